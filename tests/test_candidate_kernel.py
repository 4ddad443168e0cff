"""Candidate occupancy: the occupancy-bits lookup against the located cells, the fused candidate kernel and the packed
samples' unit-cube positions against the PyTorch composition they replace, and camera rays made on the camera's
device against nerfstudio's.

The kernel tests run where CUDA and Triton are present, or on the CPU under Triton's interpreter
(``TRITON_INTERPRET=1``); the others run everywhere."""

from __future__ import annotations

import pytest
import torch
from nerfstudio.cameras.cameras import Cameras
from nerfstudio.data.scene_box import SceneBox
from nerfstudio.field_components.spatial_distortions import SceneContraction
from nerfstudio.models.base_model import Model

from vqad_nerfstudio.encodings.occupancy import OccupancyEstimator
from vqad_nerfstudio.encodings.sparse_grid import SparseFeatureGrid
from vqad_nerfstudio.encodings.vertex_features import FloatFeatures
from vqad_nerfstudio.kernels import candidates
from vqad_nerfstudio.models.vqad import VQADModelConfig
from vqad_nerfstudio.rendering import packed

from kernel_device import DEVICE, needs_kernel


def _grid(generator: torch.Generator, shell_lod=None) -> SparseFeatureGrid:
    """Four levels (4^3 .. 32^3), the two finest grown into a random part of the children as pruning does."""
    grid = SparseFeatureGrid(4, 4, lambda level, rows: FloatFeatures(rows, 2), dense_resolution=8, shell_lod=shell_lod)
    grid.prune(lambda cells, resolution: torch.rand(cells.shape, generator=generator) < 0.4)
    return grid


