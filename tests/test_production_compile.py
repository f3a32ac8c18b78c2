"""One train step compiled at XLA's production optimization level.

tests/conftest.py compiles everything at `--xla_backend_optimization_level=0` to keep the suite fast;
real runs use XLA's default level (3). This test compiles the tiny model's train step at level 3
(a per-compilation override of the flag) and checks it computes what the level-0 step computes.
"""

from __future__ import annotations

import time

import jax
import numpy as np
import pytest

from tests import tiny_setup

PRODUCTION_LEVEL = 3  # XLA's default xla_backend_optimization_level when no flag lowers it


@pytest.mark.slow
def test_train_step_at_production_optimization_level():
    t = tiny_setup.tiny()
    batch = t.put(tiny_setup.batch(1))
    state = t.init(0)
    lowered = t.step.lower(state, batch)
    start = time.perf_counter()
    production = lowered.compile(compiler_options={"xla_backend_optimization_level": PRODUCTION_LEVEL})
    print(f"compiled at level {PRODUCTION_LEVEL} in {time.perf_counter() - start:.1f} s")
    fast = lowered.compile(compiler_options={"xla_backend_optimization_level": 0})

    new_prod, metrics_prod = production(t.init(0), batch)
    new_fast, metrics_fast = fast(t.init(0), batch)
    assert np.isfinite(float(metrics_prod["loss"]))
    np.testing.assert_allclose(float(metrics_prod["loss"]), float(metrics_fast["loss"]), rtol=1e-5)
    for a, b in zip(
        jax.tree.leaves(tiny_setup.host(new_prod)), jax.tree.leaves(tiny_setup.host(new_fast)), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
