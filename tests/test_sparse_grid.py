"""Sparse topology: pruning keeps what occupied space needs; lookups outside are well defined."""

import pytest
import torch

from vqad_nerfstudio.encodings import sparse_grid
from vqad_nerfstudio.encodings.sparse_grid import (
    CORNER_OFFSETS,
    SparseFeatureGrid,
    cell_vertex_ids,
    coords_of,
    linear_ids,
    trilinear_weights,
    vertex_rows,
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


def _search_each_level(grid, points):
    """Each point's cell per grown level by its own binary search (the lookup ``locate`` replaces), as rows of the
    levels' cells concatenated coarse to fine."""
    columns, cells_before = [], 0
    for level in grid.levels[: grid.grown_levels()]:
        coords = (points * level.resolution).floor().long().clamp(0, level.resolution - 1)
        ids = linear_ids(coords, level.resolution)
        position = torch.searchsorted(level.cells, ids).clamp_max(level.cells.numel() - 1)
        found = (level.cells[position] == ids) & ((points >= 0) & (points <= 1)).all(dim=-1)
        columns.append(torch.where(found, position + cells_before, -1))
        cells_before += level.cells.numel()
    return torch.stack(columns, dim=-1)


def _probe_points(generator, count=4000):
    """Random points around the unit cube, some outside, and points on cell faces and the cube's faces."""
    points = torch.rand(count, 3, generator=generator) * 1.4 - 0.2
    on_faces = torch.randint(0, 17, (500, 3), generator=generator).float() / 16
    return torch.cat([points, on_faces, torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.5, 1e-7]])])


def test_locate_finds_each_levels_cell_once_for_all_levels():
    generator = torch.Generator().manual_seed(3)
    grid = make_grid(store="float", levels=4)
    points = _probe_points(generator)
    # before pruning: two dense levels grown, the finer ones empty
    located = grid.locate(points)
    assert located.shape == (points.shape[0], 2) and located.dtype == torch.int32
    assert torch.equal(located.long(), _search_each_level(grid, points))

    grid.prune(keep_ball(torch.tensor([0.4, 0.55, 0.5]), 0.3))
    assert grid.grown_levels() == 4 and grid.levels[3].num_vertices < 0.5 * 33**3
    reference = _search_each_level(grid, points)
    located = grid.locate(points)
    assert torch.equal(located.long(), reference)
    for level in range(4):  # every level holds occupied and unoccupied points
        assert 0 < int((located[:, level] >= 0).sum()) < points.shape[0]
    for num_levels in (1, 2, 3, 4, 9):
        assert torch.equal(grid.locate(points, num_levels).long(), reference[:, :num_levels])
    assert grid.locate(points[:0]).shape == (0, 4)


