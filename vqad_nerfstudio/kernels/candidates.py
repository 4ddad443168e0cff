"""Which candidate samples lie in occupied space, in one GPU pass (Triton).

A sampler proposes ``rays x candidates`` intervals; before packing, each candidate is tested against
the sparse grid at its ray's level of detail (and, during the warm-up, against the occupancy
estimate). In PyTorch that test materialises the candidates' world and unit-cube positions and a
dozen temporaries of the same size; here one kernel reads each ray's origin and direction and each
candidate's interval, places the midpoint in the unit cube (scene box, or the L-infinity scene
contraction for unbounded scenes), and reads one byte of the grid's occupancy bits
(:meth:`~vqad_nerfstudio.encodings.sparse_grid.SparseFeatureGrid.occupancy_bits`): bit ``l`` of a
finest-level voxel says whether its cell at level ``l`` is occupied. Only a boolean per candidate is
written. The PyTorch composition in :meth:`~vqad_nerfstudio.models.vqad.VQADModel` is the reference.
"""

from __future__ import annotations

from typing import Optional

import torch
from jaxtyping import Bool, Float, Int, UInt8
from torch import Tensor

from vqad_nerfstudio.encodings.sparse_grid import INNER_CUBE
from vqad_nerfstudio.kernels import runs_on

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the PyTorch path is used
    triton = None


def available(starts: Tensor) -> bool:
    """Whether the kernel can test candidates on ``starts``' device (see :func:`runs_on`) with 32-bit candidate
    offsets."""
    return runs_on(starts) and starts.numel() < 2**31


