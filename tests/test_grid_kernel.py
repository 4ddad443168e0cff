"""The fused grid-interpolation kernel against the PyTorch reference path (outputs and gradients).

These run where CUDA and Triton are present, or on the CPU under Triton's interpreter (``TRITON_INTERPRET=1``)."""

from __future__ import annotations

import pytest
import torch

from vqad_nerfstudio.encodings.sparse_grid import SparseFeatureGrid
from vqad_nerfstudio.encodings.vertex_features import CodebookFeatures, FloatFeatures

from kernel_device import DEVICE, ON_GPU, needs_kernel

SCALE = 1 if ON_GPU else 15  # the interpreter is slow: fewer points on the CPU
pytestmark = needs_kernel


@pytest.fixture(autouse=True)
def full_precision_matmul():
    """The reference path's soft indices multiply matrices: compare in full float32, whatever another test (a model
    built with tf32=True) set for the process."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(before)


def _grid(store: str, generator: torch.Generator, fuse_rate: bool = False) -> SparseFeatureGrid:
    def make(level: int, rows: int):
        if store == "float":
            return FloatFeatures(rows, 16, init_std=1.0)
        features = CodebookFeatures(rows, 4, 16, logit_init_std=1.0, codebook_init_std=1.0, fuse_rate=fuse_rate)
        features.temperature = 0.5
        return features

    grid = SparseFeatureGrid(4, 4, make, dense_resolution=8)
    # grow the two finest levels into a random half of the children, as pruning does
    grid.prune(lambda cells, resolution: torch.rand(cells.shape, generator=generator) < 0.5)
    return grid.to(DEVICE)


def _forward_backward(grid: SparseFeatureGrid, fused: bool, points, lods, grad_out, located=None):
    grid.fused = fused
    grid.zero_grad(set_to_none=True)
    features, inside = grid(points, lods, located)
    (features * grad_out).sum().backward()
    grads = {name: p.grad.clone() for name, p in grid.named_parameters() if p.grad is not None}
    return features.detach(), inside, grads


@pytest.mark.parametrize("store", ["float", "codebook"])
def test_fused_interpolation_matches_reference(store: str) -> None:
    generator = torch.Generator().manual_seed(0)
    grid = _grid(store, generator)
    points = torch.rand(20000 // SCALE, 3, generator=generator) * 1.2 - 0.1  # some outside the unit cube
    lods = torch.randint(0, grid.num_levels, (points.shape[0],), generator=generator)
    grad_out = torch.randn(points.shape[0], 16, generator=generator)
    points, lods, grad_out = points.to(DEVICE), lods.to(DEVICE), grad_out.to(DEVICE)

    reference = _forward_backward(grid, False, points, lods, grad_out)
    fused = _forward_backward(grid, True, points, lods, grad_out)

    assert torch.equal(fused[1], reference[1])
    assert reference[1].float().mean() > 0.2 and not reference[1].all()  # both occupied and empty points
    torch.testing.assert_close(fused[0], reference[0], rtol=1e-5, atol=1e-5)
    assert fused[2].keys() == reference[2].keys() and fused[2]
    for name in reference[2]:
        torch.testing.assert_close(fused[2][name], reference[2][name], rtol=1e-4, atol=1e-4, msg=name)


def test_fused_interpolation_with_the_rate_in_the_tables_pass_matches_reference() -> None:
    """Stores that compute the index rate in the kernel path's table pass (``fuse_rate``): the loss with the rate
    has the reference path's gradients, step after step (each step's rate comes from that step's table)."""
    generator = torch.Generator().manual_seed(4)
    grid = _grid("codebook", generator, fuse_rate=True)
    stores = [level.features for level in grid.levels]
    points = (torch.rand(6000 // SCALE, 3, generator=generator)).to(DEVICE)
    lods = torch.full((points.shape[0],), grid.num_levels - 1, device=DEVICE)
    grad_out = torch.randn(points.shape[0], 16, generator=generator).to(DEVICE)
    for _ in range(2):
        grads = []
        for fused in (False, True):
            grid.fused = fused
            grid.zero_grad(set_to_none=True)
            features, _ = grid(points, lods)
            ((features * grad_out).sum() + 0.1 * sum(store.index_rate_bits() for store in stores)).backward()
            grads.append({name: p.grad.clone() for name, p in grid.named_parameters() if p.grad is not None})
        for name in grads[0]:
            torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-4, msg=name)
        with torch.no_grad():  # an optimiser step
            for parameter in grid.parameters():
                if parameter.grad is not None:
                    parameter.sub_(0.1 * parameter.grad)


def test_fused_interpolation_of_an_empty_batch() -> None:
    grid = _grid("float", torch.Generator().manual_seed(1))
    points = torch.zeros(0, 3, device=DEVICE)
    features, inside = grid(points, torch.zeros(0, dtype=torch.long, device=DEVICE))
    assert features.shape == (0, 16) and inside.shape == (0,)
    features.sum().backward()


def _compare(grid: SparseFeatureGrid, points, lods, grad_out, located) -> None:
    reference = _forward_backward(grid, False, points, lods, grad_out, located)
    fused = _forward_backward(grid, True, points, lods, grad_out, located)
    assert torch.equal(fused[1], reference[1])
    torch.testing.assert_close(fused[0], reference[0], rtol=1e-5, atol=1e-5)
    assert fused[2].keys() == reference[2].keys() and fused[2]
    for name in reference[2]:
        torch.testing.assert_close(fused[2][name], reference[2][name], rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.parametrize("store", ["float", "codebook"])
def test_fused_interpolation_of_located_cells_matches_reference(store: str) -> None:
    """Cells located once for all candidates, then gathered for a subset of them (the packed samples), at all grown
    levels (training) and at levels 0..1 only (rendering at level of detail 1)."""
    generator = torch.Generator().manual_seed(2)
    grid = _grid(store, generator)
    candidates = (torch.rand(30000 // SCALE, 3, generator=generator) * 1.2 - 0.1).to(DEVICE)
    located = grid.locate(candidates)
    assert located.shape == (candidates.shape[0], grid.num_levels) and located.dtype == torch.int32
    assert torch.equal(located.cpu(), grid.cpu().locate(candidates.cpu()))  # the same cells on either device
    grid.to(DEVICE)
    subset = torch.randperm(candidates.shape[0], generator=generator)[: 20000 // SCALE].to(DEVICE)
    points, lods = candidates[subset], torch.randint(0, grid.num_levels, (subset.shape[0],), generator=generator)
    grad_out = torch.randn(subset.shape[0], 16, generator=generator).to(DEVICE)
    lods = lods.to(DEVICE)
    assert torch.equal(grid(points, lods, located[subset])[1], grid(points, lods)[1])
    _compare(grid, points, lods, grad_out, located[subset])
    _compare(grid, points, lods.clamp_max(1), grad_out, grid.locate(candidates, 2)[subset])


def test_fused_interpolation_of_an_empty_batch_of_located_cells() -> None:
    grid = _grid("codebook", torch.Generator().manual_seed(3))
    points = torch.zeros(0, 3, device=DEVICE)
    located = grid.locate(points)
    assert located.shape == (0, grid.num_levels)
    features, inside = grid(points, torch.zeros(0, dtype=torch.long, device=DEVICE), located)
    assert features.shape == (0, 16) and inside.shape == (0,)
    features.sum().backward()
