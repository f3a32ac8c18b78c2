"""How good is `flaxpod plan`'s CPU-compiler estimate? Plans a config for 8 fake CPU devices, then runs
the same train step on those devices and measures what it holds.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \\
        python -m tools.plan_accuracy configs/tiny.yaml model.d_model=512 ...

Measured: (1) bytes of the live arrays on device 0 after a step (jax.live_arrays(): the new state
and the batch) against the plan's arguments per device; (2) the process's resident memory at its
peak during a step minus just before it, sampled every millisecond from /proc (CPU devices report no
memory statistics, and the 8 fake devices share one process), against the plan's
(outputs - donated + temporaries) x 8.
"""

from __future__ import annotations

import ctypes
import sys
import threading
import time

import jax
import numpy as np
from flaxpod.train.config import load_config
from flaxpod.train.planner import plan, resolve_for_plan
from flaxpod.train.targets import parse_target
from flaxpod.train.trainer import Trainer

PAGE = 4096


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def peak_rss_during(fn) -> tuple[int, int]:
    """(RSS just before `fn()`, highest RSS sampled while it ran)."""
    before, peak, done = rss_bytes(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(0.001)

    thread = threading.Thread(target=sample)
    thread.start()
    try:
        fn()
    finally:
        done.set()
        thread.join()
    return before, max(peak[0], rss_bytes())


def main(argv: list[str]) -> None:
    cfg = resolve_for_plan(load_config(argv[0], argv[1:]))
    devices = jax.devices()
    report = plan(cfg, parse_target(f"h100x{len(devices)}"))
    trainer = Trainer.from_config(cfg, devices=devices)
    rng = np.random.default_rng(0)
    shape = (cfg.data.batch_size, cfg.model.seq_len)
    tokens = rng.integers(0, cfg.model.vocab_size, shape, dtype=np.int32)
    batch = trainer.put(
        {
            "inputs": tokens,
            "targets": np.roll(tokens, -1, axis=1),
            "segment_ids": np.ones(shape, np.int32),
            "positions": np.broadcast_to(np.arange(shape[1], dtype=np.int32), shape).copy(),
            "loss_mask": np.ones(shape, np.float32),
        }
    )
    state = trainer.init_state(cfg.seed)
    state, metrics = trainer.step(state, batch)  # compiles
    jax.block_until_ready(state)

    holder = {"state": state}

    def one_step():
        holder["state"], m = trainer.step(holder["state"], batch)
        jax.block_until_ready((holder["state"], m))

    # Return the heap that compiling and the first step freed to the OS: otherwise the measured step
    # reuses those pages and its temporaries never show in the resident size.
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    before, peak = peak_rss_during(one_step)
    del metrics
    device0 = devices[0]
    live = sum(s.data.nbytes for a in jax.live_arrays() for s in a.addressable_shards if s.device == device0)
    predicted_transient = (report.outputs - report.aliased + report.temporaries) * len(devices)
    print(f"config: {argv}, {len(devices)} CPU devices, mesh {report.mesh}, {report.params:,} parameters")
    ratio = live / report.arguments
    print(f"arguments / device: planned {report.arguments:,} B, live after a step {live:,} B ({ratio:.3f}x)")
    print(
        f"step's extra memory, all devices: planned (outputs - donated + temporaries) x {len(devices)} = "
        f"{predicted_transient:,} B, measured peak RSS - RSS before = {peak - before:,} B "
        f"({(peak - before) / max(predicted_transient, 1):.3f}x)"
    )
    print(f"plan peak / device: {report.peak:,} B (compile {report.compile_seconds:.1f} s)")


if __name__ == "__main__":
    main(sys.argv[1:])