if triton is not None:

    @triton.jit
    def _voxel(u, RES: tl.constexpr):
        """Voxel coordinate of unit-cube coordinate ``u`` at ``RES`` voxels per side (clamped into the grid)."""
        return tl.minimum(tl.maximum(tl.floor(u * RES), 0.0), RES - 1.0).to(tl.int64)

    @triton.jit
    def _along(origins, directions, ray, AXIS: tl.constexpr, distance, mask):
        """Coordinate ``AXIS`` of the point at ``distance`` along each ray (as nerfstudio's Frustums compute it)."""
        origin = tl.load(origins + ray * 3 + AXIS, mask=mask, other=0.0)
        return origin + tl.load(directions + ray * 3 + AXIS, mask=mask, other=0.0) * distance

    @triton.jit
    def _contract(x, y, z):
        """nerfstudio's SceneContraction with the L-infinity norm, then its [-2, 2] cube mapped to [0, 1]."""
        magnitude = tl.maximum(tl.maximum(tl.abs(x), tl.abs(y)), tl.abs(z))
        outside = magnitude >= 1.0
        safe = tl.where(outside, magnitude, 1.0)
        scale = 2.0 - tl.div_rn(1.0, safe)
        x = tl.where(outside, scale * tl.div_rn(x, safe), x)
        y = tl.where(outside, scale * tl.div_rn(y, safe), y)
        z = tl.where(outside, scale * tl.div_rn(z, safe), z)
        return tl.div_rn(x + 2.0, 4.0), tl.div_rn(y + 2.0, 4.0), tl.div_rn(z + 2.0, 4.0)

    @triton.jit
    def _unit_midpoint(origins, directions, box, ray, start, end, mask, CONTRACT: tl.constexpr):
        """The midpoint of the interval ``start..end`` along each ray in the grid's unit cube (scene box, or the
        contraction where ``CONTRACT``)."""
        middle = (start + end) / 2.0
        x = _along(origins, directions, ray, 0, middle, mask)
        y = _along(origins, directions, ray, 1, middle, mask)
        z = _along(origins, directions, ray, 2, middle, mask)
        if CONTRACT:
            x, y, z = _contract(x, y, z)
        else:  # the scene box: box holds its minimum and its maximum corner (nerfstudio's aabb)
            x = tl.div_rn(x - tl.load(box), tl.load(box + 3) - tl.load(box))
            y = tl.div_rn(y - tl.load(box + 1), tl.load(box + 4) - tl.load(box + 1))
            z = tl.div_rn(z - tl.load(box + 2), tl.load(box + 5) - tl.load(box + 2))
        return x, y, z

    @triton.jit
    def _unit_positions(origins, directions, box, rays, starts, ends, out, n, CONTRACT: tl.constexpr,
                        BLOCK: tl.constexpr):  # fmt: skip
        sample = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = sample < n
        ray = tl.load(rays + sample, mask=mask, other=0)
        start = tl.load(starts + sample, mask=mask, other=0.0)
        end = tl.load(ends + sample, mask=mask, other=0.0)
        x, y, z = _unit_midpoint(origins, directions, box, ray, start, end, mask, CONTRACT)
        tl.store(out + sample * 3, x, mask=mask)
        tl.store(out + sample * 3 + 1, y, mask=mask)
        tl.store(out + sample * 3 + 2, z, mask=mask)

    @triton.jit
    def _occupied_candidates(
        origins,
        directions,
        starts,
        ends,
        starts_stride,
        ends_stride,
        lods,
        bits,
        occupancy,
        box,
        out,
        n_candidates,
        PER_RAY: tl.constexpr,
        RESOLUTION: tl.constexpr,
        OCCUPANCY_RESOLUTION: tl.constexpr,
        CONTRACT: tl.constexpr,
        SHELL_LOD: tl.constexpr,
        INNER_LOW: tl.constexpr,
        INNER_HIGH: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        candidate = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        in_range = candidate < n_candidates
        ray = candidate // PER_RAY
        column = candidate - ray * PER_RAY
        start = tl.load(starts + ray * starts_stride + column, mask=in_range, other=0.0)
        end = tl.load(ends + ray * ends_stride + column, mask=in_range, other=0.0)
        x, y, z = _unit_midpoint(origins, directions, box, ray, start, end, in_range, CONTRACT)
        inside = in_range & (x >= 0.0) & (x <= 1.0) & (y >= 0.0) & (y <= 1.0) & (z >= 0.0) & (z <= 1.0)
        voxel = (_voxel(x, RESOLUTION) * RESOLUTION + _voxel(y, RESOLUTION)) * RESOLUTION + _voxel(z, RESOLUTION)
        level_bits = tl.load(bits + voxel, mask=inside, other=0).to(tl.int32)
        lod = tl.load(lods + ray, mask=in_range, other=0).to(tl.int32)
        if SHELL_LOD >= 0:  # outside the inner cube, at most SHELL_LOD
            inner = (x >= INNER_LOW) & (x < INNER_HIGH) & (y >= INNER_LOW) & (y < INNER_HIGH)
            inner = inner & (z >= INNER_LOW) & (z < INNER_HIGH)
            lod = tl.where(inner, lod, tl.minimum(lod, SHELL_LOD))
        keep = inside & (((level_bits >> lod) & 1) != 0)
        if OCCUPANCY_RESOLUTION > 0:
            cell = (
                _voxel(x, OCCUPANCY_RESOLUTION) * OCCUPANCY_RESOLUTION + _voxel(y, OCCUPANCY_RESOLUTION)
            ) * OCCUPANCY_RESOLUTION + _voxel(z, OCCUPANCY_RESOLUTION)
            keep = keep & (tl.load(occupancy + cell, mask=keep, other=0) != 0)
        tl.store(out + candidate, keep.to(tl.uint8), mask=in_range)


def _rows(intervals: Tensor) -> Tensor:
    """``intervals`` as float32 rows of unit column stride (views of a ray's edges need no copy)."""
    intervals = intervals.float()
    return intervals if intervals.stride(1) == 1 else intervals.contiguous()


def _box(box: Optional[Float[Tensor, "2 3"]], like: Tensor) -> Tensor:
    """The scene box as the kernels read it, float32 on ``like``'s device (no copy where it already is; for
    contracted space ``like`` itself, never read)."""
    return like if box is None else box.to(device=like.device, dtype=torch.float32).contiguous()


def occupied_candidates(
    origins: Float[Tensor, "r 3"],
    directions: Float[Tensor, "r 3"],
    starts: Float[Tensor, "r s"],
    ends: Float[Tensor, "r s"],
    lods: Int[Tensor, "r"],
    bits: UInt8[Tensor, "v"],
    resolution: int,
    box: Optional[Float[Tensor, "2 3"]],
    occupancy: Optional[Bool[Tensor, "w"]] = None,
    occupancy_resolution: int = 0,
    shell_lod: Optional[int] = None,
) -> Bool[Tensor, "r s"]:
    """Whether the midpoint of each candidate interval ``starts..ends`` along its ray lies in an occupied cell at
    its ray's level of detail ``lods`` (per ray, at most the finest level set in ``bits``).

    ``bits``: per voxel of a ``resolution**3`` grid over the unit cube (row-major), bit ``l`` set where level ``l``
    holds the voxel's cell. ``box``: the scene box (min and max corners) that maps to the unit cube; None contracts
    space instead (unbounded scenes). ``occupancy``: optionally, a ``occupancy_resolution**3`` boolean grid the
    candidates must also fall into (the occupancy estimate during the warm-up). ``shell_lod``: outside the inner cube
    (``SparseFeatureGrid.lod_at``) a candidate's level of detail is at most this."""
    num_rays, per_ray = starts.shape
    out = torch.empty(num_rays, per_ray, dtype=torch.bool, device=starts.device)
    if out.numel() == 0:
        return out
    starts, ends = _rows(starts), _rows(ends)
    if occupancy is None:
        occupancy, occupancy_resolution = bits, 0  # not read
    block = 1024
    _occupied_candidates[(triton.cdiv(out.numel(), block),)](
        origins.float().contiguous(),
        directions.float().contiguous(),
        starts,
        ends,
        starts.stride(0),
        ends.stride(0),
        lods.contiguous(),
        bits,
        occupancy.contiguous().view(torch.uint8),
        _box(box, starts),
        out.view(torch.uint8),
        out.numel(),
        PER_RAY=per_ray,
        RESOLUTION=resolution,
        OCCUPANCY_RESOLUTION=occupancy_resolution,
        CONTRACT=box is None,
        SHELL_LOD=-1 if shell_lod is None else shell_lod,
        INNER_LOW=INNER_CUBE[0],
        INNER_HIGH=INNER_CUBE[1],
        BLOCK=block,
    )
    return out


def unit_positions(
    origins: Float[Tensor, "r 3"],
    directions: Float[Tensor, "r 3"],
    ray_indices: Int[Tensor, "n"],
    starts: Float[Tensor, "n"],
    ends: Float[Tensor, "n"],
    box: Optional[Float[Tensor, "2 3"]],
) -> Float[Tensor, "n 3"]:
    """The midpoint of each interval ``starts..ends`` along its ray ``ray_indices``, in the grid's unit cube: the
    scene ``box`` mapped to [0, 1]^3, or contracted space (``box`` None) as in :func:`occupied_candidates`; one kernel
    for what takes about ten operations in PyTorch (the field's ``to_unit_cube`` of the samples' positions)."""
    out = torch.empty(starts.shape[0], 3, device=starts.device, dtype=torch.float32)
    if out.numel():
        block = 512
        _unit_positions[(triton.cdiv(starts.shape[0], block),)](
            origins.float().contiguous(), directions.float().contiguous(), _box(box, starts),
            ray_indices.contiguous(), starts.float().contiguous(), ends.float().contiguous(), out, starts.shape[0],
            CONTRACT=box is None, BLOCK=block,
        )  # fmt: skip
    return out


__all__ = ["available", "occupied_candidates", "unit_positions"]
