"""What a TPU slice type is made of: chips, hosts, topology and its GKE node labels.

Hand-written from Cloud TPU's published slice shapes (xpk, which has such a table, cannot be a
dependency: it pins pyyaml/packaging versions that clash with ours). One JAX device per chip on
all of these (v4 and v5p run their two TensorCores as one "megacore" device).
"""

from dataclasses import dataclass

from flaxpod.model.errors import InputError

CHIPS_PER_HOST = 4  # multi-host slices of every generation below; single-host slices hold up to 8

# Slice shapes (chips -> topology) of the 2D-torus generations (v5e, v6e) and the 3D ones (v4, v5p).
_TOPOLOGY_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
_TOPOLOGY_3D = {
    4: "2x2x1",
    8: "2x2x2",
    16: "2x2x4",
    32: "2x4x4",
    64: "4x4x4",
    128: "4x4x8",
    256: "4x8x8",
    512: "8x8x8",
    1024: "8x8x16",
    2048: "8x16x16",
    4096: "16x16x16",
}
# gcloud accelerator-type prefix -> (GKE accelerator label, topology table, number in the name per chip)
_GENERATIONS = {
    "v5litepod": ("tpu-v5-lite-podslice", _TOPOLOGY_2D, 1),
    "v6e": ("tpu-v6e-slice", _TOPOLOGY_2D, 1),
    "v5p": ("tpu-v5p-slice", _TOPOLOGY_3D, 2),  # v5p-N and v4-N count TensorCores: N/2 chips
    "v4": ("tpu-v4-podslice", _TOPOLOGY_3D, 2),
}


@dataclass(frozen=True)
class TpuSlice:
    """One TPU slice as gcloud, GKE and JAX see it."""

    accelerator_type: str
    """gcloud's name, e.g. v5litepod-256."""
    chips: int
    hosts: int
    topology: str
    """GKE's cloud.google.com/gke-tpu-topology label, e.g. 16x16."""
    gke_accelerator: str
    """GKE's cloud.google.com/gke-tpu-accelerator label."""

    @property
    def chips_per_host(self) -> int:
        return self.chips // self.hosts


def tpu_slice(accelerator_type: str) -> TpuSlice:
    """The slice named like gcloud's ``--accelerator-type`` (``v5litepod-256``, ``v5p-128``, ``v6e-64``, ...)."""
    prefix, _, number = accelerator_type.rpartition("-")
    if prefix == "v5e":
        prefix = "v5litepod"  # the name people say for what gcloud calls v5litepod
    if prefix not in _GENERATIONS or not number.isdigit():
        raise InputError(
            f"--accelerator: unknown TPU type {accelerator_type!r}; expected one of "
            f"{', '.join(p + '-N' for p in _GENERATIONS)} (e.g. v5litepod-256)"
        )
    gke_label, topologies, per_chip = _GENERATIONS[prefix]
    chips = int(number) // per_chip
    if chips not in topologies:
        sizes = ", ".join(str(c * per_chip) for c in topologies)
        raise InputError(f"--accelerator: {accelerator_type!r} is not a slice size of {prefix}; sizes: {sizes}")
    hosts = 1 if chips <= 8 and prefix in ("v5litepod", "v6e") else max(1, chips // CHIPS_PER_HOST)
    return TpuSlice(f"{prefix}-{number}", chips, hosts, topologies[chips], gke_label)
