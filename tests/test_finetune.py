"""flaxpod finetune: response-only SFT loss, classification, parameter groups, the base contract, mesh
equivalence, resume after kill -9, task metrics against scikit-learn, export parity, bad input."""

from __future__ import annotations

import csv
import json
import os
import signal
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from flaxpod.data import classify as cls_data
from flaxpod.data import sft as sft_data
from flaxpod.data.sft_format import load_sft_examples
from flaxpod.data.tokenizer import train_sentencepiece
from flaxpod.sharding.mesh import build_mesh
from flaxpod.sharding.rules import make_rules
from flaxpod.train.cli import main as cli_main
from flaxpod.train.config import Config, ModelConfig, OptimConfig, TokenizerConfig
from flaxpod.train.objectives import CausalLM, Classify, class_logits
from flaxpod.train.optimizer import make_optimizer
from flaxpod.train.run_dir import load_run, single_device_mesh, write_params_run
from flaxpod.train.state import init_params
from flaxpod.train.trainer import Trainer
from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support

from tools.resume_check import compare_runs, is_committed, signal_when, start

WORDS = "apple banana cherry grape lemon mango orange peach pear plum kiwi lime melon berry fig date".split()
CLASSES = {"fruit": WORDS[:5], "tree": WORDS[5:10], "vine": WORDS[10:]}
MODEL = ModelConfig(family="llama", n_layer=2, n_head=4, n_kv_head=2, d_model=32, seq_len=32, vocab_size=320)


