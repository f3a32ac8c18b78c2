"""`flaxpod prepare` on Parquet and zstd inputs, dotted text fields, row filters and bad input.

The reference is the same content as plain JSONL: every format must give identical records.
"""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from flaxpod.data.documents import DocumentReader, RowFilter
from flaxpod.data.hf_tokenizers import train_byte_level_bpe
from flaxpod.data.prepare import main, prepare_dataset
from flaxpod.data.shards import read_json

ROWS = [
    {
        "meta": {"text": f"Document {i}: naïve café 😀 " + "word " * (i % 7), "lang": "en" if i % 3 else "fr"},
        "score": i / 40,
    }
    for i in range(40)
] + [{"meta": {"text": "", "lang": "en"}, "score": 1.0}]


def _jsonl(rows) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    train_byte_level_bpe([r["meta"]["text"] for r in ROWS], vocab_size=300).save(d)
    return d


def _records(out):
    meta = read_json(out / "metadata.json")
    return meta, meta["splits"]["train"]["tokens"] + meta["splits"]["val"]["tokens"]


def _prepare(inputs, out, tok_dir, **kw):
    return prepare_dataset(
        [str(i) for i in inputs],
        out,
        tokenizer=str(tok_dir),
        jsonl_field="meta.text",
        shard_docs=8,
        workers=1,
        progress=False,
        val_fraction=0.2,
        **kw,
    )


def test_parquet_and_zstd_equal_plain_jsonl_with_filter(tmp_path, tok_dir):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_bytes(_jsonl(ROWS))
    # Two concatenated zstd frames, as `cat a.zst b.zst` gives.
    frames = zstandard.ZstdCompressor().compress(_jsonl(ROWS[:10])) + zstandard.ZstdCompressor().compress(
        _jsonl(ROWS[10:])
    )
    (tmp_path / "in" / "b.jsonl.zst").write_bytes(frames)
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "in" / "c.parquet", row_group_size=7)
    row_filter = RowFilter.parse(["score=0.25"], ["meta.lang=en"])
    kept = [r for r in ROWS if r["score"] >= 0.25 and r["meta"]["lang"] == "en" and r["meta"]["text"]]
    metas = {}
    for name in ("a.jsonl", "b.jsonl.zst", "c.parquet"):
        meta = _prepare([tmp_path / "in" / name], tmp_path / name, tok_dir, row_filter=row_filter)
        assert (
            meta["documents"] == len(kept) and meta["reading"]["filtered_rows"] == 41 - len(kept) - 1
        )  # the empty row is counted as empty, not filtered
        metas[name] = meta
    assert metas["a.jsonl"]["tokens"] == metas["b.jsonl.zst"]["tokens"] == metas["c.parquet"]["tokens"]
    shas = {n: [s["sha256"] for s in m["splits"]["train"]["shards"]] for n, m in metas.items()}
    assert shas["a.jsonl"] == shas["b.jsonl.zst"] == shas["c.parquet"]
    # A glob over the mixed directory reads all three.
    meta = _prepare([tmp_path / "in" / "*"], tmp_path / "mixed", tok_dir, row_filter=row_filter)
    assert meta["documents"] == 3 * len(kept)
    assert meta["tokenizer"]["kind"] == "huggingface" and meta["row_filter"]["require"] == {"meta.lang": "en"}


