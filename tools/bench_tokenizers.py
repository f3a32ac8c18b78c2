"""SentencePiece BPE vs byte-level BPE (`tokenizers`) on a text corpus: training time, tokens per
byte, encode throughput. Both train on the same texts with the same vocabulary size.

    python -m tools.bench_tokenizers /work/shared/data/pretrain/gutenberg --vocab-size 8000
"""

from __future__ import annotations

import argparse
import os
import time

from flaxpod.data.hf_tokenizers import train_byte_level_bpe
from flaxpod.data.text import read_corpus, resolve_text_paths
from flaxpod.data.tokenizer import train_sentencepiece


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", help="text file, directory or glob")
    parser.add_argument("--vocab-size", type=int, default=8000)
    args = parser.parse_args()
    docs = read_corpus(resolve_text_paths(args.path)).documents
    nbytes = sum(len(d.encode("utf-8")) for d in docs)
    print(
        f"{len(docs)} documents, {nbytes / 1e6:.1f} MB, vocab {args.vocab_size}, {os.cpu_count()} cpus, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    print("| tokenizer | train s | tokens/byte | encode MB/s | round trip exact |")
    print("|---|---|---|---|---|")
    trainers = {
        "SentencePiece BPE (sentencepiece)": lambda: train_sentencepiece(docs, args.vocab_size, "bpe"),
        "byte-level BPE (tokenizers)": lambda: train_byte_level_bpe(docs, args.vocab_size),
    }
    for name, train in trainers.items():
        start = time.perf_counter()
        tok = train()
        train_s = time.perf_counter() - start
        start = time.perf_counter()
        ids = tok.encode_batch(docs)
        encode_s = time.perf_counter() - start
        tokens = sum(map(len, ids))
        exact = all(tok.decode(i) == d for i, d in zip(ids, docs, strict=True))
        print(f"| {name} | {train_s:.1f} | {tokens / nbytes:.4f} | {nbytes / 1e6 / encode_s:.1f} | {exact} |")


if __name__ == "__main__":
    main()
