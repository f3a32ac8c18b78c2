"""``--target slurm``: an sbatch script that starts one flaxpod process per GPU with ``srun``.

JAX's SLURM detection (``jax.distributed.initialize()`` with no arguments) reads the job step's
``SLURM_JOB_ID``, ``SLURM_STEP_NODELIST``, ``SLURM_NTASKS``, ``SLURM_PROCID`` and ``SLURM_LOCALID``,
takes the first node of the step as coordinator (port ``61440 + SLURM_JOB_ID % 4096``) and gives
each process the one GPU numbered ``SLURM_LOCALID``. Hence, in the script:

- one task per GPU (``--ntasks-per-node`` = GPUs per node) and GPUs requested per node
  (``--gpus-per-node``), never ``--gpus-per-task``/``--gpu-bind``: those hide a node's other
  GPUs from each task, so GPU ``SLURM_LOCALID`` does not exist in tasks 1.. (jax #28194, #16788);
- flaxpod runs only inside ``srun``: the batch shell itself has a partial ``SLURM_*`` environment
  (no job step of N tasks), and a process started there would wait for peers that never come
  (jax #30073). Stray ``FLAXPOD_*`` variables are unset so they cannot override the detection.
"""

from dataclasses import dataclass

from flaxpod.sharding.distributed import (
    AUTO_DISTRIBUTED_ENV,
    COORDINATOR_ADDRESS_ENV,
    NUM_PROCESSES_ENV,
    PROCESS_ID_ENV,
)
from flaxpod.sharding.targets.common import heredoc, resolved_config_yaml, shell_join
from flaxpod.sharding.targets.pod import Job


@dataclass(frozen=True)
class SlurmTarget:
    job_name: str
    partition: str | None
    time_limit: str | None
    venv: str
    """A virtual environment on the shared filesystem, made once (the script installs into it)."""
    cpus_per_task: int | None = None


def sbatch_script(job: Job, target: SlurmTarget, packages: list[str], entry: str, header: str) -> str:
    pod = job.pod
    options = [
        f"--job-name={target.job_name}",
        f"--nodes={pod.hosts}",
        f"--ntasks-per-node={pod.processes_per_host}",
        f"--gpus-per-node={pod.devices_per_host}",
        "--exclusive",
        # In the submit directory: SLURM opens it before the script can create run_dir/logs.
        "--output=flaxpod-%j.out",
    ]
    if target.cpus_per_task:
        options.append(f"--cpus-per-task={target.cpus_per_task}")
    if target.partition:
        options.append(f"--partition={target.partition}")
    if target.time_limit:
        options.append(f"--time={target.time_limit}")
    sbatch_lines = "\n".join(f"#SBATCH {o}" for o in options)
    config = f"{job.run_dir}/launch/config-$SLURM_JOB_ID.yaml"
    return f"""#!/bin/bash
{sbatch_lines}
{header}
# SLURM: {pod.describe()}.
# mesh {job.mesh_line()}; {job.rows_per_process} rows per process and step; run_dir {job.run_dir}
# Submit: sbatch job.sbatch   Stop (checkpoints first): scancel --signal=TERM --full JOBID
# Re-submitting resumes from the latest checkpoint in run_dir. Logs: {job.run_dir}/logs/JOBID-taskN.log
#
# One task per GPU and --gpus-per-node, not --gpus-per-task: JAX's SLURM detection gives task
# SLURM_LOCALID the GPU of that number, which must be visible to it. flaxpod runs only under srun:
# the batch shell's SLURM_* variables describe no N-task step and would make JAX wait for peers.
set -euo pipefail
unset {NUM_PROCESSES_ENV} {PROCESS_ID_ENV} {COORDINATOR_ADDRESS_ENV}
mkdir -p {job.run_dir}/logs {job.run_dir}/launch

# Install once per job, on this node, into the shared venv (pinned versions; Python >= 3.11).
[ -x {target.venv}/bin/pip ] || "${{PYTHON:-python3}}" -m venv {target.venv}
{target.venv}/bin/pip install -q {shell_join(packages)}

{heredoc(config, resolved_config_yaml(job))}

export {AUTO_DISTRIBUTED_ENV}=1
srun --kill-on-bad-exit=1 --output={job.run_dir}/logs/%j-task%t.log \\
  {target.venv}/bin/flaxpod {entry} {config}
"""
