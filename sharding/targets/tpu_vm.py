"""``--target tpu-vm``: one bash script that starts the run on every worker of a Cloud TPU VM slice.

It copies the resolved config to all workers and runs, through ``gcloud compute tpus tpu-vm ssh
--worker=all``, the same command on each: install jax and flaxpod at pinned versions into a venv,
mount the run's bucket (gcsfuse) when the run directory is ``gs://``, and start ``flaxpod pretrain``
detached with ``FLAXPOD_AUTO_DISTRIBUTED=1`` (JAX reads the coordinator, process count and rank from
the TPU metadata). Each worker logs to its own ``~/flaxpod/train.log``.
"""

from dataclasses import dataclass

from flaxpod.sharding.targets.accelerators import TpuSlice
from flaxpod.sharding.targets.common import heredoc, resolved_config_yaml, shell_join
from flaxpod.sharding.targets.pod import GCS_MOUNT_ROOT, Job

PYTHON = "python3.11"  # flaxpod needs >= 3.11; TPU VM base images (Ubuntu 22.04) ship 3.10
REMOTE_DIR = "~/flaxpod"
REMOTE_CONFIG = "flaxpod-config.yaml"  # in the worker's home: `tpu-vm scp` copies there


@dataclass(frozen=True)
class TpuVm:
    name: str
    zone: str
    project: str | None
    tpu: TpuSlice


def _remote_start(job: Job, packages: list[str], entry: str) -> str:
    lines = [
        "set -euo pipefail",
        f"mkdir -p {REMOTE_DIR}",
        f"if ! command -v {PYTHON} >/dev/null; then",
        f"  sudo apt-get update -q && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q {PYTHON} {PYTHON}-venv",
        "fi",
        f"[ -x {REMOTE_DIR}/venv/bin/pip ] || {PYTHON} -m venv {REMOTE_DIR}/venv",
        f"{REMOTE_DIR}/venv/bin/pip install -q {shell_join(packages)}",
    ]
    if job.buckets:
        lines += [
            "if ! command -v gcsfuse >/dev/null; then  # Cloud Storage FUSE's documented apt install",
            '  echo "deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt '
            'gcsfuse-$(lsb_release -c -s) main" | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null',
            "  curl -s https://packages.cloud.google.com/apt/doc/apt-key.gpg "
            "| sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null",
            "  sudo apt-get update -q && sudo apt-get install -y -q gcsfuse",
            "fi",
        ]
    for bucket in job.buckets:
        mount = f"{GCS_MOUNT_ROOT}/{bucket}"
        lines += [
            f"sudo mkdir -p {mount} && sudo chown $(id -u):$(id -g) {mount}",
            f"mountpoint -q {mount} || gcsfuse --implicit-dirs {bucket} {mount}",
        ]
    lines += [
        f"cd {REMOTE_DIR}",
        # Detached, so the run outlives the ssh session; stdin closed so ssh does not wait on it.
        f"FLAXPOD_AUTO_DISTRIBUTED=1 nohup {REMOTE_DIR}/venv/bin/flaxpod {entry} ~/{REMOTE_CONFIG} "
        f"> {REMOTE_DIR}/train.log 2>&1 < /dev/null &",
        f"echo $! > {REMOTE_DIR}/pid",
        f'echo "$(hostname): started flaxpod (pid $!), log {REMOTE_DIR}/train.log"',
    ]
    return "\n".join(lines)


def tpu_vm_script(job: Job, vm: TpuVm, packages: list[str], entry: str, header: str) -> str:
    """The launch script (``bash launch.sh start|logs|stop``)."""
    project = f" --project={vm.project}" if vm.project else ""
    pod = job.pod
    return f"""#!/usr/bin/env bash
{header}
# TPU VM {vm.name} ({vm.tpu.accelerator_type}, topology {vm.tpu.topology}): {pod.describe()}.
# mesh {job.mesh_line()}; {job.rows_per_process} rows per process and step; run_dir {job.run_dir}
#
#   bash launch.sh start   copy the config to every worker, install, start (detached) on all workers
#   bash launch.sh logs    the last lines of every worker's log
#   bash launch.sh stop    SIGTERM on every worker: the run checkpoints its current step and exits
# Re-running `start` resumes from the latest checkpoint in run_dir.
set -euo pipefail
TPU={vm.name}
WHERE=(--zone={vm.zone}{project})

read -r -d '' START <<'REMOTE' || true
{_remote_start(job, packages, entry)}
REMOTE

case "${{1:-start}}" in
  start)
    CONFIG=$(mktemp --suffix=.yaml)
    {heredoc('"$CONFIG"', resolved_config_yaml(job))}
    gcloud compute tpus tpu-vm scp "$CONFIG" "$TPU:{REMOTE_CONFIG}" --worker=all "${{WHERE[@]}}"
    gcloud compute tpus tpu-vm ssh "$TPU" --worker=all "${{WHERE[@]}}" --command="$START"
    ;;
  logs)
    gcloud compute tpus tpu-vm ssh "$TPU" --worker=all "${{WHERE[@]}}" \\
      --command='tail -n 20 {REMOTE_DIR}/train.log | sed "s/^/[$(hostname)] /"'
    ;;
  stop)
    gcloud compute tpus tpu-vm ssh "$TPU" --worker=all "${{WHERE[@]}}" \\
      --command='kill -TERM "$(cat {REMOTE_DIR}/pid)" 2>/dev/null || true'
    ;;
  *)
    echo "usage: bash $0 start|logs|stop" >&2
    exit 2
    ;;
esac
"""
