"""Octree topology coding, without a model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vqad_nerfstudio.codec import FormatError, encode_categorical
from vqad_nerfstudio.encodings.sparse_grid import child_cells
from vqad_nerfstudio.export.topology import (
    decode_base_cells,
    decode_child_masks,
    encode_base_cells,
    encode_child_masks,
)
from vqad_nerfstudio.models.limits import MAX_DECODED_CELLS as CAP


def _random_octree(seed: int):
    generator = torch.Generator().manual_seed(seed)
    base = torch.sort(torch.randperm(64, generator=generator)[:20]).values  # 4^3 cells
    children = child_cells(base, 4)
    fine = children[torch.rand(children.numel(), generator=generator) < 0.3]
    return base, fine


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_topology_round_trip(seed):
    base, fine = _random_octree(seed)
    assert torch.equal(decode_base_cells(encode_base_cells(base, 4), 4, CAP), base)
    assert torch.equal(decode_child_masks(encode_child_masks(fine, 8, base), 8, base, CAP), fine)


def test_child_masks_are_one_symbol_per_parent():
    base = torch.tensor([0, 5])
    fine = torch.tensor([0, 1, 19])  # corners 0 and 1 of cell 0 = (0, 0, 0); corner 1 of cell 5 = (0, 1, 1)
    masks = encode_child_masks(fine, 8, base)
    assert masks == encode_categorical(np.array([0b11, 0b10]), 256, context="auto")
    empty = torch.empty(0, dtype=torch.long)
    assert torch.equal(decode_child_masks(encode_child_masks(empty, 8, base), 8, base, CAP), empty)


def test_cells_without_a_parent_cannot_be_encoded():
    with pytest.raises(ValueError, match="not all children"):
        encode_child_masks(torch.tensor([511]), 8, torch.tensor([5, 9]))
    with pytest.raises(ValueError, match="not all children"):
        encode_child_masks(torch.tensor([0]), 8, torch.empty(0, dtype=torch.long))


def test_topology_payloads_must_fit_their_level():
    base, fine = _random_octree(0)
    with pytest.raises(FormatError):
        decode_child_masks(encode_child_masks(fine, 8, base), 8, base[:-1], CAP)  # one parent fewer
    with pytest.raises(FormatError):
        decode_base_cells(encode_base_cells(base, 4), 5, CAP)
    with pytest.raises(FormatError):
        decode_base_cells(encode_categorical(np.full(64, 2), 3), 4, CAP)  # symbols other than 0 and 1


def test_decoded_cells_are_capped_before_they_are_built():
    base, fine = _random_octree(0)
    masks = encode_child_masks(fine, 8, base)
    assert torch.equal(decode_child_masks(masks, 8, base, fine.numel()), fine)
    with pytest.raises(FormatError, match=f"{fine.numel()} cells, more than the {fine.numel() - 1} a decoded file"):
        decode_child_masks(masks, 8, base, fine.numel() - 1)
    with pytest.raises(FormatError, match="level 0's 4\\^3 grid has more cells than the 63"):
        decode_base_cells(encode_base_cells(base, 4), 4, 63)
    with pytest.raises(FormatError, match="level 0's 1024\\^3 grid has more cells than the 134,217,728"):
        decode_base_cells(b"", 1024, CAP)  # the finest resolution a model may have: refused before decoding
