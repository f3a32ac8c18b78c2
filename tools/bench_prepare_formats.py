"""`flaxpod prepare` throughput and peak RSS on the same rows as JSONL, .jsonl.zst and Parquet.

Rows (about 4 KB of Gutenberg text each, plus a score and a language field) are generated
into --work at each --sizes (MB of JSONL); each prepare runs as its own process, and its
peak RSS is the largest resident size of it or any one of its tokenizer workers (wait4's ru_maxrss).
A character tokenizer keeps tokenizing cheap, so the figures show the readers' cost.

    python -m tools.bench_prepare_formats /work/shared/data/pretrain/gutenberg --work /tmp/bench --sizes 64 192
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import zstandard
from flaxpod.data.text import read_corpus, resolve_text_paths
from flaxpod.data.tokenizer import train_char_tokenizer

ROW_CHARS = 4000
ROWS_PER_GROUP = 2000


def rows(source: str, mb: int):
    """Rows of text cut from `source`, round-robin, until `mb` MB of JSONL."""
    total, i = 0, 0
    while total < mb * 1_000_000:
        start = (i * 7919 * ROW_CHARS) % max(len(source) - ROW_CHARS, 1)
        row = {"text": source[start : start + ROW_CHARS], "meta": {"lang": "en"}, "score": (i % 100) / 100}
        total += len(json.dumps(row, ensure_ascii=False)) + 1
        i += 1
        yield row


def write_inputs(source: str, mb: int, work: Path) -> dict[str, Path]:
    paths = {
        "jsonl": work / f"rows{mb}.jsonl",
        "jsonl.zst": work / f"rows{mb}.jsonl.zst",
        "parquet": work / f"rows{mb}.parquet",
    }
    schema = pa.schema([("text", pa.string()), ("meta", pa.struct([("lang", pa.string())])), ("score", pa.float64())])
    with open(paths["jsonl"], "w", encoding="utf-8") as jf, open(paths["jsonl.zst"], "wb") as raw:
        zf = zstandard.ZstdCompressor(level=3).stream_writer(raw)
        writer = pq.ParquetWriter(paths["parquet"], schema)
        batch = []
        for row in rows(source, mb):
            line = json.dumps(row, ensure_ascii=False) + "\n"
            jf.write(line)
            zf.write(line.encode())
            batch.append(row)
            if len(batch) == ROWS_PER_GROUP:
                writer.write_table(pa.Table.from_pylist(batch, schema))
                batch = []
        if batch:
            writer.write_table(pa.Table.from_pylist(batch, schema))
        writer.close()
        zf.flush(zstandard.FLUSH_FRAME)
    return paths


def run_prepare(path: Path, out: Path, tok_dir: Path) -> tuple[float, float]:
    """(seconds, peak RSS MiB) of one `flaxpod prepare` process."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [
        sys.executable,
        "-m",
        "flaxpod.train.cli",
        "prepare",
        str(path),
        "--out",
        str(out),
        "--tokenizer",
        str(tok_dir),
        "--min-field",
        "score=0.1",
        "--require-field",
        "meta.lang=en",
        "--workers",
        "2",
        "--no-progress",
    ]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"prepare failed on {path}: {proc.stderr.read().decode()[-500:]}")
    return seconds, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="text files to cut rows from")
    parser.add_argument("--work", required=True, help="scratch directory (inputs and outputs)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 192], help="JSONL sizes in MB")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    source = "\n".join(read_corpus(resolve_text_paths(args.source)).documents)
    train_char_tokenizer(source).save(work / "tok")
    print(
        f"{os.cpu_count()} cpus, load average {os.getloadavg()[0]:.1f}; char tokenizer, 2 workers, "
        "filter score>=0.1 and meta.lang=en"
    )
    print("| input | file MB | text MB | seconds | text MB/s | peak RSS MiB |")
    print("|---|---|---|---|---|---|")
    for mb in args.sizes:
        paths = write_inputs(source, mb, work)
        for fmt, path in paths.items():
            seconds, rss = run_prepare(path, work / "out", work / "tok")
            meta = json.loads((work / "out" / "metadata.json").read_text())
            text_mb = meta["reading"]["text_bytes"] / 1e6
            print(
                f"| {fmt} ({mb} MB JSONL) | {path.stat().st_size / 1e6:.0f} | {text_mb:.0f} | {seconds:.1f} | "
                f"{text_mb / seconds:.2f} | {rss:.0f} |",
                flush=True,
            )
        for path in paths.values():
            path.unlink()
    shutil.rmtree(work / "out", ignore_errors=True)


if __name__ == "__main__":
    main()
