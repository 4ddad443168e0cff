"""Where the kernel tests run: CUDA when present, else the CPU, where the kernels need Triton's interpreter
(``TRITON_INTERPRET=1`` set before Triton is imported, as ``.ci/run``'s second pass sets it)."""

from __future__ import annotations

import pytest
import torch

from vqad_nerfstudio.kernels import runs_on

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
"""The device the kernel tests put their tensors on."""

ON_GPU = DEVICE == "cuda"
"""Whether the kernels run compiled (tests use more points there; the interpreter is slow)."""

KERNELS_RUN = runs_on(torch.empty(0, device=DEVICE))
"""Whether the kernels run on :data:`DEVICE` here."""

needs_kernel = pytest.mark.skipif(
    not KERNELS_RUN,
    reason="needs Triton with CUDA, or Triton's interpreter (TRITON_INTERPRET=1)",
)
"""Marks a test (or, as ``pytestmark``, a module) that runs the kernels."""
