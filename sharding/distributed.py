"""Multi-process start-up: join a JAX distributed job described by environment variables.

Call :func:`initialize_from_env` first thing in an entry point, before anything touches
JAX devices (``jax.devices()``, creating arrays, building a mesh). It reads:

``FLAXPOD_NUM_PROCESSES``        number of processes in the job; > 1 turns multi-process on
``FLAXPOD_PROCESS_ID``           this process's rank, 0 .. N-1 (rank 0 hosts the coordinator)
``FLAXPOD_COORDINATOR_ADDRESS``  ``host:port`` of rank 0, reachable from every process
``FLAXPOD_AUTO_DISTRIBUTED``     ``1``: let JAX detect the cluster (used when the three above
                                 are unset)
``FLAXPOD_HEARTBEAT_TIMEOUT_S``  seconds after which a silent peer counts as dead and every
                                 survivor aborts (default 100, JAX's own)

With none of them set the job runs as one process and nothing happens.

A dead peer (killed, its host lost) never makes the others hang forever: they are blocked in a
collective that will not complete, but JAX's coordination service stops hearing the peer's
heartbeats and, ``FLAXPOD_HEARTBEAT_TIMEOUT_S`` seconds later, aborts every surviving process
(SIGABRT, exit status 134). Under ``flaxpod launch`` the launcher stops the survivors sooner (its
``--grace-period``).

Running on one machine (CPU, Gloo collectives), e.g. 2 processes x 4 fake devices::

    flaxpod launch --num-processes 2 --devices-per-process 4 -- flaxpod pretrain cfg.yaml

``flaxpod launch`` (:mod:`sharding.launch`) sets the three variables for each child.

Running on a real pod, start the same command on every host:

* Cloud TPU pod slice: ``FLAXPOD_AUTO_DISTRIBUTED=1 flaxpod pretrain cfg.yaml`` on all
  workers (e.g. ``gcloud compute tpus tpu-vm ssh NAME --worker=all --command=...``); JAX
  reads the coordinator, process count and rank from the TPU metadata.
* GPU cluster under SLURM (or Open MPI): ``srun`` one process per host (or per GPU) with
  ``FLAXPOD_AUTO_DISTRIBUTED=1``; JAX reads ``SLURM_*`` / ``OMPI_*`` variables.
* Anything else: set ``FLAXPOD_NUM_PROCESSES``, ``FLAXPOD_PROCESS_ID`` and
  ``FLAXPOD_COORDINATOR_ADDRESS=<rank-0 host IP>:<free port>`` by hand on every host.
"""

import os

import jax

NUM_PROCESSES_ENV = "FLAXPOD_NUM_PROCESSES"
PROCESS_ID_ENV = "FLAXPOD_PROCESS_ID"
COORDINATOR_ADDRESS_ENV = "FLAXPOD_COORDINATOR_ADDRESS"
AUTO_DISTRIBUTED_ENV = "FLAXPOD_AUTO_DISTRIBUTED"
HEARTBEAT_TIMEOUT_ENV = "FLAXPOD_HEARTBEAT_TIMEOUT_S"


def initialize_from_env() -> None:
    """Join the distributed job described by the ``FLAXPOD_*`` variables, if any.

    Idempotent: returns at once when JAX's distributed runtime is already up.
    Raises ValueError naming the variable when one is missing or malformed.
    """
    if jax.distributed.is_initialized():
        return
    # Passed only when set, so that JAX's default (100 s) stays the default.
    heartbeat = _read_int(HEARTBEAT_TIMEOUT_ENV, minimum=1)
    timeouts = {} if heartbeat is None else {"heartbeat_timeout_seconds": heartbeat}
    num_processes = _read_int(NUM_PROCESSES_ENV, minimum=1)
    if num_processes is None:
        for name in (PROCESS_ID_ENV, COORDINATOR_ADDRESS_ENV):
            if os.environ.get(name, "").strip():
                raise ValueError(f"{name} is set but {NUM_PROCESSES_ENV} is not")
        if _read_auto_flag():
            # No addresses or ranks: JAX detects TPU pods, SLURM, Open MPI, ... by itself.
            _use_gloo_for_cpu_collectives()
            jax.distributed.initialize(**timeouts)
        return
    if num_processes == 1:
        return
    process_id = _read_int(PROCESS_ID_ENV, minimum=0, required=True)
    if process_id >= num_processes:
        raise ValueError(f"{PROCESS_ID_ENV}={process_id} must be below {NUM_PROCESSES_ENV}={num_processes}")
    address = _read_address(COORDINATOR_ADDRESS_ENV)
    _use_gloo_for_cpu_collectives()
    jax.distributed.initialize(
        coordinator_address=address,
        num_processes=num_processes,
        process_id=process_id,
        **timeouts,
    )


def is_main_process() -> bool:
    """True on the process that should write logs, checkpoints' metadata and run files."""
    return jax.process_index() == 0


def _use_gloo_for_cpu_collectives() -> None:
    # Cross-process collectives on the CPU backend need an implementation. jax 0.10 defaults
    # to Gloo; older releases defaulted to none, so set it when unset and keep a user's
    # explicit choice (e.g. "mpi") otherwise. It only affects the CPU backend.
    if jax.config.jax_cpu_collectives_implementation is None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")


def _read_int(name: str, minimum: int, required: bool = False) -> int | None:
    raw = os.environ.get(name, "").strip()
    if not raw:
        if required:
            raise ValueError(f"{name} must be set (an integer >= {minimum})")
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {raw!r}") from None
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {raw!r}")
    return value


def _read_address(name: str) -> str:
    raw = os.environ.get(name, "").strip()
    host, sep, port = raw.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{name} must be 'host:port' (e.g. 127.0.0.1:12345), got {raw!r}")
    return raw


def _read_auto_flag() -> bool:
    raw = os.environ.get(AUTO_DISTRIBUTED_ENV, "").strip()
    if raw in ("", "0"):
        return False
    if raw == "1":
        return True
    raise ValueError(f"{AUTO_DISTRIBUTED_ENV} must be 0 or 1, got {raw!r}")
