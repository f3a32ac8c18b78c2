"""Checkpoints: exact round trip under async saving, restore on other meshes, corruption
fallback, explicit-step errors, retention, params-only restore, failed writes."""

from __future__ import annotations

import hashlib
import json
import resource
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath
from flaxpod.data.tokenizer import CharTokenizer
from flaxpod.model.errors import InputError
from flaxpod.sharding.mesh import build_mesh
from flaxpod.train.checkpoint import Checkpointer, CheckpointWriteError, make_run_info
from flaxpod.train.checkpoint_files import (
    COMMIT_FILE,
    UNUSABLE,
    CheckpointError,
    committed_steps,
    steps_to_delete,
    write_commit,
)
from flaxpod.train.config import Config, to_dict
from flaxpod.train.run_dir import read_run_info, restore_params, save_params, tokenizer_from_run_info
from jax.sharding import SingleDeviceSharding

from tests.tiny_setup import MODEL, assert_bitwise_equal, random_state, tiny

TOKENIZER = CharTokenizer(sorted("abcdefgh \n"))
RUN_INFO = make_run_info(to_dict(Config(model=MODEL)), TOKENIZER)


@pytest.fixture(scope="module")
def sharded():
    """The tiny model's layout on (fsdp 4 x tensor 2) and three random states (host arrays)."""
    t = tiny(1, 4, 2)
    return t, [random_state(t.layout, seed) for seed in range(3)]


def save_steps(run_dir: Path, t, states, *, keep: int = 10, keep_every: int = 0) -> None:
    """Saves states[i] as step i+1 (asynchronously); each state's buffers are donated (as the train
    step does) while its save may still be writing."""
    ck = Checkpointer(run_dir, keep=keep, keep_every=keep_every, run_info=RUN_INFO)
    clobber = jax.jit(lambda s: jax.tree.map(jnp.zeros_like, s), donate_argnums=0, out_shardings=t.layout.shardings)
    for i, s in enumerate(states):
        state = jax.device_put(s, t.layout.shardings)
        ck.save(i + 1, state, {"next_index": i + 1})
        clobber(state)
    ck.close()


def test_async_save_restores_exactly_after_donation(tmp_path, sharded):
    t, states = sharded
    save_steps(tmp_path, t, states)
    assert committed_steps(tmp_path) == [1, 2, 3]
    ck = Checkpointer(tmp_path, keep=3)
    restored = ck.restore_latest(t.layout)
    ck.close()
    assert restored.step == 3 and restored.data_state == {"next_index": 3}
    assert_bitwise_equal(restored.state, states[2])
    assert restored.state.params["embed"].sharding == t.layout.shardings.params["embed"]
    assert restored.run_info["config"]["model"]["d_model"] == MODEL.d_model
    step, info = read_run_info(tmp_path)
    assert step == 3 and tokenizer_from_run_info(info).fingerprint() == TOKENIZER.fingerprint()


def test_restore_on_other_meshes(tmp_path, sharded):
    """Saved on fsdp 4 x tensor 2 (8 devices), restored on tensor 4 (4 devices) and on one device:
    the same bits, laid out on the new mesh. (Training on after such a restore: test_resume.py.)"""
    t8, states = sharded
    save_steps(tmp_path, t8, states)
    for shape in ((1, 1, 4), (1, 1, 1)):
        t = tiny(*shape)
        ck = Checkpointer(tmp_path, keep=3)
        restored = ck.restore_latest(t.layout)
        ck.close()
        assert_bitwise_equal(restored.state, states[2])
        up = restored.state.params["blocks"]["mlp"]["up"]
        assert up.sharding == t.layout.shardings.params["blocks"]["mlp"]["up"]
        assert len(up.sharding.device_set) == np.prod(shape)


def test_restore_params_only(tmp_path, sharded):
    t, states = sharded
    save_steps(tmp_path, t, states)
    # Without its optimizer state on disk, params-only restore still works: it never reads it.
    shutil.rmtree(tmp_path / "checkpoints" / "2" / "train_state")
    params, step = restore_params(tmp_path, step=3)
    assert step == 3
    assert_bitwise_equal(params, states[2].params)
    assert params["embed"].sharding.device_set == {jax.devices()[0]}
    mesh = build_mesh(1, 2, 2, devices=jax.devices()[:4])
    params, _ = restore_params(tmp_path, step=3, target=mesh)
    assert tuple(params["blocks"]["attn"]["q"].sharding.spec) == (None, "fsdp", "tensor", None)
    assert_bitwise_equal(params, states[2].params)
    params, step = restore_params(tmp_path, target=t.layout)
    assert step == 3 and params["embed"].sharding == t.layout.param_shardings["embed"]
    with pytest.raises(CheckpointError, match="step 2 .* unusable: item 'train_state' is missing"):
        restore_params(tmp_path, step=2)
    with pytest.raises(CheckpointError, match=r"no checkpoint step 7 .* usable steps: \[1, 3\]"):
        restore_params(tmp_path, step=7)


