"""Multi-process start-up and the local launcher, with real processes on 127.0.0.1."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import pytest
from flaxpod.sharding import distributed, launch

REPO_ROOT = Path(__file__).resolve().parents[1]
FLAXPOD_VARS = (
    distributed.NUM_PROCESSES_ENV,
    distributed.PROCESS_ID_ENV,
    distributed.COORDINATOR_ADDRESS_ENV,
    distributed.AUTO_DISTRIBUTED_ENV,
)


@pytest.fixture
def child_env(monkeypatch):
    """Children start without this process's FLAXPOD_* variables (they import the installed flaxpod)."""
    for name in FLAXPOD_VARS:
        monkeypatch.delenv(name, raising=False)


def _script(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


def _wait_for(path: Path, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def _is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# --- the real thing: 2 JAX processes x 4 CPU devices --------------------------------------


GLOBAL_SUM_SCRIPT = """
    from flaxpod.sharding.distributed import initialize_from_env, is_main_process

    initialize_from_env()

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    assert jax.process_count() == 2, jax.process_count()
    assert jax.device_count() == 8, jax.device_count()
    assert jax.local_device_count() == 4, jax.local_device_count()
    mesh = Mesh(np.array(jax.devices()), ("data",))
    rank = jax.process_index()
    # 4 rows of 3 per process; process 1's rows are shifted by 100 so each process's share
    # shows in the sum: 2 * (0 + ... + 11) + 12 * 100 = 1332.
    rows = np.arange(12, dtype=np.float32).reshape(4, 3) + 100 * rank
    batch = jax.make_array_from_process_local_data(
        NamedSharding(mesh, PartitionSpec("data")), rows, (8, 3)
    )
    total = jax.jit(jnp.sum)(batch)
    print(f"rank={rank} main={is_main_process()} shape={batch.shape} global_sum={float(total)}")
"""


def test_two_processes_four_devices_compute_a_global_sum(tmp_path, capsys, child_env):
    script = _script(tmp_path, "global_sum.py", GLOBAL_SUM_SCRIPT)
    argv = ["--num-processes", "2", "--devices-per-process", "4", "--", sys.executable, script]
    code = launch.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 0, out + err
    lines = out.splitlines()
    assert "[p0] rank=0 main=True shape=(8, 3) global_sum=1332.0" in lines, out
    assert "[p1] rank=1 main=False shape=(8, 3) global_sum=1332.0" in lines, out


# --- failures and signals ---------------------------------------------------------------


def test_failing_child_stops_the_sleeping_one(tmp_path, capsys, child_env):
    script = _script(
        tmp_path,
        "fail.py",
        f"""
        import os, sys, time
        from pathlib import Path
        pid_file = Path({str(tmp_path)!r}) / "sleeper.pid"
        if os.environ["FLAXPOD_PROCESS_ID"] == "0":
            pid_file.write_text(str(os.getpid()))
            time.sleep(300)
        else:
            while not pid_file.exists():
                time.sleep(0.02)
            sys.exit(3)
        """,
    )
    start = time.monotonic()
    code = launch.main(["--num-processes", "2", "--", sys.executable, str(script)])
    elapsed = time.monotonic() - start
    _, err = capsys.readouterr()
    assert code == 3
    assert elapsed < 30
    assert not _is_alive(int((tmp_path / "sleeper.pid").read_text()))
    assert "flaxpod launch: process 1 exited with code 3; stopping 1 other process(es)" in err


def test_child_ignoring_sigterm_is_killed_after_the_grace_period(tmp_path, capsys, child_env):
    script = _script(
        tmp_path,
        "stubborn.py",
        f"""
        import os, signal, sys, time
        from pathlib import Path
        pid_file = Path({str(tmp_path)!r}) / "stubborn.pid"
        if os.environ["FLAXPOD_PROCESS_ID"] == "0":
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            pid_file.write_text(str(os.getpid()))
            time.sleep(300)
        else:
            while not pid_file.exists():
                time.sleep(0.02)
            os.kill(os.getpid(), signal.SIGSEGV)
        """,
    )
    argv = ["--num-processes", "2", "--grace-period", "0.5", "--", sys.executable, str(script)]
    start = time.monotonic()
    code = launch.main(argv)
    elapsed = time.monotonic() - start
    _, err = capsys.readouterr()
    assert code == 128 + signal.SIGSEGV
    assert 0.5 <= elapsed < 30
    assert not _is_alive(int((tmp_path / "stubborn.pid").read_text()))
    assert "process 1 was killed by signal SIGSEGV" in err
    assert "sending SIGKILL" in err


def test_sigterm_to_the_launcher_reaches_every_child(tmp_path, child_env):
    script = _script(
        tmp_path,
        "wait_for_term.py",
        f"""
        import os, signal, sys, time
        from pathlib import Path
        out = Path({str(tmp_path)!r})
        rank = os.environ["FLAXPOD_PROCESS_ID"]

        def on_term(signum, frame):
            (out / f"term{{rank}}").write_text("got SIGTERM")
            sys.exit(0)

        signal.signal(signal.SIGTERM, on_term)
        (out / f"ready{{rank}}").write_text("")
        time.sleep(300)
        """,
    )
    launcher = subprocess.Popen(
        [sys.executable, "-m", "flaxpod.sharding.launch", "--num-processes", "2", "--"] + [sys.executable, str(script)],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for(tmp_path / "ready0")
        _wait_for(tmp_path / "ready1")
        launcher.send_signal(signal.SIGTERM)
        _, err = launcher.communicate(timeout=30)
    finally:
        launcher.kill()
    assert launcher.returncode == 128 + signal.SIGTERM, err
    assert (tmp_path / "term0").read_text() == "got SIGTERM"
    assert (tmp_path / "term1").read_text() == "got SIGTERM"
    assert "got SIGTERM, forwarding it" in err


def test_large_outputs_are_streamed_with_prefixes(tmp_path, capsys, child_env):
    # Far more than a pipe buffer (64 KiB) on both streams: reading one pipe at a time
    # would deadlock.
    script = _script(
        tmp_path,
        "chatty.py",
        """
        import os, sys
        rank = os.environ["FLAXPOD_PROCESS_ID"]
        for i in range(20000):
            print(f"out {rank} {i}")
            print(f"err {rank} {i}", file=sys.stderr)
        sys.stdout.write("no newline at the end")
        """,
    )
    code = launch.main(["--num-processes", "2", "--", sys.executable, str(script)])
    out, err = capsys.readouterr()
    assert code == 0
    for rank in (0, 1):
        out_lines = [line for line in out.splitlines() if line.startswith(f"[p{rank}] ")]
        err_lines = [line for line in err.splitlines() if line.startswith(f"[p{rank}] ")]
        expected = [f"[p{rank}] out {rank} {i}" for i in range(20000)]
        assert out_lines == [*expected, f"[p{rank}] no newline at the end"]
        assert err_lines == [f"[p{rank}] err {rank} {i}" for i in range(20000)]


# --- command line and environment -------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--num-processes", "2", "python", "x.py"], "missing '--'"),
        (["--num-processes", "0", "--", "python", "x.py"], "--num-processes must be >= 1, got 0"),
        (["--num-processes", "2", "--"], "no COMMAND after '--'"),
        (["--num-processes", "two", "--", "python"], "invalid int value: 'two'"),
        (["--", "python", "x.py"], "the following arguments are required: --num-processes"),
        (["--num-processes", "2", "--port", "70000", "--", "python"], "--port must be in"),
        (["--num-processes", "2", "--devices-per-process", "0", "--", "python"], ">= 1, got 0"),
    ],
)
def test_bad_usage_returns_2_with_one_line(argv, message, capsys):
    assert launch.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert len(err.splitlines()) == 1
    assert err.startswith("flaxpod launch: error: ")
    assert message in err


def test_unknown_command_returns_2(capsys):
    code = launch.main(["--num-processes", "2", "--", "/nonexistent/flaxpod-command"])
    assert code == 2
    assert "cannot start '/nonexistent/flaxpod-command'" in capsys.readouterr().err


def test_help_returns_0(capsys):
    assert launch.main(["--help"]) == 0
    assert "--num-processes N" in capsys.readouterr().out


def test_child_env_sets_start_up_variables_and_replaces_the_device_count():
    base = {"PATH": "/bin", "XLA_FLAGS": "--xla_foo=1 --xla_force_host_platform_device_count=8"}
    env = launch.child_env(base, 2, 1, "127.0.0.1:4321", devices_per_process=4)
    assert env["FLAXPOD_NUM_PROCESSES"] == "2"
    assert env["FLAXPOD_PROCESS_ID"] == "1"
    assert env["FLAXPOD_COORDINATOR_ADDRESS"] == "127.0.0.1:4321"
    assert env["JAX_PLATFORMS"] == "cpu"
    assert env["XLA_FLAGS"] == "--xla_foo=1 --xla_force_host_platform_device_count=4"
    assert env["PATH"] == "/bin"
    assert base["XLA_FLAGS"].endswith("=8"), "the launcher's own environment must not change"

    plain = launch.child_env({"XLA_FLAGS": "--xla_foo=1"}, 2, 0, "127.0.0.1:1")
    assert plain["XLA_FLAGS"] == "--xla_foo=1"
    assert "JAX_PLATFORMS" not in plain
    assert launch.xla_flags_with_device_count("", 3) == "--xla_force_host_platform_device_count=3"


# --- initialize_from_env in this process (jax.distributed.initialize recorded, not run) -----


@pytest.fixture
def recorded_initialize(monkeypatch):
    """Replace jax.distributed.initialize by a recorder; clear the FLAXPOD_* variables."""
    calls = []
    state = {"up": False}

    def fake_initialize(**kwargs):
        calls.append(kwargs)
        state["up"] = True

    monkeypatch.setattr(jax.distributed, "initialize", fake_initialize)
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: state["up"])
    for name in FLAXPOD_VARS:
        monkeypatch.delenv(name, raising=False)
    return calls


