"""Real spherical harmonics of view directions in one GPU pass (Triton).

nerfstudio's :func:`~nerfstudio.utils.math.components_from_spherical_harmonics` builds the ``levels**2`` components
one column at a time: at 4 levels about 80 PyTorch operations (a launch each on a GPU) for every batch of samples
whose colour is evaluated, where a training step of the fast path launches a few hundred in all. This kernel
computes the same polynomials, in the same order of operations, one direction per lane, and writes each row once.
nerfstudio's function is the reference (and the CPU path); no gradient flows to the directions, as there.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from vqad_nerfstudio.kernels import runs_on

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the PyTorch path is used
    triton = None

_BLOCK = 256
"""Directions per program."""


def available(directions: Tensor, levels: int) -> bool:
    """Whether the kernel can encode ``directions`` (float32 ``[n, 3]`` on a device it runs on, see :func:`runs_on`)
    at ``levels`` (1..4, as nerfstudio's SHEncoding)."""
    return (
        runs_on(directions)
        and directions.dtype == torch.float32
        and directions.dim() == 2
        and directions.shape[1] == 3
        and 1 <= levels <= 4
        and directions.numel() < 2**31
    )


if triton is not None:

    @triton.jit
    def _put(row, column: tl.constexpr, value, mask):
        tl.store(row + column, value, mask=mask)

    @triton.jit
    def _components(directions, out, n, LEVELS: tl.constexpr, BLOCK: tl.constexpr):
        rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = rows < n
        x = tl.load(directions + rows * 3, mask=mask, other=0.0)
        y = tl.load(directions + rows * 3 + 1, mask=mask, other=0.0)
        z = tl.load(directions + rows * 3 + 2, mask=mask, other=0.0)
        xx = x * x
        yy = y * y
        zz = z * z
        row = out + rows * (LEVELS * LEVELS)
        _put(row, 0, tl.full([BLOCK], 0.28209479177387814, tl.float32), mask)
        if LEVELS > 1:
            _put(row, 1, 0.4886025119029199 * y, mask)
            _put(row, 2, 0.4886025119029199 * z, mask)
            _put(row, 3, 0.4886025119029199 * x, mask)
        if LEVELS > 2:
            _put(row, 4, 1.0925484305920792 * x * y, mask)
            _put(row, 5, 1.0925484305920792 * y * z, mask)
            _put(row, 6, 0.9461746957575601 * zz - 0.31539156525251999, mask)
            _put(row, 7, 1.0925484305920792 * x * z, mask)
            _put(row, 8, 0.5462742152960396 * (xx - yy), mask)
        if LEVELS > 3:
            _put(row, 9, 0.5900435899266435 * y * (3 * xx - yy), mask)
            _put(row, 10, 2.890611442640554 * x * y * z, mask)
            _put(row, 11, 0.4570457994644658 * y * (5 * zz - 1), mask)
            _put(row, 12, 0.3731763325901154 * z * (5 * zz - 3), mask)
            _put(row, 13, 0.4570457994644658 * x * (5 * zz - 1), mask)
            _put(row, 14, 1.445305721320277 * z * (xx - yy), mask)
            _put(row, 15, 0.5900435899266435 * x * (xx - 3 * yy), mask)


def spherical_harmonics(directions: Float[Tensor, "n 3"], levels: int) -> Float[Tensor, "n c"]:
    """The ``levels**2`` real spherical-harmonic components of each direction (``c = levels**2``), as nerfstudio's
    ``components_from_spherical_harmonics``; requires :func:`available`."""
    if not available(directions, levels):
        raise ValueError(
            f"the spherical-harmonics kernel takes float32 [n, 3] directions on a device it runs on and 1..4 levels, "
            f"got {directions.dtype} {tuple(directions.shape)} on {directions.device} and {levels} levels"
        )
    directions = directions.detach().contiguous()
    n = directions.shape[0]
    out = torch.empty(n, levels * levels, device=directions.device, dtype=torch.float32)
    if n:
        _components[(triton.cdiv(n, _BLOCK),)](directions, out, n, LEVELS=levels, BLOCK=_BLOCK)
    return out


__all__ = ["available", "spherical_harmonics"]
