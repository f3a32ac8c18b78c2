"""Checks an exported model against its run: the same prompt through flaxpod (JAX) and through
transformers (PyTorch, CPU, float32); prints the largest logit difference and both greedy
continuations.

    python -m tools.hf_check RUN_DIR HF_DIR [--prompt TEXT] [--new-tokens N] [--step N]

Needs torch and transformers (the project's `test` extra).
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("hf_dir")
    parser.add_argument("--prompt", default="ROMEO:\nWhat light through yonder window breaks?\n")
    parser.add_argument("--new-tokens", type=int, default=20)
    parser.add_argument("--step", type=int, default=None)
    args = parser.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    import transformers
    from flax import nnx
    from flaxpod.model.decode import check_lengths, left_pad, make_generate
    from flaxpod.train.run_dir import load_run, single_device_mesh

    run = load_run(args.run_dir, args.step, mesh=single_device_mesh())
    tok = run.tokenizer
    ids = tok.encode(args.prompt)
    check_lengths(run.cfg.model, len(ids), args.new_tokens)
    hf = transformers.AutoModelForCausalLM.from_pretrained(args.hf_dir, dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(args.hf_dir)
    hf_ids = hf_tok.encode(args.prompt, add_special_tokens=False)

    ours = np.asarray(nnx.merge(run.graphdef, run.params)(jnp.asarray([ids])))[0]
    x = torch.tensor([ids])
    with torch.no_grad():
        theirs = hf(x).logits[0].numpy()
        hf_out = hf.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=args.new_tokens)
    gen = make_generate(run.graphdef, max_new_tokens=args.new_tokens, eos_id=tok.eos_id)
    out, count = gen(run.params, *left_pad([ids]), jax.random.key(0))
    our_new = np.asarray(out[0, : int(count[0])]).tolist()
    hf_new = hf_out[0, len(ids) :].tolist()
    if tok.eos_id is not None and tok.eos_id in hf_new:
        hf_new = hf_new[: hf_new.index(tok.eos_id)]
    V = tok.vocab_size  # noqa: N806 - padding rows beyond the tokenizer are compared too, below
    print(f"run {args.run_dir} step {run.step} vs {args.hf_dir} ({type(hf).__name__})")
    print(f"prompt tokens: {len(ids)}; tokenizer ids identical: {hf_ids == ids}")
    print(
        f"max |logit difference|: {np.abs(ours - theirs).max():.3e} (over all {ours.shape[1]} logits; "
        f"{np.abs(ours[:, :V] - theirs[:, :V]).max():.3e} over the tokenizer's {V} ids)"
    )
    print(f"greedy continuations identical: {our_new == hf_new} ({len(our_new)} tokens)")
    print(f"flaxpod:      {tok.decode(our_new)!r}")
    print(f"transformers: {hf_tok.decode(hf_new)!r}")
    return 0 if our_new == hf_new else 1


if __name__ == "__main__":
    sys.exit(main())