def test_initialize_from_env_is_a_no_op_without_variables(recorded_initialize, monkeypatch):
    distributed.initialize_from_env()
    distributed.initialize_from_env()
    monkeypatch.setenv("FLAXPOD_NUM_PROCESSES", "1")
    distributed.initialize_from_env()
    monkeypatch.setenv("FLAXPOD_AUTO_DISTRIBUTED", "0")
    distributed.initialize_from_env()
    assert recorded_initialize == []
    assert distributed.is_main_process()


@pytest.fixture
def no_cpu_collectives():
    """CPU collectives switched off, as older jax releases had by default."""
    before = jax.config.jax_cpu_collectives_implementation
    jax.config.update("jax_cpu_collectives_implementation", None)
    yield
    jax.config.update("jax_cpu_collectives_implementation", before)


def test_initialize_from_env_passes_the_variables_once(recorded_initialize, no_cpu_collectives, monkeypatch):
    monkeypatch.setenv("FLAXPOD_NUM_PROCESSES", "4")
    monkeypatch.setenv("FLAXPOD_PROCESS_ID", "3")
    monkeypatch.setenv("FLAXPOD_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    distributed.initialize_from_env()
    distributed.initialize_from_env()
    expected = {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3}
    assert recorded_initialize == [expected]
    assert jax.config.jax_cpu_collectives_implementation == "gloo"


def test_auto_distributed_lets_jax_detect_the_cluster(recorded_initialize, monkeypatch):
    monkeypatch.setenv("FLAXPOD_AUTO_DISTRIBUTED", "1")
    distributed.initialize_from_env()
    distributed.initialize_from_env()
    assert recorded_initialize == [{}]


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"FLAXPOD_NUM_PROCESSES": "two"}, "FLAXPOD_NUM_PROCESSES must be an integer >= 1"),
        ({"FLAXPOD_NUM_PROCESSES": "0"}, "FLAXPOD_NUM_PROCESSES must be an integer >= 1"),
        (
            {"FLAXPOD_NUM_PROCESSES": "2", "FLAXPOD_COORDINATOR_ADDRESS": "127.0.0.1:5"},
            "FLAXPOD_PROCESS_ID must be set",
        ),
        (
            {"FLAXPOD_NUM_PROCESSES": "2", "FLAXPOD_PROCESS_ID": "-1"},
            "FLAXPOD_PROCESS_ID must be an integer >= 0, got '-1'",
        ),
        (
            {"FLAXPOD_NUM_PROCESSES": "2", "FLAXPOD_PROCESS_ID": "2"},
            "FLAXPOD_PROCESS_ID=2 must be below FLAXPOD_NUM_PROCESSES=2",
        ),
        (
            {"FLAXPOD_NUM_PROCESSES": "2", "FLAXPOD_PROCESS_ID": "0"},
            "FLAXPOD_COORDINATOR_ADDRESS must be 'host:port'",
        ),
        (
            {
                "FLAXPOD_NUM_PROCESSES": "2",
                "FLAXPOD_PROCESS_ID": "0",
                "FLAXPOD_COORDINATOR_ADDRESS": "127.0.0.1",
            },
            "must be 'host:port' (e.g. 127.0.0.1:12345), got '127.0.0.1'",
        ),
        ({"FLAXPOD_PROCESS_ID": "1"}, "FLAXPOD_PROCESS_ID is set but FLAXPOD_NUM_PROCESSES is not"),
        ({"FLAXPOD_AUTO_DISTRIBUTED": "yes"}, "FLAXPOD_AUTO_DISTRIBUTED must be 0 or 1, got 'yes'"),
    ],
)
def test_bad_variables_raise_one_clear_error(recorded_initialize, monkeypatch, env, message):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError) as info:
        distributed.initialize_from_env()
    assert message in str(info.value)
    assert recorded_initialize == []
