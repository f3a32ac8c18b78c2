"""Finetuning benchmarks of issue 9, one invocation, figures in a table (and JSON with --json).

    python -m tools.bench_finetune --base runs/tiny --work /tmp/ft-bench \
        --banking77 ../shared/data/classification/banking77 --seed-tasks ../shared/data/sft/seed_tasks.jsonl

1. Transfer on banking77: the base's architecture finetuned from its pretrained weights and from random
   weights, the same budget (early stopping on a 10% split of train.csv), both scored on test.csv; a
   TF-IDF + logistic-regression baseline (scikit-learn) on the same split.
2. SFT learns what the base cannot: greedy exact match on the generated word-reversal task
   (tools/demo_tasks.py) of the base, then of the base after SFT.
3. SFT on the self-instruct seed tasks (instances expanded): the response-only validation loss curve.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def flaxpod(*args: str, log: Path) -> float:
    """Runs a flaxpod subcommand (output appended to `log`); returns its wall time."""
    start = time.perf_counter()
    with open(log, "a") as out:
        out.write(f"\n$ flaxpod {' '.join(args)}\n")
        out.flush()
        code = subprocess.run([sys.executable, "-m", "flaxpod.train.cli", *args], stdout=out, stderr=out).returncode
    if code != 0:
        raise SystemExit(f"flaxpod {args[0]} failed with exit code {code}; see {log}")
    return time.perf_counter() - start


def results(run_dir: Path, task: str) -> dict:
    report = max((run_dir / "eval").glob("step_*.json"), key=lambda p: p.stat().st_mtime)
    return json.loads(report.read_text())["results"][task]


def metric_curve(run_dir: Path, key: str) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r[key]) for r in rows if key in r]


def banking77(args, log: Path) -> list[dict]:
    train, test = Path(args.banking77) / "train.csv", Path(args.banking77) / "test.csv"
    rows = []
    for init in ("pretrained", "random"):
        run = args.work / f"banking77-{init}"
        seconds = flaxpod(
            "finetune",
            str(ROOT / "configs" / "finetune_classify.yaml"),
            f"run_dir={run}",
            f"finetune.base={args.base}",
            f"finetune.init={init}",
            f"data.path={train}",
            f"train.steps={args.classify_steps}",
            log=log,
        )
        flaxpod("evaluate", str(run), "--classify", str(test), log=log)
        r = results(run, "classify:test")
        best = json.loads((run / "best.json").read_text())
        rows.append(
            {"model": f"flaxpod, {init} init", "accuracy": r["accuracy"], "macro_f1": r["macro_f1"],
             "best_step": best["step"], "seconds": seconds}
        )  # fmt: skip
    rows.append(tfidf_baseline(train, test))
    return rows


def tfidf_baseline(train: Path, test: Path) -> dict:
    from flaxpod.data.classify import read_examples
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score

    start = time.perf_counter()
    tr, te = read_examples(train, "text", "category"), read_examples(test, "text", "category")
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
    x_train = vectorizer.fit_transform([e.text for e in tr])
    model = LogisticRegression(max_iter=2000, C=10.0).fit(x_train, [e.label for e in tr])
    pred = model.predict(vectorizer.transform([e.text for e in te]))
    truth = [e.label for e in te]
    return {
        "model": "TF-IDF (1-2 grams) + logistic regression",
        "accuracy": accuracy_score(truth, pred),
        "macro_f1": f1_score(truth, pred, average="macro"),
        "best_step": None,
        "seconds": time.perf_counter() - start,
    }


def reverse_sft(args, log: Path) -> dict:
    demo = args.work / "demo"
    subprocess.run([sys.executable, "-m", "tools.demo_tasks", str(demo)], check=True, cwd=ROOT, capture_output=True)
    test = demo / "reverse_test.jsonl"
    sft = ["--sft", str(test), "--extractor", "full", "--max-new-tokens", "24", "--limit", str(args.reverse_eval)]
    flaxpod("evaluate", str(args.base), *sft, log=log)
    before = results(Path(args.base), "sft:reverse_test")["exact_match"]
    run = args.work / "reverse-sft"
    seconds = flaxpod(
        "finetune",
        str(ROOT / "configs" / "finetune_sft.yaml"),
        f"run_dir={run}",
        f"finetune.base={args.base}",
        f"data.path={demo / 'reverse_train.jsonl'}",
        f"train.steps={args.sft_steps}",
        "model.seq_len=64",
        "optim.lr=1e-3",
        "data.batch_size=32",
        log=log,
    )
    flaxpod("evaluate", str(run), *sft, log=log)
    after = results(run, "sft:reverse_test")
    return {"before": before, "after": after["exact_match"], "examples": after["examples"], "seconds": seconds,
            "val_loss": metric_curve(run, "val_loss")}  # fmt: skip


def seed_tasks(args, log: Path) -> dict:
    run = args.work / "seed-tasks"
    seconds = flaxpod(
        "finetune",
        str(ROOT / "configs" / "finetune_sft.yaml"),
        f"run_dir={run}",
        f"finetune.base={args.base}",
        f"data.path={args.seed_tasks}",
        "data.prompt_field=instruction",
        "data.response_field=instances",
        "data.val_fraction=0.15",
        f"train.steps={args.seed_steps}",
        f"train.eval_every={max(args.seed_steps // 4, 1)}",
        log=log,
    )
    return {"val_loss": metric_curve(run, "val_loss"), "seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="a pretrained run directory (e.g. runs/tiny)")
    parser.add_argument("--work", type=Path, required=True, help="where the finetuning runs go")
    parser.add_argument("--banking77", default=None, help="directory with train.csv and test.csv")
    parser.add_argument("--seed-tasks", default=None, help="self-instruct seed_tasks.jsonl")
    parser.add_argument("--classify-steps", type=int, default=600)
    parser.add_argument("--sft-steps", type=int, default=600)
    parser.add_argument("--seed-steps", type=int, default=200)
    parser.add_argument("--reverse-eval", type=int, default=100, help="test examples generated from")
    parser.add_argument("--only", choices=["banking77", "reverse", "seed"], action="append", default=None)
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    log = args.work / "bench.log"
    only = set(args.only or ["banking77", "reverse", "seed"])
    out: dict = {}
    if "banking77" in only and args.banking77:
        out["banking77"] = banking77(args, log)
        print("| model | test accuracy | test macro-F1 | best step | seconds |\n|---|---|---|---|---|")
        for r in out["banking77"]:
            print(
                f"| {r['model']} | {r['accuracy']:.4f} | {r['macro_f1']:.4f} | {r['best_step']} | {r['seconds']:.0f} |"
            )
    if "reverse" in only:
        r = out["reverse"] = reverse_sft(args, log)
        print(
            f"word reversal, greedy exact match on {r['examples']} test prompts: base {r['before']:.1%}, after "
            f"{args.sft_steps} SFT steps {r['after']:.1%} ({r['seconds']:.0f} s); val loss {r['val_loss']}"
        )
    if "seed" in only and args.seed_tasks:
        r = out["seed_tasks"] = seed_tasks(args, log)
        print(f"seed tasks, response-only validation loss by step: {r['val_loss']} ({r['seconds']:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
