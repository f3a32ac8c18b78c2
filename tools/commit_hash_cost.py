"""What content hashes in the commit record cost: writes a params-only checkpoint of SIZE MB (one
float32 array, through Orbax as training does), then times the commit record (sizes + SHA-256 of
every file), the size-only check, the content check, and an Orbax restore of the same step.

    python -m tools.commit_hash_cost --mb 1024 --dir /tmp/hash_cost

The machine is shared: report the load average with the figures (printed first).
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

import jax
import numpy as np
from flaxpod.train.checkpoint_files import check_step, checkpoints_dir, write_commit
from flaxpod.train.run_dir import restore_params, save_params


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=1024, help="checkpoint size in MB")
    parser.add_argument("--dir", default="/tmp/flaxpod_hash_cost", help="scratch run directory (deleted)")
    args = parser.parse_args()
    run = Path(args.dir)
    shutil.rmtree(run, ignore_errors=True)
    print(f"load average: {os.getloadavg()}; {os.cpu_count()} CPUs")
    params = {"w": jax.device_put(np.random.default_rng(0).standard_normal(args.mb * 2**18, np.float32))}
    saved = timed(lambda: save_params(run, 1, params))  # Orbax write + commit record (hashes)
    step_dir = checkpoints_dir(run) / "1"
    size = sum(f.stat().st_size for f in Path(str(step_dir)).rglob("*") if f.is_file())
    commit = timed(lambda: write_commit(step_dir, 1))
    sizes_only = timed(lambda: check_step(step_dir))
    content = timed(lambda: check_step(step_dir, content=True))
    target = {"w": jax.ShapeDtypeStruct(params["w"].shape, np.float32, sharding=params["w"].sharding)}
    restore = timed(lambda: restore_params(run, 1, target))  # includes its own content check
    print(f"checkpoint: {size / 2**30:.2f} GiB on disk; save_params (Orbax write + commit record) {saved:.2f} s")
    print(f"commit record with SHA-256: {commit:.2f} s ({size / 2**20 / commit:.0f} MiB/s)")
    print(f"check sizes only: {sizes_only * 1000:.1f} ms; check content: {content:.2f} s")
    print(f"restore_params (content check + Orbax read): {restore:.2f} s")
    shutil.rmtree(run, ignore_errors=True)


if __name__ == "__main__":
    main()
