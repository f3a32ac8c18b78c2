"""Training-step speed of a ~1B Llama on one accelerator, per attention kernel and remat policy.

    python -m tools.bench_gpu --out DIR [--config configs/llama_1b.yaml] [--batch 8] [--seq 2048]
        [--steps 5] [--warmup 2] [--attention einsum,xla,cudnn] [--remat none,dots,full] [--loss-chunk 512]
        [--budget-s 0] [--combo-timeout-s 300] [--no-isolate] [--tiny] [key.sub=value ...]

The real training code: `Trainer.from_config(cfg, devices=jax.devices()[:1])` on a 1x1x1 mesh (as
tools/bench_vs_torch.py's build_flaxpod), its jitted step compiled once, then `--warmup` untimed and
`--steps` timed steps on random token batches (put on the device each step like the loop does). The
config gets model.seq_len=--seq, model.dtype=bfloat16 (parameters stay float32: flaxpod's default), a
one-device mesh and data.batch_size=--batch, then `--tiny` (a model that runs on CPU in seconds) and
the command line's overrides. Combos: attention `einsum`, `xla` (model.attention=fused,
attention_impl=xla), `cudnn` (fused, cudnn) x model.remat; one that fails is recorded with its error's
first line and the bench goes on. Then the fastest combo again with optim.loss_chunk=--loss-chunk.

Each combo runs in its own subprocess (unless --no-isolate): a crash or an out-of-memory abort costs
one row, and the device's peak_bytes_in_use (memory_stats(), "n/a" where the backend has none, e.g.
CPU) is that combo's own. `--budget-s` skips the combos that would start after that many seconds;
results.md / results.json are rewritten after every combo, so a run stopped early keeps its rows.

Before the speed runs, a packed-row check (maxtext #4476: cuDNN silently ignored segment ids) builds
the model with at most 2 layers and --packed-seq positions, and with the same parameters computes the
loss and its gradient on rows packing three documents each (positions restart, a padding tail) with
every attention implementation, and again without segment ids (plain causal rows: the `is_causal`
path of fused attention). Reported: |loss - einsum's| and max |grad - einsum's| / max |einsum's grad|,
and, for scale, how much the loss moves when the documents may see each other (what a kernel ignoring
segment ids would give); a kernel is called `same` when its loss is within a tenth of that.

MFU = tokens/s x FLOPs/token / peak (--peak-flops, default 989e12: H100/H200 dense bf16). FLOPs/token
are flaxpod.train.flops.flops_per_token: 6 N + 12 L d T (PaLM appendix B, N without the token
embedding; attention counted over the full T x T square, not halved for causality). With a tied head
the LM-head matmul is not in N; column `MFU+head` adds its 6 d V per token (untied: already in N).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
from flax import nnx
from flaxpod.model.transformer import Transformer, count_params
from flaxpod.train.config import Config, load_config
from flaxpod.train.flops import flops_per_token
from flaxpod.train.objectives import CausalLM
from flaxpod.train.trainer import Trainer

ATTENTION = {
    "einsum": ["model.attention=einsum"],
    "xla": ["model.attention=fused", "model.attention_impl=xla"],
    "cudnn": ["model.attention=fused", "model.attention_impl=cudnn"],
}
REMAT = ("none", "dots", "full")
# The order combos run in when a time budget may cut the list short: the likely fastest first.
PRIORITY = [("cudnn", "none"), ("cudnn", "dots"), ("xla", "none"), ("einsum", "none"), ("xla", "dots")]
TINY = [
    "model.n_layer=2",
    "model.n_head=4",
    "model.n_kv_head=2",
    "model.d_model=64",
    "model.d_ff=128",
    "model.vocab_size=256",
]
H100_H200_BF16_DENSE = 989e12
GiB = 1024**3
RESULT_PREFIX = "BENCH_RESULT "
COLUMNS = [
    ("attention", "attention"),
    ("remat", "remat"),
    ("loss_chunk", "loss_chunk"),
    ("tokens_per_s", "tokens/s"),
    ("step_ms", "step ms (median)"),
    ("mfu", "MFU"),
    ("mfu_with_head", "MFU+head"),
    ("peak_gib", "peak GiB (memory_stats)"),
    ("xla_temp_gib", "XLA temp GiB"),
    ("compile_s", "compile s"),
    ("first_loss", "first loss"),
    ("status", "status"),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="directory for results.md and results.json")
    p.add_argument("--config", default="configs/llama_1b.yaml")
    p.add_argument("--batch", type=int, default=8, help="rows per step (8 x 2048 tokens fits an H200 easily)")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=5, help="timed steps per combo")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
    p.add_argument("--attention", default="einsum,xla,cudnn", help=f"comma-separated, of {list(ATTENTION)}")
    p.add_argument("--remat", default="none,dots,full", help=f"comma-separated, of {list(REMAT)}")
    p.add_argument("--loss-chunk", type=int, default=512, help="optim.loss_chunk for the best combo's rerun; 0: none")
    p.add_argument("--peak-flops", type=float, default=H100_H200_BF16_DENSE, help="per-device peak FLOP/s for MFU")
    p.add_argument("--budget-s", type=float, default=0.0, help="start no combo after this many seconds; 0: no limit")
    p.add_argument("--combo-timeout-s", type=float, default=300.0, help="kill an isolated combo after this long")
    p.add_argument("--no-isolate", action="store_true", help="run the combos in this process (tests, debugging)")
    p.add_argument("--no-packed-check", action="store_true")
    p.add_argument(
        "--packed-seq", type=int, default=512, help="sequence length of the packed-row check (at most --seq)"
    )
    p.add_argument("--tiny", action="store_true", help="a 2-layer, 64-wide model (CPU, tests)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--child", default="", help=argparse.SUPPRESS)  # "ATTENTION:REMAT:CHUNK" or "packed"
    p.add_argument("overrides", nargs="*", help="config overrides key.sub=value, applied last")
    args = p.parse_args(argv)
    for name, allowed in (("attention", ATTENTION), ("remat", REMAT)):
        for value in getattr(args, name).split(","):
            if value not in allowed:
                p.error(f"--{name}: expected values of {list(allowed)}, got {value!r}")
    return args


def bench_config(args: argparse.Namespace, attention: str = "einsum", remat: str = "none", chunk: int = 0) -> Config:
    base = [
        f"model.seq_len={args.seq}",
        "model.dtype=bfloat16",
        "mesh.data=1",
        "mesh.fsdp=1",
        "mesh.tensor=1",
        f"data.batch_size={args.batch}",
        "train.grad_accum=1",
    ]
    combo = [*ATTENTION[attention], f"model.remat={remat}", f"optim.loss_chunk={chunk}"]
    cfg = load_config(args.config, base + (TINY if args.tiny else []) + combo + list(args.overrides))
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, max_seq_len=cfg.model.max_len))


def one_line(error: BaseException | str) -> str:
    text = str(error).strip().splitlines()
    first = next((line for line in text if line.strip()), "")
    name = type(error).__name__ if isinstance(error, BaseException) else "error"
    return f"{name}: {first}"[:240]


def memory_peak() -> int | None:
    stats = jax.devices()[0].memory_stats()
    return None if not stats else stats.get("peak_bytes_in_use")


def flop_counts(cfg: Config, n_nonembed: int) -> tuple[float, float]:
    """(FLOPs/token by flaxpod.train.flops, the same plus the LM head's 6 d V where N does not hold it)."""
    m = cfg.model
    palm = flops_per_token(m.n_layer, m.d_model, m.seq_len, n_nonembed)
    return palm, palm + (6.0 * m.d_model * m.vocab_size if m.tie_embeddings else 0.0)


def run_combo(args: argparse.Namespace, attention: str, remat: str, chunk: int) -> dict:
    """One combo's figures (raises on failure)."""
    cfg = bench_config(args, attention, remat, chunk)
    trainer = Trainer.from_config(cfg, devices=jax.devices()[:1])
    state = jax.block_until_ready(trainer.init_state(cfg.seed))
    rng = np.random.default_rng(args.seed)
    m = cfg.model
    rows = [rng.integers(0, m.vocab_size, (args.batch, m.seq_len + 1), dtype=np.int32) for _ in range(2)]
    batches = [{"inputs": r[:, :-1].copy(), "targets": r[:, 1:].copy()} for r in rows]
    t0 = time.perf_counter()
    compiled = trainer.step.lower(state, trainer.put(batches[0])).compile()
    compile_s = time.perf_counter() - t0
    analysis = compiled.memory_analysis()
    first_loss = None
    for i in range(args.warmup):
        state, metrics = compiled(state, trainer.put(batches[i % 2]))
        if first_loss is None:
            first_loss = float(metrics["loss"])
    seconds = []
    for i in range(args.steps):
        t0 = time.perf_counter()
        state, metrics = compiled(state, trainer.put(batches[i % 2]))
        loss = float(metrics["loss"])  # waits for the step
        seconds.append(time.perf_counter() - t0)
        first_loss = loss if first_loss is None else first_loss
    step_s = statistics.median(seconds)
    palm, with_head = flop_counts(cfg, trainer.param_counts()[1])
    tokens_per_s = args.batch * m.seq_len / step_s
    peak = memory_peak()
    return {
        "tokens_per_s": tokens_per_s,
        "step_ms": 1e3 * step_s,
        "mfu": tokens_per_s * palm / args.peak_flops,
        "mfu_with_head": tokens_per_s * with_head / args.peak_flops,
        "peak_gib": None if peak is None else peak / GiB,
        "xla_temp_gib": None if analysis is None else analysis.temp_size_in_bytes / GiB,
        "compile_s": compile_s,
        "first_loss": first_loss,
        "last_loss": loss,
        "status": "ok",
    }


def packed_batch(rows: int, seq: int, vocab: int, seed: int) -> dict[str, np.ndarray]:
    """Rows of three documents each at random boundaries, positions restarting, a padding tail (segment
    0, not scored)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (rows, seq + 1), dtype=np.int32)
    segment_ids = np.zeros((rows, seq), np.int32)
    positions = np.zeros((rows, seq), np.int32)
    for r in range(rows):
        cuts = np.sort(rng.choice(np.arange(2, seq - 1), size=3, replace=False))
        starts = [0, *cuts[:2]]
        for doc, (a, b) in enumerate(zip(starts, cuts, strict=True), start=1):
            segment_ids[r, a:b] = doc
            positions[r, a:b] = np.arange(b - a)
    return {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "segment_ids": segment_ids,
        "positions": positions,
        "loss_mask": (segment_ids > 0).astype(np.float32),
    }


def packed_check(args: argparse.Namespace) -> dict:
    """Loss and gradient of every attention implementation from the same parameters, on packed rows and
    on plain causal rows, against einsum's."""
    cfg = bench_config(args)
    seq = min(args.packed_seq, cfg.model.seq_len)  # the kernels' masking does not depend on length: keep it cheap
    model = dataclasses.replace(cfg.model, n_layer=min(cfg.model.n_layer, 2), seq_len=seq)
    _, params = nnx.split(Transformer(model, rngs=nnx.Rngs(args.seed)))
    packed = {k: jnp.asarray(v) for k, v in packed_batch(2, model.seq_len, model.vocab_size, args.seed).items()}
    causal = {k: packed[k] for k in ("inputs", "targets")}
    leaky = {**causal, "positions": packed["positions"], "loss_mask": packed["loss_mask"]}
    objective = CausalLM()

    def loss_and_grad(attention: str, batch: dict) -> tuple[float, jax.Array]:
        overrides = dict(o.split("=", 1) for o in ATTENTION[attention])
        variant = dataclasses.replace(
            model, attention=overrides["model.attention"], attention_impl=overrides.get("model.attention_impl", "xla")
        )
        graphdef = nnx.graphdef(nnx.eval_shape(lambda: Transformer(variant, rngs=nnx.Rngs(0))))

        def mean_loss(p):
            total, _ = objective.loss_sums(nnx.merge(graphdef, p), batch, None)
            return total / objective.weight(batch)

        loss, grads = jax.jit(jax.value_and_grad(mean_loss))(params)
        return float(loss), grads

    reference = {name: loss_and_grad("einsum", batch) for name, batch in (("packed", packed), ("causal", causal))}
    out = {
        "model": f"{model.n_layer} layers, d_model {model.d_model}, vocab {model.vocab_size}, {model.dtype}",
        "rows": f"2 x {model.seq_len}, 3 documents per row + padding",
        "einsum_loss": reference["packed"][0],
        "documents_leaking_loss_change": abs(loss_and_grad("einsum", leaky)[0] - reference["packed"][0]),
        "implementations": {},
    }
    for attention in ATTENTION:
        result = {}
        for name, batch in (("packed", packed), ("causal", causal)):
            try:
                loss, grads = loss_and_grad(attention, batch)
            except Exception as e:  # noqa: BLE001 - a kernel this backend lacks is a result, not a crash
                result[name] = {"status": f"unavailable: {one_line(e)}"}
                continue
            ref_loss, ref_grads = reference[name]
            scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(ref_grads))
            pairs = zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True)
            worst = max(float(jnp.max(jnp.abs(g - r))) for g, r in pairs)
            result[name] = {"status": "ok", "loss": loss, "loss_diff": abs(loss - ref_loss)}
            result[name]["grad_rel_diff"] = worst / scale
        out["implementations"][attention] = result
    return out


