"""Hardware targets of `flaxpod plan`: chip count, HBM and peak figures per chip, and how to compile for them.

TPU slices are named as Google Cloud names them: `v5p-128` counts TensorCores (v4 and v5p have two per
chip, run as one "megacore" device), `v5e-256` / `v5litepod-256` / `v6e-256` count chips. A slice's
physical shape is the one Cloud provisions (sharding/targets/accelerators.py, the table `flaxpod
launch` uses); any other shape is given explicitly, e.g. `v5p:4x4x12`. GPU targets are hosts of eight: `h100x8`,
`2xh200x8` (two hosts). Several TPU slices (`2xv5e-256`) are refused for now (see parse_target).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from flaxpod.model.errors import InputError
from flaxpod.sharding.targets.accelerators import tpu_slice

GiB = 1024**3


@dataclass(frozen=True)
class Chip:
    hbm_bytes: int
    peak_flops: float  # dense bf16 FLOP/s


# Figures per chip from the vendors' spec pages:
# TPU: cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e ("System architecture" tables).
# (v5e: the compiler reports 15.75 GiB of the 16 GiB available to programs.)
# GPU: NVIDIA H100 SXM / H200 SXM / A100 80GB SXM / B200 (DGX B200) data sheets, dense (no sparsity).
TPU_CHIPS = {
    "v4": Chip(32 * GiB, 275e12),
    "v5e": Chip(16 * GiB, 197e12),
    # Cloud's page says 95 GB; libtpu's compiler reports 95.74 GiB available to programs on a v5p.
    "v5p": Chip(96 * GiB, 459e12),
    "v6e": Chip(32 * GiB, 918e12),
}
GPU_CHIPS = {
    "a100": Chip(80 * 10**9, 312e12),
    "h100": Chip(80 * 10**9, 989e12),
    "h200": Chip(141 * 10**9, 989e12),
    "b200": Chip(180 * 10**9, 2250e12),
}
# Per generation: the topology-name prefix libtpu expects, dimensions of the chip torus, and
# libtpu's chip configuration.
TPU_GENERATIONS = {
    "v4": ("v4", 3, "megacore"),
    "v5p": ("v5", 3, "megacore"),
    "v5e": ("v5e", 2, "default"),
    "v6e": ("v6e", 2, "default"),
}
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6lite": "v6e"}


@dataclass(frozen=True)
class Target:
    name: str
    platform: str  # "tpu": compiled by libtpu for the real chips; "cpu": fake CPU devices stand in
    chip_name: str
    chip: Chip
    chips_per_slice: int
    slices: int = 1
    topology: str = ""  # libtpu topology name, e.g. "v5e:16x16"
    chip_config: str = ""

    @property
    def chips(self) -> int:
        return self.chips_per_slice * self.slices

    @property
    def compiler(self) -> str:
        if self.platform == "tpu":
            return f"TPU compiler (libtpu), {self.topology} x {self.slices} slice(s)"
        return f"CPU compiler on {self.chips} fake devices (estimate for {self.chip_name.upper()})"


def known_targets() -> str:
    return (
        "v4-N, v5p-N, v5e-N / v5litepod-N, v6e-N, v5p:4x4x12, "
        + ", ".join(f"{g}x8" for g in GPU_CHIPS)
        + ", Nx<gpu>x8 for N hosts"
    )


def parse_target(text: str) -> Target:
    """A target from its name (case-insensitive); InputError naming the known forms otherwise."""
    name = text.strip().lower()
    slices = 1
    multi = re.fullmatch(r"(\d+)x(.+)", name)
    if multi and not re.fullmatch(r"\d+x\d+", name):
        slices, name = int(multi.group(1)), multi.group(2)
    gpu = re.fullmatch(r"([a-z]\d+)x(\d+)", name)
    if gpu and gpu.group(1) in GPU_CHIPS:
        chip = gpu.group(1)
        return Target(text, "cpu", chip, GPU_CHIPS[chip], int(gpu.group(2)), slices)
    sized = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", name)
    shaped = re.fullmatch(r"(v\d+[a-z]*):(\d+(?:x\d+)+)", name)
    if slices > 1 and (sized or shaped):
        # libtpu describes several slices, but jax.make_mesh (sharding/mesh.py) lays a mesh over one
        # slice's torus only; spanning slices needs a hybrid (ICI x DCN) mesh, not built yet.
        raise InputError(f"--target {text}: several TPU slices are not supported yet; plan one slice")
    if slices < 1 or not (sized or shaped):
        raise InputError(f"--target: unknown target {text!r}; known forms: {known_targets()}")
    generation = ALIASES.get((sized or shaped).group(1), (sized or shaped).group(1))
    if generation not in TPU_GENERATIONS:
        raise InputError(f"--target: unknown TPU generation in {text!r}; known: {', '.join(TPU_GENERATIONS)}")
    prefix, ndim, chip_config = TPU_GENERATIONS[generation]
    if shaped:
        dims = [int(d) for d in shaped.group(2).split("x")]
        if len(dims) != ndim:
            raise InputError(f"--target: {generation} slices have {ndim} dimensions, got {shaped.group(2)!r}")
    else:
        try:  # the one table of Cloud's slice shapes, shared with `flaxpod launch`
            dims = [int(d) for d in tpu_slice(f"{generation}-{sized.group(2)}").topology.split("x")]
        except InputError as e:
            raise InputError(f"--target {text}: {str(e).removeprefix('--accelerator: ')}") from e
    topology = f"{prefix}:{'x'.join(map(str, dims))}"
    return Target(text, "tpu", generation, TPU_CHIPS[generation], math.prod(dims), slices, topology, chip_config)


def tpu_devices(target: Target) -> list:
    """The target's TPU devices, described by libtpu (no TPU needed; the `plan` extra installs libtpu)."""
    import os

    # Without a TPU VM there is no metadata server to ask; libtpu would otherwise wait for one.
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    # libtpu takes a machine-wide lock for the chips it drives; plan drives none (JAX runs on the
    # CPU), so two plans, or a plan beside a TPU job, may load it at once.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    try:
        topology = topologies.get_topology_desc(
            platform="tpu",
            topology_name=target.topology,
            chip_config_name=target.chip_config,
            chips_per_host_bounds=(2, 2, 1) if target.chips_per_slice >= 4 else (1, 1, 1),
            num_slices=target.slices,
        )
    except Exception as e:  # jax raises RuntimeError/ValueError/XlaRuntimeError depending on what is missing
        raise InputError(
            f"--target {target.name}: libtpu could not describe {target.topology} ({e}); "
            'TPU targets need libtpu: pip install -c constraints.txt -e ".[plan]"'
        ) from e
    return list(topology.devices)