def sentences(rng: np.random.Generator, n: int) -> list[str]:
    return [" ".join(rng.choice(WORDS, 6)) for _ in range(n)]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A params-only base run (random weights, a SentencePiece tokenizer with EOS), a labelled CSV
    split in two, and SFT JSONL files of a copy task."""
    root = tmp_path_factory.mktemp("finetune")
    rng = np.random.default_rng(0)
    tokenizer = train_sentencepiece(
        sentences(rng, 400) + ["repeat: copy the words after the colon"] * 20, vocab_size=300
    )
    cfg = Config(run_dir=str(root / "base"), model=MODEL, tokenizer=TokenizerConfig(kind="sentencepiece"))
    params = jax.tree.map(np.asarray, init_params(MODEL, 0))
    write_params_run(root / "base", cfg, tokenizer, params)
    for name, n in (("train", 240), ("test", 60)):
        with open(root / f"{name}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["text", "category"])
            for _ in range(n):
                label = str(rng.choice(list(CLASSES)))
                words = list(rng.choice(CLASSES[label], 3)) + list(rng.choice(WORDS, 2))
                rng.shuffle(words)
                w.writerow([" ".join(words), label])
    for name, n in (("sft", 160), ("sft_test", 16)):
        with open(root / f"{name}.jsonl", "w") as f:
            for text in sentences(rng, n):
                words = " ".join(text.split()[:3])
                f.write(json.dumps({"prompt": f"repeat: {words}", "response": words}) + "\n")
    return root


def classify_args(work: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        "finetune",
        str(Path(__file__).resolve().parents[1] / "configs" / "finetune_classify.yaml"),
        f"run_dir={run_dir}",
        f"finetune.base={work / 'base'}",
        f"data.path={work / 'train.csv'}",
        f"data.val_path={work / 'test.csv'}",
        "data.label_field=category",
        "model.seq_len=16",
        "model.pooling=last",  # transformers' sequence classifiers pool the last token: the HF export is exact
        "data.batch_size=16",
        "train.steps=30",
        "train.eval_every=10",
        "train.log_every=10",
        "checkpoint.every=10",
        "optim.warmup_steps=3",
        "logging.tensorboard=false",
        *extra,
    ]


def sft_args(work: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        "finetune",
        str(Path(__file__).resolve().parents[1] / "configs" / "finetune_sft.yaml"),
        f"run_dir={run_dir}",
        f"finetune.base={work / 'base'}",
        f"data.path={work / 'sft.jsonl'}",
        f"data.val_path={work / 'sft_test.jsonl'}",
        "model.seq_len=32",
        "data.batch_size=8",
        "train.steps=24",
        "train.eval_every=12",
        "train.log_every=4",
        "checkpoint.every=12",
        "optim.warmup_steps=3",
        "logging.tensorboard=false",
        *extra,
    ]


def metric(run_dir: Path, key: str) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in rows if key in r}


# ---------------------------------------------------------------------------------------------
# The objective and the trainer, in process


def sft_batch(work: Path) -> dict[str, np.ndarray]:
    tokenizer = load_run(work / "base", mesh=single_device_mesh()).tokenizer
    tokenized, _ = sft_data.tokenize_examples(load_sft_examples(work / "sft.jsonl"), tokenizer, 32)
    return sft_data.make_sft_eval_batches(tokenized, seq_len=32, global_batch_size=8)[0]


def trainer_on(devices: int, objective, *, mesh_shape=None, **optimizer) -> Trainer:
    mesh = build_mesh(*(mesh_shape or (devices, 1, 1)), devices=jax.devices()[:devices])
    tx, schedule = make_optimizer(OptimConfig(lr=1e-2, warmup_steps=1), 10, **optimizer)
    model = MODEL if not isinstance(objective, Classify) else ModelConfig(**{**MODEL.__dict__, "num_labels": 3})
    return Trainer(model, mesh, make_rules("fsdp_tp"), tx, schedule, objective)


def test_response_only_loss_ignores_prompt_targets(work):
    """Changing the targets of prompt tokens (loss_mask 0) leaves the loss and the gradients as they were."""
    batch = sft_batch(work)
    assert 0 < batch["loss_mask"].sum() < (batch["segment_ids"] > 0).sum()
    trainer = trainer_on(1, CausalLM())
    state = trainer.init_state(0)
    mutated = dict(batch, targets=np.where(batch["loss_mask"] > 0, batch["targets"], (batch["targets"] + 7) % 300))
    assert (mutated["targets"] != batch["targets"]).any()
    _, a = trainer.step(jax.tree.map(np.copy, state), trainer.put(batch))
    _, b = trainer.step(state, trainer.put(mutated))
    assert float(a["loss"]) == float(b["loss"]) and float(a["grad_norm"]) == float(b["grad_norm"])


@pytest.mark.parametrize("task", ["sft", "classify"])
def test_eight_devices_equal_one(work, task):
    if task == "sft":
        objective, batch = CausalLM(), sft_batch(work)
    else:
        tokenizer = load_run(work / "base", mesh=single_device_mesh()).tokenizer
        examples = cls_data.read_examples(work / "train.csv", "text", "category")
        labels = cls_data.collect_labels(examples, work / "train.csv")
        encoded = cls_data.encode_examples(examples[:16], tokenizer, labels, 16, "train.csv", append_eos=True)
        objective, batch = Classify(), cls_data.make_classify_eval_batches(encoded, global_batch_size=16)[0]
    losses = []
    for devices, shape in ((1, None), (8, (2, 2, 2))):
        trainer = trainer_on(devices, objective, mesh_shape=shape)
        state = trainer.init_state(0)
        run = []
        for _ in range(3):
            state, m = trainer.step(state, trainer.put(batch))
            run.append(float(m["loss"]))
        losses.append(run)
    np.testing.assert_allclose(losses[1], losses[0], atol=1e-5)
    assert losses[0][-1] < losses[0][0]


def test_frozen_groups_do_not_change_and_hold_no_optimizer_state(work):
    batch = sft_batch(work)
    plain = trainer_on(1, CausalLM())
    frozen = trainer_on(1, CausalLM(), frozen=["embed"], lr_mult={"head": 0.0})
    sizes = [sum(x.size for x in jax.tree.leaves(t.layout.shapes.opt_state) if x.ndim) for t in (plain, frozen)]
    embed = MODEL.vocab_size * MODEL.d_model
    assert sizes[0] - sizes[1] == 2 * embed  # no Adam moments for the frozen embedding
    state = frozen.state_from_params(jax.tree.map(np.asarray, plain.init_state(0).params), 0)
    before = jax.tree.map(np.array, state.params)
    for _ in range(2):  # the first step's learning rate is 0 (warm-up)
        state, _ = frozen.step(state, frozen.put(batch))
    after = jax.tree.map(np.array, state.params)
    np.testing.assert_array_equal(after["embed"], before["embed"])
    np.testing.assert_array_equal(after["final_norm"]["scale"], before["final_norm"]["scale"])  # lr x 0
    assert not np.array_equal(after["blocks"]["mlp"]["up"], before["blocks"]["mlp"]["up"])
    with pytest.raises(ValueError, match="unknown parameter group 'embeddings'"):
        make_optimizer(OptimConfig(), 10, frozen=["embeddings"])


# ---------------------------------------------------------------------------------------------
# The CLI, as a user runs it


@pytest.mark.slow
def test_classify_end_to_end(work, tmp_path, capsys):
    run_dir = tmp_path / "cls"
    args = classify_args(work, run_dir, "finetune.early_stop_metric=val_macro_f1", "finetune.patience=5")
    assert cli_main(args) == 0, capsys.readouterr().err
    assert json.loads((run_dir / "labels.json").read_text())["labels"] == sorted(CLASSES)
    f1 = metric(run_dir, "val_macro_f1")
    assert max(f1.values()) > 0.8, f1  # the keywords decide the class: finetuning finds them
    best = json.loads((run_dir / "best.json").read_text())
    assert best["value"] == max(f1.values()) and (run_dir / "checkpoints" / str(best["step"])).is_dir()

    assert cli_main(["evaluate", str(run_dir), "--classify", str(work / "test.csv")]) == 0
    report = json.loads((run_dir / "eval" / f"step_{best['step']}.json").read_text())
    result = report["results"]["classify:test"]
    rows = [json.loads(line) for line in (run_dir / "eval" / f"step_{best['step']}.classify-test.jsonl").open()]
    y_true, y_pred = [r["label"] for r in rows], [r["prediction"] for r in rows]
    assert len(rows) == 60 and result["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    assert result["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro", zero_division=0))
    p, r, _, _ = precision_recall_fscore_support(y_true, y_pred, average="weighted", zero_division=0)
    assert (result["weighted_precision"], result["weighted_recall"]) == (pytest.approx(p), pytest.approx(r))
    assert result["accuracy"] == pytest.approx(metric(run_dir, "val_accuracy")[best["step"]])  # same file
    assert (run_dir / "eval" / f"step_{best['step']}.classify-test.png").stat().st_size > 0

    capsys.readouterr()
    assert cli_main(["predict", str(run_dir), "--text", "apple banana cherry", "--text", "kiwi lime melon"]) == 0
    predictions = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [p["label"] for p in predictions] == ["fruit", "vine"]

    out = tmp_path / "hf"
    assert cli_main(["export", str(run_dir), "--out", str(out)]) == 0
    assert cli_main(["export", str(run_dir), "--out", str(tmp_path / "plain"), "--format", "safetensors"]) == 0
    assert json.loads((tmp_path / "plain" / "labels.json").read_text())["labels"] == sorted(CLASSES)
    from transformers import AutoModelForSequenceClassification

    run = load_run(run_dir, mesh=single_device_mesh())
    tokens = np.array([run.tokenizer.encode("pear lemon grape") + [run.tokenizer.eos_id]], np.int32)
    fn = jax.jit(
        lambda p: class_logits(nnx.merge(run.graphdef, p), {"inputs": tokens, "segment_ids": tokens * 0 + 1}, None)
    )
    ours = np.asarray(fn(run.params))
    hf = AutoModelForSequenceClassification.from_pretrained(out).eval()
    with torch.no_grad():
        theirs = hf(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(theirs, ours, atol=1e-4)
    assert hf.config.id2label[int(ours.argmax())] == predictions_for(run_dir, "pear lemon grape", capsys)


def predictions_for(run_dir: Path, text: str, capsys) -> str:
    capsys.readouterr()
    assert cli_main(["predict", str(run_dir), "--text", text]) == 0
    return json.loads(capsys.readouterr().out)["label"]


@pytest.mark.slow
def test_sft_end_to_end(work, tmp_path, capsys):
    run_dir = tmp_path / "sft"
    assert cli_main(sft_args(work, run_dir)) == 0, capsys.readouterr().err
    val = metric(run_dir, "val_loss")
    assert val[24] < val[12] and (run_dir / "checkpoints" / "24").is_dir()
    assert cli_main(["evaluate", str(run_dir), "--sft", str(work / "sft_test.jsonl"), "--max-new-tokens", "6"]) == 0
    result = json.loads((run_dir / "eval" / "step_24.json").read_text())["results"]["sft:sft_test"]
    assert result["loss"] == pytest.approx(val[24], rel=1e-5)  # the same response-only loss as validation
    rows = [json.loads(line) for line in (run_dir / "eval" / "step_24.sft-sft_test.jsonl").open()]
    assert len(rows) == 16 and result["exact_match"] == sum(r["exact_match"] for r in rows) / 16

    out = tmp_path / "hf"
    assert cli_main(["export", str(run_dir), "--out", str(out)]) == 0
    from transformers import AutoModelForCausalLM

    run = load_run(run_dir, mesh=single_device_mesh())
    tokens = np.array([run.tokenizer.encode("repeat: apple pear")], np.int32)
    ours = np.asarray(jax.jit(lambda p: nnx.merge(run.graphdef, p)(tokens))(run.params))
    with torch.no_grad():
        theirs = AutoModelForCausalLM.from_pretrained(out).eval()(torch.tensor(tokens, dtype=torch.long)).logits
    np.testing.assert_allclose(theirs.numpy(), ours, atol=1e-4)


def assert_kill9_resumes_bit_for_bit(work: Path, tmp_path: Path, *extra: str) -> Path:
    """A classify finetuning run killed (-9) right after its step-10 checkpoint and re-run ends exactly as
    an uninterrupted one: every metric row and the final parameters, bit for bit. Returns the reference."""
    environ = {**os.environ, "JAX_PLATFORMS": "cpu"}
    flaxpod = [sys.executable, "-m", "flaxpod.train.cli"]
    reference = tmp_path / "reference"
    assert start([*flaxpod, *classify_args(work, reference, *extra)], tmp_path / "ref.log", environ).wait(600) == 0
    killed = tmp_path / "killed"
    cmd = [*flaxpod, *classify_args(work, killed, *extra)]
    proc = start(cmd, tmp_path / "killed.log", environ)
    assert signal_when(proc, lambda: is_committed(killed, 10), signal.SIGKILL), "ended before the kill"
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert start(cmd, tmp_path / "killed.log", environ).wait(600) == 0, (tmp_path / "killed.log").read_text()[-2000:]
    c = compare_runs(reference, killed, from_step=10)
    assert not c.missing and c.first_difference is None, (c.missing[:3], c.first_difference)
    assert c.params_equal
    return reference


@pytest.mark.slow
def test_kill9_during_finetuning_resumes_bit_for_bit(work, tmp_path):
    assert_kill9_resumes_bit_for_bit(work, tmp_path)


# ---------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, nothing written


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda w, t: ["finetune.base=" + str(t / "nowhere")], "finetune.base: run directory .*nowhere does not exist"),
        (lambda w, t: ["model.n_layer=3"], "model.n_layer: 3 differs from the base's 2"),
        (lambda w, t: ["finetune.lr_mult={blocks: 2, body: 1}"], "unknown parameter group 'body'"),
        (
            lambda w, t: ["data.val_path=" + write(t / "v.csv", "text,category\napple pear,animal\n")],
            r"v.csv row 1 \(line 2\): label 'animal' is not among the 3 labels",
        ),
        (
            lambda w, t: ["data.path=" + write(t / "one.csv", "text,category\napple,fruit\npear,fruit\n")],
            "one.csv: every one of the 2 examples has the label .fruit.",
        ),
        (
            lambda w, t: ["data.path=" + write(t / "ragged.csv", "text,category\napple,fruit,extra\n")],
            "ragged.csv row 1",
        ),
    ],
)
def test_bad_classify_input(work, tmp_path, capsys, make, message):
    run_dir = tmp_path / "run"
    assert cli_main(classify_args(work, run_dir, *make(work, tmp_path))) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and __import__("re").search(message, err), err
    assert not run_dir.exists()


def test_bad_sft_input(work, tmp_path, capsys):
    chat = write(tmp_path / "chat.jsonl", json.dumps({"messages": [{"role": "robot", "content": "hi"}]}) + "\n")
    run_dir = tmp_path / "run"
    assert cli_main(sft_args(work, run_dir, f"data.path={chat}")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "chat.jsonl" in err and "robot" in err, err
    assert not run_dir.exists()


@pytest.mark.slow
def test_lm_task_starts_from_the_base_weights(work, tmp_path, capsys):
    """Continued pretraining (finetune.task=lm) on text: with a zero learning rate the trained weights are
    the base's, bit for bit (the run started from them, through the pretraining data pipeline)."""
    text = tmp_path / "text.txt"
    text.write_text("\n".join(sentences(np.random.default_rng(1), 300)))
    run_dir = tmp_path / "lm"
    args = sft_args(work, run_dir, "finetune.task=lm", f"data.path={text}", "data.val_path=", "train.steps=4")
    assert cli_main([*args, "optim.lr=0", "optim.min_lr=0"]) == 0, capsys.readouterr().err
    trained = load_run(run_dir, mesh=single_device_mesh())
    base = load_run(work / "base", mesh=single_device_mesh())
    for a, b in zip(jax.tree.leaves(trained.params), jax.tree.leaves(base.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert trained.tokenizer.fingerprint() == base.tokenizer.fingerprint()
    assert np.isfinite(metric(run_dir, "val_loss")[4])


@pytest.mark.slow
def test_two_processes_match_one(work, tmp_path):
    """Classification finetuning on 2 processes x 4 devices (through the launcher) equals 1 x 8: training
    losses and the validation metrics gathered from both processes' predictions. Without dropout: process p
    feeds rows p, p+2, ... of each global batch (as in pretraining), so the batch rows are in another order
    on the mesh and dropout would draw other masks for them."""
    from tests.helpers import run_cli

    short = ["train.steps=4", "train.log_every=1", "train.eval_every=2", "model.dropout=0"]
    short += ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]
    single = run_cli(classify_args(work, tmp_path / "single", *short))
    assert single.returncode == 0, single.stderr[-3000:]
    launch = ["launch", "--num-processes", "2", "--devices-per-process", "4", "--", sys.executable, "-m"]
    multi = run_cli([*launch, "flaxpod.train.cli", *classify_args(work, tmp_path / "multi", *short)])
    assert multi.returncode == 0, (multi.stdout + multi.stderr)[-4000:]
    assert "over 8 devices in 2 process(es)" in multi.stdout
    for key in ("loss", "val_loss", "val_accuracy", "val_macro_f1"):
        one, two = metric(tmp_path / "single", key), metric(tmp_path / "multi", key)
        assert one.keys() == two.keys() and list(two.values()) == pytest.approx(list(one.values()), abs=1e-5), key
