"""LoRA finetuning: adapters inside the scanned blocks (forward, merge, sharding), a frozen base with no
optimizer state, checkpoints that hold only the adapters and refuse a changed base, merged and PEFT exports."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import yaml
from flax import nnx
from flaxpod.model.config import LoraConfig, ModelConfig
from flaxpod.model.lora import merge
from flaxpod.train.cli import main as cli_main
from flaxpod.train.objectives import class_logits, forward
from flaxpod.train.run_dir import host_params, load_run, restore_params, single_device_mesh, write_params_run
from flaxpod.train.state import abstract_model, init_params

from tests.test_finetune import assert_kill9_resumes_bit_for_bit, classify_args, metric, sft_args, work  # noqa: F401  (the module's fixture)

ALL = {"llama": ["q", "k", "v", "o", "up", "gate", "down"], "gpt2": ["q", "k", "v", "o", "up", "down"]}


def tiny(family: str, **lora) -> ModelConfig:
    kv = 2 if family == "llama" else 0
    model = ModelConfig(family=family, n_layer=2, n_head=4, n_kv_head=kv, d_model=32, seq_len=16, vocab_size=64)
    return dataclasses.replace(model, lora=LoraConfig(**lora)) if lora else model


def graft(base: dict, fresh: dict) -> dict:
    """`fresh` (a LoRA model's parameters) with the base model's weights wherever the base has them."""
    return {k: (graft(base[k], v) if isinstance(v, dict) else base[k]) if k in base else v for k, v in fresh.items()}


def perturb_b(params: dict, seed: int = 1) -> dict:
    """B starts at zero (the adapter is a no-op); give it values so the adapter changes the output."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    out = [
        v + 0.05 * jax.random.normal(k, v.shape) if str(path[-1].key).endswith("_lora_b") else v
        for (path, v), k in zip(leaves, keys, strict=True)
    ]
    return jax.tree.unflatten(treedef, out)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_adapters_start_as_identity_and_merge_exactly(family):
    base_cfg, lora_cfg = tiny(family), tiny(family, rank=4, alpha=8.0, targets=ALL[family])
    base = init_params(base_cfg, 0)
    params = graft(base, init_params(lora_cfg, 0))
    batch = {"inputs": jnp.arange(32).reshape(2, 16) % 64}
    ref = forward(abstract_model(base_cfg)[0], base, batch)
    lora_graph = abstract_model(lora_cfg)[0]
    # B = 0 at init: exactly the base model, bit for bit.
    np.testing.assert_array_equal(np.asarray(forward(lora_graph, params, batch)), np.asarray(ref))
    # With B != 0: the unmerged forward equals the plain model with W + (alpha/r) A B folded in.
    params = perturb_b(params)
    unmerged = np.asarray(forward(lora_graph, params, batch))
    merged = merge(jax.tree.map(np.asarray, params), lora_cfg.lora)
    assert jax.tree.structure(merged) == jax.tree.structure(base)
    np.testing.assert_allclose(np.asarray(forward(abstract_model(base_cfg)[0], merged, batch)), unmerged, atol=2e-5)
    assert np.abs(unmerged - np.asarray(ref)).max() > 0.05  # the adapters do change the output


LORA = ["finetune.lora.rank=4", "finetune.lora.alpha=8", "finetune.lora.targets=q,v,down"]


def test_lora_finetune_trains_only_adapters_and_head(work, tmp_path, capsys):  # noqa: F811
    run = tmp_path / "lora"
    assert cli_main(classify_args(work, run, *LORA, "train.steps=20", "checkpoint.every=20")) == 0
    out = capsys.readouterr().out
    assert "trainable parameters:" in out and "for full finetuning" in out
    base = load_run(work / "base", mesh=single_device_mesh()).params
    tuned = load_run(run, mesh=single_device_mesh()).params
    flat_base = dict(jax.tree_util.tree_flatten_with_path(base)[0])
    for path, value in jax.tree_util.tree_flatten_with_path(tuned)[0]:
        keys = [k.key for k in path]
        if "lora" in keys:
            if keys[-1].endswith("_lora_b"):
                assert np.abs(np.asarray(value)).max() > 0, keys  # B moved off zero
        elif keys[0] != "cls_head":
            np.testing.assert_array_equal(np.asarray(value), np.asarray(flat_base[path]), err_msg=str(keys))


