"""Config loading, overrides and every user error naming its key."""

from __future__ import annotations

import pytest
from flaxpod.train.config import (
    Config,
    ConfigError,
    MeshConfig,
    check_against_devices,
    config_reference_markdown,
    field_docs,
    load_config,
    resolve_mesh_shape,
)

from tests.helpers import REPO


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("seed: 3\nmodel:\n  n_layer: 2\noptim:\n  lr: 1e-3\n")
    cfg = load_config(path, ["model.n_layer=6", "train.steps=7", "data.weights=0.7,0.3", "optim.min_lr=1e-5"])
    assert (cfg.seed, cfg.model.n_layer, cfg.train.steps) == (3, 6, 7)
    assert cfg.optim.lr == pytest.approx(1e-3) and cfg.optim.min_lr == pytest.approx(1e-5)
    assert cfg.data.weights == [0.7, 0.3]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.n_layr=3"], "unknown config key 'model.n_layr'; did you mean 'model.n_layer'?"),
        (["trian.steps=3"], "unknown config key 'trian'; did you mean 'train'?"),
        (["model.n_layer=abc"], "model.n_layer: expected int, got str 'abc'"),
        (["model.n_layer=2.5"], "model.n_layer: expected int, got float 2.5"),
        (["model.family=bert"], "model.family: expected one of ['gpt2', 'llama'], got 'bert'"),
        (["model.n_head=3", "model.d_model=32"], "model.d_model: 32 is not divisible by model.n_head=3"),
        (["model.n_head=4", "model.n_kv_head=3"], "model.n_kv_head: 3 does not divide model.n_head=4"),
        (["mesh.tensor=3"], "model.n_head: 4 is not divisible by mesh.tensor=3"),
        (["model.mlp_chunks=3"], "model.mlp_chunks: expected a positive divisor of the MLP width 512, got 3"),
        (["model.mlp_chunks=2", "model.lora.rank=4"], "model.mlp_chunks: 2 cannot be combined with LoRA"),
        (["model.seq_len=512", "model.max_seq_len=256"], "model.seq_len: 512 exceeds the model's maximum"),
        (["data.batch_size=10", "train.grad_accum=4"], "data.batch_size: 10 is not divisible by train.grad_accum=4"),
        (["mesh.data=-1", "mesh.fsdp=-1"], "mesh: at most one axis may be -1"),
        (["train.steps=0"], "train.steps: must be positive, got 0"),
        (["model=3"], "model: expected a mapping"),
        (["novalue"], "override 'novalue': expected key.sub=value"),
    ],
)
def test_bad_values_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert message in str(e.value)


def test_bad_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  n_layer: 2\n  d_model: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+: invalid YAML"):
        load_config(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_mesh_resolution_against_devices():
    assert resolve_mesh_shape(MeshConfig(data=-1, fsdp=2, tensor=2), 8) == (2, 2, 2)
    assert resolve_mesh_shape(MeshConfig(data=1, fsdp=-1, tensor=1), 8) == (1, 8, 1)
    with pytest.raises(ConfigError, match=r"data\*fsdp\*tensor = 2\*2\*1 = 4 does not match the 8 devices"):
        resolve_mesh_shape(MeshConfig(data=2, fsdp=2, tensor=1), 8)
    with pytest.raises(ConfigError, match="8 devices cannot be split"):
        resolve_mesh_shape(MeshConfig(data=-1, fsdp=3, tensor=1), 8)
    cfg = load_config(None, ["data.batch_size=12", "mesh.data=8"])
    with pytest.raises(
        ConfigError, match="data.batch_size: 12 .* not divisible by the data-parallel size data\\*fsdp=8"
    ):
        check_against_devices(cfg, 8)


def test_every_field_documented_and_shipped_configs_load():
    rows = field_docs()
    assert len(rows) > 50
    assert all(doc for _, _, _, doc in rows), [key for key, _, _, doc in rows if not doc]
    table = config_reference_markdown()
    for key in ("run_dir", "train.grad_accum", "model.family", "mesh.fsdp", "checkpoint.every", "data.path"):
        assert f"`{key}`" in table
    for path in sorted((REPO / "configs").glob("*.yaml")):
        assert isinstance(load_config(path), Config), path


def test_readme_config_reference_is_current():
    assert config_reference_markdown() in (REPO / "README.md").read_text(), "run: flaxpod config-reference"