def test_bad_inputs_name_file_and_row_and_keep_shards(tmp_path, tok_dir, capsys):
    pq.write_table(pa.Table.from_pylist([{"body": "x"}]), tmp_path / "nocol.parquet")
    code = main(
        [
            str(tmp_path / "nocol.parquet"),
            "--out",
            str(tmp_path / "o1"),
            "--tokenizer",
            str(tok_dir),
            "--text-field",
            "text",
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "nocol.parquet: no column 'text' (columns: body)" in err[0]

    rows = [{"text": f"row {i} " * 30} for i in range(30)] + [{"text": 5}]
    (tmp_path / "bad.jsonl").write_bytes(_jsonl(rows))
    code = main(
        [
            str(tmp_path / "bad.jsonl"),
            "--out",
            str(tmp_path / "o2"),
            "--tokenizer",
            str(tok_dir),
            "--shard-docs",
            "5",
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "bad.jsonl:31: field 'text' must be a string, got int" in err[0]
    finished = sorted((tmp_path / "o2").rglob("*.array_record"))
    assert finished, "shards finished before the bad row are kept"
    # Fixed input: the re-run reuses the finished shards.
    (tmp_path / "bad.jsonl").write_bytes(_jsonl(rows[:30]))
    meta = prepare_dataset(
        [str(tmp_path / "bad.jsonl")], tmp_path / "o2", tokenizer=str(tok_dir), shard_docs=5, workers=1, progress=False
    )
    assert meta["run"]["shards_reused"] >= 1

    whole = zstandard.ZstdCompressor().compress(_jsonl(rows[:30]))
    (tmp_path / "cut.jsonl.zst").write_bytes(whole[: len(whole) // 2])
    code = main(
        [str(tmp_path / "cut.jsonl.zst"), "--out", str(tmp_path / "o3"), "--tokenizer", str(tok_dir), "--no-progress"]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "cut.jsonl.zst" in err[0] and "zstd" in err[0]

    pq.write_table(pa.Table.from_pylist([{"text": "a"}, {"text": None}, {"text": "b"}]), tmp_path / "n.parquet")
    pq.write_table(pa.Table.from_pylist([{"text": 1}]), tmp_path / "int.parquet")
    code = main(
        [str(tmp_path / "int.parquet"), "--out", str(tmp_path / "o4"), "--tokenizer", str(tok_dir), "--no-progress"]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "int.parquet:row 0: field 'text' must be a string, got int" in err[0]
    reader = DocumentReader([tmp_path / "n.parquet"])
    assert [d.text for d in reader] == ["a", "b"] and reader.stats.empty_documents == 1  # a null text counts as empty


def test_filter_arguments_are_checked():
    with pytest.raises(ValueError, match="--min-field 'score=high': 'high' is not a number"):
        RowFilter.parse(["score=high"])
    with pytest.raises(ValueError, match="--require-field 'lang': expected NAME=VALUE"):
        RowFilter.parse([], ["lang"])
    f = RowFilter.parse(["a.b=1"], [])
    assert f.keeps({"a": {"b": 2}}, "x") and not f.keeps({"a": {"b": 0.5}}, "x") and not f.keeps({}, "x")
    with pytest.raises(ValueError, match="x: filter field 'a.b' must be a number, got str"):
        f.keeps({"a": {"b": "2"}}, "x")


def test_shards_follow_bos_policy_and_refuse_another_tokenizer(tmp_path, tok_dir):
    from flaxpod.data.prepared import read_split_documents
    from flaxpod.data.tokenizer import load_tokenizer
    from flaxpod.train.evaluate import prepared_tokens
    from tokenizers import Tokenizer, processors

    base = load_tokenizer(tok_dir)
    tok = Tokenizer.from_str(base.tokenizer_json())
    tok.add_special_tokens(["<s>"])
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    (tmp_path / "bos").mkdir()
    (tmp_path / "bos" / "tokenizer.json").write_text(tok.to_str())
    (tmp_path / "bos" / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "<|endoftext|>"})
    )
    (tmp_path / "in.jsonl").write_bytes(_jsonl([{"text": r["meta"]["text"]} for r in ROWS]))
    meta = prepare_dataset(
        [str(tmp_path / "in.jsonl")],
        tmp_path / "ds",
        tokenizer=str(tmp_path / "bos"),
        workers=1,
        progress=False,
        val_fraction=0.2,
    )
    assert meta["tokenizer"]["add_special_tokens"]["prefix"] == ["<s>"]
    ours = load_tokenizer(tmp_path / "ds" / "tokenizer")
    texts = {r["meta"]["text"] for r in ROWS if r["meta"]["text"]}
    for record in read_split_documents(tmp_path / "ds", "train"):
        ids = record.tolist()
        assert ids[0] == bos and ids[-1] == ours.eos_id and ours.decode(ids) in texts
    assert len(prepared_tokens(str(tmp_path / "ds"), ours)) == meta["splits"]["val"]["documents"]
    with pytest.raises(ValueError, match="tokenized with tokenizer"):
        prepared_tokens(str(tmp_path / "ds"), base)
