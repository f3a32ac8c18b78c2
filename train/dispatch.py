"""How far the host may run ahead of the devices when it dispatches training steps.

JAX dispatches a jitted step and returns at once, so a loop that fetches its metrics only every so many
steps queues steps on the devices faster than they run. XLA's CPU client admits 32 computations per
device ahead of the host; with several CPU devices in one process (sharding/cpu_devices.py gives one per
core), a host that went further deadlocked the devices at the step's all-reduce, and XLA aborted the
process after its 60-second rendezvous timeout (jaxlib 0.10.2; `train.log_every` 100 hit it within the
first hundred steps on a 2-core VM; tests/test_cpu_devices.py). A few steps of queue keep every
backend's devices fed: the host waits for the step dispatched STEPS_AHEAD steps before.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import jax

STEPS_AHEAD = 4


class StepWindow:
    """Call `dispatched(outputs)` after each step: once more than `ahead` steps are in flight, it waits
    for the outputs (any pytree of arrays) of the step dispatched `ahead` steps before this one."""

    def __init__(self, ahead: int = STEPS_AHEAD):
        if ahead < 1:
            raise ValueError(f"StepWindow: ahead must be at least 1, got {ahead}")
        self._recent: deque[Any] = deque(maxlen=ahead + 1)

    def dispatched(self, outputs: Any) -> None:
        self._recent.append(outputs)
        if len(self._recent) == self._recent.maxlen:
            jax.block_until_ready(self._recent[0])
