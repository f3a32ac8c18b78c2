"""Local launcher: run one command as N JAX processes on 127.0.0.1.

    flaxpod launch --num-processes 2 --devices-per-process 4 -- flaxpod pretrain cfg.yaml
    python -m sharding.launch --num-processes 2 -- python -m train.pretrain cfg.yaml

Each child gets ``FLAXPOD_NUM_PROCESSES``, ``FLAXPOD_PROCESS_ID`` and
``FLAXPOD_COORDINATOR_ADDRESS`` (read by :func:`sharding.distributed.initialize_from_env`),
so it takes the same multi-process code path as a TPU or GPU pod, with Gloo collectives on
CPU. ``--devices-per-process K`` gives every child K fake CPU devices. Child output is
streamed line by line, prefixed ``[p0] ``, ``[p1] ``, ... If one child fails, the others are
stopped (SIGTERM, then SIGKILL after ``--grace-period`` seconds) and its exit code is
returned; SIGINT/SIGTERM sent to the launcher are forwarded to the children.

With ``--target tpu-vm|gke|slurm`` it instead writes or prints the files that start a run on a pod
(a TPU VM script, a GKE JobSet, an sbatch script), checked against the run's config: see
:mod:`flaxpod.sharding.targets.cli`. On a pod no local launcher runs: each host's process joins the
job through :mod:`flaxpod.sharding.distributed`.
"""

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import TextIO

from flaxpod.model.errors import InputError
from flaxpod.sharding.distributed import COORDINATOR_ADDRESS_ENV, NUM_PROCESSES_ENV, PROCESS_ID_ENV

PROG = "flaxpod launch"
DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
POLL_INTERVAL_S = 0.05
# Reader threads drain what is left in the pipes after the children exit; a grandchild that
# kept a pipe open must not hang the launcher.
READER_JOIN_TIMEOUT_S = 5.0


