"""The stored size a model reports is the size of the file it exports to."""

from __future__ import annotations

import math
import warnings

import torch

from vqad_nerfstudio.codec import describe, read_container, write_container
from vqad_nerfstudio.export.vqad_codec import IncompleteFileWarning, encode_model, load_compressed
from vqad_nerfstudio.models.size_accounting import model_size_report, stored_kib


def test_the_reported_size_is_the_file_size(trained, encoded):
    report = model_size_report(trained.model)
    assert report.total_bytes == len(encoded)
    assert stored_kib(trained.model) == len(encoded) / 1024
    level_ends = {}
    for row in describe(read_container(encoded)):
        if row["lod"] is not None:
            level_ends[row["lod"]] = row["end"]
    for lod, end in level_ends.items():
        assert report.cumulative_bytes(lod) == end + 16  # the prefix and its end marker


def test_levels_without_cells_cost_nothing(encoded):
    """A model holding fewer levels than its configuration (a decoded prefix) reports the file it writes."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IncompleteFileWarning)
        model, _ = load_compressed(encoded, max_lod=0)
    written = encode_model(model)
    assert model_size_report(model).total_bytes == len(write_container(written.header, written.chunks))
    assert len(model_size_report(model).levels) == 1


def test_the_report_follows_changes_of_the_model(encoded):
    model, _ = load_compressed(encoded)
    before = model_size_report(model)
    assert model_size_report(model) is before  # cached while nothing changes
    store = model.grid.levels[0].features
    store.load_codewords(store.codebook.detach(), torch.zeros_like(store.hard_indices()))
    after = model_size_report(model)
    assert after.levels[0].rows < before.levels[0].rows


def test_a_model_in_its_float_warm_up_has_no_stored_size_yet():
    from nerfstudio.data.scene_box import SceneBox

    from vqad_nerfstudio.models.vqad import VQADModelConfig

    config = VQADModelConfig(num_levels=1, base_resolution=2, dense_resolution=2, num_samples=8, hidden_dim=8)
    model = config.setup(scene_box=SceneBox(aabb=torch.tensor([[-1.0] * 3, [1.0] * 3])), num_train_data=1)
    assert model.grid.levels[0].features.in_float_warmup
    assert math.isnan(stored_kib(model))
