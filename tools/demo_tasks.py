"""Small finetuning tasks generated on the spot, for the README's finetuning demo, tests and benchmarks.

    python -m tools.demo_tasks OUT_DIR [--seed 0]

writes
    OUT_DIR/reverse_{train,test}.jsonl   SFT: "Reverse the order of these words: w1 w2 w3 w4" -> "w4 w3 w2 w1"
    OUT_DIR/stdlib_{train,test}.csv      classification: the first line of a standard-library docstring ->
                                         the module it documents (text,category)

Both come from what every machine with Python has: a fixed word list, and the docstrings of the
running interpreter's standard library (`inspect`). A pretrained model cannot do the first (exact
match ~0%): SFT must teach it; the second rewards what pretraining on code and prose learned.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import inspect
import json
import random
import sys
from pathlib import Path

WORDS = (
    "apple river stone cloud green table music paper light water dream house sugar winter horse "
    "garden silver window forest bread candle mirror orange thunder pocket rabbit planet ladder violin "
    "tiger coffee island butter dragon copper meadow rocket lemon castle"
).split()
MODULES = (
    "os", "re", "json", "math", "datetime", "random", "itertools", "shutil", "socket", "zipfile", "statistics",
    "threading", "subprocess", "tarfile", "decimal", "pathlib", "functools", "operator", "email.utils", "time",
)  # fmt: skip
PER_MODULE = 40  # at most, so that no module dominates


def reverse_examples(n: int, rng: random.Random) -> list[dict[str, str]]:
    out = []
    for _ in range(n):
        words = rng.sample(WORDS, rng.randint(3, 5))
        out.append(
            {"prompt": f"Reverse the order of these words: {' '.join(words)}", "response": " ".join(words[::-1])}
        )
    return out


def docstring_examples() -> list[tuple[str, str]]:
    """(first docstring line, module) of every public function and class of MODULES, deduplicated."""
    seen, out = set(), []
    for name in MODULES:
        module, count = importlib.import_module(name), 0
        for attr in sorted(dir(module)):
            if attr.startswith("_"):
                continue
            obj = getattr(module, attr)
            if not (inspect.isfunction(obj) or inspect.isbuiltin(obj) or inspect.isclass(obj)):
                continue
            doc = (inspect.getdoc(obj) or "").strip().splitlines()
            line = doc[0].strip() if doc else ""
            if len(line) >= 12 and line not in seen and count < PER_MODULE:
                seen.add(line)
                out.append((line, name))
                count += 1
    return out


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_csv(path: Path, rows: list[tuple[str, str]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "category"])
        writer.writerows(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reverse-train", type=int, default=4000, help="SFT training examples")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    write_jsonl(out / "reverse_train.jsonl", reverse_examples(args.reverse_train, rng))
    write_jsonl(out / "reverse_test.jsonl", reverse_examples(200, rng))
    docs = docstring_examples()
    rng.shuffle(docs)
    n_test = len(docs) // 5
    write_csv(out / "stdlib_train.csv", docs[n_test:])
    write_csv(out / "stdlib_test.csv", docs[:n_test])
    n_train = len(docs) - n_test
    print(f"{out}: reverse_train/test.jsonl ({args.reverse_train}/200), stdlib_train/test.csv ({n_train}/{n_test})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
