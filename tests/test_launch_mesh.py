"""Multi-slice / multi-node meshes: which device lands where (fake devices), and the config keys."""

from dataclasses import dataclass

import jax
import numpy as np
import pytest
from flaxpod.sharding.mesh import MESH_AXES, build_mesh, hybrid_device_array
from flaxpod.train.config import ConfigError, MeshConfig, load_config, resolve_mesh_shape


@dataclass(frozen=True)
class FakeDevice:
    """What mesh_utils reads of a device: id, process, platform, kind (and slice_index on TPU)."""

    id: int
    process_index: int
    platform: str = "gpu"
    device_kind: str = "fake"


@dataclass(frozen=True)
class FakeTpuCore(FakeDevice):
    slice_index: int = 0


def slice_of(array: np.ndarray, key) -> np.ndarray:
    return np.vectorize(key)(array)


def test_two_slices_put_the_data_axis_across_slices():
    # 2 slices x 4 chips, shuffled, as a mesh (data=4, fsdp=2, tensor=1) with dcn_data=2.
    devices = [FakeTpuCore(id=i, process_index=i // 2, platform="cpu", slice_index=i // 4) for i in range(8)]
    rng = np.random.default_rng(0)
    array = hybrid_device_array((4, 2, 1), (2, 1, 1), [devices[i] for i in rng.permutation(8)])
    assert array.shape == (4, 2, 1)
    slices = slice_of(array, lambda d: d.slice_index)
    # data positions 0-1 in slice 0, 2-3 in slice 1; each slice holds a whole (2, 2, 1) ICI block,
    # so fsdp (and tensor) collectives never leave a slice.
    np.testing.assert_array_equal(slices[:, :, 0], [[0, 0], [0, 0], [1, 1], [1, 1]])
    assert sorted(d.id for d in array.ravel()) == list(range(8))


def test_dcn_fsdp_splits_the_fsdp_axis():
    devices = [FakeTpuCore(id=i, process_index=i, platform="cpu", slice_index=i // 2) for i in range(8)]
    array = hybrid_device_array((2, 4, 1), (1, 4, 1), devices)
    slices = slice_of(array, lambda d: d.slice_index)
    np.testing.assert_array_equal(slices[:, :, 0], [[0, 1, 2, 3], [0, 1, 2, 3]])


def test_processes_are_the_granules_without_slice_index():
    # CPU multi-process: one process per node, no slice_index (process_is_granule=True).
    devices = [FakeDevice(id=100 * (i // 4) + i, process_index=i // 4, platform="cpu") for i in range(8)]
    array = hybrid_device_array((2, 2, 2), (2, 1, 1), devices[4:] + devices[:4])
    processes = slice_of(array, lambda d: d.process_index)
    assert (processes[0] == 0).all() and (processes[1] == 1).all()


def test_one_process_per_gpu_groups_consecutive_ranks_into_nodes():
    # 2 nodes x 4 GPUs, one SLURM task per GPU: ranks 0-3 on node 0, 4-7 on node 1.
    devices = [FakeDevice(id=i, process_index=i) for i in range(8)]
    array = hybrid_device_array((2, 2, 2), (2, 1, 1), list(reversed(devices)))
    assert all(isinstance(d, FakeDevice) for d in array.ravel())  # the node tags are unwrapped
    nodes = slice_of(array, lambda d: d.process_index // 4)
    assert (nodes[0] == 0).all() and (nodes[1] == 1).all()
    # Inside a node, GPUs are ordered by id (mesh_utils' GPU rule): tensor pairs are neighbours.
    np.testing.assert_array_equal(slice_of(array[1], lambda d: d.id), [[4, 5], [6, 7]])


def test_uneven_granules_are_refused():
    devices = [FakeDevice(id=i, process_index=i) for i in range(6)]
    with pytest.raises(ValueError, match="6 process\\(es\\) cannot form 4 slices/nodes"):
        hybrid_device_array((6, 4, 1), (1, 4, 1), devices)
    with pytest.raises(ValueError, match=r"mesh \(6, 1, 1\) cannot be split \(4, 1, 1\) ways"):
        hybrid_device_array((6, 1, 1), (4, 1, 1), devices)


def test_build_mesh_without_dcn_is_unchanged():
    mesh = build_mesh(2, 2, 2)
    assert mesh.axis_names == MESH_AXES and dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert mesh.devices.ravel().tolist() == build_mesh(2, 2, 2, dcn_data=1, dcn_fsdp=1).devices.ravel().tolist()


def test_build_mesh_with_dcn_in_one_process_names_the_problem():
    with pytest.raises(ValueError, match="1 process"):
        build_mesh(4, 2, 1, devices=jax.devices(), dcn_data=2)


def test_config_keys_are_validated():
    cfg = load_config("configs/tiny.yaml", ["mesh.data=4", "mesh.dcn_data=2", "mesh.fsdp=2", "mesh.dcn_fsdp=2"])
    assert (cfg.mesh.dcn_data, cfg.mesh.dcn_fsdp) == (2, 2)
    with pytest.raises(ConfigError, match="mesh.dcn_data: 3 does not divide mesh.data=4"):
        load_config("configs/tiny.yaml", ["mesh.data=4", "mesh.dcn_data=3"])
    with pytest.raises(ConfigError, match="mesh.dcn_fsdp: expected a positive"):
        load_config("configs/tiny.yaml", ["mesh.dcn_fsdp=0"])
    # An axis of -1 is checked once the device count fills it in.
    with pytest.raises(ConfigError, match="mesh.dcn_data: 3 does not divide mesh.data=8 on 8 devices"):
        resolve_mesh_shape(MeshConfig(data=-1, dcn_data=3), 8)
    assert resolve_mesh_shape(MeshConfig(data=-1, fsdp=2, dcn_data=2), 8) == (4, 2, 1)
