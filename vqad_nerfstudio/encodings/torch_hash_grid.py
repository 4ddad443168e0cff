"""nerfstudio's torch hash grid with a backward pass that skips lookups of zero gradient.

nerfstudio's fields zero the positions of samples outside the scene box before the hash grid (and
zero their density after it), so in object scenes a large share of the samples look up the same
vertex, ``(0, 0, 0)``, with a gradient of exactly zero. The torch fallback of
:class:`~nerfstudio.field_components.encodings.HashEncoding` gathers with ``table[indices]``, whose
backward pass (``index_put_`` with accumulation) sorts the indices and sums each run of equal
indices in one thread group, so those duplicates serialise. :func:`sparse_backward_hash_grids`
gives the torch fallbacks in a module the same lookup (nerfstudio's hash function, table and
trilinear weights) through :func:`gather_rows`, whose backward pass drops zero-gradient lookups and
adds the rest with ``index_add_``. Outputs and gradients are unchanged; tinycudann grids are left alone.
"""

from __future__ import annotations

from functools import partial
from typing import Optional, Tuple

import torch
from jaxtyping import Float, Int
from nerfstudio.field_components.encodings import HashEncoding
from torch import Tensor, nn

from vqad_nerfstudio.encodings.sparse_grid import trilinear_weights
from vqad_nerfstudio.encodings.straight_through import nonzero_gradient_lookups
from vqad_nerfstudio.rounding import rounded_rows, straight_through


class _GatherRows(torch.autograd.Function):
    """``table[indices]`` whose backward pass adds only the rows of nonzero gradient (on a GPU)."""

    @staticmethod
    def forward(ctx, table: Tensor, indices: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(indices)
        ctx.table_shape = table.shape
        return table.index_select(0, indices.reshape(-1)).view(*indices.shape, table.shape[-1])

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> Tuple[Optional[Tensor], None]:  # type: ignore[override]
        (indices,) = ctx.saved_tensors
        grad, indices = grad_out.reshape(-1, grad_out.shape[-1]), indices.reshape(-1)
        if grad.is_cuda:  # GPU scatter-adds serialise on repeated rows; the CPU adds in order anyway
            grad, indices = nonzero_gradient_lookups(grad, indices)
        return grad.new_zeros(ctx.table_shape).index_add_(0, indices, grad), None


def gather_rows(table: Float[Tensor, "rows f"], indices: Int[Tensor, "*b"]) -> Float[Tensor, "*b f"]:
    """Rows ``table[indices]``; on a GPU, the gradient of the table skips lookups whose gradient is zero."""
    return _GatherRows.apply(table, indices)


_PRIMES = (1, 2654435761, 805459861)
"""The coordinate multipliers of ``HashEncoding.hash_fn`` (Instant-NGP's)."""


def rounded_table(encoding: HashEncoding, bits: int) -> Float[Tensor, "rows f"]:
    """``encoding``'s hash table as a file of ``bits`` bits per value stores it: each level's entries rounded with
    one scale (:func:`~vqad_nerfstudio.rounding.rounded_rows` of the table viewed as one row per level), with
    straight-through gradients to the table."""
    table = encoding.hash_table
    return straight_through(table, rounded_rows(table.view(encoding.num_levels, -1), bits).view_as(table))


def hash_grid_forward(
    encoding: HashEncoding, positions: Float[Tensor, "*bs 3"], table_bits: Optional[int] = None
) -> Float[Tensor, "*bs out"]:
    """What ``encoding.pytorch_fwd`` computes (same hash, table and trilinear weights), gathering with
    :func:`gather_rows`, from the table rounded to ``table_bits`` (:func:`rounded_table`) where given. Each
    coordinate's hash term is formed once for its lower and upper corner; the 8 corners combine them (corner
    ``4 bx + 2 by + bz`` takes the upper corner on the axes whose bit is set, the order of
    :func:`~vqad_nerfstudio.encodings.sparse_grid.trilinear_weights`)."""
    scaled = positions[..., None, :] * encoding.scalings.view(-1, 1).to(positions.device)  # [..., L, 3]
    lower = torch.floor(scaled)
    upper_weight = scaled - lower
    corners = torch.stack([lower, torch.ceil(scaled)], dim=-1).int().long()  # [..., L, 3, 2]
    terms = [corners[..., axis, :] * prime for axis, prime in enumerate(_PRIMES)]  # [..., L, 2] each
    hashed = terms[0][..., :, None, None] ^ terms[1][..., None, :, None] ^ terms[2][..., None, None, :]
    offsets = encoding.hash_offset.to(positions.device)[:, None]
    hashed = torch.remainder(hashed.flatten(start_dim=-3), encoding.hash_table_size) + offsets  # [..., L, 8]
    table = encoding.hash_table if table_bits is None else rounded_table(encoding, table_bits)
    features = gather_rows(table, hashed)  # [..., L, 8, f]
    return (features * trilinear_weights(upper_weight)[..., None]).sum(dim=-2).flatten(start_dim=-2)


def sparse_backward_hash_grids(module: nn.Module, table_bits: Optional[int] = None) -> int:
    """Make every torch-fallback :class:`HashEncoding` in ``module`` look up through :func:`hash_grid_forward`
    (from tables rounded to ``table_bits`` where given); returns how many it changed (tinycudann grids keep their
    own kernels)."""
    changed = 0
    for encoding in module.modules():
        if isinstance(encoding, HashEncoding) and encoding.tcnn_encoding is None:
            encoding.pytorch_fwd = partial(hash_grid_forward, encoding, table_bits=table_bits)  # type: ignore[method-assign]
            changed += 1
    return changed


__all__ = ["gather_rows", "hash_grid_forward", "rounded_table", "sparse_backward_hash_grids"]
