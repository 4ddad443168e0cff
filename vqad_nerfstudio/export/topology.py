"""Octree topology of a sparse grid as bytes: which cells of each level are occupied.

Level 0: one occupancy bit (0 or 1) per cell of the ``resolution**3`` grid, in linear-id order.
Level l > 0: one child mask (0..255) per occupied parent cell (level l - 1, ascending ids) whose
bit ``c`` tells whether the child at corner offset ``c`` (x = bit 2, y = bit 1, z = bit 0) is
occupied. Both symbol sequences are stored as categorical payloads (``encode_categorical`` with
``context="auto"``), which fall back to plain bit packing when coding does not pay.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from vqad_nerfstudio.codec import FormatError, encode_categorical
from vqad_nerfstudio.encodings.sparse_grid import CORNER_OFFSETS, coords_of, linear_ids
from vqad_nerfstudio.export.symbols import decode_symbols

__all__ = ["encode_base_cells", "decode_base_cells", "encode_child_masks", "decode_child_masks"]

_CORNER_WEIGHTS = torch.tensor([4, 2, 1])
_POPCOUNT = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).sum(axis=1)
"""Set bits of every byte value: the children a child mask names."""


def encode_base_cells(cells: Tensor, resolution: int) -> bytes:
    """Occupancy bits of all ``resolution**3`` cells (``cells``: sorted occupied linear ids)."""
    occupancy = np.zeros(resolution**3, dtype=np.uint8)
    occupancy[cells.cpu().numpy()] = 1
    return encode_categorical(occupancy, 2, context="auto")


def decode_base_cells(payload: bytes, resolution: int, max_cells: int) -> Tensor:
    """Sorted occupied cell ids from :func:`encode_base_cells` bytes; ``FormatError`` before decoding if the grid has
    more than ``max_cells`` cells."""
    if resolution**3 > max_cells:
        cap = f"the {max_cells:,} a decoded file may hold"
        raise FormatError(f"level 0's {resolution}^3 grid has more cells than {cap}")
    occupancy = decode_symbols(payload, resolution**3, 2, "base occupancy")
    return torch.from_numpy(np.flatnonzero(occupancy)).long()


def encode_child_masks(cells: Tensor, resolution: int, parent_cells: Tensor) -> bytes:
    """One child mask per parent cell; every cell (at ``resolution``) must have an occupied parent."""
    cells, parent_cells = cells.cpu(), parent_cells.cpu()
    coords = coords_of(cells, resolution)
    parents = linear_ids(coords // 2, resolution // 2)
    slot = torch.searchsorted(parent_cells, parents)
    if cells.numel() and (int(slot.max()) >= parent_cells.numel() or not torch.equal(parent_cells[slot], parents)):
        raise ValueError(f"the cells at resolution {resolution} are not all children of the coarser level's cells")
    masks = torch.zeros(parent_cells.numel(), dtype=torch.long)
    masks.index_add_(0, slot, 1 << ((coords % 2) * _CORNER_WEIGHTS).sum(dim=-1))
    return encode_categorical(masks.numpy(), 256, context="auto")


def decode_child_masks(payload: bytes, resolution: int, parent_cells: Tensor, max_cells: int) -> Tensor:
    """Sorted cell ids at ``resolution`` from the child masks of ``parent_cells`` (at ``resolution // 2``);
    ``FormatError`` before they are built if the masks name more than ``max_cells`` cells."""
    masks = decode_symbols(payload, parent_cells.numel(), 256, "child masks").astype(np.uint8)
    cells = int(_POPCOUNT[masks].sum())
    if cells > max_cells:
        raise FormatError(f"{cells:,} cells, more than the {max_cells:,} a decoded file may still hold")
    bits = torch.from_numpy(np.unpackbits(masks[:, None], axis=1, bitorder="little"))
    parent_slot, corner = torch.nonzero(bits, as_tuple=True)
    coords = coords_of(parent_cells.cpu()[parent_slot], resolution // 2) * 2 + CORNER_OFFSETS[corner]
    return torch.sort(linear_ids(coords, resolution)).values
