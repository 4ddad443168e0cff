"""Wall time of a call on the GPU, as the micro-benchmarks of this folder measure it."""

from __future__ import annotations

import time
from typing import Callable

import torch


def seconds_per_call(call: Callable[[], object], repeats: int, warmup: int = 3) -> float:
    """Mean seconds of ``call()`` over ``repeats`` calls after ``warmup`` untimed ones, from the first launch to the
    GPU's completion (launching the operations counts, as it does in a training step)."""
    for _ in range(warmup):
        call()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        call()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats
