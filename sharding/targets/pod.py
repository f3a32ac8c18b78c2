"""The pod a run is launched on, and the checks that the run's config fits it.

This is the one place in ``sharding`` that reads train's ``Config``: it is the back end of the
``flaxpod launch`` entry point, which DESIGN lists among train's entry points.
"""

from dataclasses import dataclass, replace
from pathlib import PurePosixPath

from flaxpod.data.text import DEFAULT_CORPUS
from flaxpod.model.errors import ConfigError
from flaxpod.train.config import Config, check_against_devices, micro_batch_size

# Directories that are private to a host on every cluster we know: a multi-host run there would
# write one partial run directory per host.
NODE_LOCAL_PREFIXES = ("/tmp", "/var/tmp", "/dev/shm", "/run")
GCS_MOUNT_ROOT = "/gcs"  # where the generated files mount gs:// buckets (gcsfuse)


@dataclass(frozen=True)
class Pod:
    """Devices and processes of a pod. A slice is a TPU slice; GPU pods count as one slice of nodes."""

    kind: str
    """`tpu` or `gpu`."""
    slices: int
    hosts_per_slice: int
    devices_per_host: int
    processes_per_host: int = 1
    """1 (one process drives all of a host's devices), or one per GPU under SLURM."""

    @property
    def hosts(self) -> int:
        return self.slices * self.hosts_per_slice

    @property
    def devices(self) -> int:
        return self.hosts * self.devices_per_host

    @property
    def processes(self) -> int:
        return self.hosts * self.processes_per_host

    def describe(self) -> str:
        slices = f"{self.slices} slice(s) x " if self.kind == "tpu" else ""
        return (
            f"{slices}{self.hosts_per_slice} host(s) x {self.devices_per_host} {self.kind.upper()} device(s) = "
            f"{self.devices} devices in {self.processes} process(es)"
        )


@dataclass(frozen=True)
class Job:
    """A config checked against a pod, with what the generated files need."""

    pod: Pod
    cfg: Config
    """The run's config with every gs:// path replaced by its mount path (what each host reads)."""
    mesh_shape: tuple[int, int, int]
    rows_per_process: int
    buckets: tuple[str, ...]
    """gs:// buckets to mount at /gcs/BUCKET on every host (gcsfuse), sorted."""

    @property
    def run_dir(self) -> str:
        return self.cfg.run_dir

    def mesh_line(self) -> str:
        data, fsdp, tensor = self.mesh_shape
        m = self.cfg.mesh
        return f"data={data} (dcn {m.dcn_data}) fsdp={fsdp} (dcn {m.dcn_fsdp}) tensor={tensor}"


def check_job(pod: Pod, cfg: Config, allow_gcs: bool = True) -> Job:
    """Checks that ``cfg`` runs on ``pod``; raises ConfigError naming the key and both numbers."""
    try:
        mesh_shape = check_against_devices(cfg, pod.devices)
    except ConfigError as err:
        raise ConfigError(f"{err} (the pod: {pod.describe()})") from None
    granules = cfg.mesh.dcn_data * cfg.mesh.dcn_fsdp
    if pod.kind == "tpu" and granules != pod.slices:
        raise ConfigError(
            f"mesh.dcn_data * mesh.dcn_fsdp = {cfg.mesh.dcn_data} * {cfg.mesh.dcn_fsdp} = {granules} must equal "
            f"the number of TPU slices, {pod.slices}"
        )
    if pod.kind == "gpu" and pod.hosts % granules:
        raise ConfigError(f"mesh.dcn_data * mesh.dcn_fsdp = {granules} must divide the number of nodes, {pod.hosts}")
    micro = micro_batch_size(cfg)
    if micro % pod.processes:
        raise ConfigError(
            f"data.batch_size: the micro-batch of {micro} rows (train.grad_accum={cfg.train.grad_accum}) "
            f"does not split evenly over {pod.processes} processes, each of which loads its own rows"
        )
    buckets: set[str] = set()

    def shared(key: str, path: str) -> str:
        return _shared_path(key, path, pod.hosts, allow_gcs, buckets)

    run_dir = shared("run_dir", cfg.run_dir)
    data_paths = [shared("data.path", p) for p in cfg.data.path.split(",")]
    tokenizer_path = cfg.tokenizer.path and shared("tokenizer.path", cfg.tokenizer.path)
    on_every_host = replace(
        cfg,
        run_dir=run_dir,
        data=replace(cfg.data, path=",".join(data_paths)),
        tokenizer=replace(cfg.tokenizer, path=tokenizer_path),
    )
    return Job(pod, on_every_host, mesh_shape, micro // pod.processes, tuple(sorted(buckets)))


def _shared_path(key: str, path: str, hosts: int, allow_gcs: bool, buckets: set[str]) -> str:
    """``path`` as every host sees it; gs:// URLs become their mount path (and their bucket is noted)."""
    path = path.strip()
    if path.startswith("gs://"):
        if not allow_gcs:
            raise ConfigError(f"{key}: {path!r} is on Cloud Storage; this target needs a shared filesystem path")
        bucket, _, rest = path[len("gs://") :].partition("/")
        if not bucket or not rest.strip("/"):
            raise ConfigError(f"{key}: expected gs://BUCKET/PATH, got {path!r}")
        # flaxpod reads and writes these with ordinary file calls, so the bucket is mounted
        # (gcsfuse) at the same path on every host and the run uses that path.
        buckets.add(bucket)
        return f"{GCS_MOUNT_ROOT}/{bucket}/{rest.strip('/')}"
    if hosts == 1 or (key == "data.path" and path == DEFAULT_CORPUS):
        return path
    where = "gs://BUCKET/PATH or " if allow_gcs else ""
    pure = PurePosixPath(path)
    if not pure.is_absolute():
        raise ConfigError(
            f"{key}: {path!r} is relative, so each of the {hosts} hosts would use its own; use "
            f"{where}an absolute path on a filesystem every host mounts (NFS, Filestore, Lustre)"
        )
    if any(pure == PurePosixPath(p) or PurePosixPath(p) in pure.parents for p in NODE_LOCAL_PREFIXES):
        raise ConfigError(
            f"{key}: {path!r} is node-local storage; use {where}a path on a filesystem all {hosts} hosts mount"
        )
    return path