def _points(generator: torch.Generator, count: int) -> torch.Tensor:
    """Points in and around the unit cube, a share of them on cell faces of every level and on the cube's faces."""
    points = torch.rand(count, 3, generator=generator) * 1.2 - 0.1
    on_faces = torch.randint(0, 33, (count // 4, 3), generator=generator) / 32.0
    return torch.cat([points, on_faces])


def test_occupancy_bits_agree_with_the_located_cells() -> None:
    generator = torch.Generator().manual_seed(0)
    grid = _grid(generator)
    points = _points(generator, 4000)
    lods = torch.randint(0, 4, (points.shape[0],), generator=generator)
    expected = SparseFeatureGrid.occupied(grid.locate(points), lods)
    assert 0 < int(expected.sum()) < expected.numel()
    assert torch.equal(grid.inside(points, lods), expected)
    for lod in range(4):
        assert torch.equal(grid.inside(points, lod), SparseFeatureGrid.occupied(grid.locate(points), lods * 0 + lod))


def test_occupancy_bits_follow_the_topology() -> None:
    generator = torch.Generator().manual_seed(1)
    grid = _grid(generator)
    before = grid.occupancy_bits().clone()
    grid.prune(lambda cells, resolution: torch.rand(cells.shape, generator=generator) < 0.2)
    after = grid.occupancy_bits()
    assert not torch.equal(before, after)
    points = _points(generator, 2000)
    finest = torch.full((points.shape[0],), 3)
    assert torch.equal(grid.inside(points, 3), SparseFeatureGrid.occupied(grid.locate(points), finest))


def test_an_empty_grid_is_refused() -> None:
    grid = SparseFeatureGrid(4, 2, lambda level, rows: FloatFeatures(rows, 2), dense_resolution=0)
    with pytest.raises(RuntimeError, match="no occupied cells"):
        grid.inside(torch.rand(3, 3), 0)


def _rays(generator: torch.Generator, num_rays: int, per_ray: int, far: float):
    origins = torch.randn(num_rays, 3, generator=generator) * 2
    directions = torch.nn.functional.normalize(torch.randn(num_rays, 3, generator=generator), dim=-1)
    bins = torch.sort(torch.rand(num_rays, per_ray + 1, generator=generator), dim=-1).values * far
    return origins, directions, bins[:, :-1].contiguous(), bins[:, 1:].contiguous()


def _unit(world: torch.Tensor, box) -> torch.Tensor:
    """nerfstudio's scene box normalisation, or its contraction mapped to the unit cube (the field's to_unit_cube)."""
    if box is None:
        return (SceneContraction(order=float("inf"))(world) + 2.0) / 4.0
    return SceneBox.get_normalized_positions(world, box)


def _reference(grid, origins, directions, starts, ends, lods, box, occupancy):
    """What the model computes without the kernel: nerfstudio's frustum midpoints, its scene box normalisation or
    contraction, then the grid's (and the estimate's) occupancy."""
    world = origins[:, None, :] + directions[:, None, :] * (starts + ends)[..., None] / 2
    unit = _unit(world, box).reshape(-1, 3)
    keep = grid.inside(unit, lods[:, None].expand(starts.shape).reshape(-1))
    if occupancy is not None:
        keep &= occupancy.occupied_at(unit)
    return keep.reshape(starts.shape)


@needs_kernel
@pytest.mark.parametrize("bounded,shell_lod", [(True, None), (False, None), (False, 0), (False, 2)])
@pytest.mark.parametrize("with_estimate", [False, True])
def test_the_kernel_keeps_what_the_reference_keeps(bounded: bool, shell_lod, with_estimate: bool) -> None:
    generator = torch.Generator().manual_seed(2)
    grid = _grid(generator, shell_lod).to(DEVICE)
    origins, directions, starts, ends = _rays(generator, 300, 64, far=6.0 if bounded else 40.0)
    lods = torch.randint(0, 4, (300,), generator=generator)
    box = torch.tensor([[-1.5, -1.0, -2.0], [1.5, 2.0, 1.0]]) if bounded else None
    occupancy = None
    if with_estimate:
        occupancy = OccupancyEstimator(8, density_threshold=0.5)
        occupancy.binary = torch.rand(8**3, generator=generator) < 0.7
    tensors = [t.to(DEVICE) for t in (origins, directions, starts, ends, lods)]
    kept = candidates.occupied_candidates(
        *tensors,
        grid.occupancy_bits(),
        grid.resolutions[-1],
        None if box is None else box.to(DEVICE),
        None if occupancy is None else occupancy.binary.to(DEVICE),
        0 if occupancy is None else occupancy.resolution,
        shell_lod,
    )
    grid_cpu = grid.cpu()
    expected = _reference(grid_cpu, origins, directions, starts, ends, lods, box, occupancy)
    assert 0 < int(expected.sum()) < expected.numel()
    assert torch.equal(kept.cpu(), expected)


@needs_kernel
def test_the_kernel_reads_intervals_as_views_of_the_edges() -> None:
    """The model passes each ray's starts and ends as two strided views of its edges, without copies."""
    generator = torch.Generator().manual_seed(5)
    grid = _grid(generator).to(DEVICE)
    origins, directions, starts, ends = (t.to(DEVICE) for t in _rays(generator, 100, 32, far=6.0))
    edges = torch.cat([starts, ends[:, -1:]], dim=-1)
    lods = torch.randint(0, 4, (100,), generator=generator).to(DEVICE)
    box = torch.tensor([[-1.5, -1.0, -2.0], [1.5, 2.0, 1.0]], device=DEVICE)
    arguments = (lods, grid.occupancy_bits(), grid.resolutions[-1], box)
    from_views = candidates.occupied_candidates(origins, directions, edges[:, :-1], edges[:, 1:], *arguments)
    expected = candidates.occupied_candidates(origins, directions, starts, ends, *arguments)
    assert 0 < int(expected.sum()) < expected.numel() and torch.equal(from_views, expected)


@needs_kernel
@pytest.mark.parametrize("bounded", [True, False])
def test_unit_positions_of_packed_samples(bounded: bool) -> None:
    generator = torch.Generator().manual_seed(6)
    origins, directions, starts, ends = _rays(generator, 200, 16, far=6.0 if bounded else 40.0)
    samples = packed.pack(starts, ends, torch.rand(200, 16, generator=generator) < 0.5)
    box = torch.tensor([[-1.5, -1.0, -2.0], [1.5, 2.0, 1.0]]) if bounded else None
    rays = samples.ray_indices
    expected = _unit(origins[rays] + directions[rays] * ((samples.starts + samples.ends) / 2)[:, None], box)
    on_device = (t.to(DEVICE) for t in (origins, directions, rays, samples.starts, samples.ends))
    got = candidates.unit_positions(*on_device, None if box is None else box.to(DEVICE))
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-6, atol=1e-6)
    nothing = torch.zeros(0, device=DEVICE)
    empty = candidates.unit_positions(origins.to(DEVICE), directions.to(DEVICE), nothing.long(),
                                      nothing, nothing, None)  # fmt: skip
    assert empty.shape == (0, 3)


@needs_kernel
def test_the_kernel_takes_an_empty_batch() -> None:
    grid = _grid(torch.Generator().manual_seed(3)).to(DEVICE)
    empty = torch.zeros(0, 3, device=DEVICE)
    nothing = torch.zeros(0, 16, device=DEVICE)
    lods = torch.zeros(0, dtype=torch.long, device=DEVICE)
    kept = candidates.occupied_candidates(
        empty, empty, nothing, nothing, lods, grid.occupancy_bits(), grid.resolutions[-1], None
    )
    assert kept.shape == (0, 16) and kept.dtype == torch.bool


def test_camera_rays_are_nerfstudios() -> None:
    """The model makes a view's pixel grid on the camera's device; the rays and the rendering are nerfstudio's."""
    torch.manual_seed(0)
    config = VQADModelConfig(
        num_levels=2, base_resolution=2, dense_resolution=4, num_samples=8, hidden_dim=8, tf32=False
    )
    model = config.setup(scene_box=SceneBox(aabb=torch.tensor([[-1.0] * 3, [1.0] * 3])), num_train_data=1)
    model.eval()
    pose = torch.tensor([[[1.0, 0.0, 0.0, 0.1], [0.0, 1.0, 0.0, -0.2], [0.0, 0.0, 1.0, 3.0]]])
    camera = Cameras(camera_to_worlds=pose, fx=20.0, fy=21.0, cx=9.5, cy=6.0, width=19, height=13)
    ours = model.get_outputs_for_camera(camera)
    theirs = Model.get_outputs_for_camera(model, camera)
    assert ours["rgb"].shape == (13, 19, 3)
    for name, value in theirs.items():
        assert torch.equal(ours[name], value), name


def _model(unbounded: bool, pruned: bool):
    torch.manual_seed(0)
    config = VQADModelConfig(
        num_levels=3, base_resolution=4, dense_resolution=8, num_samples=48, hidden_dim=8, tf32=False,
        unbounded=unbounded,
    )  # fmt: skip
    model = config.setup(scene_box=SceneBox(aabb=torch.tensor([[-1.0] * 3, [1.0] * 3])), num_train_data=1)
    generator = torch.Generator().manual_seed(4)
    if pruned:  # the finest level grown into part of the space
        model.grid.prune(lambda cells, resolution: torch.rand(cells.shape, generator=generator) < 0.5)
    # before the first pruning, the occupancy estimate also gates the candidates of training rays
    model.occupancy.binary = torch.rand(model.occupancy.binary.shape, generator=generator) < 0.8
    return model.to(DEVICE)


@needs_kernel
@pytest.mark.parametrize("unbounded", [False, True])
@pytest.mark.parametrize("training,pruned", [(True, False), (True, True), (False, True)])
def test_the_model_renders_the_same_with_and_without_kernels(unbounded: bool, training: bool, pruned: bool) -> None:
    """The model's kernel path (candidates and interpolation in Triton, positions made for the packed samples only)
    renders what its PyTorch path renders: in training (random coarser LODs; before the first pruning, the occupancy
    estimate) and in eval."""
    from nerfstudio.cameras.rays import RayBundle

    model = _model(unbounded, pruned)
    model.train(training)
    generator = torch.Generator().manual_seed(5)
    origins = torch.randn(200, 3, generator=generator) * (3.0 if unbounded else 0.5)
    directions = torch.nn.functional.normalize(torch.randn(200, 3, generator=generator), dim=-1)
    outputs = []
    for fused in (False, True):
        model.grid.fused = fused
        torch.manual_seed(6)  # the same coarser LODs and jitter for both paths
        rays = RayBundle(
            origins=origins.to(DEVICE),
            directions=directions.to(DEVICE),
            pixel_area=torch.ones(200, 1, device=DEVICE),
            camera_indices=torch.zeros(200, 1, dtype=torch.long, device=DEVICE),
        )
        with torch.no_grad():
            outputs.append(model(rays))
    reference, fused_outputs = outputs
    assert float(reference["samples_per_ray"].mean()) > 1
    assert torch.equal(fused_outputs["samples_per_ray"], reference["samples_per_ray"])
    for name in ("rgb", "accumulation", "depth"):
        torch.testing.assert_close(fused_outputs[name], reference[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("spacing", ["grown", "finest"])
def test_training_rays_take_fewer_candidates_until_the_fine_levels_grow(spacing: str) -> None:
    config = VQADModelConfig(
        num_levels=4, base_resolution=4, dense_resolution=8, num_samples=64, hidden_dim=8, tf32=False,
        warmup_sample_spacing=spacing,
    )  # fmt: skip
    model = config.setup(scene_box=SceneBox(aabb=torch.tensor([[-1.0] * 3, [1.0] * 3])), num_train_data=1)
    assert model.grid.grown_levels() == 2  # 4^3 and 8^3 start dense, 16^3 and 32^3 grow at the first pruning
    model.train()
    assert model.candidates_per_ray() == (16 if spacing == "grown" else 64)
    model.eval()
    assert model.candidates_per_ray() == 64  # renders always take num_samples
    model.train()
    model.grid.prune(lambda cells, resolution: torch.ones(cells.shape, dtype=torch.bool))
    assert model.grid.grown_levels() == 4 and model.candidates_per_ray() == 64
