"""flaxpod's CPU training step against PyTorch eager on nanoGPT's two shakespeare shapes, in one invocation.

    python -m tools.bench_cpu --torch-ref ../shared/bench/torch_ref.py [--shapes small,big]
        [--rounds 5] [--json OUT] [key.sub=value ...]

Shapes (configs/shakespeare_char.yaml with overrides, 65 token ids, random batches):
  small  nanoGPT's CPU recipe: 4 layers, 4 heads, 128 wide, context 64, batch 12
  big    nanoGPT's GPU shakespeare shape run on the CPU: 6 layers, 6 heads, 384 wide, context 256, batch 16

Three sides per shape, alternated round by round with the order rotated (these machines are noisy):
  flaxpod    the real training code (tools/bench_vs_torch.py's Trainer), in this process, on the CPU
             devices a training job claims (sharding/cpu_devices.py: one per core that the batch splits
             across; `mesh.cpu_devices=1` measures JAX's single device with a thread pool)
  twin       tools/torch_reference.py, PyTorch eager with flaxpod's weights, in this process
  torch_ref  an independent PyTorch GPT (--torch-ref, checked bit-identical to nanoGPT's step), run
             as a fresh process each round; its own median ms/step over the round's timed steps
With several shapes each runs in its own child process, set up as its training job would be (the CPU
devices and glibc's allocator settings are fixed per process before JAX starts; sharding/cpu_devices.py).
The ratio is reported against the FASTER PyTorch side (a slow reference flatters flaxpod), with
the load average before and after. Compilation and warm-up are excluded everywhere.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import jax
from flaxpod.sharding.cpu_devices import auto_cpu_device_count, prepare_cpu_backend
from flaxpod.train.config import Config, micro_batch_size

from tools.bench_vs_torch import CHAR_VOCAB, DEFAULT_CONFIG, bench_config, build_flaxpod, build_torch, random_batches

SHAPES = {
    "small": {"n_layer": 4, "n_head": 4, "d_model": 128, "seq_len": 64, "batch_size": 12, "steps": 20},
    "big": {"n_layer": 6, "n_head": 6, "d_model": 384, "seq_len": 256, "batch_size": 16, "steps": 3},
}
PARITY_TOLERANCE = 1e-4


def shape_overrides(shape: dict) -> list[str]:
    model = [f"model.{k}={shape[k]}" for k in ("n_layer", "n_head", "d_model", "seq_len")]
    return [*model, f"data.batch_size={shape['batch_size']}"]


def shape_config(name: str, overrides: list[str]) -> Config:
    return bench_config(DEFAULT_CONFIG, [*shape_overrides(SHAPES[name]), *overrides], CHAR_VOCAB)


@dataclass
class TorchRefSide:
    """torch_ref.py in a subprocess: each call runs `warmup + steps` steps and reads its median."""

    script: Path
    shape: dict
    warmup: int
    name: str = "torch_ref"
    seconds: list[float] = field(default_factory=list)

    def round(self, steps: int) -> float:
        s = self.shape
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "ref.json"
            cmd = [
                sys.executable, str(self.script), "--n_layer", str(s["n_layer"]), "--n_head", str(s["n_head"]),
                "--n_embd", str(s["d_model"]), "--block_size", str(s["seq_len"]),
                "--batch_size", str(s["batch_size"]), "--vocab", str(CHAR_VOCAB), "--bias", "0",
                "--iters", str(self.warmup + steps), "--warmup", str(self.warmup), "--json", str(out),
            ]  # fmt: skip
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            return json.loads(out.read_text())["median_ms"] / 1e3


def bench_shape(name: str, ref_script: Path | None, rounds: int, warmup: int, overrides: list[str]) -> dict:
    shape = SHAPES[name]
    steps = shape["steps"]
    cfg = shape_config(name, overrides)
    batches = random_batches(cfg, CHAR_VOCAB, 8, seed=cfg.seed)
    devices = jax.devices()[: auto_cpu_device_count(cfg.mesh, micro_batch_size(cfg), jax.device_count())]
    flax = build_flaxpod(cfg, devices=devices)
    twin = build_torch(cfg, flax.initial_params)
    twin.name = "twin"
    t0 = time.perf_counter()
    flax_loss = flax.side.wait(flax.side.step(batches[0]))
    compile_seconds = time.perf_counter() - t0
    twin_loss = twin.wait(twin.step(batches[0]))
    if abs(flax_loss - twin_loss) > PARITY_TOLERANCE:
        raise RuntimeError(f"parity: first-step loss flaxpod {flax_loss:.6f} vs twin {twin_loss:.6f}")
    for side in (flax.side, twin):
        side.timed(batches, warmup)
    sides: list = [flax.side, twin]
    if ref_script is not None:
        sides.append(TorchRefSide(ref_script, shape, warmup))
    for r in range(rounds):
        for side in sides[r % len(sides) :] + sides[: r % len(sides)]:
            if isinstance(side, TorchRefSide):
                side.seconds.append(side.round(steps))
            else:
                side.seconds.append(side.timed(batches, steps)[0])
    medians = {side.name: statistics.median(side.seconds) for side in sides}
    fastest_torch = min(v for k, v in medians.items() if k != "flaxpod")
    return {
        "shape": shape,
        "overrides": overrides,
        "steps_per_round": steps,
        "flaxpod_devices": len(devices),
        "process_id": os.getpid(),
        "rounds": rounds,
        "compile_seconds": compile_seconds,
        "first_loss": {"flaxpod": flax_loss, "twin": twin_loss},
        "ms_per_step": {k: v * 1e3 for k, v in medians.items()},
        "ms_per_step_rounds": {side.name: [s * 1e3 for s in side.seconds] for side in sides},
        "ratio_fastest_torch_over_flaxpod": fastest_torch / medians["flaxpod"],
    }


def bench_in_own_process(name: str, args: argparse.Namespace) -> dict:
    """This benchmark for one shape in a child process: each shape gets the process set-up its own
    training job gets (the CPU devices and glibc's allocator settings are per process and fixed before
    JAX starts), as `--shapes NAME` alone would."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "shape.json"
        cmd = [sys.executable, "-m", "tools.bench_cpu", *args.overrides, "--shapes", name, "--json", str(out)]
        cmd += ["--rounds", str(args.rounds), "--warmup", str(args.warmup)]
        cmd += ["--torch-ref", args.torch_ref] if args.torch_ref else []
        child = subprocess.run(cmd, stdout=subprocess.DEVNULL)
        if child.returncode != 0:
            raise SystemExit(child.returncode)  # the child printed its error
        return json.loads(out.read_text())["shapes"][name]


