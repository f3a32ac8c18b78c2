"""flaxpod's training step against a PyTorch eager twin of the same model, in one process.

    python -m tools.bench_vs_torch [--config configs/shakespeare_char.yaml]
        [key.sub=value ...] [--steps 50] [--rounds 5] [--vocab 65] [--json OUT]
        [--variant "model.scan_layers=false" ...]

Both sides start from the same weights (flaxpod's initial parameters copied into PyTorch) and must
give the same first-step loss; that is checked and printed before anything is timed. The flaxpod
side is the real training code (the one Trainer, train/trainer.py, on a one-device mesh: its
init_state and jitted step, batches placed with Trainer.put every step); the PyTorch side is
nanoGPT-style eager code with AdamW, the same schedule and clipping, and as many threads as usable
CPUs (torch.set_num_threads). Compilation and warm-up are excluded; then each round times --steps
steps of every side, rotating the order each round because these machines are noisy, and the medians
over rounds are reported. `--variant` adds flaxpod runs with extra overrides (e.g. another attention
kernel) to the same rotation.

MFU uses train.flops (6N + 12 L d T per token, LM head not counted) against the FLOP/s of a
1024x1024 float32 jnp matmul measured in this process.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import jax
import numpy as np
from flaxpod.train.config import Config, ConfigError, load_config
from flaxpod.train.dispatch import StepWindow
from flaxpod.train.flops import flops_per_token, measure_matmul_flops
from flaxpod.train.loop import VOCAB_MULTIPLE
from flaxpod.train.optimizer import make_optimizer
from flaxpod.train.trainer import Trainer

DEFAULT_CONFIG = "configs/shakespeare_char.yaml"
CHAR_VOCAB = 65  # tiny shakespeare's characters, as nanoGPT's shakespeare_char
PARITY_TOLERANCE = {"float32": 1e-4, "bfloat16": 5e-2}
NpBatch = dict[str, np.ndarray]


def bench_config(path: str, overrides: list[str], vocab: int) -> Config:
    """The config with the derived model fields the loop would fill from a tokenizer: vocab_size
    (model.vocab_size, else `vocab` rounded up to 64 rows) and max_seq_len."""
    cfg = load_config(path, overrides)
    m = cfg.model
    if m.vocab_size and vocab > m.vocab_size:
        raise ConfigError(f"--vocab: {vocab} token ids do not fit model.vocab_size={m.vocab_size}")
    rows = m.vocab_size or -(-vocab // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    model = dataclasses.replace(m, vocab_size=rows, max_seq_len=m.max_len)
    from tools.torch_reference import check_supported

    check_supported(model)
    return dataclasses.replace(cfg, model=model)


def random_batches(cfg: Config, vocab: int, count: int, seed: int = 0) -> list[NpBatch]:
    """`count` batches of uniform random token ids (timing does not depend on the text)."""
    rng = np.random.default_rng(seed)
    shape = (cfg.data.batch_size, cfg.model.seq_len + 1)
    out = []
    for _ in range(count):
        rows = rng.integers(0, vocab, size=shape, dtype=np.int32)
        out.append({"inputs": rows[:, :-1].copy(), "targets": rows[:, 1:].copy()})
    return out


@dataclass
class Side:
    """One implementation under test: `step(batch)` runs one training step and returns its
    loss (maybe not yet computed); `wait(loss)` blocks until that work is done."""

    name: str
    step: Callable[[NpBatch], object]
    wait: Callable[[object], float]
    seconds: list[float] = field(default_factory=list)
    cpu_seconds: list[float] = field(default_factory=list)

    def timed(self, batches: list[NpBatch], n: int) -> tuple[float, float]:
        """(wall seconds, process CPU seconds) per step over `n` steps. CPU time counts every
        thread of this process, and only this side runs meanwhile, so it is this side's work;
        it is less disturbed than wall time when other processes share the cores."""
        t0, c0 = time.perf_counter(), time.process_time()
        loss = None
        for i in range(n):
            loss = self.step(batches[i % len(batches)])
        if loss is not None:  # n = 0 (no warm-up): nothing to wait for
            self.wait(loss)
        return (time.perf_counter() - t0) / max(n, 1), (time.process_time() - c0) / max(n, 1)


@dataclass
class FlaxpodBuild:
    side: Side
    initial_params: dict
    n_nonembed: int
    compile_seconds: float = 0.0


def data_parallel_trainer(cfg: Config, devices: list) -> Trainer:
    """The real Trainer for `cfg` with the batch split over `devices` (a data-parallel mesh)."""
    mesh = dataclasses.replace(cfg.mesh, data=len(devices), fsdp=1, tensor=1)
    return Trainer.from_config(dataclasses.replace(cfg, mesh=mesh), devices=devices)


def one_device_trainer(cfg: Config) -> Trainer:
    """The real Trainer for `cfg` on a 1x1x1 mesh of the first device."""
    return data_parallel_trainer(cfg, jax.devices()[:1])


def build_flaxpod(cfg: Config, name: str = "flaxpod", devices: list | None = None) -> FlaxpodBuild:
    """The real training code on a one-device mesh (or data-parallel over `devices`), exactly as
    train/loop.py assembles it."""
    trainer = one_device_trainer(cfg) if devices is None else data_parallel_trainer(cfg, devices)
    holder = {"state": trainer.init_state(cfg.seed)}
    initial = jax.tree.map(np.asarray, jax.device_get(holder["state"].params))
    window = StepWindow()  # as far ahead of the devices as train/loop.py's host runs

    def step(batch: NpBatch):
        holder["state"], metrics = trainer.step(holder["state"], trainer.put(batch))
        window.dispatched(metrics)
        return metrics["loss"]

    def wait(loss) -> float:
        return float(jax.block_until_ready(loss))

    n_nonembed = trainer.param_counts()[1]
    return FlaxpodBuild(Side(name, step, wait), initial, n_nonembed)


def build_torch(cfg: Config, params: dict, adamw: str = "foreach") -> Side:
    import torch

    from tools.torch_reference import (
        TorchTransformer,
        load_flaxpod_params,
        make_torch_optimizer,
        make_torch_step,
    )

    torch.set_num_threads(_usable_cpus())
    model = TorchTransformer(cfg.model)
    load_flaxpod_params(model, params)
    opt = make_torch_optimizer(model, cfg.optim, adamw)
    _, schedule = make_optimizer(cfg.optim, cfg.train.steps)
    lr_cache: dict[int, float] = {}

    def lr_at(i: int) -> float:
        if i not in lr_cache:
            lr_cache[i] = float(schedule(i))
        return lr_cache[i]

    step_fn = make_torch_step(model, opt, cfg.optim, lr_at, cfg.train.grad_accum)
    counter = {"step": 0}

    def step(batch: NpBatch):
        i = counter["step"]
        counter["step"] += 1
        return step_fn(i, torch.from_numpy(batch["inputs"]).long(), torch.from_numpy(batch["targets"]).long())

    return Side("pytorch", step, lambda loss: float(loss))


def parity_losses(cfg: Config, steps: int = 2, vocab: int | None = None, adamw: str = "foreach") -> list[tuple]:
    """(flaxpod loss, torch loss) for each of the first `steps` steps from the same weights and
    batches; the second and later steps also compare the optimizers' updates."""
    flax_build = build_flaxpod(cfg)
    torch_side = build_torch(cfg, flax_build.initial_params, adamw)
    batches = random_batches(cfg, vocab or cfg.model.vocab_size, steps, seed=cfg.seed)
    out = []
    for batch in batches:
        out.append((flax_build.side.wait(flax_build.side.step(batch)), torch_side.wait(torch_side.step(batch))))
    return out