def test_lora_from_a_base_that_computes_its_mlp_in_blocks(work, tmp_path, capsys):  # noqa: F811
    """A base trained with model.mlp_chunks=2 (a CPU speed setting; same parameters) finetunes with LoRA
    in one block, since adapters take whole projections; asking for the blocks too is refused."""
    base = tmp_path / "base"
    shutil.copytree(work / "base", base)
    config = yaml.safe_load((base / "config.yaml").read_text())
    config["model"]["mlp_chunks"] = 2
    (base / "config.yaml").write_text(yaml.safe_dump(config))
    run = tmp_path / "lora"
    args = classify_args(work, run, f"finetune.base={base}", *LORA, "train.steps=2", "train.eval_every=0")
    assert cli_main(args) == 0
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["mlp_chunks"] == 1
    capsys.readouterr()
    assert cli_main([*args, f"run_dir={tmp_path / 'refused'}", "model.mlp_chunks=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: model.mlp_chunks: 2 cannot be combined with LoRA (lora.rank > 0); use 1", err
    assert not (tmp_path / "refused").exists()


def params_bytes(params: dict) -> int:
    return sum(np.asarray(x).nbytes for x in jax.tree.leaves(params))


@pytest.mark.slow
def test_kill9_lora_resumes_bit_for_bit_and_checkpoints_hold_adapters(work, tmp_path):  # noqa: F811
    reference = assert_kill9_resumes_bit_for_bit(work, tmp_path, *LORA)
    # The checkpoint holds the adapters and the head only: a small fraction of the base's parameters.
    saved, _ = restore_params(reference, 30)
    names = {"/".join(str(k.key) for k in p) for p, _ in jax.tree_util.tree_flatten_with_path(saved)[0]}
    assert names == {
        f"blocks/{m}/lora/{t}_lora_{ab}" for m, t in (("attn", "q"), ("attn", "v"), ("mlp", "down")) for ab in "ab"
    } | {"cls_head"}
    base, _ = restore_params(work / "base")
    assert params_bytes(saved) < params_bytes(base) / 4, (params_bytes(saved), params_bytes(base))


def our_logits(run_dir: Path, tokens: np.ndarray, *, classify: bool) -> np.ndarray:
    """The LoRA run's own (unmerged) forward pass."""
    run = load_run(run_dir, mesh=single_device_mesh())
    batch = {"inputs": tokens, "segment_ids": tokens * 0 + 1}
    if classify:
        return np.asarray(jax.jit(lambda p: class_logits(nnx.merge(run.graphdef, p), batch, None))(run.params))
    return np.asarray(jax.jit(lambda p: forward(run.graphdef, p, {"inputs": tokens}))(run.params))


@pytest.mark.slow
def test_lora_classify_evaluate_predict_and_merged_export(work, tmp_path, capsys):  # noqa: F811
    from transformers import AutoModelForSequenceClassification

    run_dir = tmp_path / "cls"
    args = classify_args(work, run_dir, *LORA, "optim.lr=1e-2", "finetune.lora.train_fully=norms")
    assert cli_main(args) == 0, capsys.readouterr().err
    assert max(metric(run_dir, "val_macro_f1").values()) > 0.8  # adapters + head learn the keyword task
    assert cli_main(["evaluate", str(run_dir), "--classify", str(work / "test.csv")]) == 0
    capsys.readouterr()
    assert cli_main(["predict", str(run_dir), "--text", "pear lemon grape"]) == 0
    predicted = json.loads(capsys.readouterr().out)["label"]

    out = tmp_path / "hf"
    assert cli_main(["export", str(run_dir), "--out", str(out)]) == 0
    run = load_run(run_dir, mesh=single_device_mesh())
    tokens = np.array([run.tokenizer.encode("pear lemon grape") + [run.tokenizer.eos_id]], np.int32)
    ours = our_logits(run_dir, tokens, classify=True)
    hf = AutoModelForSequenceClassification.from_pretrained(out).eval()
    with torch.no_grad():
        theirs = hf(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(theirs, ours, atol=1e-4)  # merged (transformers) vs unmerged (flaxpod)
    assert hf.config.id2label[int(ours.argmax())] == predicted
    assert cli_main(["export", str(run_dir), "--out", str(tmp_path / "a"), "--adapters-only"]) == 2  # norms trained
    assert "train_fully" in capsys.readouterr().err


@pytest.mark.slow
def test_lora_sft_peft_round_trip_and_changed_base_refused(work, tmp_path, capsys):  # noqa: F811
    from transformers import AutoModelForCausalLM

    peft = pytest.importorskip("peft")
    run_dir = tmp_path / "sft"
    targets = "finetune.lora.targets=q,k,v,o,up,gate,down"
    assert cli_main(sft_args(work, run_dir, "finetune.lora.rank=4", targets, "optim.lr=1e-2")) == 0
    loss = metric(run_dir, "loss")
    assert loss[24] < loss[4] - 0.05  # the adapters learn (the base is random: validation barely moves)
    assert cli_main(["generate", str(run_dir), "--prompt", "repeat: apple", "--max-new-tokens", "4"]) == 0

    merged, adapters, base_hf = tmp_path / "merged", tmp_path / "adapters", tmp_path / "base_hf"
    assert cli_main(["export", str(run_dir), "--out", str(merged)]) == 0
    assert cli_main(["export", str(run_dir), "--out", str(adapters), "--adapters-only"]) == 0
    assert cli_main(["export", str(work / "base"), "--out", str(base_hf)]) == 0
    run = load_run(run_dir, mesh=single_device_mesh())
    tokens = np.array([run.tokenizer.encode("repeat: apple pear")], np.int32)
    ours = our_logits(run_dir, tokens, classify=False)
    ids = torch.tensor(tokens, dtype=torch.long)
    with torch.no_grad():
        from_merged = AutoModelForCausalLM.from_pretrained(merged).eval()(ids).logits.numpy()
        with_peft = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_hf), adapters).eval()
        from_peft = with_peft(ids).logits.numpy()
    np.testing.assert_allclose(from_merged, ours, atol=1e-4)
    np.testing.assert_allclose(from_peft, ours, atol=1e-4)

    # A base whose params checkpoint changed is refused (its adapters belong to the old weights).
    base_copy = tmp_path / "base_copy"
    shutil.copytree(work / "base", base_copy)
    run2 = tmp_path / "sft2"
    args = sft_args(work, run2, "finetune.lora.rank=4", "train.steps=12")
    args[args.index(f"finetune.base={work / 'base'}")] = f"finetune.base={base_copy}"
    assert cli_main(args) == 0
    # The base is re-saved at the same step with other weights (the commit record's hashes change).
    old = load_run(base_copy, mesh=single_device_mesh())
    shutil.rmtree(base_copy)
    params = jax.tree.map(lambda x: np.asarray(x) + 1e-3, host_params(old.params))
    write_params_run(base_copy, old.cfg, old.tokenizer, params, step=old.step)
    capsys.readouterr()
    assert cli_main(["evaluate", str(run2), "--sft", str(work / "sft_test.jsonl")]) == 2
    assert "changed since this LoRA run started" in capsys.readouterr().err


def _padded(spec, n: int) -> tuple:
    return tuple(spec) + (None,) * (n - len(tuple(spec)))


def test_adapters_shard_like_their_base_and_only_they_hold_optimizer_state():
    from flaxpod.sharding.mesh import build_mesh
    from flaxpod.sharding.rules import make_rules
    from flaxpod.train.config import OptimConfig
    from flaxpod.train.optimizer import make_optimizer
    from flaxpod.train.state import make_layout

    cfg = tiny("llama", rank=4, targets=ALL["llama"])
    tx, _ = make_optimizer(OptimConfig(), 10, lora=cfg.lora)
    layout = make_layout(cfg, tx, build_mesh(1, 2, 4), make_rules("fsdp_tp", {}))
    params = layout.param_shardings["blocks"]
    for module, name in (("attn", "q"), ("attn", "k"), ("attn", "o"), ("mlp", "up"), ("mlp", "down")):
        base = params[module][name].spec
        n_in = {"q": 1, "k": 1, "o": 2, "up": 1, "down": 1}[name]
        w = _padded(base, len(layout.shapes.params["blocks"][module][name].shape))
        a = _padded(params[module]["lora"][name + "_lora_a"].spec, n_in + 2)
        b = _padded(params[module]["lora"][name + "_lora_b"].spec, len(w) - n_in + 1)
        assert a == (*w[: n_in + 1], None) and b == (w[0], None, *w[n_in + 1 :]), (name, w, a, b)
    assert any(s is not None for s in w)  # the mesh really splits these weights
    # Adam's moments exist for the adapters only (the base is frozen), sharded like them.
    adapter_shapes = {s.shape for s in jax.tree.leaves(layout.shapes.params["blocks"]["attn"]["lora"])}
    adapter_shapes |= {s.shape for s in jax.tree.leaves(layout.shapes.params["blocks"]["mlp"]["lora"])}
    moments = [s.shape for s in jax.tree.leaves(layout.shapes.opt_state) if s.ndim > 0]
    assert moments and set(moments) <= adapter_shapes
    n_adapter = sum(s.size for s in jax.tree.leaves(layout.shapes.params["blocks"]) if s.shape in adapter_shapes)
    assert sum(s.size for s in jax.tree.leaves(layout.shapes.opt_state) if s.ndim > 0) == 2 * n_adapter


def test_the_step_computes_no_weight_gradients_for_the_frozen_base():
    from flaxpod.sharding.mesh import build_mesh
    from flaxpod.sharding.rules import make_rules
    from flaxpod.train.config import OptimConfig
    from flaxpod.train.objectives import CausalLM
    from flaxpod.train.optimizer import make_optimizer, trainable_mask
    from flaxpod.train.state import make_layout
    from flaxpod.train.step import make_train_step

    cfg = tiny("llama", rank=4)
    tx, schedule = make_optimizer(OptimConfig(), 10, lora=cfg.lora)
    layout = make_layout(cfg, tx, build_mesh(1, 1, 1, devices=jax.devices()[:1]), make_rules("fsdp_tp", {}))
    frozen = jax.tree.map(lambda t: not t, trainable_mask(layout.shapes.params, (), cfg.lora))
    batch = {k: jax.ShapeDtypeStruct((2, 16), jnp.int32) for k in ("inputs", "targets")}

    def matmuls(step) -> int:
        return str(jax.make_jaxpr(step)(layout.shapes, batch)).count("dot_general")

    stopped = matmuls(make_train_step(layout, tx, schedule, CausalLM(), frozen=frozen))
    plain = matmuls(make_train_step(layout, tx, schedule, CausalLM()))
    # The base's q, k, v, o, gate, up, down and LM-head weight gradients are not computed (8 matmuls).
    assert plain - stopped == 8, (plain, stopped)