def _largest_file(directory: Path) -> Path:
    return max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _truncate(step_dir: Path) -> None:
    path = _largest_file(step_dir / "params")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _no_commit(step_dir: Path) -> None:
    (step_dir / COMMIT_FILE).unlink()


def _delete_item(step_dir: Path) -> None:
    shutil.rmtree(step_dir / "train_state")


def _scramble_same_size(step_dir: Path) -> None:
    """Damage the sizes cannot show (caught by the content hashes)."""
    path = step_dir / "params" / "_METADATA"
    path.write_bytes(b"#" * path.stat().st_size)


def _flip_bytes(step_dir: Path) -> None:
    """Bit rot in the array data: same size, some bytes inverted."""
    path = _largest_file(step_dir / "params")
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 3, len(data) // 3 + 64):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage, problem",
    [
        (_truncate, "file params/.* has .* bytes, .* were written"),
        (_no_commit, "no flaxpod_commit.json"),
        (_delete_item, "item 'train_state' is missing"),
        (_scramble_same_size, "file params/_METADATA does not hold the bytes that were written"),
        (_flip_bytes, "file params/.* does not hold the bytes that were written"),
    ],
)
def test_damaged_latest_step_falls_back_to_previous(tmp_path, sharded, capsys, damage, problem):
    t, states = sharded
    save_steps(tmp_path, t, states)
    damage(tmp_path / "checkpoints" / "3")
    with pytest.raises(CheckpointError, match=f"step 3 .*unusable: {problem}"):  # explicit: an error, no fallback
        restore_params(tmp_path, step=3)
    params, step = restore_params(tmp_path, target=t.layout)  # the readers' fallback (evaluate, export, ...)
    assert step == 2
    assert_bitwise_equal(params, states[1].params)
    ck = Checkpointer(tmp_path, keep=3)
    restored = ck.restore_latest(t.layout)
    ck.close()
    assert restored.step == 2
    assert_bitwise_equal(restored.state, states[1])
    err = capsys.readouterr().err
    assert "checkpoint step 3" in err and "skipping it" in err
    assert not (tmp_path / "checkpoints" / "3").exists()  # set aside, so step 3 can be written again
    assert [p.name.split("-")[0] for p in (tmp_path / UNUSABLE).iterdir()] == ["3"]


def test_no_usable_checkpoint_is_an_error_but_unfinished_saves_are_invisible(tmp_path, sharded):
    t, states = sharded
    save_steps(tmp_path, t, states[:2])
    for step in ("1", "2"):
        _truncate(tmp_path / "checkpoints" / step)
    with pytest.raises(CheckpointError, match="no usable checkpoint .*step 2: .*step 1: "):
        Checkpointer(tmp_path, keep=3).restore_latest(t.layout)
    other = tmp_path / "other"
    save_steps(other, t, states[:1])
    _no_commit(other / "checkpoints" / "1")
    (other / "checkpoints" / "4.orbax-checkpoint-tmp-123").mkdir()
    ck = Checkpointer(other, keep=3)
    ck.remove_partial_saves()
    assert ck.restore_latest(t.layout) is None  # a fresh start
    assert list((other / "checkpoints").iterdir()) == []


def test_params_only_checkpoint(tmp_path, sharded):
    """save_params (imported weights) writes a committed checkpoint without optimizer state:
    restore_params reads it onto an abstract target, training refuses to resume from it."""
    t, states = sharded
    params = jax.device_put(states[0].params, t.layout.param_shardings)
    save_params(tmp_path, 5, params, RUN_INFO)
    assert committed_steps(tmp_path) == [5]
    one = SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=one), t.layout.shapes.params)
    restored, step = restore_params(tmp_path, target=target)
    assert step == 5 and restored["embed"].sharding == one
    assert_bitwise_equal(restored, states[0].params)
    with pytest.raises(CheckpointError, match="step 5 already exists"):
        save_params(tmp_path, 5, params)
    with pytest.raises(CheckpointError, match="holds parameters only"):
        Checkpointer(tmp_path, keep=3).restore_latest(t.layout)


def test_data_state_of_another_process_count_is_a_clear_error(tmp_path, sharded):
    t, states = sharded
    save_steps(tmp_path, t, states[:1])
    step_dir = tmp_path / "checkpoints" / "1"
    (step_dir / "data" / "process_0-of-1.json").rename(step_dir / "data" / "process_0-of-2.json")
    write_commit(epath.Path(step_dir), 1)
    with pytest.raises(CheckpointError, match="data-iterator state of 2 processes, this run has 1"):
        Checkpointer(tmp_path, keep=3).restore_latest(t.layout)
    assert (tmp_path / "checkpoints" / "1").exists()  # a user error, not damage: nothing is moved


