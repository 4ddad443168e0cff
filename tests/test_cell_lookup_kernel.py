"""The cell-lookup kernel against the sparse grid's PyTorch lookup: every level, some levels, points on cell faces
and outside the unit cube, an empty batch, what it refuses.

The kernel tests run where CUDA and Triton are present, or on the CPU under Triton's interpreter
(``TRITON_INTERPRET=1``); the others run everywhere."""

from __future__ import annotations

import pytest
import torch

from vqad_nerfstudio.encodings.sparse_grid import SparseFeatureGrid
from vqad_nerfstudio.encodings.vertex_features import FloatFeatures
from vqad_nerfstudio.kernels import cell_lookup

from kernel_device import DEVICE, KERNELS_RUN, needs_kernel


def _grid(seed: int, shell_lod=None) -> SparseFeatureGrid:
    """Four levels (3^3 .. 24^3, a base that is not a power of two), the two finest grown into a random part of the
    children as pruning does."""
    generator = torch.Generator().manual_seed(seed)
    grid = SparseFeatureGrid(3, 4, lambda level, rows: FloatFeatures(rows, 2), dense_resolution=6, shell_lod=shell_lod)
    grid.prune(lambda cells, resolution: torch.rand(cells.shape, generator=generator) < 0.4)
    return grid.to(DEVICE)


def _points(seed: int, count: int) -> torch.Tensor:
    """Points in and around the unit cube, a quarter of them on cell faces of every level and on the cube's faces."""
    generator = torch.Generator().manual_seed(seed)
    points = torch.rand(count, 3, generator=generator) * 1.2 - 0.1
    on_faces = torch.randint(0, 25, (count // 4, 3), generator=generator) / 24.0
    return torch.cat([points, on_faces]).to(DEVICE)


def _reference(grid: SparseFeatureGrid, points: torch.Tensor, num_levels=None) -> torch.Tensor:
    grid.fused = False
    try:
        return grid.locate(points, num_levels)
    finally:
        grid.fused = True


@needs_kernel
@pytest.mark.parametrize("shell_lod", [None, 1])
@pytest.mark.parametrize("num_levels", [None, 1, 3])
def test_the_kernel_finds_the_cells_the_reference_finds(shell_lod, num_levels) -> None:
    grid = _grid(0, shell_lod)
    points = _points(1, 3000)
    expected = _reference(grid, points, num_levels)
    got = grid.locate(points, num_levels)
    assert got.dtype == torch.int32 and got.shape == expected.shape
    assert int((expected >= 0).sum()) > 0 and int((expected < 0).sum()) > 0
    assert torch.equal(got, expected)


@needs_kernel
def test_an_empty_batch() -> None:
    grid = _grid(2)
    assert grid.locate(torch.zeros(0, 3, device=DEVICE)).shape == (0, 4)


def test_what_the_kernel_refuses() -> None:
    keys = torch.arange(10)
    for positions in (torch.rand(5, 3, dtype=torch.float64), torch.rand(5, 2), torch.rand(5)):
        assert not cell_lookup.available(positions.to(DEVICE))
        with pytest.raises(ValueError, match="takes float32"):
            cell_lookup.locate(positions.to(DEVICE), keys, 4, 2)
    if KERNELS_RUN:
        with pytest.raises(ValueError, match="at least one level"):
            cell_lookup.locate(torch.rand(5, 3, device=DEVICE), keys, 4, 0)