class UsageError(InputError):
    """Bad command line; reported as one line with exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        usage=f"{PROG} --num-processes N [--devices-per-process K] [--port P] [--grace-period S] -- COMMAND [ARGS...]",
        description="Run COMMAND as N JAX processes on 127.0.0.1. "
        "For pods: flaxpod launch --target {tpu-vm,gke,slurm} --help.",
    )
    parser.add_argument("--num-processes", type=int, required=True, metavar="N")
    parser.add_argument(
        "--devices-per-process",
        type=int,
        metavar="K",
        help="give each child K fake CPU devices (sets JAX_PLATFORMS=cpu and XLA_FLAGS)",
    )
    parser.add_argument("--port", type=int, metavar="P", help="coordinator port (default: a free one)")
    parser.add_argument(
        "--grace-period",
        type=float,
        default=10.0,
        metavar="S",
        help="seconds between SIGTERM and SIGKILL when stopping children (default 10)",
    )
    return parser


def _parse(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = _build_parser()
    if "--" not in argv:
        if "-h" in argv or "--help" in argv:
            parser.parse_args(["--help"])  # prints help and exits 0
        raise UsageError("missing '--' between the launcher options and COMMAND")
    split = list(argv).index("--")
    args = parser.parse_args(argv[:split])
    command = list(argv[split + 1 :])
    if not command:
        raise UsageError("no COMMAND after '--'")
    if args.num_processes < 1:
        raise UsageError(f"--num-processes must be >= 1, got {args.num_processes}")
    if args.devices_per_process is not None and args.devices_per_process < 1:
        raise UsageError(f"--devices-per-process must be >= 1, got {args.devices_per_process}")
    if args.port is not None and not 0 < args.port < 65536:
        raise UsageError(f"--port must be in 1..65535, got {args.port}")
    if args.grace_period < 0:
        raise UsageError(f"--grace-period must be >= 0, got {args.grace_period}")
    return args, command


def free_port() -> int:
    """A TCP port that is free now (the OS picks it; another program could take it later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def xla_flags_with_device_count(xla_flags: str, devices: int) -> str:
    """``xla_flags`` with any device-count flag replaced by one asking for ``devices``."""
    kept = [
        flag for flag in xla_flags.split() if flag != DEVICE_COUNT_FLAG and not flag.startswith(DEVICE_COUNT_FLAG + "=")
    ]
    return " ".join([*kept, f"{DEVICE_COUNT_FLAG}={devices}"])


def child_env(
    base: Mapping[str, str],
    num_processes: int,
    process_id: int,
    coordinator_address: str,
    devices_per_process: int | None = None,
) -> dict[str, str]:
    """Environment of child ``process_id``: ``base`` plus the distributed start-up variables."""
    env = dict(base)
    env[NUM_PROCESSES_ENV] = str(num_processes)
    env[PROCESS_ID_ENV] = str(process_id)
    env[COORDINATOR_ADDRESS_ENV] = coordinator_address
    # Children write into pipes, where Python would buffer whole blocks; unbuffered output
    # keeps the interleaving of the children's lines close to real time.
    env.setdefault("PYTHONUNBUFFERED", "1")
    if devices_per_process is not None:
        env["JAX_PLATFORMS"] = "cpu"
        env["XLA_FLAGS"] = xla_flags_with_device_count(env.get("XLA_FLAGS", ""), devices_per_process)
    return env


def _pump(pipe: TextIO, stream_name: str, prefix: str, lock: threading.Lock) -> None:
    # The sink is looked up per line so that a replaced sys.stdout (tests) is honoured.
    with pipe:
        for line in pipe:
            if not line.endswith("\n"):
                line += "\n"
            with lock:
                sink = getattr(sys, stream_name)
                sink.write(prefix + line)
                sink.flush()


def _say(message: str, lock: threading.Lock) -> None:
    with lock:
        print(f"{PROG}: {message}", file=sys.stderr, flush=True)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    # Each child leads its own process group, so wrapper scripts' own children get it too.
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def _describe(code: int) -> str:
    if code < 0:
        return f"was killed by signal {signal.Signals(-code).name}"
    return f"exited with code {code}"


def _exit_status(code: int) -> int:
    # Shell convention for a death by signal, so the launcher's own status stays in 1..255.
    return 128 - code if code < 0 else code


class _Supervisor:
    """Start the children, watch them, stop them all when one fails or on a signal."""

    def __init__(self, command: list[str], envs: list[dict[str, str]], grace_period: float):
        self.command = command
        self.envs = envs
        self.grace_period = grace_period
        self.lock = threading.Lock()
        self.procs: list[subprocess.Popen] = []
        self.readers: list[threading.Thread] = []
        self.pending_signals: list[int] = []

    def on_signal(self, signum: int, frame: object) -> None:
        self.pending_signals.append(signum)

    def start(self) -> None:
        for rank, env in enumerate(self.envs):
            proc = subprocess.Popen(
                self.command,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                encoding="utf-8",
                errors="replace",
                process_group=0,
            )
            self.procs.append(proc)
            for pipe, name in ((proc.stdout, "stdout"), (proc.stderr, "stderr")):
                reader = threading.Thread(target=_pump, args=(pipe, name, f"[p{rank}] ", self.lock), daemon=True)
                reader.start()
                self.readers.append(reader)

    def stop_all(self, sig: int) -> None:
        for proc in self.procs:
            _signal_group(proc, sig)

    def run(self) -> int:
        """Wait for the children; returns the launcher's exit status."""
        failure: int | None = None
        interrupted: int | None = None
        kill_at: float | None = None
        while True:
            codes = [proc.poll() for proc in self.procs]
            if failure is None and interrupted is None:
                for rank, code in enumerate(codes):
                    if code:
                        failure = code
                        others = sum(c is None for c in codes)
                        _say(
                            f"process {rank} {_describe(code)}; stopping {others} other process(es)",
                            self.lock,
                        )
                        self.stop_all(signal.SIGTERM)
                        kill_at = time.monotonic() + self.grace_period
                        break
            while self.pending_signals:
                signum = self.pending_signals.pop(0)
                if interrupted is None:
                    interrupted = signum
                    _say(f"got {signal.Signals(signum).name}, forwarding it", self.lock)
                    self.stop_all(signum)
                    if kill_at is None:
                        kill_at = time.monotonic() + self.grace_period
                else:
                    kill_at = time.monotonic()  # a second signal: stop waiting
            if all(code is not None for code in codes):
                break
            if kill_at is not None and time.monotonic() >= kill_at:
                _say("grace period over, sending SIGKILL", self.lock)
                self.stop_all(signal.SIGKILL)
                kill_at = float("inf")
            time.sleep(POLL_INTERVAL_S)
        self.join_readers()
        if interrupted is not None:
            return 128 + interrupted
        return 0 if failure is None else _exit_status(failure)

    def join_readers(self) -> None:
        deadline = time.monotonic() + READER_JOIN_TIMEOUT_S
        for reader in self.readers:
            reader.join(max(0.0, deadline - time.monotonic()))


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``flaxpod launch``; ``argv`` excludes the ``launch`` word itself."""
    argv = sys.argv[1:] if argv is None else argv
    options = argv[: argv.index("--")] if "--" in argv else argv
    if any(word == "--target" or word.startswith("--target=") for word in options):
        # Pod targets read train's config: imported only when asked for.
        from flaxpod.sharding.targets.cli import main as pod_main

        return pod_main(argv)
    try:
        args, command = _parse(argv)
    except UsageError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    except SystemExit as exit_:  # --help
        return int(exit_.code or 0)

    port = args.port if args.port is not None else free_port()
    address = f"127.0.0.1:{port}"
    envs = [
        child_env(os.environ, args.num_processes, rank, address, args.devices_per_process)
        for rank in range(args.num_processes)
    ]
    supervisor = _Supervisor(command, envs, args.grace_period)
    handled = (signal.SIGINT, signal.SIGTERM)
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.getsignal(sig) for sig in handled} if in_main_thread else {}
    try:
        for sig in previous:
            signal.signal(sig, supervisor.on_signal)
        _say(f"starting {args.num_processes} process(es), coordinator {address}", supervisor.lock)
        try:
            supervisor.start()
        except OSError as err:
            supervisor.stop_all(signal.SIGKILL)
            for proc in supervisor.procs:
                proc.wait()
            print(f"{PROG}: error: cannot start {command[0]!r}: {err}", file=sys.stderr)
            return 2
        return supervisor.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())
