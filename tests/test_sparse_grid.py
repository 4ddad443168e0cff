"""Sparse topology: pruning keeps what occupied space needs; lookups outside are well defined."""

import torch

from vqad_nerfstudio.encodings.sparse_grid import (
    CORNER_OFFSETS,
    SparseFeatureGrid,
    coords_of,
    linear_ids,
    trilinear_weights,
)
from vqad_nerfstudio.encodings.vertex_features import CodebookFeatures, FloatFeatures


def make_grid(store="codebook", base=4, levels=3, dense=8):
    def factory(level, rows):
        return CodebookFeatures(rows, 4, 6) if store == "codebook" else FloatFeatures(rows, 6)

    return SparseFeatureGrid(base, levels, factory, dense_resolution=dense)


def keep_ball(center, radius):
    """Cell filter: keep cells whose box intersects a ball (an analytic 'occupied space')."""

    def keep(cells, resolution):
        lo = coords_of(cells, resolution).float() / resolution
        nearest = torch.maximum(lo, torch.minimum(center, lo + 1.0 / resolution))
        return (nearest - center).norm(dim=-1) <= radius

    return keep


def test_levels_grow_and_prune_to_occupied_space():
    torch.manual_seed(0)
    grid = make_grid()
    assert grid.grown_levels() == 2  # 4^3 and 8^3 dense; 16^3 waits for the first pruning
    center, radius = torch.tensor([0.4, 0.5, 0.6]), 0.2
    grid.prune(keep_ball(center, radius))
    assert grid.grown_levels() == 3 and grid.pruned

    # every point inside the ball is inside the topology at every level, with a nonzero feature path
    points = center + radius * 0.999 * torch.nn.functional.normalize(torch.randn(2000, 3), dim=-1) * torch.rand(2000, 1)
    for lod in range(3):
        assert grid.inside(points, torch.full((2000,), lod)).all()
    # inside() is the occupancy forward() reports, per point at its own level of detail
    anywhere, lods = torch.rand(3000, 3), torch.randint(0, 3, (3000,))
    assert torch.equal(grid.inside(anywhere, lods), grid(anywhere, lods)[1])
    assert not grid.inside(anywhere, torch.full((3000,), 2)).all()
    # the finest level is much smaller than dense
    assert grid.levels[2].num_vertices < 0.5 * 17**3

    # octree nesting: every fine cell has an occupied parent
    for parent, child in zip(grid.levels[:-1], grid.levels[1:]):
        parents = linear_ids(coords_of(child.cells, child.resolution) // 2, parent.resolution)
        assert torch.isin(parents, parent.cells).all()


def test_lookups_outside_occupied_space_are_zero_and_flagged():
    grid = make_grid(store="float")
    grid.prune(keep_ball(torch.tensor([0.25, 0.25, 0.25]), 0.1))
    far = torch.tensor([[0.9, 0.9, 0.9], [1.5, 0.5, 0.5], [-0.2, 0.1, 0.1]])
    features, inside = grid(far)
    assert not inside.any()
    assert torch.equal(features, torch.zeros_like(features))
    assert torch.isfinite(features).all()


def test_pruning_keeps_features_of_surviving_vertices():
    torch.manual_seed(1)
    grid = make_grid(store="float")
    points = torch.tensor([[0.45, 0.5, 0.55]])
    before, _ = grid(points, torch.tensor([1]))
    grid.prune(keep_ball(torch.tensor([0.45, 0.5, 0.55]), 0.15))
    after, inside = grid(points, torch.tensor([1]))
    assert inside.all()
    torch.testing.assert_close(before, after)


def test_state_dict_roundtrip_restores_topology():
    torch.manual_seed(2)
    grid = make_grid()
    grid.prune(keep_ball(torch.tensor([0.5, 0.5, 0.5]), 0.25))
    fresh = make_grid()
    fresh.load_state_dict(grid.state_dict())
    points = torch.rand(500, 3)
    for a, b in zip(grid(points), fresh(points)):
        assert torch.equal(a, b)
    assert fresh.occupied_vertices() == grid.occupied_vertices() and fresh.pruned


def test_bad_grid_arguments():
    import pytest

    with pytest.raises(ValueError, match="at least one level"):
        make_grid(levels=0)


def test_trilinear_weights_interpolate_corners_and_differentiate():
    torch.manual_seed(0)
    frac = torch.rand(50, 4, 3, dtype=torch.float64, requires_grad=True)
    weights = trilinear_weights(frac)
    assert weights.shape == (50, 4, 8)
    torch.testing.assert_close(weights.sum(dim=-1), torch.ones(50, 4, dtype=torch.float64))
    # interpolating the corner coordinates gives the point back
    torch.testing.assert_close(weights @ CORNER_OFFSETS.to(torch.float64), frac)
    reference = torch.where(CORNER_OFFSETS.bool(), frac[..., None, :], 1 - frac[..., None, :]).prod(dim=-1)
    torch.testing.assert_close(weights, reference)
    upstream = torch.randn_like(weights)
    (grad,) = torch.autograd.grad((weights * upstream).sum(), frac)
    (grad_reference,) = torch.autograd.grad((reference * upstream).sum(), frac)
    torch.testing.assert_close(grad, grad_reference)