def test_retention_keeps_newest_and_every_mth():
    assert steps_to_delete([1, 2, 3, 4, 5, 6], keep=2, keep_every=3) == [1, 2, 4]
    assert steps_to_delete([10, 20, 30], keep=3) == []
    assert steps_to_delete([10, 20, 30], keep=1, keep_every=0) == [10, 20]


def test_retention_applies_after_commit(tmp_path, sharded):
    t, states = sharded
    save_steps(tmp_path, t, states * 2, keep=2, keep_every=3)
    assert committed_steps(tmp_path) == [3, 5, 6]


def test_failed_write_is_an_error_and_keeps_the_previous_checkpoint(tmp_path, sharded):
    """A disk that fills up: files cannot grow past 4 kB while step 2 is written."""
    t, states = sharded
    ck = Checkpointer(tmp_path, keep=3, run_info=RUN_INFO)
    ck.save(1, jax.device_put(states[0], t.layout.shardings), {"i": 1}, wait=True)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
    try:
        with pytest.raises(CheckpointWriteError, match=r"step 2 .*failed.*previous checkpoint \(step 1\) is intact"):
            ck.save(2, jax.device_put(states[1], t.layout.shardings), {"i": 2}, wait=True)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        ck.close()
    assert committed_steps(tmp_path) == [1]
    params, step = restore_params(tmp_path)
    assert step == 1
    assert_bitwise_equal(params, states[0].params)


def test_commit_file_lists_every_file(tmp_path, sharded):
    t, states = sharded
    save_steps(tmp_path, t, states[:1])
    step_dir = tmp_path / "checkpoints" / "1"
    record = json.loads((step_dir / COMMIT_FILE).read_text())
    on_disk = {str(p.relative_to(step_dir)) for p in step_dir.rglob("*") if p.is_file() and p.name != COMMIT_FILE}
    assert record["step"] == 1 and set(record["files"]) == on_disk == set(record["sha256"])
    some = sorted(on_disk)[0]
    assert record["sha256"][some] == hashlib.sha256((step_dir / some).read_bytes()).hexdigest()
    assert {"params", "train_state", "data", "run"} <= {p.split("/")[0] for p in on_disk}


def _legacy_record(step_dir: Path) -> None:
    """A commit record as written before content hashes: sizes only."""
    record = json.loads((step_dir / COMMIT_FILE).read_text())
    del record["sha256"]
    (step_dir / COMMIT_FILE).write_text(json.dumps(record))


def test_readers_fall_back_when_a_restore_fails(tmp_path, sharded, capsys):
    """Damage no record can show (a record without hashes): every reader (restore_params,
    read_run_info, so evaluate/generate/export/finetune's base) warns naming the step and falls
    back; an explicit step says it is damaged."""
    t, states = sharded
    save_steps(tmp_path, t, states)
    step_dir = tmp_path / "checkpoints" / "3"
    _legacy_record(step_dir)
    _scramble_same_size(step_dir)
    params, step = restore_params(tmp_path)  # target from the checkpoint's own config
    assert step == 2
    assert_bitwise_equal(params, states[1].params)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "checkpoint step 3" in err and "restore failed" in err, err
    with pytest.raises(CheckpointError, match="checkpoint step 3 in .* is damaged: restore failed"):
        restore_params(tmp_path, step=3, target=t.layout)
    _legacy_record(tmp_path / "checkpoints" / "2")
    _scramble_same_size(tmp_path / "checkpoints" / "2")
    _no_commit(tmp_path / "checkpoints" / "1")
    with pytest.raises(CheckpointError, match=r"no usable checkpoint .*\(step 3: restore failed .*; step 2: restore"):
        restore_params(tmp_path)


def test_only_ascii_digit_names_are_steps(tmp_path, sharded, capsys):
    """'²' (int() refuses it) and '٣' (int() reads 3) are not steps: ignored with a warning, and
    the real step 3 is the one found."""
    t, states = sharded
    save_steps(tmp_path, t, states)
    for name in ("\u00b2", "\u0663", "notes"):
        (tmp_path / "checkpoints" / name).mkdir()
    assert committed_steps(tmp_path) == [1, 2, 3]
    params, step = restore_params(tmp_path, target=t.layout)
    assert step == 3
    assert_bitwise_equal(params, states[2].params)
    err = capsys.readouterr().err
    assert all(f"checkpoints/{n}: not a checkpoint step" in err for n in ("\u00b2", "\u0663", "notes")), err


@pytest.mark.parametrize("name", ["/tmp/evil.json", "../evil.json", "a/b.json", "..", "", None])
def test_tokenizer_file_name_from_a_checkpoint_is_never_a_path(tmp_path, name):
    info = json.loads(json.dumps(RUN_INFO))
    info["tokenizer"]["filename"] = name
    with pytest.raises(InputError, match="is not a plain file name"):
        tokenizer_from_run_info(info)
    assert not Path("/tmp/evil.json").exists() and not (tmp_path.parent / "evil.json").exists()
