"""Reading raw inputs into documents: text, .gz, JSONL, and the real-world oddities."""

import gzip
import io
import json
import os
import re

import pytest
from flaxpod.data import progress
from flaxpod.data.documents import DocumentReader, document_hash, hash_below, input_files


def read(paths, **kw):
    reader = DocumentReader(paths, **kw)
    return [d.text for d in reader], reader.stats


def test_text_files_latin1_crlf_empty_and_long_line(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"caf\xe9 au lait\n")  # Latin-1, not UTF-8
    (tmp_path / "b.txt").write_bytes(b"one\r\ntwo\r\n")
    (tmp_path / "c.txt").write_bytes(b"")
    (tmp_path / "d.txt").write_text("x" * 300_000 + "\nshort\n")
    texts, stats = read(input_files([str(tmp_path)]))
    assert texts == ["caf\ufffd au lait\n", "one\ntwo\n", "x" * 300_000 + "\nshort\n"]
    assert stats.files == 4
    assert stats.documents == 3
    assert stats.empty_documents == 1
    assert stats.replaced_bytes == 1
    assert stats.files_with_replacements == 1
    assert stats.replacement_examples == [str(tmp_path / "a.txt")]
    assert stats.crlf_documents == 1
    assert stats.longest_line_chars == 300_000


def test_gzip_and_jsonl(tmp_path):
    with gzip.open(tmp_path / "book.txt.gz", "wb") as f:
        f.write(b"Gzipped text.\r\n")
    rows = [{"text": "first row", "id": 1}, {"text": ""}, {"text": "third\r\nrow"}]
    body = "\n".join(json.dumps(r) for r in rows[:2]) + "\n\n" + json.dumps(rows[2]) + "\n"
    with gzip.open(tmp_path / "rows.jsonl.gz", "wt") as f:
        f.write(body)
    (tmp_path / "other.jsonl").write_text(json.dumps({"body": "custom field"}) + "\n")
    texts, stats = read([tmp_path / "book.txt.gz", tmp_path / "rows.jsonl.gz"])
    assert texts == ["Gzipped text.\n", "first row", "third\nrow"]
    assert stats.empty_documents == 1 and stats.crlf_documents == 2
    texts, _ = read([tmp_path / "other.jsonl"], jsonl_field="body")
    assert texts == ["custom field"]


def test_documents_carry_source_and_progress(tmp_path):
    (tmp_path / "r.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n')
    (tmp_path / "s.txt").write_text("hello")
    reader = DocumentReader([tmp_path / "r.jsonl", tmp_path / "s.txt"])
    docs = list(reader)
    assert [d.source for d in docs] == [
        f"{tmp_path / 'r.jsonl'}:1",
        f"{tmp_path / 'r.jsonl'}:2",
        str(tmp_path / "s.txt"),
    ]
    assert docs[-1].disk_offset == reader.total_disk_bytes()


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "bad.jsonl:2: invalid JSON"),
        ('["a list"]', "bad.jsonl:2: expected a JSON object, got list"),
        ('{"title": "x", "body": "y"}', "bad.jsonl:2: no field 'text' (keys: body, title)"),
        ('{"text": 5}', "bad.jsonl:2: field 'text' must be a string, got int"),
    ],
)
def test_bad_jsonl_names_file_and_line(tmp_path, line, message):
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(ValueError, match=re.escape(message)):
        read([tmp_path / "bad.jsonl"])


def test_missing_input_and_corrupt_gzip(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        input_files([str(tmp_path / "nope*.txt")])
    (tmp_path / "broken.txt.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    with pytest.raises(ValueError, match="cannot read input .*broken.txt.gz"):
        read([tmp_path / "broken.txt.gz"])


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file(tmp_path):
    path = tmp_path / "secret.txt"
    path.write_text("x")
    path.chmod(0)
    with pytest.raises(ValueError, match="cannot read input .*secret.txt"):
        read([path])


def test_hash_choice_is_a_property_of_the_document():
    digests = [document_hash(f"document {i}") for i in range(4000)]
    chosen = sum(hash_below(d, 0.25) for d in digests)
    assert 900 < chosen < 1100
    assert hash_below(document_hash("document 7"), 0.25) == hash_below(digests[7], 0.25)
    assert not any(hash_below(d, 0.0) for d in digests)


def test_progress_line(monkeypatch):
    clock = iter([100.0, 102.0, 102.0])
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    out = io.StringIO()
    bar = progress.Progress("prepare", 10_000_000, stream=out, log_every=0)
    bar.update(3, 4_000_000)  # 4 MB in 2 s: 2 MB/s, 6 MB left: 3 s
    assert out.getvalue() == "prepare: 3 docs | 4.0/10.0 MB (40%) | 2.00 MB/s | ETA 0m03s\n"
