"""Each point's occupied cell at every level of the sparse grid, in one GPU pass (Triton).

:meth:`~vqad_nerfstudio.encodings.sparse_grid.SparseFeatureGrid.locate` finds a point's cell at each level by one
binary search in the levels' sorted cell keys (each level's row-major cell ids offset by the coarser levels' grid
sizes, so that the levels' cells concatenated form one sorted list). In PyTorch that takes about twenty operations
per batch (scaling, flooring, clamping, the keys, ``searchsorted``, the comparison, the unit-cube test), each a
launch; here one kernel computes the same keys from the same float32 products and searches them per point and
level. The PyTorch composition is the reference and the CPU path.
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor

from vqad_nerfstudio.kernels import runs_on
from vqad_nerfstudio.kernels.binary_search import search_steps

try:
    import triton
    import triton.language as tl

    from vqad_nerfstudio.kernels.binary_search import lower_bound
except ImportError:  # CPU-only installs: the PyTorch path is used
    triton = None

_BLOCK = 256
"""Points per program."""


def available(unit_positions: Tensor) -> bool:
    """Whether the kernel can locate ``unit_positions`` (float32 ``[n, 3]`` on a device it runs on)."""
    return (
        runs_on(unit_positions)
        and unit_positions.dtype == torch.float32
        and unit_positions.dim() == 2
        and unit_positions.shape[1] == 3
        and unit_positions.numel() < 2**31
    )


if triton is not None:

    @triton.jit
    def _level_coordinate(u, resolution):
        """The cell coordinate of unit-cube coordinate ``u`` at ``resolution`` cells per side (clamped into the grid,
        as the reference's ``minimum(floor(u * R).clamp_min(0), R - 1)``)."""
        cell = tl.floor(u * resolution.to(tl.float32)).to(tl.int64)
        return tl.minimum(tl.maximum(cell, 0), resolution - 1)

    @triton.jit
    def _locate(
        positions, keys, num_keys, steps, out, n,
        BASE_RESOLUTION: tl.constexpr, LEVELS: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        point = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = point < n
        x = tl.load(positions + point * 3, mask=mask, other=0.0)
        y = tl.load(positions + point * 3 + 1, mask=mask, other=0.0)
        z = tl.load(positions + point * 3 + 2, mask=mask, other=0.0)
        inside = (x >= 0.0) & (x <= 1.0) & (y >= 0.0) & (y <= 1.0) & (z >= 0.0) & (z <= 1.0)
        offset = tl.zeros((), dtype=tl.int64)
        for level in tl.static_range(LEVELS):
            resolution = tl.zeros((), dtype=tl.int64) + BASE_RESOLUTION * (2**level)
            cx = _level_coordinate(x, resolution)
            cy = _level_coordinate(y, resolution)
            cz = _level_coordinate(z, resolution)
            key = (cx * resolution + cy) * resolution + cz + offset
            lo = lower_bound(keys, num_keys, key, steps)
            found = (lo < num_keys) & inside
            at = tl.load(keys + lo, mask=found & mask, other=-1) == key
            row = tl.where(found & at, lo, -1).to(tl.int32)
            tl.store(out + point * LEVELS + level, row, mask=mask)
            offset += resolution * resolution * resolution


def locate(
    unit_positions: Float[Tensor, "n 3"], cell_keys: Int[Tensor, "m"], base_resolution: int, num_levels: int
) -> Int[Tensor, "n l"]:
    """Each point's row in ``cell_keys`` at levels ``0..num_levels-1`` (``l``), as int32, -1 where the cell is not
    in the keys or the point is outside the unit cube. Level ``k`` has ``base_resolution * 2**k`` cells per side;
    ``cell_keys``: the levels' sorted row-major cell ids, each level's offset by the cells of the coarser levels'
    grids, concatenated (one sorted list, int64). Requires :func:`available`."""
    if not available(unit_positions):
        raise ValueError(
            f"the cell-lookup kernel takes float32 [n, 3] positions on a device it runs on, got "
            f"{unit_positions.dtype} {tuple(unit_positions.shape)} on {unit_positions.device}"
        )
    if num_levels < 1 or base_resolution < 1:
        raise ValueError(f"need at least one level and a positive base resolution, got {num_levels}, {base_resolution}")
    n = unit_positions.shape[0]
    out = torch.empty(n, num_levels, dtype=torch.int32, device=unit_positions.device)
    if n:
        keys = cell_keys.to(torch.int64).contiguous()
        _locate[(triton.cdiv(n, _BLOCK),)](
            unit_positions.contiguous(), keys, keys.numel(), search_steps(keys.numel()), out, n,
            BASE_RESOLUTION=base_resolution, LEVELS=num_levels, BLOCK=_BLOCK,
        )  # fmt: skip
    return out


__all__ = ["available", "locate"]
