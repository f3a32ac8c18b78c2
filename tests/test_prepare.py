"""`flaxpod prepare` / `flaxpod tokenizer`: content, determinism, resume, crashes, bad input."""

import gzip
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from array_record.python.array_record_module import ArrayRecordReader
from flaxpod.data.prepare import main, prepare_dataset, tokenizer_main
from flaxpod.data.shards import decode_record, file_sha256
from flaxpod.data.tokenizer import CharTokenizer, load_tokenizer

REPO = Path(__file__).resolve().parents[1]
WORDS = "the a cat sat on mat dog ran far away and then home quick brown fox naïve zebra".split()


def sentence_text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words)) + ".\n"


def make_corpus(root: Path, n_files: int = 24, seed: int = 0) -> Path:
    """Small text files of varied length plus the awkward cases prepare must handle."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_files):
        text = f"Document {i}.\n" + "".join(sentence_text(rng, rng.randint(3, 30)) for _ in range(rng.randint(1, 20)))
        (root / f"doc{i:03d}.txt").write_text(text, encoding="utf-8")
    (root / "latin1.txt").write_bytes("Caf\xe9 cr\xe8me, the cat.\n".encode("latin-1"))
    (root / "crlf.txt").write_bytes(b"line one\r\nline two\r\n")
    (root / "empty.txt").write_bytes(b"")
    (root / "longline.txt").write_text("the cat " * 20_000 + "\n")
    rows = [{"text": f"Row {j}: " + sentence_text(rng, 8), "id": j} for j in range(30)]
    with gzip.open(root / "rows.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    corpus = make_corpus(out / "corpus")
    assert tokenizer_main([str(corpus), "--out", str(out / "tok"), "--vocab-size", "300"]) == 0
    return out / "tok"


def records(dataset: Path, split: str) -> list[bytes]:
    meta = json.loads((dataset / "metadata.json").read_text())
    out = []
    for shard in meta["splits"][split]["shards"]:
        reader = ArrayRecordReader(str(dataset / shard["path"]))
        out += reader.read_all()
        reader.close()
    return out


def shard_hashes(dataset: Path) -> dict[str, str]:
    meta = json.loads((dataset / "metadata.json").read_text())
    return {s["path"]: s["sha256"] for split in ("train", "val") for s in meta["splits"][split]["shards"]}


def test_prepare_content_and_metadata(tmp_path, tokenizer_dir):
    corpus = make_corpus(tmp_path / "corpus")
    out = tmp_path / "ds"
    meta = prepare_dataset(
        [str(corpus)], out, tokenizer=tokenizer_dir, val_fraction=0.2, shard_docs=7, workers=1, progress=False
    )
    tok = load_tokenizer(out / "tokenizer")
    assert tok.fingerprint() == load_tokenizer(tokenizer_dir).fingerprint()
    assert meta["tokenizer"]["fingerprint"] == tok.fingerprint()
    reading = meta["reading"]
    # 24 documents + latin1 + crlf + longline + 30 JSONL rows; the empty file is skipped.
    assert meta["documents"] == reading["documents"] == 24 + 3 + 30
    assert reading["empty_documents"] == 1
    assert reading["replaced_bytes"] == 2
    assert reading["crlf_documents"] == 1
    assert reading["longest_line_chars"] == len("the cat " * 20_000)

    # Every record decodes to exactly one input document, followed by eos.
    texts = []
    for split in ("train", "val"):
        recs = records(out, split)
        assert len(recs) == meta["splits"][split]["documents"]
        assert sum(len(r) // 4 for r in recs) == meta["splits"][split]["tokens"]
        for r in recs:
            ids = decode_record(r)
            assert ids[-1] == tok.eos_id and tok.eos_id not in ids[:-1]
            texts.append(tok.decode(ids[:-1].tolist()))
    expected = {"Caf\ufffd cr\ufffdme, the cat.\n", "line one\nline two\n", "the cat " * 20_000 + "\n"}
    expected |= {(corpus / f"doc{i:03d}.txt").read_text() for i in range(24)}
    with gzip.open(corpus / "rows.jsonl.gz", "rt") as f:
        expected |= {json.loads(line)["text"] for line in f}
    assert sorted(texts) == sorted(expected)
    assert 0 < meta["splits"]["val"]["documents"] < meta["documents"]

    # Shards hold at most 7 documents; metadata hashes and sizes match the files.
    for split in ("train", "val"):
        for shard in meta["splits"][split]["shards"]:
            path = out / shard["path"]
            assert shard["documents"] <= 7
            assert shard["sha256"] == file_sha256(path)
            assert shard["bytes"] == path.stat().st_size
    saved = json.loads((out / "metadata.json").read_text())
    assert saved["command"].startswith("prepare_dataset(")
    assert "run" not in saved and saved["splits"] == meta["splits"]


def test_deterministic_idempotent_and_worker_count_free(tmp_path, tokenizer_dir):
    corpus = make_corpus(tmp_path / "corpus")
    kw = dict(tokenizer=tokenizer_dir, val_fraction=0.2, shard_docs=10, progress=False)
    a = prepare_dataset([str(corpus)], tmp_path / "a", workers=1, **kw)
    b = prepare_dataset([str(corpus)], tmp_path / "b", workers=2, **kw)
    assert shard_hashes(tmp_path / "a") == shard_hashes(tmp_path / "b")
    assert a["splits"] == b["splits"]
    saved_a, saved_b = (json.loads((tmp_path / d / "metadata.json").read_text()) for d in "ab")
    assert saved_a.pop("command") != saved_b.pop("command")  # they name their --out
    assert saved_a == saved_b

    # Re-running rewrites nothing: every shard is reused and its file is untouched.
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "a").rglob("*.array_record")}
    again = prepare_dataset([str(corpus)], tmp_path / "a", workers=1, **kw)
    assert again["run"]["shards_reused"] == len(mtimes) > 2
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    assert shard_hashes(tmp_path / "a") == shard_hashes(tmp_path / "b")


def test_validation_split_is_stable_when_inputs_are_added(tmp_path, tokenizer_dir):
    first = make_corpus(tmp_path / "first", seed=1)
    more = make_corpus(tmp_path / "more", n_files=40, seed=2)
    kw = dict(tokenizer=tokenizer_dir, val_fraction=0.3, workers=1, progress=False)
    prepare_dataset([str(first)], tmp_path / "small", **kw)
    prepare_dataset([str(first), str(more)], tmp_path / "big", **kw)
    small_val = set(records(tmp_path / "small", "val"))
    small_train = set(records(tmp_path / "small", "train"))
    big_val = set(records(tmp_path / "big", "val"))
    assert small_val and small_val <= big_val
    assert not small_train & big_val


def test_trained_tokenizer_is_reused_and_long_documents_get_own_shard(tmp_path):
    corpus = make_corpus(tmp_path / "corpus")
    kw = dict(vocab_size=300, model_type="unigram", shard_bytes=4096, workers=1, progress=False, val_fraction=0.0)
    meta = prepare_dataset([str(corpus)], tmp_path / "ds", **kw)
    assert meta["tokenizer"]["model_type"] == "unigram" and meta["tokenizer"]["vocab_size"] == 300
    assert meta["tokenizer"]["sample_documents"] == meta["documents"]
    assert meta["reading"]["documents_larger_than_a_shard"] == 1  # longline.txt, 160 kB
    long_shards = [s for s in meta["splits"]["train"]["shards"] if s["documents"] == 1 and s["tokens"] > 4096]
    assert len(long_shards) == 1
    again = prepare_dataset([str(corpus)], tmp_path / "ds", **kw)
    assert again["tokenizer"]["fingerprint"] == meta["tokenizer"]["fingerprint"]
    assert again["run"]["shards_reused"] == len(meta["splits"]["train"]["shards"])


CRASH_SCRIPT = """
import os, sys
from flaxpod.data import shards
from flaxpod.data.prepare import prepare_dataset
real_write, count = shards.ShardWriter.write, [0]
def write(self, record):
    count[0] += 1
    if count[0] == int(sys.argv[3]):
        os._exit(17)  # like a kill -9: no cleanup runs
    real_write(self, record)
