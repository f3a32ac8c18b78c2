"""Peak memory of the causal-LM loss's forward + backward with and without optim.loss_chunk.

    JAX_PLATFORMS=cpu python -m tools.bench_loss_memory [--batch 2] [--seq 1024] [--d-model 512]
        [--vocab 128256] [--chunks 0,256] [--dtype float32] [--json OUT]

For each chunk size (0 = the plain loss) the gradient of CausalLM's objective w.r.t. all parameters of a
one-layer Llama with a 128k vocabulary (tied head, the head dominates) is jitted and compiled, and XLA's
own buffer assignment is read from the compiled executable (`memory_analysis()`: temp bytes = the
buffers the computation allocates besides its arguments and outputs; the executable's
peak_memory_in_bytes is not shown: on CPU it counts only arguments and outputs). Then a fresh subprocess
per variant builds the same function, compiles it, runs it once and reports the process's peak resident
memory (ru_maxrss), that peak just before the run, and the run's wall and CPU time (the CPU time of all
threads is the steadier figure on a shared machine).
The variants must give the same loss (checked, printed).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flaxpod.model.transformer import Transformer
from flaxpod.train.config import ModelConfig
from flaxpod.train.objectives import CausalLM

GiB = 1024**3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--chunks", default="0,512,128", help="comma-separated loss_chunk values; 0 is the plain loss")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="model compute dtype")
    p.add_argument("--json", default="", help="also write the rows here")
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)  # one variant, in a subprocess
    return p.parse_args(argv)


def build(args: argparse.Namespace, chunk: int):
    """(jitted grad function, params, batch) for one loss_chunk value."""
    cfg = ModelConfig(
        family="llama",
        n_layer=1,
        n_head=max(args.d_model // 64, 1),
        d_model=args.d_model,
        seq_len=args.seq,
        vocab_size=args.vocab,
        dtype=args.dtype,
    )
    graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    tokens = np.random.default_rng(0).integers(0, args.vocab, (args.batch, args.seq + 1), dtype=np.int32)
    batch = {"inputs": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:])}
    objective = CausalLM(z_loss=1e-4, loss_chunk=chunk)

    def mean_loss(p, b):
        total, _ = objective.loss_sums(nnx.merge(graphdef, p), b, None)
        return total / objective.weight(b)

    return jax.jit(jax.value_and_grad(mean_loss)), params, batch


def compiled_stats(args: argparse.Namespace, chunk: int) -> dict:
    fn, params, batch = build(args, chunk)
    t0 = time.perf_counter()
    stats = fn.lower(params, batch).compile().memory_analysis()
    return {
        "chunk": chunk,
        "temp_bytes": stats.temp_size_in_bytes,
        "argument_bytes": stats.argument_size_in_bytes,
        "output_bytes": stats.output_size_in_bytes,
        "compile_s": time.perf_counter() - t0,
    }


def child(args: argparse.Namespace) -> None:
    """Runs one variant and prints its RSS figures as JSON (ru_maxrss is in KiB on Linux)."""
    fn, params, batch = build(args, args.child)
    compiled = fn.lower(params, batch).compile()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0, c0 = time.perf_counter(), time.process_time()
    loss, grads = jax.block_until_ready(compiled(params, batch))
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(
        json.dumps(
            {
                "loss": float(loss),
                "rss_before": rss_before,
                "rss_peak": peak,
                "run_s": seconds,
                "run_cpu_s": cpu_seconds,
            }
        )
    )


def run_child(args: argparse.Namespace, chunk: int) -> dict:
    cmd = [sys.executable, "-m", "tools.bench_loss_memory", "--child", str(chunk), "--batch", str(args.batch)]
    cmd += ["--seq", str(args.seq), "--d-model", str(args.d_model), "--vocab", str(args.vocab), "--dtype", args.dtype]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=os.environ)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child is not None:
        child(args)
        return
    print(
        f"jax {jax.__version__} on {jax.devices()[0].platform}; batch {args.batch} x seq {args.seq}, "
        f"d_model {args.d_model}, vocab {args.vocab}, compute {args.dtype}; load average {os.getloadavg()}"
    )
    rows = []
    for chunk in (int(c) for c in args.chunks.split(",")):
        row = compiled_stats(args, chunk)
        row.update(run_child(args, chunk))
        rows.append(row)
    plain = rows[0]
    header = "| loss_chunk | XLA temp | process peak RSS | peak RSS before run | run wall s | run CPU s | loss |"
    print(header + "\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['chunk'] or 'off'} | {r['temp_bytes'] / GiB:.3f} GiB "
            f"| {r['rss_peak'] / GiB:.3f} GiB | {r['rss_before'] / GiB:.3f} GiB "
            f"| {r['run_s']:.2f} | {r['run_cpu_s']:.2f} "
            f"| {r['loss']:.6f} |"
        )
    for r in rows[1:]:
        print(
            f"loss_chunk={r['chunk']}: XLA temp {plain['temp_bytes'] / max(r['temp_bytes'], 1):.1f}x smaller, "
            f"peak RSS {plain['rss_peak'] / r['rss_peak']:.2f}x smaller, "
            f"|loss diff| {abs(r['loss'] - plain['loss']):.2e}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
