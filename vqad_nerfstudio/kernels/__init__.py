"""GPU kernels (Triton) for the hot paths; each has a PyTorch reference that CPU runs use and tests compare.

Kernels run on CUDA tensors when Triton imports. Under Triton's interpreter (``TRITON_INTERPRET=1`` in the
environment before Triton is imported) they also run on CPU tensors, slowly: the test suite's kernel tests use it
to compare the kernels with their references on machines without a GPU."""

from __future__ import annotations

import os

from torch import Tensor

try:
    import triton
except ImportError:  # CPU-only installs: the PyTorch paths are used
    triton = None

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
"""Whether Triton runs kernels in its interpreter (on CPU tensors)."""


def runs_on(tensor: Tensor) -> bool:
    """Whether the kernels can run on ``tensor``'s device: CUDA with Triton, or the CPU under Triton's interpreter."""
    return triton is not None and (tensor.is_cuda or (INTERPRETED and tensor.device.type == "cpu"))
