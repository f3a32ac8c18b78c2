"""Task metrics of a finetuned run: `evaluate --sft`, `evaluate --classify` and `predict`.

SFT: response-only loss and perplexity (the training objective on the file's examples) and greedy
generation from each prompt, scored by exact match of the extracted answer (`--extractor`: `full`,
`after:MARKER`, `regex:PATTERN`). Classification: accuracy, macro/weighted precision, recall and F1,
per-class scores and the confusion matrix (JSON and PNG). Per-example outputs go to a JSONL file
beside the run's eval/step_N.json.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import optax
from flaxpod.data import classify as cls_data
from flaxpod.data import sft as sft_data
from flaxpod.data.sft_answers import check_extractor, check_references, exact_match, extract_answer
from flaxpod.data.sft_format import load_sft_eval_pairs, load_sft_examples
from flaxpod.model.errors import InputError
from flaxpod.sharding.rules import make_rules
from flaxpod.train.classification_metrics import (
    classification_report,
    format_table,
    summary_metrics,
    write_confusion_png,
)
from flaxpod.train.finetuning import predict_batches, prediction_fn, sft_format
from flaxpod.train.generate import generate_ids
from flaxpod.train.objectives import CausalLM, Classify
from flaxpod.train.run_dir import LoadedRun
from flaxpod.train.trainer import Trainer


def inference_trainer(run: LoadedRun, objective: Any) -> Trainer:
    """A Trainer over the loaded run's mesh and rules, used only for its compiled evaluation (no optimizer)."""
    rules = make_rules(run.cfg.mesh.rules, run.cfg.mesh.rule_overrides)
    return Trainer(run.cfg.model, run.mesh, rules, optax.identity(), optax.constant_schedule(0.0), objective)


def _global_batch(run: LoadedRun, batch_size: int) -> dict[str, int]:
    import jax

    ways = max(jax.process_count(), 1)
    return {
        "global_batch_size": -(-batch_size // ways) * ways,
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
    }


def per_example_path(run: LoadedRun, task: str) -> Path:
    return run.run_dir / "eval" / f"step_{run.step}.{task.replace(':', '-')}.jsonl"


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)


def evaluate_sft(
    run: LoadedRun, path: str, *, extractor: str, max_new_tokens: int, batch_size: int, limit: int | None
) -> tuple[dict[str, float], list[dict]]:
    """(metrics, per-example rows) of an SFT test file."""
    import jax

    check_extractor(extractor)
    fmt = sft_format(run.cfg)
    pairs = load_sft_eval_pairs(path, fmt)[:limit]
    check_references(pairs, extractor)
    examples = load_sft_examples(path, fmt)[:limit]
    tokenized, stats = sft_data.tokenize_examples(examples, run.tokenizer, run.cfg.model.seq_len)
    batches = sft_data.make_sft_eval_batches(tokenized, seq_len=run.cfg.model.seq_len, **_global_batch(run, batch_size))
    loss = inference_trainer(run, CausalLM()).evaluate(run.params, batches)["loss"]
    prompts = [sft_data.encode_prompt(pair, run.tokenizer) for pair in pairs]
    outputs = generate_ids(run, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    rows, correct = [], 0
    for pair, prompt, ids in zip(pairs, prompts, outputs, strict=True):
        text = "".join(run.tokenizer.decode_stream(prompt, ids))
        ok = exact_match(text, pair.reference, extractor)
        correct += ok
        rows.append(
            {
                "where": pair.where,
                "prompt": pair.prompt,
                "reference": pair.reference,
                "output": text,
                "answer": extract_answer(text, extractor),
                "exact_match": bool(ok),
            }
        )
    metrics = {
        "loss": loss,
        "perplexity": float(np.exp(loss)),
        "exact_match": correct / max(len(pairs), 1),
        "examples": len(pairs),
        "truncated": stats.truncated,
        "dropped": stats.dropped,
    }
    if jax.process_index() == 0:
        print(f"sft {path}: {correct}/{len(pairs)} exact matches ({extractor})")
    return metrics, rows


def run_labels(run: LoadedRun) -> list[str]:
    path = run.run_dir / cls_data.LABELS_FILE
    if run.cfg.model.num_labels <= 0 or not path.is_file():
        raise InputError(f"{run.run_dir} is not a classification run (no {cls_data.LABELS_FILE}, model.num_labels=0)")
    return cls_data.load_labels(path)


def _encode_for(run: LoadedRun, examples: list, labels: list[str], path: str) -> cls_data.EncodedExamples:
    # Encoded exactly as in training (train/finetuning.py classify_task).
    append_eos = run.tokenizer.eos_id is not None and run.cfg.model.pooling == "last"
    return cls_data.encode_examples(examples, run.tokenizer, labels, run.cfg.model.seq_len, path, append_eos=append_eos)


def evaluate_classify(run: LoadedRun, path: str, *, batch_size: int, limit: int | None) -> tuple[dict, list[dict]]:
    """(report, per-example rows) of a labelled CSV/TSV/JSONL file; writes the confusion-matrix PNG."""
    import jax

    labels = run_labels(run)
    examples = cls_data.read_examples(path, run.cfg.data.text_field, run.cfg.data.label_field)[:limit]
    encoded = _encode_for(run, examples, labels, path)
    batches = cls_data.make_classify_eval_batches(encoded, **_global_batch(run, batch_size))
    trainer = inference_trainer(run, Classify())
    y_true, y_pred, probs = predict_batches(prediction_fn(trainer), trainer, run.params, batches)
    report = classification_report(y_true, y_pred, labels)
    rows = [
        {"row": ex.row, "label": ex.label, "prediction": labels[p], "probability": float(probs[i, p])}
        for i, (ex, p) in enumerate(zip(examples, y_pred, strict=True))
    ]
    if jax.process_index() == 0:
        png = run.run_dir / "eval" / f"step_{run.step}.classify-{Path(path).stem}.png"
        png.parent.mkdir(parents=True, exist_ok=True)
        write_confusion_png(report, png, title=f"{Path(path).name}, step {run.step}")
        print(f"classify {path}:\n{format_table(report)}\nconfusion matrix: {png}")
    result = {
        **summary_metrics(report),
        "per_class": report["per_class"],
        "confusion_matrix": report["confusion_matrix"],
    }
    return result, rows


def predict_texts(run: LoadedRun, texts: list[str], *, batch_size: int) -> list[dict]:
    """Label and probability of each text (a classification run)."""
    labels = run_labels(run)
    if not texts:
        raise InputError("nothing to predict: give --text TEXT or --file FILE")
    append_eos = run.tokenizer.eos_id is not None and run.cfg.model.pooling == "last"
    encoded = cls_data.encode_texts(texts, run.tokenizer, run.cfg.model.seq_len, append_eos=append_eos)
    batches = cls_data.make_classify_eval_batches(encoded, **_global_batch(run, batch_size))
    trainer = inference_trainer(run, Classify())
    _, y_pred, probs = predict_batches(prediction_fn(trainer), trainer, run.params, batches)
    return [
        {"text": text, "label": labels[p], "probability": float(probs[i, p])}
        for i, (text, p) in enumerate(zip(texts, y_pred, strict=True))
    ]