shards.ShardWriter.write = write
prepare_dataset([sys.argv[1]], sys.argv[2], tokenizer=sys.argv[4], shard_docs=10,
                val_fraction=0.2, workers=1, progress=False)
"""


def test_crash_leaves_no_complete_looking_shard_and_rerun_finishes(tmp_path, tokenizer_dir):
    corpus = make_corpus(tmp_path / "corpus")
    kw = dict(tokenizer=tokenizer_dir, shard_docs=10, val_fraction=0.2, workers=1, progress=False)
    prepare_dataset([str(corpus)], tmp_path / "clean", **kw)
    out = tmp_path / "crashed"
    env = dict(os.environ)
    # Die while writing the 25th record: in the third shard.
    proc = subprocess.run(
        [sys.executable, "-c", CRASH_SCRIPT, str(corpus), str(out), "25", str(tokenizer_dir)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 17, proc.stderr
    assert not (out / "metadata.json").exists()
    finals = sorted(out.rglob("*.array_record"))
    temps = sorted(out.rglob("*.array_record.tmp"))
    assert len(finals) == 2 and len(temps) == 1
    for path in finals:  # whatever has a final name is whole
        reader = ArrayRecordReader(str(path))
        assert reader.num_records() == 10
        reader.close()
    meta = prepare_dataset([str(corpus)], out, **kw)
    assert meta["run"]["shards_reused"] == 2
    assert shard_hashes(out) == shard_hashes(tmp_path / "clean")
    assert not list(out.rglob("*.tmp"))


def test_cli_prepare_and_errors(tmp_path, tokenizer_dir, capsys):
    corpus = make_corpus(tmp_path / "corpus", n_files=3)
    out = tmp_path / "ds"
    assert (
        main(
            [
                str(corpus),
                "--out",
                str(out),
                "--tokenizer",
                str(tokenizer_dir),
                "--workers",
                "1",
                "--no-progress",
                "--shard-bytes",
                "1k",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert f"prepared {out}: 36 documents" in printed  # 3 + latin1, crlf, long + 30 rows
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["command"].startswith(f"flaxpod prepare {corpus} --out {out}")
    assert meta["shard_bytes"] == 1024

    model = tokenizer_dir / "tokenizer.model"
    cases = [
        ([str(tmp_path / "missing.txt"), "--out", str(tmp_path / "x")], "missing.txt"),
        (
            [str(corpus), "--out", str(tmp_path / "x"), "--shard-docs", "3", "--shard-bytes", "1M"],
            "not allowed with argument",
        ),
        ([str(corpus), "--out", str(tmp_path / "x"), "--val-fraction", "1.5"], "--val-fraction"),
        ([str(corpus), "--out", str(tmp_path / "x"), "--tokenizer", str(tmp_path / "nope")], "--tokenizer"),
        ([str(corpus), "--out", str(corpus / "sub")], "lies inside the input directory"),
        ([str(out / "metadata.json"), "--out", str(out)], "lies inside the output directory"),
        ([str(corpus), "--out", str(tmp_path / "x"), "--bogus"], "unrecognized arguments"),
        (
            [str(corpus), "--out", str(tmp_path / "x"), "--tokenizer", str(tokenizer_dir), "--vocab-size", "500"],
            "--vocab-size and --model-type train a tokenizer",
        ),
        (
            [str(corpus), "--out", str(tmp_path / "x"), "--tokenizer", str(corpus / "crlf.txt")],
            "not a SentencePiece model",
        ),
    ]
    for argv, needle in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and err.startswith("flaxpod prepare: error:"), err
        assert needle in err, (needle, err)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    assert main([str(corpus), "--out", str(busy), "--tokenizer", str(model)]) == 2
    assert "not empty" in capsys.readouterr().err


def test_failed_run_names_the_document_and_can_be_rerun(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("abc")
    (tmp_path / "in" / "b.txt").write_text("abz")
    CharTokenizer(list("abc")).save(tmp_path / "tok")
    argv = [str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--tokenizer", str(tmp_path / "tok"), "--no-progress"]
    for workers in ("2", "1"):  # the error crosses the process boundary intact
        assert main([*argv, "--workers", workers]) == 2
        err = capsys.readouterr().err
        assert f"{tmp_path / 'in' / 'b.txt'}: char tokenizer: character 'z'" in err, err
    assert not (tmp_path / "out" / "metadata.json").exists()
    (tmp_path / "in" / "b.txt").write_text("abba")
    assert main([*argv, "--workers", "1"]) == 0
    meta = json.loads((tmp_path / "out" / "metadata.json").read_text())
    assert meta["tokens"] == 7 and meta["record"]["content"] == "token ids of one document"


def test_tokenizer_cli_errors(tmp_path, capsys):
    (tmp_path / "tiny.txt").write_text("ab")
    assert tokenizer_main([str(tmp_path / "tiny.txt"), "--out", str(tmp_path / "t"), "--vocab-size", "5000"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("flaxpod tokenizer: error: tokenizer.vocab_size: 5000")
    assert err.count("\n") == 0