def child_main(args: argparse.Namespace) -> None:
    if args.child == "packed":
        result = packed_check(args)
    else:
        attention, remat, chunk = args.child.split(":")
        result = run_combo(args, attention, remat, int(chunk))
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def in_child(args: argparse.Namespace, spec: str) -> dict:
    """Runs `--child spec` in a fresh process; its result, or {"status": the error's line}."""
    flags = ["-S"] if sys.flags.no_site else []  # a dry run without site-packages (tools/gpu_run.sh) stays one
    argv = [sys.executable, *flags, "-m", "tools.bench_gpu", "--child", spec, *child_argv(args)]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=args.combo_timeout_s, env=args.child_env)
    except subprocess.TimeoutExpired:
        return {"status": f"timeout: killed after {args.combo_timeout_s:.0f} s"}
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    errors = [line for line in done.stderr.splitlines() if "Error" in line or "error" in line]
    last = (errors or done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
    return {"status": f"failed (exit {done.returncode}): {last.strip()[:240]}"}


def child_argv(args: argparse.Namespace) -> list[str]:
    argv = ["--out", args.out, "--config", args.config, "--batch", str(args.batch), "--seq", str(args.seq)]
    argv += ["--steps", str(args.steps), "--warmup", str(args.warmup), "--seed", str(args.seed)]
    argv += ["--peak-flops", str(args.peak_flops)] + (["--tiny"] if args.tiny else [])
    return argv + list(args.overrides)


def run_isolated_or_not(args: argparse.Namespace, spec: str, fn) -> dict:
    if not args.no_isolate:
        return in_child(args, spec)
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - one combo's failure is a row of the table
        return {"status": one_line(e)}


def combos(args: argparse.Namespace) -> list[tuple[str, str]]:
    wanted = [(a, r) for a in args.attention.split(",") for r in args.remat.split(",")]
    return [c for c in PRIORITY if c in wanted] + [c for c in wanted if c not in PRIORITY]


def fmt(value, digits: int = 1) -> str:
    """A table cell: n/a for missing figures, `digits` decimals, or a percentage with digits=-1."""
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.1%}" if digits == -1 else f"{value:,.{digits}f}"
    return str(value)


