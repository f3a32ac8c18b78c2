"""One writer per run directory: an exclusive lock held for the life of a writing command.

Two `flaxpod pretrain` (or finetune) processes on the same run_dir would both resume from the
same step and write checkpoints that silently mix the two runs. `hold_run_dir` makes the second
one stop with a one-line error instead. Readers (evaluate, generate, export) take no lock.

The lock is a file, RUN_DIR/flaxpod.lock, created with O_CREAT|O_EXCL (atomic on local disks and
NFS) and holding {"pid", "host", "time", "command"}; its holder touches it every HEARTBEAT_S. A
lock file outlives a process killed with -9, so a lock whose process is gone is stale and is
broken with a message: on the same host, when its pid no longer runs; from another host (a job
restarted on a new VM after preemption), when it has not been touched for STALE_AFTER_S. (An
flock() would vanish with its process, but is not honoured across hosts on NFS nor by gcsfuse.)
With several JAX processes only process 0 takes the lock: they are one job, and the other
processes do not write the run's files.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import jax
from flaxpod.model.errors import FlaxpodError, InputError
from flaxpod.train.faults import EXIT_CHECKPOINT_WRITE

LOCK_FILE = "flaxpod.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0  # ten missed heartbeats: the holder is gone (or its storage stalled that long)


@dataclass
class _Held:
    stop: threading.Event
    beat: threading.Thread
    depth: int = 0  # nesting in this process (re-entrant)


_held: dict[Path, _Held] = {}  # lock path -> held by this process


class RunDirLocked(InputError):
    """Another live process is writing this run directory."""


class RunDirNotWritable(FlaxpodError, OSError):
    """The run directory cannot be created or written (read-only, a file in the way, no space)."""

    exit_code = EXIT_CHECKPOINT_WRITE


def _process_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _read_owner(path: Path) -> dict:
    try:
        owner = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return owner if isinstance(owner, dict) else {}


def _stale(path: Path, owner: dict) -> str | None:
    """Why the lock's holder is known to be gone, or None: on this host its pid does not run (or is
    this very process, which does not hold it: left by an earlier run in this interpreter); from
    another host, or unreadable, it has not been touched for STALE_AFTER_S."""
    pid = owner.get("pid")
    if owner.get("host") == socket.gethostname() and isinstance(pid, int):
        if pid == os.getpid() or not _process_running(pid):
            return f"pid {pid} is no longer running"
        return None
    try:
        idle = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return "it was just removed"
    return f"not touched for {idle:.0f} s" if idle > STALE_AFTER_S else None


def _create(path: Path) -> bool:
    """Creates the lock file with this process as owner; False if it already exists."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    owner = {"pid": os.getpid(), "host": socket.gethostname(), "time": time.time(), "command": sys.argv[:8]}
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(owner))
    return True


def _acquire(run_dir: Path) -> Path:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise RunDirNotWritable(f"run_dir {run_dir}: exists and is not a directory") from None
    except OSError as e:
        raise RunDirNotWritable(f"run_dir {run_dir}: cannot be created ({e.strerror or e})") from None
    path = run_dir / LOCK_FILE
    for _ in range(3):  # a lost race with another process breaking the same stale lock: look again
        try:
            if _create(path):
                return path
        except OSError as e:
            if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT):
                raise RunDirNotWritable(f"run_dir {run_dir}: not writable ({e.strerror})") from None
            raise
        owner = _read_owner(path)
        why = _stale(path, owner)
        if why is None:
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner.get("time", 0)))
            raise RunDirLocked(
                f"run_dir {run_dir}: another flaxpod process (pid {owner.get('pid', '?')} on host "
                f"{owner.get('host', '?')}, since {since}) is writing it; wait for it, or if that process is "
                f"gone, delete {path} (a lock untouched for {STALE_AFTER_S:.0f} s is broken automatically)"
            )
        # Renaming is atomic: of several processes breaking the same stale lock, one succeeds.
        broken = path.with_name(f"{LOCK_FILE}.stale-{os.getpid()}")
        with contextlib.suppress(FileNotFoundError):
            path.rename(broken)
            broken.unlink()
            if jax.process_index() == 0:
                print(
                    f"warning: broke the stale lock {path} of pid {owner.get('pid')} on host "
                    f"{owner.get('host')} ({why})",
                    file=sys.stderr,
                    flush=True,
                )
    raise RunDirLocked(f"run_dir {run_dir}: could not take {path} (other processes keep taking it)")


@contextlib.contextmanager
def hold_run_dir(run_dir: str | Path) -> Iterator[None]:
    """Holds RUN_DIR's lock for the block (creating RUN_DIR). Re-entrant within a process, so a
    caller may hold it around writing the run files and `fit` holds it again inside. Raises
    RunDirLocked (exit 2) if a live process holds it, RunDirNotWritable (exit 4) if the directory
    cannot be written."""
    if jax.process_index() != 0 or "://" in str(run_dir):  # cloud storage: no atomic create-if-absent here
        yield
        return
    key = Path(os.path.abspath(run_dir)) / LOCK_FILE
    if key not in _held:
        _acquire(key.parent)
        stop = threading.Event()
        beat = threading.Thread(target=_heartbeat, args=(key, stop), name="flaxpod-lock", daemon=True)
        beat.start()
        _held[key] = _Held(stop, beat)
    _held[key].depth += 1
    try:
        yield
    finally:
        held = _held[key]
        held.depth -= 1
        if not held.depth:
            del _held[key]
            held.stop.set()
            held.beat.join()
            with contextlib.suppress(FileNotFoundError):
                key.unlink()


def _heartbeat(path: Path, stop: threading.Event) -> None:
    """Touches the lock file while it is held, so other hosts can tell a live holder from a dead one."""
    while not stop.wait(HEARTBEAT_S):
        with contextlib.suppress(OSError):  # a storage hiccup must not kill the run
            os.utime(path)
