"""Fused learned-index hash lookup (Triton), forward and backward.

The learned mode of :class:`~vqad_nerfstudio.encodings.learned_index_hash.LearnedIndexHashEncoding` with this kernel:

1. PyTorch picks every index entry's choice (the argmax of its logits, or its frozen index): one integer per entry
   of all levels' index tables concatenated.
2. One kernel computes, per point and level, the 8 corners of the point's cell, their index entries (dense vertex id,
   or spatial hash into the level's buckets) and first candidates (a second hash, or the start of the level's
   codebook when an entry indexes the whole codebook), reads the codebook row each corner's choice picks, and writes
   the trilinear sum of the rows; the levels' outputs lie side by side. Nothing of size ``points x 8 x width`` is
   materialised.
3. The backward kernel walks the same lookups and scatters with atomic adds: the weighted output gradient into the
   gradient of the chosen codebook rows and, for trained logits, each lookup's gradient with respect to its entry's
   soft index (the dot product of the weighted output gradient with each candidate row) into an
   ``[entries, 2**index_bits]`` table. PyTorch applies the softmax Jacobian of the straight-through estimator to it,
   exactly as the reference (:func:`~vqad_nerfstudio.encodings.straight_through.interpolated_codewords`) does.

Positions get no gradient: the encoding keeps its PyTorch path, the reference the tests compare against, when they
need one.
"""

from __future__ import annotations

from typing import Optional

import torch
from jaxtyping import Float, Int
from torch import Tensor

from vqad_nerfstudio.encodings.straight_through import relaxed_logit_grad
from vqad_nerfstudio.kernels import runs_on

try:
    import triton
    import triton.language as tl

    from vqad_nerfstudio.kernels.grid_interpolation import axis_cell, corner_weight, launch_config
except ImportError:  # CPU-only installs: the PyTorch path is used
    triton = None


def available(positions: Tensor, out_width: int) -> bool:
    """Whether the fused kernel can encode ``positions`` (float32, on their device, see :func:`runs_on`, with 32-bit
    per-point offsets)."""
    return runs_on(positions) and positions.dtype == torch.float32 and positions.shape[0] * max(out_width, 3) < 2**31