def test_inside_at_each_lod_is_the_located_cell_at_that_lod():
    generator = torch.Generator().manual_seed(4)
    grid = make_grid(store="float")
    grid.prune(keep_ball(torch.tensor([0.5, 0.45, 0.5]), 0.25))
    points = _probe_points(generator)
    reference = _search_each_level(grid, points) >= 0
    located = grid.locate(points)
    for lod in range(grid.num_levels):
        lods = torch.full((points.shape[0],), lod)
        assert torch.equal(grid.inside(points, lod), reference[:, lod])
        assert torch.equal(grid.inside(points, lods), reference[:, lod])
        assert torch.equal(SparseFeatureGrid.occupied(located, lods), reference[:, lod])
    lods = torch.randint(0, grid.num_levels, (points.shape[0],), generator=generator)
    expected = reference.gather(1, lods[:, None]).squeeze(1)
    assert torch.equal(grid(points, lods)[1], expected)
    assert torch.equal(grid(points, lods, located)[1], expected)
    # per ray: an expanded view of each ray's level of detail, as the model passes it
    ray_lods = torch.randint(0, grid.num_levels, (points.shape[0] // 7,), generator=generator)
    rays = located[: ray_lods.shape[0] * 7].view(-1, 7, grid.num_levels)
    per_candidate = SparseFeatureGrid.occupied(rays, ray_lods[:, None].expand(-1, 7))
    candidate_lods = ray_lods.repeat_interleave(7)
    expected = reference[: candidate_lods.shape[0]].gather(1, candidate_lods[:, None]).squeeze(1)
    assert torch.equal(per_candidate.reshape(-1), expected)
    assert SparseFeatureGrid.occupied(located[:0], lods[:0]).shape == (0,)


def test_forward_with_located_cells_equals_forward_that_locates():
    """Features, occupancy and gradients are the same whether the cells are found by forward or passed in, also
    for a subset of the located points (the packed samples) and for cells located at fewer levels."""
    generator = torch.Generator().manual_seed(5)
    torch.manual_seed(5)
    grid = make_grid(store="codebook")
    grid.prune(keep_ball(torch.tensor([0.45, 0.5, 0.55]), 0.3))
    points = _probe_points(generator)
    located = grid.locate(points)
    subset = torch.randperm(points.shape[0], generator=generator)[:1500]
    lods = torch.randint(0, grid.num_levels, (subset.shape[0],), generator=generator)
    upstream = torch.randn(subset.shape[0], grid.feature_dim, generator=generator)

    def run(*args):
        grid.zero_grad(set_to_none=True)
        features, inside = grid(points[subset], *args)
        (features * upstream).sum().backward()
        return features.detach(), inside, {n: p.grad.clone() for n, p in grid.named_parameters() if p.grad is not None}

    for given, found in [
        (run(lods, located[subset]), run(lods)),
        (run(lods, located[subset][:, :2]), run(lods.clamp_max(1))),
    ]:
        assert torch.equal(given[0], found[0]) and torch.equal(given[1], found[1])
        assert given[2].keys() == found[2].keys() and given[2]
        for name in found[2]:
            assert torch.equal(given[2][name], found[2][name]), name
    features, inside = grid(points[:0], lods[:0], located[:0])
    assert features.shape == (0, grid.feature_dim) and inside.shape == (0,)


def test_located_cells_interpolate_each_levels_own_vertices():
    """With each vertex holding its own position, every level interpolates a point back to itself: a point inside
    at level of detail ``l`` gets ``(l + 1) * position`` (wrong cells or rows would give other vertices)."""
    generator = torch.Generator().manual_seed(6)
    grid = SparseFeatureGrid(4, 3, lambda level, rows: FloatFeatures(rows, 3), dense_resolution=8)
    grid.prune(keep_ball(torch.tensor([0.5, 0.4, 0.5]), 0.3))
    for level in grid.levels:
        level.features.load_features(coords_of(level.vertex_ids, level.resolution + 1).float() / level.resolution)
    points = _probe_points(generator)
    located = grid.locate(points)
    lods = torch.randint(0, grid.num_levels, (points.shape[0],), generator=generator)
    features, inside = grid(points, lods, located)
    assert 0.05 < inside.float().mean() < 0.5
    torch.testing.assert_close(features[inside], (lods[inside, None] + 1) * points[inside])


def test_pruning_that_would_empty_the_grid_leaves_it_as_it_is():
    grid = SparseFeatureGrid(2, 2, lambda level, rows: FloatFeatures(rows, 2), dense_resolution=2)
    cells = [level.cells.clone() for level in grid.levels]
    assert grid.prune(lambda candidates, resolution: torch.zeros_like(candidates, dtype=torch.bool)) == []
    assert all(torch.equal(level.cells, before) for level, before in zip(grid.levels, cells))
    assert not grid.pruned


def test_rows_from_gathers_surviving_rows_and_zeroes_new_ones():
    from vqad_nerfstudio.encodings.vertex_features import rows_from

    values = torch.arange(12.0).reshape(4, 3)
    rows = rows_from(values, torch.tensor([3, -1, 0, 3]))
    assert torch.equal(rows, torch.tensor([[9.0, 10, 11], [0, 0, 0], [0, 1, 2], [9, 10, 11]]))
    assert torch.equal(rows_from(torch.tensor([True, False]), torch.tensor([-1, 0])), torch.tensor([False, True]))
    assert rows_from(values, torch.full((2,), -1)).abs().sum() == 0
    assert rows_from(values[:0], torch.full((2,), -1)).shape == (2, 3)  # a level grown from nothing
    assert rows_from(values, torch.zeros(0, dtype=torch.long)).shape == (0, 3)


@pytest.mark.parametrize("table_max", [0, sparse_grid.DENSE_VERTEX_TABLE_MAX])  # sorting, then the grid table
def test_vertex_rows_are_the_sorted_distinct_corners_and_each_corners_row(monkeypatch, table_max):
    monkeypatch.setattr(sparse_grid, "DENSE_VERTEX_TABLE_MAX", table_max)
    resolution = 12
    cells = torch.unique(torch.randint(0, resolution**3, (300,), generator=torch.Generator().manual_seed(0)))
    corners = cell_vertex_ids(cells, resolution)
    ids, rows = vertex_rows(corners, (resolution + 1) ** 3)
    expected_ids, expected_rows = torch.unique(corners, return_inverse=True)
    assert torch.equal(ids, expected_ids) and torch.equal(rows, expected_rows.int()) and rows.dtype == torch.int32
    # each cell's corners are its own: the lowest corner's coordinates plus the corner offsets
    assert torch.equal(
        coords_of(ids[rows.long()], resolution + 1), coords_of(cells, resolution)[:, None] + CORNER_OFFSETS
    )
    empty_ids, empty_rows = vertex_rows(corners[:0], (resolution + 1) ** 3)
    assert empty_ids.shape == (0,) and empty_rows.shape == (0, 8)
