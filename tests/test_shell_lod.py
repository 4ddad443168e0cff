"""A background capped at a level of detail (shell_lod): the grid's rule, its files (version 2.0) and bad input."""

from __future__ import annotations

import pytest
import torch

from vqad_nerfstudio.codec import (
    FORMAT_VERSION,
    REQUIRING_VERSION,
    FormatError,
    UnsupportedVersionError,
    read_container,
    write_container,
)
from vqad_nerfstudio.encodings.sparse_grid import SparseFeatureGrid, coords_of, in_inner_cube
from vqad_nerfstudio.encodings.vertex_features import FloatFeatures
from vqad_nerfstudio.export.vqad_codec import load_compressed
from vqad_nerfstudio.models.vqad import DEFAULT_SHELL_LOD, VQADModelConfig


def _grid(shell_lod) -> SparseFeatureGrid:
    return SparseFeatureGrid(4, 3, lambda level, rows: FloatFeatures(rows, 2, init_std=1.0), 16, shell_lod)


def _centres(level) -> torch.Tensor:
    return (coords_of(level.cells, level.resolution).float() + 0.5) / level.resolution


def test_levels_finer_than_the_shell_lod_hold_only_inner_cells() -> None:
    grid = _grid(0)
    assert grid.levels[0].cells.numel() == 4**3  # the coarsest level covers the background
    for level in grid.levels[1:]:
        assert level.cells.numel() and bool(in_inner_cube(_centres(level)).all())
    generator = torch.Generator().manual_seed(0)
    grid.prune(lambda cells, resolution: torch.rand(cells.shape, generator=generator) < 0.7)  # neighbours spill out
    for level in grid.levels[1:]:
        assert level.cells.numel() and bool(in_inner_cube(_centres(level)).all())


def test_background_points_are_looked_up_at_the_shell_lod() -> None:
    capped, uncapped = _grid(1), _grid(None)
    uncapped.load_state_dict(capped.state_dict(), strict=False)  # the same rows where both have them
    points = torch.rand(3000, 3, generator=torch.Generator().manual_seed(1))
    inner = in_inner_cube(points)
    assert 0 < int(inner.sum()) < points.shape[0]
    finest = torch.full((points.shape[0],), 2)
    features, inside = capped(points, finest)
    assert bool(inside.all())  # background points render at LOD 2 from levels 0..1
    at_shell, _ = capped(points, torch.full_like(finest, 1))
    assert torch.equal(features[~inner], at_shell[~inner])
    assert not torch.equal(features[inner], at_shell[inner])
    assert torch.equal(capped.inside(points, 2), inside)
    assert torch.equal(capped.lod_at(points, finest), torch.where(inner, finest, torch.ones_like(finest)))


def test_bad_shell_lods_are_refused() -> None:
    with pytest.raises(ValueError, match="shell_lod must be a level of detail in 0..2"):
        _grid(3)
    with pytest.raises(ValueError, match="needs unbounded=True"):
        VQADModelConfig(unbounded=False, shell_lod=1)
    assert VQADModelConfig(shell_lod=1).unbounded is None  # decided from the images (tests/test_scene_bounds.py)
    with pytest.raises(ValueError, match="shell_lod must be an integer in -1..4"):
        VQADModelConfig(unbounded=True, shell_lod=5)


def test_unbounded_scenes_cap_their_background_by_default(unbounded_model) -> None:
    assert VQADModelConfig(unbounded=True).background_lod == DEFAULT_SHELL_LOD
    assert VQADModelConfig(unbounded=True, num_levels=2, base_resolution=4).background_lod == 1  # the finest there
    assert VQADModelConfig(unbounded=True, shell_lod=-1).background_lod is None
    assert VQADModelConfig(unbounded=True, shell_lod=0).background_lod == 0
    assert VQADModelConfig().background_lod is None  # bounded: no background
    assert unbounded_model(None).grid.shell_lod == 2


@pytest.fixture
def unbounded_model(tiny_vqad):
    """``build(shell_lod, alpha_threshold=None)``: a small unbounded model (:func:`tiny_vqad`)."""
    return lambda shell_lod, alpha_threshold=None: tiny_vqad(
        2, unbounded=True, shell_lod=shell_lod, alpha_threshold=alpha_threshold
    )


def test_a_capped_file_is_version_2_and_decodes_to_the_same_grid(unbounded_model, vqad_file) -> None:
    model = unbounded_model(1, alpha_threshold=0.0)
    data = vqad_file(model)
    container = read_container(data)
    assert container.version == REQUIRING_VERSION and container.header["requires"] == ["shell_lod"]
    decoded, _ = load_compressed(data)
    assert decoded.config.shell_lod == 1 and decoded.grid.shell_lod == 1
    for original, level in zip(model.grid.levels, decoded.grid.levels):
        assert torch.equal(level.cells, original.cells)
    points = torch.rand(500, 3, generator=torch.Generator().manual_seed(3))
    lods = torch.full((500,), 2)
    assert torch.equal(decoded.grid.inside(points, lods), model.grid.inside(points, lods))
    uncapped = vqad_file(unbounded_model(-1, alpha_threshold=0.0))
    assert read_container(uncapped).version == FORMAT_VERSION  # uncapped files stay readable by 1.x
    decoded, _ = load_compressed(uncapped)  # and decode uncapped, whatever today's default
    assert decoded.config.background_lod is None and decoded.grid.shell_lod is None


def test_files_that_require_what_the_reader_lacks_are_refused(unbounded_model, vqad_file) -> None:
    container = read_container(vqad_file(unbounded_model(1)))
    unknown = write_container({**container.header, "requires": ["shell_lod", "teleport"]}, container.chunks)
    with pytest.raises(UnsupportedVersionError, match="requires teleport"):
        load_compressed(unknown)
    header = {key: value for key, value in container.header.items() if key != "requires"}
    with pytest.raises(FormatError, match="shell_lod is set but not required"):
        load_compressed(write_container(header, container.chunks))


def test_the_alpha_threshold_travels_in_the_file(unbounded_model, vqad_file) -> None:
    """Unbounded models skip faint samples by default: their files say so (version 2.0), and decode to models that
    skip the same samples; a file without the key (written before it existed) renders every sample."""
    model = unbounded_model(1)
    container = read_container(vqad_file(model))
    assert container.header["requires"] == ["shell_lod", "alpha_threshold"]
    assert container.header["model"]["alpha_threshold"] == 0.01
    decoded, _ = load_compressed(vqad_file(model))
    assert decoded.config.skipped_alpha == 0.01
    header = {**container.header, "requires": ["shell_lod"]}
    header["model"] = {key: value for key, value in header["model"].items() if key != "alpha_threshold"}
    older, _ = load_compressed(write_container(header, container.chunks))
    assert older.config.skipped_alpha == 0.0
    for bad in (1.5, "0.01", 1):
        header = {**container.header, "model": {**container.header["model"], "alpha_threshold": bad}}
        with pytest.raises(FormatError, match="alpha_threshold"):
            load_compressed(write_container(header, container.chunks))


def test_runs_from_before_the_alpha_threshold_keep_rendering_every_sample() -> None:
    config = VQADModelConfig(unbounded=True)
    state = dict(config.__dict__)
    del state["alpha_threshold"]
    restored = VQADModelConfig.__new__(VQADModelConfig)
    restored.__setstate__(state)
    assert restored.skipped_alpha == 0.0 and config.skipped_alpha == 0.01