if triton is not None:

    @triton.jit
    def _spatial_hash(vx, vy, vz, size, P0: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr):
        """``spatial_hash`` of int64 vertex coordinates (non-negative, so ``%`` is the remainder)."""
        return ((vx * P0) ^ (vy * P1) ^ (vz * P2)) % size

    @triton.jit
    def _block_points(positions, n_points, BLOCK: tl.constexpr):
        """This program's points (ids, which exist) and their coordinates."""
        point = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        in_range = point < n_points
        x = tl.load(positions + point * 3, mask=in_range, other=0.0)
        y = tl.load(positions + point * 3 + 1, mask=in_range, other=0.0)
        z = tl.load(positions + point * 3 + 2, mask=in_range, other=0.0)
        return point, in_range, x, y, z

    @triton.jit
    def _level_cells(geometry, x, y, z, level):
        """Level ``level``'s geometry (vertices per side, entries, dense, first entry) and the points' cells."""
        side = tl.load(geometry + level * 4)
        rows = tl.load(geometry + level * 4 + 1)
        dense = tl.load(geometry + level * 4 + 2)
        first_entry = tl.load(geometry + level * 4 + 3)
        resolution = (side - 1).to(tl.float32)
        cx, fx = axis_cell(x, resolution)
        cy, fy = axis_cell(y, resolution)
        cz, fz = axis_cell(z, resolution)
        return side, rows, dense, first_entry, cx, cy, cz, fx, fy, fz

    @triton.jit
    def _corner_lookup(
        choices,
        side,
        rows,
        dense,
        first_entry,
        cx,
        cy,
        cz,
        valid,
        level,
        CORNER: tl.constexpr,
        CODEBOOK: tl.constexpr,
        FULL_INDEX: tl.constexpr,
    ):
        """Corner ``CORNER``'s index entry, the offset of its first candidate in the level's codebook, and the chosen
        row of all levels' codebooks concatenated (int64). The primes are ``learned_index_hash``'s ``_ROW_PRIMES``
        (entries) and ``_BASE_PRIMES`` (first candidates)."""
        vx = cx + ((CORNER >> 2) & 1)
        vy = cy + ((CORNER >> 1) & 1)
        vz = cz + (CORNER & 1)
        hashed = _spatial_hash(vx, vy, vz, rows, 1, 2654435761, 805459861)
        entry = first_entry + tl.where(dense != 0, (vx * side + vy) * side + vz, hashed)
        if FULL_INDEX:  # a free index into the whole codebook
            first = tl.zeros_like(vx)
        else:
            first = _spatial_hash(vx, vy, vz, CODEBOOK, 73856093, 19349663, 83492791)
        choice = tl.load(choices + entry, mask=valid, other=0).to(tl.int64)
        return entry, first, level * CODEBOOK + (first + choice) % CODEBOOK

    @triton.jit
    def _lookup_forward(
        positions,
        geometry,
        choices,
        codebooks,
        out,
        n_points,
        LEVELS: tl.constexpr,
        CODEBOOK: tl.constexpr,
        FULL_INDEX: tl.constexpr,
        WIDTH: tl.constexpr,
        WIDTH_POW2: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """``out[point, level * WIDTH + k]``: the trilinear sum of the chosen rows of the point's cell at each level."""
        point, in_range, x, y, z = _block_points(positions, n_points, BLOCK)
        channel = tl.arange(0, WIDTH_POW2)
        mask = in_range[:, None] & (channel < WIDTH)[None, :]
        for level in range(LEVELS):  # a loop, not unrolled: 16 unrolled levels took minutes to compile
            side, rows, dense, first_entry, cx, cy, cz, fx, fy, fz = _level_cells(geometry, x, y, z, level)
            acc = tl.zeros((BLOCK, WIDTH_POW2), dtype=tl.float32)
            for corner in tl.static_range(8):
                _, _, row = _corner_lookup(
                    choices, side, rows, dense, first_entry, cx, cy, cz, in_range, level, corner, CODEBOOK, FULL_INDEX
                )
                feature = tl.load(codebooks + row[:, None] * WIDTH + channel[None, :], mask=mask, other=0.0)
                acc += corner_weight(fx, fy, fz, corner)[:, None] * feature
            tl.store(out + point[:, None] * (LEVELS * WIDTH) + level * WIDTH + channel[None, :], acc, mask=mask)

    @triton.jit
    def _lookup_backward(
        positions,
        geometry,
        choices,
        codebooks,
        grad_out,
        grad_codebooks,
        grad_soft,
        n_points,
        LEVELS: tl.constexpr,
        CODEBOOK: tl.constexpr,
        FULL_INDEX: tl.constexpr,
        CANDIDATES: tl.constexpr,
        WIDTH: tl.constexpr,
        WIDTH_POW2: tl.constexpr,
        BLOCK: tl.constexpr,
        NEED_CODEBOOKS: tl.constexpr,
        NEED_SOFT: tl.constexpr,
    ):
        """Scatter the weighted output gradient into the chosen rows' gradient and, per lookup, its dot product with
        every candidate row into its entry's soft-index gradient."""
        point, in_range, x, y, z = _block_points(positions, n_points, BLOCK)
        channel = tl.arange(0, WIDTH_POW2)
        channel_ok = channel < WIDTH
        for level in range(LEVELS):  # a loop, not unrolled: 16 unrolled levels took minutes to compile
            side, rows, dense, first_entry, cx, cy, cz, fx, fy, fz = _level_cells(geometry, x, y, z, level)
            grad_at = grad_out + point[:, None] * (LEVELS * WIDTH) + level * WIDTH + channel[None, :]
            grad = tl.load(grad_at, mask=in_range[:, None] & channel_ok[None, :], other=0.0)
            valid = in_range & (tl.max(tl.abs(grad), axis=1) > 0)  # zero rows add nothing: skip their atomics
            mask = valid[:, None] & channel_ok[None, :]
            for corner in tl.static_range(8):
                entry, first, row = _corner_lookup(
                    choices, side, rows, dense, first_entry, cx, cy, cz, valid, level, corner, CODEBOOK, FULL_INDEX
                )
                weighted = corner_weight(fx, fy, fz, corner)[:, None] * grad
                if NEED_CODEBOOKS:
                    grad_rows = grad_codebooks + row[:, None] * WIDTH + channel[None, :]
                    tl.atomic_add(grad_rows, weighted, mask=mask, sem="relaxed")
                if NEED_SOFT:
                    # every candidate row's dot product with the weighted gradient, one channel at a time
                    candidate = tl.arange(0, CANDIDATES)
                    candidate_rows = level * CODEBOOK + (first[:, None] + candidate[None, :]) % CODEBOOK
                    dots = tl.zeros((BLOCK, CANDIDATES), dtype=tl.float32)
                    for k in tl.static_range(WIDTH):
                        weighted_k = tl.sum(tl.where(channel[None, :] == k, weighted, 0.0), axis=1)
                        values = tl.load(codebooks + candidate_rows * WIDTH + k, mask=valid[:, None], other=0.0)
                        dots += values * weighted_k[:, None]
                    grad_at_soft = grad_soft + entry[:, None] * CANDIDATES + candidate[None, :]
                    tl.atomic_add(grad_at_soft, dots, mask=valid[:, None], sem="relaxed")


_BLOCK = 128
_BACKWARD_TILE = 4096
"""Lookups times candidates per program of the logit gradient (the backward block shrinks for many candidates)."""


class _FusedLookup(torch.autograd.Function):
    """:func:`fused_lookup`: the kernel forward, the scatter kernel and the softmax Jacobian backward."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        codebooks: Tensor,
        logits: Optional[Tensor],
        choices: Tensor,
        positions: Tensor,
        geometry: Tensor,
        codebook_size: int,
        full_index: bool,
        temperature: float,
    ) -> Tensor:
        n_points, width, levels = positions.shape[0], codebooks.shape[1], geometry.shape[0]
        out = torch.empty(n_points, levels * width, device=positions.device, dtype=torch.float32)
        if n_points:
            grid, width_pow2 = launch_config(n_points, _BLOCK, width)
            _lookup_forward[grid](
                positions, geometry, choices, codebooks, out, n_points,
                LEVELS=levels, CODEBOOK=codebook_size, FULL_INDEX=full_index, WIDTH=width, WIDTH_POW2=width_pow2,
                BLOCK=_BLOCK,
            )  # fmt: skip
        ctx.save_for_backward(codebooks, logits, choices, positions, geometry)
        ctx.codebook_size, ctx.full_index, ctx.temperature = codebook_size, full_index, temperature
        ctx.set_materialize_grads(False)
        return out

    @staticmethod
    def backward(ctx, grad_out: Optional[Tensor]):  # type: ignore[override]
        need_codebooks, need_logits = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if grad_out is None or not (need_codebooks or need_logits):
            return (None,) * 8
        codebooks, logits, choices, positions, geometry = ctx.saved_tensors
        grad_codebooks = torch.zeros_like(codebooks) if need_codebooks else None
        candidates = logits.shape[1] if need_logits else 1
        grad_soft = torch.zeros_like(logits) if need_logits else None
        n_points, width = positions.shape[0], codebooks.shape[1]
        if n_points:
            block = max(16, min(_BLOCK, _BACKWARD_TILE // candidates))
            grid, width_pow2 = launch_config(n_points, block, width)
            _lookup_backward[grid](
                positions, geometry, choices, codebooks, grad_out.contiguous().float(),
                codebooks if grad_codebooks is None else grad_codebooks, codebooks if grad_soft is None else grad_soft,
                n_points, LEVELS=geometry.shape[0], CODEBOOK=ctx.codebook_size, FULL_INDEX=ctx.full_index,
                CANDIDATES=candidates, WIDTH=width, WIDTH_POW2=width_pow2, BLOCK=block,
                NEED_CODEBOOKS=need_codebooks, NEED_SOFT=need_logits,
            )  # fmt: skip
        grad_logits = relaxed_logit_grad(logits, ctx.temperature, grad_soft) if need_logits else None
        return grad_codebooks, grad_logits, None, None, None, None, None, None


def fused_lookup(
    codebooks: Float[Tensor, "rows k"],
    logits: Optional[Float[Tensor, "entries c"]],
    choices: Int[Tensor, "entries"],
    positions: Float[Tensor, "n 3"],
    level_geometry: Int[Tensor, "levels 4"],
    codebook_size: int,
    full_index: bool,
    temperature: float = 1.0,
) -> Float[Tensor, "n levels_k"]:
    """Each level's trilinear interpolation at ``positions`` of the codebook rows its corners' index entries choose,
    the levels concatenated.

    ``codebooks``: the levels' codebooks of ``codebook_size`` rows, concatenated. ``choices``: every index entry's
    choice among its ``c`` candidates (entries of all levels concatenated); the candidates of a corner are the ``c``
    rows of its level's codebook from its base hash on (from the codebook's start if ``full_index``), wrapping around.
    ``level_geometry``: per level, vertices per side, index entries, dense (0/1), first entry (the encoding's buffer).
    Differentiable in ``codebooks`` (the chosen rows) and, when given, in ``logits``: the straight-through gradient of
    the softmax at ``temperature`` (``choices`` must then be their argmax).
    """
    return _FusedLookup.apply(
        codebooks.contiguous().float(),
        None if logits is None else logits.contiguous().float(),
        choices.contiguous().to(torch.int32),
        positions.contiguous().float(),
        level_geometry.contiguous().long(),
        codebook_size,
        full_index,
        temperature,
    )


__all__ = ["available", "fused_lookup"]
