"""`flaxpod evaluate RUN_DIR [--step N] [--text PATH ...] [--val] [--mc JSONL ...] [--sft JSONL ...]
[--classify FILE ...] [--limit N]`.

Finetuned runs: `--sft` and `--classify` give task metrics (train/task_eval.py). A classification run
is evaluated at its best step (RUN_DIR/best.json) unless --step says otherwise.

Language-model metrics on text: the token stream (documents joined as in training, each
followed by EOS when the tokenizer has one) is cut into windows of seq_len + 1 tokens that
overlap by one, so every token after the first is predicted exactly once, with the context
restarting at each window (as training's validation does). loss = mean cross entropy in nats
per predicted token, perplexity = exp(loss), bits per byte = total nats / ln 2 / UTF-8 bytes of
the predicted text.

Masked-LM runs (train.objective=mlm): text metrics are masked-token loss and accuracy with the fixed
masking seed 0, and `--pll` adds pseudo-log-likelihood per token (slow: one pass per token); see
train/mlm_eval.py.

Multiple choice, scored the way lm-evaluation-harness scores `multiple_choice` tasks: for each
choice, the log-likelihood of " " + choice given the query (tokenized whole and split where the
query's tokens end; left-truncated to the model's context). acc takes the choice with the
highest log-likelihood, acc_norm the highest log-likelihood per character of the choice.

Rows are batched and sharded over the mesh like training batches. A table is printed and the
figures are written as JSON to RUN_DIR/eval/.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from flaxpod.data.jsonl import read_jsonl
from flaxpod.data.text import read_corpus, resolve_text_paths
from flaxpod.train.cli import run_guarded

# JAX, Grain and Orbax (and the flaxpod modules that import them) are imported inside the functions that
# need them: imported here they make `flaxpod evaluate --help` take 5-6 s instead of 0.65 s (measured
# with a load average of 5 on 2 cores; `python -X importtime`: jax 1.4 s, run_dir/orbax 4.6 s cumulative).

DEFAULT_BATCH = 32


@dataclass
class Choice:
    """One multiple-choice question."""

    query: str
    choices: list[str]
    gold: int
    where: str = ""  # file:line, for messages


def read_mc_jsonl(path: str | Path, limit: int | None = None) -> list[Choice]:
    """Rows {"query": str, "choices": [str, ...], "gold": int}; a bad row names its line."""
    path = Path(path)
    rows: list[Choice] = []
    for line_no, row in read_jsonl(path):
        if limit is not None and len(rows) >= limit:
            break
        for key in ("query", "choices", "gold"):
            if key not in row:
                raise ValueError(f"{path}:{line_no}: missing field '{key}' (expected query, choices, gold)")
        query, choices, gold = row["query"], row["choices"], row["gold"]
        if not isinstance(query, str):
            raise ValueError(f"{path}:{line_no}: 'query' must be a string, got {type(query).__name__}")
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise ValueError(f"{path}:{line_no}: 'choices' must be a list of at least 2 strings")
        if not isinstance(gold, int) or isinstance(gold, bool) or not 0 <= gold < len(choices):
            raise ValueError(f"{path}:{line_no}: 'gold' must be an index into choices (0..{len(choices) - 1})")
        rows.append(Choice(query, choices, gold, f"{path}:{line_no}"))
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


class Scorer:
    """Per-row sums of token cross entropy, `(inputs, targets, weights) [N, T] -> [N]`, run in
    fixed-size batches sharded over the run's mesh (rows padded with zero weight)."""

    def __init__(self, run, batch_size: int = DEFAULT_BATCH):
        import jax
        from flaxpod.model.axes import activation_sharding
        from flaxpod.sharding.mesh import batch_sharding
        from flaxpod.sharding.rules import activation_resolver, make_rules
        from flaxpod.train.objectives import forward, token_losses
        from jax.sharding import NamedSharding, PartitionSpec

        self.run = run
        rules = make_rules(run.cfg.mesh.rules, run.cfg.mesh.rule_overrides)
        self.sharding = batch_sharding(run.mesh, rules)
        ways = 1
        batch_axes = self.sharding.spec[0] or ()
        for axis in (batch_axes,) if isinstance(batch_axes, str) else batch_axes:
            ways *= run.mesh.shape[axis]
        ways = max(ways, jax.process_count())
        self.batch_size = -(-batch_size // ways) * ways  # each data shard gets whole rows
        graphdef = run.graphdef

        def row_losses(params, batch):
            logits = forward(graphdef, params, batch)
            ce, _ = token_losses(logits, batch["targets"])
            return (ce * batch["loss_mask"]).sum(axis=-1)

        replicated = NamedSharding(run.mesh, PartitionSpec())
        self._resolver = activation_resolver(run.mesh, rules)
        self._activation_sharding = activation_sharding
        self._fn = jax.jit(row_losses, out_shardings=replicated)

    def __call__(self, inputs: np.ndarray, targets: np.ndarray, weights: np.ndarray) -> np.ndarray:
        import jax
        from flaxpod.sharding.mesh import put_batch

        n = len(inputs)
        out = np.zeros(n, np.float64)
        pid, pcount = jax.process_index(), jax.process_count()
        b = self.batch_size
        local = b // pcount
        for start in range(0, n, b):
            rows = slice(start, min(start + b, n))
            batch = {}
            for key, x in (("inputs", inputs), ("targets", targets), ("loss_mask", weights)):
                block = np.zeros((b, x.shape[1]), x.dtype)
                block[: rows.stop - rows.start] = x[rows]
                batch[key] = block[pid * local : (pid + 1) * local]
            with self._activation_sharding(self._resolver):
                sums = self._fn(self.run.params, put_batch(batch, self.sharding))
            out[rows] = np.asarray(sums)[: rows.stop - rows.start]
        return out


def lm_windows(tokens: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(inputs, targets, weights) [W, seq_len]: windows overlapping by one token, the last one
    zero-padded and masked, so each token after the first is a target exactly once."""
    n_targets = len(tokens) - 1
    if n_targets < 1:
        raise ValueError("text too short to evaluate: it gives fewer than 2 tokens")
    count = -(-n_targets // seq_len)
    inputs = np.zeros((count, seq_len), np.int32)
    targets = np.zeros((count, seq_len), np.int32)
    weights = np.zeros((count, seq_len), np.float32)
    for w in range(count):
        chunk = tokens[w * seq_len : w * seq_len + seq_len + 1]
        k = len(chunk) - 1
        inputs[w, :k], targets[w, :k], weights[w, :k] = chunk[:-1], chunk[1:], 1.0
    return inputs, targets, weights


def lm_metrics(scorer: Scorer, tokens: np.ndarray, seq_len: int, text_bytes: int) -> dict[str, float]:
    """loss (nats/token), perplexity and bits per byte over `tokens`; `text_bytes` is the UTF-8
    size of the predicted text (every token but the first)."""
    inputs, targets, weights = lm_windows(tokens, seq_len)
    nats = float(scorer(inputs, targets, weights).sum())
    count = int(weights.sum())
    loss = nats / count
    return {
        "loss": loss,
        "perplexity": math.exp(loss),
        "bits_per_byte": nats / math.log(2) / max(text_bytes, 1),
        "tokens": count,
        "bytes": text_bytes,
    }


def text_tokens(tokenizer, documents: list[str]) -> tuple[np.ndarray, int]:
    """(token stream as in training, UTF-8 bytes of the predicted part)."""
    eos = [] if tokenizer.eos_id is None else [tokenizer.eos_id]
    ids = [t for doc in tokenizer.encode_batch(documents) for t in doc + eos]
    tokens = np.asarray(ids, np.int32)
    predicted_bytes = len(tokenizer.decode(ids[1:]).encode("utf-8")) if len(ids) > 1 else 0
    return tokens, predicted_bytes


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-evaluation-harness's split: trailing spaces of the context move to the continuation,
    the whole text is encoded once, and the continuation is what follows the context's tokens."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        continuation = context[-spaces:] + continuation
        context = context[:-spaces]
    whole = tokenizer.encode(context + continuation)
    context_ids = tokenizer.encode(context)
    return context_ids, whole[len(context_ids) :]


def mc_requests(tokenizer, rows: list[Choice], max_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One row per (question, choice): inputs, targets and a mask over the continuation."""
    seqs = []
    for row in rows:
        for choice in row.choices:
            context, continuation = encode_pair(tokenizer, row.query, " " + choice)
            if not continuation:
                raise ValueError(f"{row.where}: choice {choice!r} encodes to no tokens after the query")
            whole = (context + continuation)[-(max_len + 1) :]
            scored = min(len(continuation), len(whole) - 1)
            seqs.append((whole, scored))
    width = max(len(w) - 1 for w, _ in seqs)
    inputs = np.zeros((len(seqs), width), np.int32)
    targets = np.zeros((len(seqs), width), np.int32)
    weights = np.zeros((len(seqs), width), np.float32)
    for i, (whole, scored) in enumerate(seqs):
        k = len(whole) - 1
        inputs[i, :k], targets[i, :k] = whole[:-1], whole[1:]
        weights[i, k - scored : k] = 1.0
    return inputs, targets, weights


def encodable(tokenizer, rows: list[Choice]) -> tuple[list[Choice], list[str]]:
    """(rows whose text the tokenizer can encode, file:line of the others). A character
    tokenizer trained on one corpus cannot encode characters it never saw."""
    kept, skipped = [], []
    for row in rows:
        try:
            for text in (row.query, *row.choices):
                tokenizer.encode(text)
        except ValueError:
            skipped.append(row.where)
            continue
        kept.append(row)
    return kept, skipped


def mc_metrics(scorer: Scorer, tokenizer, rows: list[Choice], max_len: int) -> dict[str, float]:
    """acc and acc_norm (log-likelihood per character of the choice) over the rows the
    tokenizer can encode; `skipped` counts the others."""
    rows, skipped = encodable(tokenizer, rows)
    if not rows:
        raise ValueError(
            f"no multiple-choice row can be encoded by this {tokenizer.kind} tokenizer ({skipped[0]}, ...)"
        )
    if skipped:
        print(f"warning: skipped {len(skipped)} rows the tokenizer cannot encode (first: {skipped[0]})", flush=True)
    inputs, targets, weights = mc_requests(tokenizer, rows, max_len)
    loglik = -_score_by_length(scorer, inputs, targets, weights)
    correct = correct_norm = 0
    i = 0
    for row in rows:
        ll = loglik[i : i + len(row.choices)]
        i += len(row.choices)
        lengths = np.array([float(len(c)) for c in row.choices])
        correct += int(np.argmax(ll) == row.gold)
        correct_norm += int(np.argmax(ll / np.maximum(lengths, 1.0)) == row.gold)
    n = len(rows)
    return {
        "acc": correct / n,
        "acc_stderr": _stderr(correct / n, n),
        "acc_norm": correct_norm / n,
        "acc_norm_stderr": _stderr(correct_norm / n, n),
        "questions": n,
        "skipped": len(skipped),
        "chance": float(np.mean([1.0 / len(r.choices) for r in rows])),
    }


def _stderr(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / max(n - 1, 1))  # sample stderr, as the harness reports


def _score_by_length(scorer: Scorer, inputs, targets, weights) -> np.ndarray:
    """Scores rows grouped by length, each group trimmed to a power-of-two width, so short
    rows do not pay for the longest one and few shapes compile."""
    lengths = weights.shape[1] - np.argmax(weights[:, ::-1] > 0, axis=1)  # last scored column + 1
    order = np.argsort(lengths, kind="stable")
    out = np.zeros(len(inputs), np.float64)
    start = 0
    while start < len(order):
        width = min(1 << int(math.ceil(math.log2(lengths[order[start]]))), inputs.shape[1])
        stop = start
        while stop < len(order) and lengths[order[stop]] <= width:
            stop += 1
        idx = order[start:stop]
        out[idx] = scorer(inputs[idx, :width], targets[idx, :width], weights[idx, :width])
        start = stop
    return out


def _format_table(results: dict[str, dict[str, Any]]) -> str:
    lines = [f"{'task':<28} {'metric':<16} {'value':>12}"]
    for task, metrics in results.items():
        for key, value in metrics.items():
            if not isinstance(value, int | float):
                continue  # per-class tables and matrices: in the JSON file
            text = f"{value:,}" if isinstance(value, int) else f"{value:.4f}"
            lines.append(f"{task:<28} {key:<16} {text:>12}")
    return "\n".join(lines)


def run_evaluate(
    run_dir: str | Path,
    *,
    step: int | None = None,
    texts: list[str] = (),
    val: bool = False,
    datasets: list[str] = (),
    mc: list[str] = (),
    limit: int | None = None,
    batch_size: int = DEFAULT_BATCH,
    seq_len: int | None = None,
    sft: list[str] = (),
    classify: list[str] = (),
    extractor: str = "full",
    max_new_tokens: int = 64,
    pll: bool = False,
) -> dict[str, Any]:
    """Evaluates a checkpoint; returns {"step", "results": {task: metrics}} and writes it as JSON."""
    import jax
    from flaxpod.train import task_eval
    from flaxpod.train.cli import check_option
    from flaxpod.train.run_dir import load_run

    if not texts and not mc and not val and not datasets and not sft and not classify:
        raise ValueError(
            "nothing to evaluate: give --text PATH, --dataset DIR, --val, --mc JSONL, --sft JSONL or --classify FILE"
        )
    check_option("--limit", limit, minimum=1)
    check_option("--batch-size", batch_size, minimum=1)
    check_option("--seq-len", seq_len, minimum=1)
    check_option("--step", step, minimum=0)
    check_option("--max-new-tokens", max_new_tokens, minimum=1)
    mc_rows = {path: read_mc_jsonl(path, limit) for path in mc}  # bad rows fail before the model loads
    corpora = {spec: read_corpus(resolve_text_paths([spec], what="--text"), what="--text") for spec in texts}
    run = load_run(run_dir, step)
    m = run.cfg.model
    max_len = m.max_len
    window = seq_len or m.seq_len
    if not 0 < window <= max_len:
        raise ValueError(f"--seq-len: expected 1..{max_len} (model.max_seq_len), got {window}")
    scorer = Scorer(run, batch_size)
    text_metrics = lm_metrics
    if run.cfg.train.objective == "mlm":
        # An encoder has no next-token loss: its text metrics are masked-token ones (train/mlm_eval.py).
        from flaxpod.train import mlm_eval

        def text_metrics(_scorer, tokens, window, _nbytes):
            return mlm_eval.masked_lm_metrics(run, tokens, window, batch_size)

        if mc:
            raise ValueError("--mc: multiple-choice scoring needs a causal run; this one is masked-LM")
    elif pll:
        raise ValueError("--pll: pseudo-log-likelihood needs a masked-LM run (train.objective=mlm)")
    results: dict[str, dict[str, Any]] = {}
    for spec, corpus in corpora.items():
        try:
            tokens, nbytes = text_tokens(run.tokenizer, corpus.documents)
        except ValueError as e:
            raise ValueError(f"--text {spec}: {e}") from None
        results[f"text:{Path(spec).name}"] = text_metrics(scorer, tokens, window, nbytes)
        if pll:
            results[f"pll:{Path(spec).name}"] = mlm_eval.pseudo_log_likelihood(run, tokens, window, batch_size, limit)
    for dataset_dir in datasets:
        tokens = np.concatenate(prepared_tokens(dataset_dir, run.tokenizer))
        nbytes = len(run.tokenizer.decode(tokens[1:].tolist()).encode("utf-8"))
        results[f"dataset:{Path(dataset_dir).name}"] = text_metrics(scorer, tokens, window, nbytes)
    if val:
        tokens, nbytes = _validation_split(run)
        results["val"] = text_metrics(scorer, tokens, window, nbytes)
    for path, rows in mc_rows.items():
        results[f"mc:{Path(path).stem}"] = mc_metrics(scorer, run.tokenizer, rows, max_len)
    per_example: dict[str, list[dict]] = {}
    for path in sft:
        task = f"sft:{Path(path).stem}"
        results[task], per_example[task] = task_eval.evaluate_sft(
            run, path, extractor=extractor, max_new_tokens=max_new_tokens, batch_size=batch_size, limit=limit
        )
    for path in classify:
        task = f"classify:{Path(path).stem}"
        results[task], per_example[task] = task_eval.evaluate_classify(run, path, batch_size=batch_size, limit=limit)
    report = {"run_dir": str(run_dir), "step": run.step, "seq_len": window, "limit": limit, "results": results}
    if jax.process_index() == 0:
        out_path = Path(run_dir) / "eval" / f"step_{run.step}.json"
        write_merged_report(out_path, report)
        for task, rows in per_example.items():
            task_eval.write_jsonl(task_eval.per_example_path(run, task), rows)
        print(f"step {run.step} of {run_dir}\n{_format_table(results)}\nwritten to {out_path}")
    return report


def write_merged_report(path: Path, report: dict[str, Any]) -> None:
    """Writes `report` to `path`, keeping the results of tasks an earlier evaluation of the same
    step wrote there (a --mc-only run must not delete the saved --val figures); a task evaluated
    again is replaced. Written to a temporary name and renamed, so a crash never leaves half a file.
    A file that is not an earlier report is kept aside as PATH.unreadable rather than overwritten."""
    path.parent.mkdir(exist_ok=True)
    results = dict(report["results"])
    if path.exists():
        try:
            earlier = json.loads(path.read_text())
            previous = earlier["results"]
            if not isinstance(previous, dict):
                raise TypeError("results is not a mapping")
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            aside = path.with_name(path.name + ".unreadable")
            path.replace(aside)
            print(f"warning: {path} was not an evaluation report ({e}); moved to {aside}", file=sys.stderr)
        else:
            results = {**previous, **results}
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({**report, "results": results}, indent=2))
    tmp.replace(path)


def _validation_split(run) -> tuple[np.ndarray, int]:
    """The run's own held-out tokens, as in training: the validation split of its prepared
    datasets, or the last data.val_fraction of its text."""
    from flaxpod.data.pipeline import split_tokens, tokenize_corpus
    from flaxpod.train.data_source import data_paths, is_prepared, truncate_documents

    cfg = run.cfg
    paths = data_paths(cfg)
    if is_prepared(paths):
        tokens = np.concatenate([np.concatenate(prepared_tokens(p, run.tokenizer)) for p in paths])
        return tokens, len(run.tokenizer.decode(tokens[1:].tolist()).encode("utf-8"))
    try:
        corpus = read_corpus(resolve_text_paths(paths))
    except (FileNotFoundError, ValueError) as e:
        raise ValueError(f"--val: cannot read the run's data.path ({e}); give the held-out text with --text") from None
    if cfg.data.max_bytes:
        corpus.documents = truncate_documents(corpus.documents, cfg.data.max_bytes)
    _, val = split_tokens(tokenize_corpus(corpus, run.tokenizer), cfg.data.val_fraction)
    return val, len(run.tokenizer.decode(val[1:].tolist()).encode("utf-8"))


def prepared_tokens(dataset_dir: str, tokenizer) -> list[np.ndarray]:
    """The validation documents of a prepared dataset, refusing one made with another tokenizer."""
    from flaxpod.data.prepared import load_dataset_metadata, read_split_documents

    meta = load_dataset_metadata(dataset_dir)
    expected = meta["tokenizer"]["fingerprint"]
    if expected != tokenizer.fingerprint():
        raise ValueError(
            f"{dataset_dir}: tokenized with tokenizer {expected}, but the run's tokenizer is {tokenizer.fingerprint()}"
        )
    return read_split_documents(dataset_dir, "val")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flaxpod evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="run directory (config.yaml, tokenizer/, checkpoints/)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument("--text", action="append", default=[], help="text file, directory or glob (repeatable)")
    parser.add_argument("--val", action="store_true", help="the run's own validation split of data.path")
    parser.add_argument(
        "--dataset", action="append", default=[], help="prepared dataset directory: its validation split (repeatable)"
    )
    parser.add_argument("--mc", action="append", default=[], help='JSONL of {"query", "choices", "gold"}')
    parser.add_argument("--limit", type=int, default=None, help="first N multiple-choice questions only")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH, help="rows per batch (global)")
    parser.add_argument("--seq-len", type=int, default=None, help="window for text metrics (default model.seq_len)")
    parser.add_argument("--sft", action="append", default=[], help="SFT JSONL: response loss + generated exact match")
    parser.add_argument("--extractor", default="full", help="--sft answer: full, after:MARKER or regex:PATTERN")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="--sft: tokens generated per prompt")
    parser.add_argument("--classify", action="append", default=[], help="labelled CSV/TSV/JSONL: classification report")
    parser.add_argument(
        "--pll", action="store_true", help="masked-LM runs: pseudo-log-likelihood of --text (one pass per token: slow)"
    )
    args = parser.parse_args(argv)

    from flaxpod.sharding.distributed import initialize_from_env

    initialize_from_env()

    return run_guarded(
        lambda: run_evaluate(
            args.run_dir,
            step=args.step,
            texts=args.text,
            val=args.val,
            datasets=args.dataset,
            mc=args.mc,
            limit=args.limit,
            batch_size=args.batch_size,
            seq_len=args.seq_len,
            sft=args.sft,
            classify=args.classify,
            extractor=args.extractor,
            max_new_tokens=args.max_new_tokens,
            pll=args.pll,
        )
    )


if __name__ == "__main__":
    sys.exit(main())
