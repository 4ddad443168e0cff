"""Fused multi-level sparse-grid interpolation on the GPU (Triton), forward and backward.

One kernel computes, per point, the sum over the levels up to the point's level of detail of the
trilinear interpolation of its cell's 8 corner rows, reading the rows straight from the feature
tables: nothing of size ``points x 8 x width`` is materialised. The backward pass scatters the
output gradient into the tables with atomic adds (the gradient of the rows; the stores turn it into
codebook, logit or float-row gradients). Positions get no gradient.

:class:`~vqad_nerfstudio.encodings.sparse_grid.SparseFeatureGrid` uses it on CUDA tensors when Triton
imports; its PyTorch path is the reference the tests compare against.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from jaxtyping import Float, Int
from torch import Tensor

from vqad_nerfstudio.kernels import runs_on

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the PyTorch path is used
    triton = None


def available(positions: Tensor, width: int, levels: int) -> bool:
    """Whether the fused kernel can interpolate ``positions`` (on their device, see :func:`runs_on`, with 32-bit
    per-point offsets)."""
    return runs_on(positions) and positions.shape[0] * max(width, levels, 3) < 2**31


if triton is not None:

    @triton.jit
    def corner_weight(fx, fy, fz, CORNER: tl.constexpr):
        bx: tl.constexpr = (CORNER >> 2) & 1
        by: tl.constexpr = (CORNER >> 1) & 1
        bz: tl.constexpr = CORNER & 1
        return (fx * bx + (1.0 - fx) * (1 - bx)) * (fy * by + (1.0 - fy) * (1 - by)) * (fz * bz + (1.0 - fz) * (1 - bz))

    @triton.jit
    def axis_cell(p, resolution):
        """The cell coordinate (int64) of ``p`` along one axis at ``resolution`` and ``p``'s place in it."""
        scaled = p * resolution
        corner = tl.minimum(tl.maximum(tl.floor(scaled), 0.0), resolution - 1.0)
        return corner.to(tl.int64), scaled - corner

    @triton.jit
    def _block_points(positions, lods, n_points, WIDTH: tl.constexpr, WIDTH_POW2: tl.constexpr, BLOCK: tl.constexpr):
        """This program's points (ids, which exist, coordinates, levels of detail) and the feature channels."""
        point = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        in_range = point < n_points
        channel = tl.arange(0, WIDTH_POW2)
        channel_ok = channel < WIDTH
        x = tl.load(positions + point * 3, mask=in_range, other=0.0)
        y = tl.load(positions + point * 3 + 1, mask=in_range, other=0.0)
        z = tl.load(positions + point * 3 + 2, mask=in_range, other=0.0)
        lod = tl.load(lods + point, mask=in_range, other=-1)
        return point, in_range, channel, channel_ok, x, y, z, lod

    @triton.jit
    def _level_cell(
        cell_index,
        point,
        in_range,
        lod,
        x,
        y,
        z,
        LEVEL: tl.constexpr,
        LEVELS: tl.constexpr,
        BASE_RESOLUTION: tl.constexpr,
    ):
        """The points' cells at ``LEVEL`` (rows of ``corner_rows``), which contribute, and the points' place in them."""
        resolution: tl.constexpr = BASE_RESOLUTION * (1 << LEVEL)
        cell = tl.load(cell_index + point * LEVELS + LEVEL, mask=in_range, other=-1).to(tl.int64)
        valid = in_range & (cell >= 0) & (lod >= LEVEL)
        _, fx = axis_cell(x, resolution)
        _, fy = axis_cell(y, resolution)
        _, fz = axis_cell(z, resolution)
        return cell, valid, fx, fy, fz

    @triton.jit
    def _corner(corner_rows, cell, valid, fx, fy, fz, CORNER: tl.constexpr):
        """The table row (int64) and trilinear weight of each cell's corner ``CORNER``."""
        row = tl.load(corner_rows + cell * 8 + CORNER, mask=valid, other=0).to(tl.int64)
        return row, corner_weight(fx, fy, fz, CORNER)

    @triton.jit
    def _interpolate_forward(
        positions,
        lods,
        cell_index,
        corner_rows,
        tables,
        out,
        n_points,
        BASE_RESOLUTION: tl.constexpr,
        LEVELS: tl.constexpr,
        WIDTH: tl.constexpr,
        WIDTH_POW2: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        point, in_range, channel, channel_ok, x, y, z, lod = _block_points(
            positions, lods, n_points, WIDTH, WIDTH_POW2, BLOCK
        )
        acc = tl.zeros((BLOCK, WIDTH_POW2), dtype=tl.float32)
        for level in tl.static_range(LEVELS):
            cell, valid, fx, fy, fz = _level_cell(
                cell_index, point, in_range, lod, x, y, z, level, LEVELS, BASE_RESOLUTION
            )
            for corner in tl.static_range(8):
                row, weight = _corner(corner_rows, cell, valid, fx, fy, fz, corner)
                feature = tl.load(
                    tables + row[:, None] * WIDTH + channel[None, :],
                    mask=valid[:, None] & channel_ok[None, :],
                    other=0.0,
                )
                acc += weight[:, None] * feature
        tl.store(out + point[:, None] * WIDTH + channel[None, :], acc, mask=in_range[:, None] & channel_ok[None, :])

    @triton.jit
    def _interpolate_backward(
        positions,
        lods,
        cell_index,
        corner_rows,
        grad_out,
        grad_tables,
        n_points,
        BASE_RESOLUTION: tl.constexpr,
        LEVELS: tl.constexpr,
        WIDTH: tl.constexpr,
        WIDTH_POW2: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        point, in_range, channel, channel_ok, x, y, z, lod = _block_points(
            positions, lods, n_points, WIDTH, WIDTH_POW2, BLOCK
        )
        grad_mask = in_range[:, None] & channel_ok[None, :]
        grad = tl.load(grad_out + point[:, None] * WIDTH + channel[None, :], mask=grad_mask, other=0.0)
        has_grad = tl.max(tl.abs(grad), axis=1) > 0  # zero rows add nothing: skip their atomics
        for level in tl.static_range(LEVELS):
            cell, valid, fx, fy, fz = _level_cell(
                cell_index, point, in_range, lod, x, y, z, level, LEVELS, BASE_RESOLUTION
            )
            valid = valid & has_grad
            for corner in tl.static_range(8):
                row, weight = _corner(corner_rows, cell, valid, fx, fy, fz, corner)
                tl.atomic_add(
                    grad_tables + row[:, None] * WIDTH + channel[None, :],
                    weight[:, None] * grad,
                    mask=valid[:, None] & channel_ok[None, :],
                    sem="relaxed",
                )


_BLOCK = 128


def launch_config(n_points: int, block: int, width: int) -> Tuple[Tuple[int], int]:
    """The launch grid for ``n_points`` in blocks of ``block``, and the channel tile for ``width``."""
    return (triton.cdiv(max(n_points, 1), block),), triton.next_power_of_2(width)


class _FusedInterpolation(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx, tables: Tensor, positions: Tensor, lods: Tensor, cell_index: Tensor, corner_rows: Tensor, base: int
    ) -> Tensor:
        n_points, width = positions.shape[0], tables.shape[1]
        out = torch.empty(n_points, width, device=positions.device, dtype=torch.float32)
        if n_points:
            grid, width_pow2 = launch_config(n_points, _BLOCK, width)
            _interpolate_forward[grid](
                positions, lods, cell_index, corner_rows, tables, out, n_points,
                BASE_RESOLUTION=base, LEVELS=cell_index.shape[1], WIDTH=width, WIDTH_POW2=width_pow2, BLOCK=_BLOCK,
            )  # fmt: skip
        ctx.save_for_backward(positions, lods, cell_index, corner_rows)
        ctx.table_shape, ctx.base = tables.shape, base
        ctx.set_materialize_grads(False)
        return out

    @staticmethod
    def backward(ctx, grad_out: Optional[Tensor]):  # type: ignore[override]
        if grad_out is None or not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None
        positions, lods, cell_index, corner_rows = ctx.saved_tensors
        grad_tables = torch.zeros(ctx.table_shape, device=grad_out.device, dtype=torch.float32)
        n_points, width = positions.shape[0], ctx.table_shape[1]
        if n_points:
            grid, width_pow2 = launch_config(n_points, _BLOCK, width)
            _interpolate_backward[grid](
                positions, lods, cell_index, corner_rows, grad_out.contiguous().float(), grad_tables, n_points,
                BASE_RESOLUTION=ctx.base, LEVELS=cell_index.shape[1], WIDTH=width, WIDTH_POW2=width_pow2,
                BLOCK=_BLOCK,
            )  # fmt: skip
        return grad_tables, None, None, None, None, None


def fused_interpolation(
    tables: Float[Tensor, "rows k"],
    positions: Float[Tensor, "n 3"],
    lods: Int[Tensor, "n"],
    cell_index: Int[Tensor, "n levels"],
    corner_rows: Int[Tensor, "cells 8"],
    base_resolution: int,
) -> Float[Tensor, "n k"]:
    """Sum over levels ``l <= lods[i]`` of the trilinear interpolation at ``positions[i]`` of level ``l``.

    Levels are concatenated: ``cell_index[i, l]`` is the row of ``corner_rows`` of point i's cell at level ``l``
    (-1: unoccupied, no contribution; what ``SparseFeatureGrid.locate`` returns), and ``corner_rows`` holds rows of
    ``tables``. Level ``l`` has ``base_resolution * 2**l`` cells per side. Differentiable in ``tables``.
    """
    return _FusedInterpolation.apply(
        tables.contiguous().float(),
        positions.contiguous().float(),
        lods.contiguous().to(torch.int32),
        cell_index.contiguous().to(torch.int32),
        corner_rows.contiguous().to(torch.int32),
        base_resolution,
    )


__all__ = ["available", "fused_interpolation"]