def markdown(meta: dict, rows: list[dict], packed: dict | None) -> str:
    lines = [f"# flaxpod training-step benchmark: {meta['model']}", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items() if k != "model"]
    lines += ["", "| " + " | ".join(title for _, title in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    digits = {"mfu": -1, "mfu_with_head": -1, "peak_gib": 2, "xla_temp_gib": 2, "first_loss": 4, "step_ms": 1}
    for row in rows:
        lines.append("| " + " | ".join(fmt(row.get(key), digits.get(key, 1)) for key, _ in COLUMNS) + " |")
    if packed is not None:
        lines += ["", "## Packed rows: every attention implementation against einsum, same parameters", ""]
        if "status" in packed:
            lines.append(f"packed-row check did not run: {packed['status']}")
        else:
            lines += [f"- {packed['model']}; rows {packed['rows']}; einsum loss {packed['einsum_loss']:.6f}"]
            lines += [
                f"- loss change if documents could see each other (a kernel ignoring segment ids): "
                f"{packed['documents_leaking_loss_change']:.3e}",
                "",
                "| attention | rows | status | loss | abs loss diff | max grad diff / max grad |",
                "|---|---|---|---|---|---|",
            ]
            for attention, result in packed["implementations"].items():
                for kind, r in result.items():
                    # Within a tenth of what leaking documents would change: the same function (bf16 noise aside).
                    same = (
                        r.get("loss_diff") is not None and r["loss_diff"] < packed["documents_leaking_loss_change"] / 10
                    )
                    status = f"{r['status']}, {'same' if same else 'DIFFERENT'}" if r["status"] == "ok" else r["status"]
                    lines.append(
                        f"| {attention} | {kind} | {status} | {fmt(r.get('loss'), 6)} "
                        f"| {fmt(r.get('loss_diff'), 9)} | {fmt(r.get('grad_rel_diff'), 9)} |"
                    )
    return "\n".join(lines) + "\n"


def write_results(out: Path, meta: dict, rows: list[dict], packed: dict | None) -> None:
    """Both files, each written to a temporary name and renamed (a killed run leaves whole files)."""
    for name, text in (
        ("results.json", json.dumps({"meta": meta, "rows": rows, "packed_check": packed}, indent=1)),
        ("results.md", markdown(meta, rows, packed)),
    ):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(out / name)


def describe(args: argparse.Namespace) -> dict:
    cfg = bench_config(args)
    m = cfg.model
    params = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: Transformer(m, rngs=nnx.Rngs(0))), nnx.Param))
    n_params, n_nonembed = count_params(params), count_params(params, exclude_embeddings=True)
    palm, with_head = flop_counts(cfg, n_nonembed)
    device = jax.devices()[0]
    return {
        "model": f"{m.family}, {m.n_layer} layers, d_model {m.d_model}, {m.n_head}/{m.kv_heads} heads, "
        f"vocab {m.vocab_size}, {'tied' if m.tie_embeddings else 'untied'} head, {n_params / 1e9:.3f} B params",
        "jax": f"{jax.__version__} (jaxlib {jaxlib.__version__})",
        "device": f"{device.platform} {getattr(device, 'device_kind', '')} x {jax.device_count()} (one used)",
        "config": f"{args.config} + seq {m.seq_len}, {m.dtype} compute, float32 params, 1x1x1 mesh"
        + (", --tiny" if args.tiny else "")
        + (f", {' '.join(args.overrides)}" if args.overrides else ""),
        "batch": f"{args.batch} x {m.seq_len} = {args.batch * m.seq_len} tokens/step; {args.warmup} warm-up + "
        f"{args.steps} timed steps after compiling; median step time",
        "peak FLOP/s for MFU": f"{args.peak_flops / 1e12:g} TFLOP/s (dense bf16, H100/H200 data sheet)",
        "FLOPs/token": f"{palm:.4g} = 6N + 12 L d T (PaLM, N = {n_nonembed / 1e9:.3f} B non-embedding, "
        f"attention not halved); MFU+head uses {with_head:.4g} (+ 6 d V for the tied LM head)",
        "peak memory": "device memory_stats()['peak_bytes_in_use'] of the combo's own process"
        + (" (in-process run: cumulative)" if args.no_isolate else ""),
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        child_main(args)
        return
    started = time.perf_counter()
    args.child_env = dict(os.environ)
    if not args.no_isolate:
        # The combos run in children with the accelerator to themselves: this process only describes the
        # device, and must not take most of its memory as jax does when a GPU backend starts (preallocation).
        os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = describe(args)
    print("\n".join(f"{k}: {v}" for k, v in meta.items()), flush=True)
    packed = None
    if not args.no_packed_check:
        packed = run_isolated_or_not(args, "packed", lambda: packed_check(args))
        print("packed-row check:", json.dumps(packed), flush=True)
    rows: list[dict] = []

    def record(attention: str, remat: str, chunk: int) -> dict:
        row = {"attention": attention, "remat": remat, "loss_chunk": chunk}
        if args.budget_s and time.perf_counter() - started > args.budget_s:
            row["status"] = f"skipped: past the {args.budget_s:.0f} s budget"
        else:
            spec = f"{attention}:{remat}:{chunk}"
            row.update(run_isolated_or_not(args, spec, lambda: run_combo(args, attention, remat, chunk)))
        rows.append(row)
        rows.sort(key=lambda r: (list(ATTENTION).index(r["attention"]), REMAT.index(r["remat"]), r["loss_chunk"]))
        write_results(out, meta, rows, packed)
        print(json.dumps(row), flush=True)
        return row

    for attention, remat in combos(args):
        record(attention, remat, 0)
    ok = [r for r in rows if r["status"] == "ok"]
    if args.loss_chunk and ok:
        best = max(ok, key=lambda r: r["tokens_per_s"])
        record(best["attention"], best["remat"], args.loss_chunk)
    write_results(out, meta, rows, packed)
    print(f"wrote {out / 'results.md'} and results.json in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
