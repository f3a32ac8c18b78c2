"""Generation speed with and without the KV cache, back to back in one process.

    python -m tools.bench_generate RUN_DIR [--batch 8] [--prompt-len 16] [--new-tokens 48]
    python -m tools.bench_generate --random llama --d-model 256 --layers 4 --max-len 512 --new-tokens 256

Without RUN_DIR (`--random FAMILY`) a random model of the given size is timed. Each row: greedy
decoding of `batch` prompts of `prompt-len` tokens for `new-tokens` steps (no early stop), timed
after a compile-and-warm-up call, best of --repeats. The cache-free decoder recomputes the whole
(fixed-size) sequence each step, as a model without a cache must.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import numpy as np
from flax import nnx


def _random_run(family: str, d_model: int, layers: int, max_len: int, vocab: int):
    from flaxpod.model.config import ModelConfig
    from flaxpod.train.state import abstract_model

    n_head = max(1, d_model // 64)
    cfg = ModelConfig(
        family=family,
        n_layer=layers,
        n_head=n_head,
        n_kv_head=max(1, n_head // 2) if family == "llama" and n_head % 2 == 0 else 0,
        d_model=d_model,
        seq_len=max_len,
        max_seq_len=max_len,
        vocab_size=vocab,
    )
    graphdef, abstract = abstract_model(cfg)
    rng = np.random.default_rng(0)
    params = jax.tree.map(
        lambda s: jax.numpy.asarray(rng.normal(0, 0.05, s.shape), s.dtype), nnx.to_pure_dict(abstract)
    )
    return cfg, graphdef, params


def time_decoder(gen, params, tokens, lengths, repeats: int) -> float:
    """Best wall time of `repeats` calls, after one warm-up (compile) call."""
    jax.block_until_ready(gen(params, tokens, lengths, jax.random.key(0)))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(gen(params, tokens, lengths, jax.random.key(0)))
        best = min(best, time.perf_counter() - start)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", nargs="?", help="run directory to time (else --random)")
    parser.add_argument("--random", choices=["gpt2", "llama"], help="time a random model of this family")
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--max-len", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, nargs="+", default=[48])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    from flaxpod.model.decode import check_lengths, make_generate

    if args.run_dir:
        from flaxpod.train.run_dir import load_run

        run = load_run(args.run_dir)
        cfg, graphdef, params = run.cfg.model, run.graphdef, run.params
        what = f"{args.run_dir} (step {run.step})"
    elif args.random:
        cfg, graphdef, params = _random_run(args.random, args.d_model, args.layers, args.max_len, args.vocab)
        what = f"random {args.random} d_model={cfg.d_model} layers={cfg.n_layer} heads={cfg.n_head}"
    else:
        parser.error("give RUN_DIR or --random FAMILY")
    rng = np.random.default_rng(0)
    tokens = jax.numpy.asarray(rng.integers(1, min(cfg.vocab_size, 60), (args.batch, args.prompt_len)), "int32")
    lengths = jax.numpy.full((args.batch,), args.prompt_len, "int32")
    print(f"{what}; {jax.device_count()} {jax.devices()[0].platform} device(s), greedy, batch {args.batch}")
    header = f"{'prompt':>7} {'new':>5} {'cached tok/s':>13} {'no-cache tok/s':>15} {'speed-up':>9}"
    print(header)
    for new in args.new_tokens:
        check_lengths(cfg, args.prompt_len, new)
        rates = []
        for use_cache in (True, False):
            gen = make_generate(graphdef, max_new_tokens=new, use_cache=use_cache)
            seconds = time_decoder(gen, params, tokens, lengths, args.repeats)
            rates.append(args.batch * new / seconds)
        print(f"{args.prompt_len:>7} {new:>5} {rates[0]:>13,.0f} {rates[1]:>15,.0f} {rates[0] / rates[1]:>8.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