def format_table(results: dict) -> str:
    lines = [
        f"load average before {results['load_average'][0]:.2f}, after {results['load_average'][1]:.2f} "
        f"({os.cpu_count()} CPUs); XLA_FLAGS={os.environ.get('XLA_FLAGS') or '(none)'}; flaxpod on "
        + ", ".join(f"{r['flaxpod_devices']} devices ({name})" for name, r in results["shapes"].items()),
        f"{'shape':<7}{'flaxpod ms':>12}{'twin ms':>10}{'torch_ref ms':>14}{'ratio':>8}"
        "  (fastest torch / flaxpod; > 1: flaxpod faster)",
    ]
    for name, r in results["shapes"].items():
        ms = r["ms_per_step"]
        ref = f"{ms['torch_ref']:>14.1f}" if "torch_ref" in ms else f"{'-':>14}"
        lines.append(
            f"{name:<7}{ms['flaxpod']:>12.1f}{ms['twin']:>10.1f}{ref}{r['ratio_fastest_torch_over_flaxpod']:>8.3f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_cpu", description=__doc__.split("\n")[0])
    parser.add_argument("overrides", nargs="*", help="extra key.sub=value overrides for flaxpod and the twin")
    parser.add_argument("--torch-ref", help="path of torch_ref.py (e.g. ../shared/bench/torch_ref.py)")
    parser.add_argument("--shapes", default="small,big", help=f"comma-separated, of {sorted(SHAPES)}")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
    parser.add_argument("--json", help="write the figures to this JSON file")
    args = parser.parse_args(argv)

    from flaxpod.train.cli import run_guarded

    def job() -> None:
        if args.rounds <= 0 or args.warmup < 0:
            raise ValueError(f"--rounds must be positive and --warmup not negative, got {args.rounds}, {args.warmup}")
        names = args.shapes.split(",")
        unknown = [n for n in names if n not in SHAPES]
        if unknown:
            raise ValueError(f"--shapes: unknown {unknown}, expected some of {sorted(SHAPES)}")
        ref = Path(args.torch_ref) if args.torch_ref else None
        if ref is not None and not ref.is_file():
            raise ValueError(f"--torch-ref: {ref} is not a file")
        load_before = os.getloadavg()[0]
        if len(names) == 1:
            # Before anything starts JAX's backends: the devices (and allocator) `flaxpod pretrain` sets up
            # for this shape.
            prepare_cpu_backend(shape_config(names[0], args.overrides))
            shapes = {names[0]: bench_shape(names[0], ref, args.rounds, args.warmup, args.overrides)}
        else:
            for n in names:  # bad overrides: the one-line error here, before any child starts
                shape_config(n, args.overrides)
            shapes = {n: bench_in_own_process(n, args) for n in names}
        results = {"shapes": shapes, "load_average": [load_before, os.getloadavg()[0]], "command": " ".join(sys.argv)}
        results["xla_flags"] = os.environ.get("XLA_FLAGS", "")
        print(format_table(results), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2) + "\n")

    return run_guarded(job)


if __name__ == "__main__":
    sys.exit(main())
