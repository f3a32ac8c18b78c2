"""`flaxpod generate RUN_DIR --prompt TEXT [--prompt ...] [--prompts-file FILE] [options]`.

Jitted decoding with a key/value cache (model/decode.py): greedy by default, or sampling with
--temperature, --top-k and --top-p; --seed makes sampling repeatable. Prompts of different
lengths run together in batches; a row stops at the tokenizer's end-of-sequence id or after
--max-new-tokens.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def read_prompts(prompts: list[str], prompts_file: str | None) -> list[str]:
    """--prompt values, then one prompt per non-empty line of --prompts-file (a literal `\\n`
    in a line stands for a newline)."""
    out = list(prompts)
    if prompts_file is not None:
        path = Path(prompts_file)
        if not path.is_file():
            raise FileNotFoundError(f"--prompts-file {path} does not exist")
        out += [line.replace("\\n", "\n") for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not out:
        raise ValueError("no prompts: give --prompt TEXT or --prompts-file FILE")
    return out


def generate_texts(run, prompts: list[str], **options) -> list[str]:
    """Continuations of `prompts` from a loaded run (train.run_dir.load_run); `options` as `generate_ids`'s."""
    encoded = []
    for i, prompt in enumerate(prompts):
        try:
            encoded.append(run.tokenizer.encode_for_model(prompt))  # BOS as transformers adds it
        except ValueError as e:
            raise ValueError(f"prompt {i + 1}: {e}") from None
    outputs = generate_ids(run, encoded, **options)
    # Decoded after the prompt's ids, whole characters only (a byte-level BPE can stop mid-character).
    return ["".join(run.tokenizer.decode_stream(p, ids)) for p, ids in zip(encoded, outputs, strict=True)]


def generate_ids(
    run,
    encoded: list[list[int]],
    *,
    max_new_tokens: int = 100,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 16,
    use_cache: bool = True,
) -> list[list[int]]:
    """New token ids after each encoded prompt (ending at EOS, which is not included, or the limit)."""
    import jax
    import numpy as np
    from flaxpod.model.decode import Sampling, check_lengths, left_pad, make_generate

    sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p)
    tok = run.tokenizer
    key = jax.random.key(seed)
    fns: dict[int, object] = {}
    outputs: list[list[int]] = []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        tokens, lengths = left_pad(chunk, pad_id=tok.pad_id or 0)
        check_lengths(run.cfg.model, tokens.shape[1], max_new_tokens)
        if max_new_tokens not in fns:
            fns[max_new_tokens] = make_generate(
                run.graphdef,
                max_new_tokens=max_new_tokens,
                sampling=sampling,
                eos_id=tok.eos_id,
                vocab_limit=tok.vocab_size,
                use_cache=use_cache,
            )
        out, counts = fns[max_new_tokens](run.params, tokens, lengths, jax.random.fold_in(key, start))
        out, counts = np.asarray(out), np.asarray(counts)
        outputs += [out[i, : counts[i]].tolist() for i in range(len(chunk))]
    return outputs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flaxpod generate", description=__doc__.split("\n\n")[1])
    parser.add_argument("run_dir", help="run directory (config.yaml, tokenizer/, checkpoints/)")
    parser.add_argument("--prompt", action="append", default=[], help="prompt text (repeatable)")
    parser.add_argument("--prompts-file", default=None, help="file with one prompt per line")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument("--max-new-tokens", type=int, default=100)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k most likely ids (0 = all)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0 = off)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts decoded together")
    parser.add_argument("--no-cache", action="store_true", help="recompute the whole sequence each step (slow)")
    args = parser.parse_args(argv)

    from flaxpod.train.cli import check_option, run_guarded

    def job() -> None:
        from flaxpod.model.errors import InputError
        from flaxpod.train.run_dir import load_run, load_run_config

        if load_run_config(args.run_dir).train.objective == "mlm":
            raise InputError(f"{args.run_dir}: a masked-LM encoder does not generate text; use flaxpod fill-mask")
        prompts = read_prompts(args.prompt, args.prompts_file)
        check_option("--batch-size", args.batch_size, minimum=1)
        check_option("--max-new-tokens", args.max_new_tokens, minimum=1)
        check_option("--temperature", args.temperature, minimum=0)
        check_option("--top-k", args.top_k, minimum=0)
        check_option("--top-p", args.top_p, above=0, maximum=1)
        check_option("--step", args.step, minimum=0)
        run = load_run(args.run_dir, args.step)
        texts = generate_texts(
            run,
            prompts,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
            batch_size=args.batch_size,
            use_cache=not args.no_cache,
        )
        for i, (prompt, text) in enumerate(zip(prompts, texts, strict=True)):
            print(f"=== prompt {i + 1} (step {run.step}) ===\n{prompt}{text}")

    return run_guarded(job)


if __name__ == "__main__":
    sys.exit(main())