def run_benchmark(
    cfg: Config,
    *,
    vocab: int,
    steps: int,
    rounds: int,
    warmup: int = 3,
    variants: list[tuple[str, Config]] = (),
    adamw: str = "foreach",
) -> dict:
    """Parity check, warm-up, then `rounds` rounds of `steps` timed steps per side (order rotated
    each round). Returns the figures as a JSON-ready dict."""
    load_before = os.getloadavg()[0]
    batches = random_batches(cfg, vocab, 8, seed=cfg.seed)
    peak = measure_matmul_flops()
    base = build_flaxpod(cfg)
    builds = [base] + [build_flaxpod(v_cfg, name) for name, v_cfg in variants]
    torch_side = build_torch(cfg, base.initial_params, adamw)
    sides = [b.side for b in builds] + [torch_side]

    # First step: same weights, same batch -> same loss. Times the compilation too.
    torch_loss = torch_side.wait(torch_side.step(batches[0]))
    parity = {}
    for b in builds:
        t0 = time.perf_counter()
        loss = b.side.wait(b.side.step(batches[0]))
        b.compile_seconds = time.perf_counter() - t0
        parity[b.side.name] = loss
    tolerance = PARITY_TOLERANCE[cfg.model.dtype]
    for name, loss in parity.items():
        if abs(loss - torch_loss) > tolerance:
            raise RuntimeError(
                f"parity: first-step loss of {name} {loss:.6f} differs from PyTorch's {torch_loss:.6f} "
                f"by more than {tolerance}: the two do not implement the same model"
            )
    for side in sides:
        side.timed(batches, warmup)

    for r in range(rounds):
        order = sides[r % len(sides) :] + sides[: r % len(sides)]
        for side in order:
            wall, cpu = side.timed(batches, steps)
            side.seconds.append(wall)
            side.cpu_seconds.append(cpu)

    tokens = cfg.data.batch_size * cfg.model.seq_len
    flops_tok = flops_per_token(cfg.model.n_layer, cfg.model.d_model, cfg.model.seq_len, base.n_nonembed)
    torch_median = statistics.median(torch_side.seconds)
    figures = {}
    for side in sides:
        median = statistics.median(side.seconds)
        figures[side.name] = {
            "ms_per_step_median": median * 1e3,
            "ms_per_step_min": min(side.seconds) * 1e3,
            "ms_per_step_rounds": [s * 1e3 for s in side.seconds],
            "cpu_ms_per_step_median": statistics.median(side.cpu_seconds) * 1e3,
            "tokens_per_sec": tokens / median,
            "mfu": tokens / median * flops_tok / peak,
            "torch_over_this": torch_median / median,
        }
    for b in builds:
        figures[b.side.name]["compile_seconds"] = b.compile_seconds
        figures[b.side.name]["first_loss"] = parity[b.side.name]
    figures["pytorch"]["first_loss"] = torch_loss
    return {
        "model": dataclasses.asdict(cfg.model),
        "batch_size": cfg.data.batch_size,
        "tokens_per_step": tokens,
        "params_nonembedding": base.n_nonembed,
        "flops_per_token": flops_tok,
        "peak_flops": peak,
        "peak_source": "measured 1024x1024 float32 jnp matmul",
        "threads": {"torch": _torch_threads(), "cpu_count": os.cpu_count(), "usable_cpus": _usable_cpus()},
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "load_average": [load_before, os.getloadavg()[0]],
        "steps_per_round": steps,
        "rounds": rounds,
        "parity_tolerance": tolerance,
        "sides": figures,
        "ratio_torch_over_flaxpod": figures[base.side.name]["torch_over_this"],
    }


