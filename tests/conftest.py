"""Test set-up, before JAX is imported anywhere: 8 fake CPU devices, and compilation tuned for a
suite that compiles many tiny programs and runs each only a few times.

- `--xla_backend_optimization_level=0`: XLA's CPU back end spends most of a tiny model's compile
  time optimizing code that then runs a handful of steps (init 11 s -> 1.6 s, train step
  13.6 s -> 6 s, measured on this 2-core machine); runs get slower, which tests do not notice.
- A persistent compilation cache shared by the test process and the CLI subprocesses it starts
  (they inherit the environment): identical programs compile once per machine.
"""

import os
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "flaxpod-test-jax-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# model/cpu_gemm.py's kernel, built once per machine, outside the user's cache
os.environ.setdefault("FLAXPOD_CACHE_DIR", os.path.join(tempfile.gettempdir(), "flaxpod-test-cache"))