def pin_cpus(n: int) -> None:
    """Restricts this process (XLA's and PyTorch's thread pools, created later) to n CPUs."""
    usable = sorted(os.sched_getaffinity(0))
    if not 0 < n <= len(usable):
        raise ValueError(f"--cpus: expected 1..{len(usable)} (the usable CPUs), got {n}")
    os.sched_setaffinity(0, usable[:n])


def _usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def format_report(result: dict) -> str:
    m, threads = result["model"], result["threads"]
    lines = [
        f"model: {m['family']}, {m['n_layer']} layers, {m['n_head']} heads, d_model {m['d_model']}, "
        f"seq {m['seq_len']}, batch {result['batch_size']}, vocab {m['vocab_size']} rows, {m['dtype']}; "
        f"{result['params_nonembedding'] / 1e6:.3f}M non-embedding parameters",
        f"threads: torch {threads['torch']}, {threads['usable_cpus']} usable of {threads['cpu_count']} CPUs; "
        f"XLA_FLAGS={result['xla_flags'] or '(none)'}",
        f"peak {result['peak_flops'] / 1e9:.1f} GFLOP/s ({result['peak_source']}); "
        f"{result['flops_per_token'] / 1e6:.3f} MFLOP per token",
    ]
    torch_loss = result["sides"]["pytorch"]["first_loss"]
    for name, fig in result["sides"].items():
        if name != "pytorch":
            lines.append(
                f"parity: first-step loss {name} {fig['first_loss']:.6f} vs pytorch {torch_loss:.6f} "
                f"(|diff| {abs(fig['first_loss'] - torch_loss):.1e} <= {result['parity_tolerance']:g})"
            )
    lines.append(
        f"{result['rounds']} rounds x {result['steps_per_round']} steps per side, order rotated each round; "
        "compile and warm-up excluded; medians over rounds"
    )
    width = max(len(n) for n in result["sides"]) + 2
    lines.append(
        f"{'':<{width}}{'ms/step':>9}{'min':>9}{'cpu ms':>9}{'tokens/s':>10}{'MFU':>7}"
        f"{'torch/this':>12}{'compile s':>11}"
    )
    for name, fig in result["sides"].items():
        compile_s = f"{fig['compile_seconds']:.1f}" if "compile_seconds" in fig else "-"
        lines.append(
            f"{name:<{width}}{fig['ms_per_step_median']:>9.2f}{fig['ms_per_step_min']:>9.2f}"
            f"{fig['cpu_ms_per_step_median']:>9.1f}{fig['tokens_per_sec']:>10,.0f}{fig['mfu'] * 100:>6.1f}%"
            f"{fig['torch_over_this']:>12.3f}{compile_s:>11}"
        )
    ratio = result["ratio_torch_over_flaxpod"]
    verdict = "flaxpod faster" if ratio > 1 else "PyTorch faster"
    lines.append(f"ratio torch/flaxpod = {ratio:.3f} ({verdict}; > 1 means flaxpod is faster)")
    load = max(result["load_average"])
    if load > threads["usable_cpus"] + 0.5:
        lines.append(
            f"warning: load average {load:.1f} on {threads['cpu_count']} CPUs: other processes share the cores; "
            "wall times are inflated (multi-threaded PyTorch suffers most) and the ratio is not trustworthy"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="flaxpod bench-vs-torch",
        description="Time flaxpod's train step against a PyTorch eager twin of the same model.",
    )
    parser.add_argument("--config", default=DEFAULT_CONFIG, help=f"YAML config (default {DEFAULT_CONFIG})")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. data.batch_size=8")
    parser.add_argument("--steps", type=int, default=50, help="timed steps per side per round")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (medians over rounds)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps after compilation")
    parser.add_argument(
        "--vocab", type=int, default=0, help=f"token ids drawn (default model.vocab_size, else {CHAR_VOCAB})"
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        help="extra flaxpod run with space-separated overrides, e.g. 'model.scan_layers=false'",
    )
    parser.add_argument("--adamw", default="foreach", choices=["foreach", "fused", "for-loop"], help="torch AdamW")
    parser.add_argument(
        "--cpus", type=int, default=0, help="pin the process to the first N usable CPUs (default: all of them)"
    )
    parser.add_argument("--json", help="write the figures to this JSON file")
    args = parser.parse_args(argv)

    from flaxpod.train.cli import run_guarded

    def job() -> None:
        for name, value in (("--steps", args.steps), ("--rounds", args.rounds)):
            if value <= 0:
                raise ValueError(f"{name}: must be positive, got {value}")
        if args.cpus:
            pin_cpus(args.cpus)
        probe = load_config(args.config, args.overrides)
        vocab = args.vocab or probe.model.vocab_size or CHAR_VOCAB
        cfg = bench_config(args.config, args.overrides, vocab)
        variants = [(v, bench_config(args.config, [*args.overrides, *v.split()], vocab)) for v in args.variant]
        result = run_benchmark(
            cfg,
            vocab=vocab,
            steps=args.steps,
            rounds=args.rounds,
            warmup=args.warmup,
            variants=variants,
            adamw=args.adamw,
        )
        result["config"] = args.config
        result["overrides"] = args.overrides
        result["command"] = " ".join(sys.argv)
        print(format_report(result), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2) + "\n")

    return run_guarded(job)


if __name__ == "__main__":
    sys.exit(main())
