"""Checkpoints load through nerfstudio's pipeline as they were saved, float warm-up included, and loading leaves
the caller's state dict as it was."""

from __future__ import annotations

import torch
from nerfstudio.data.scene_box import SceneBox
from nerfstudio.pipelines.base_pipeline import VanillaPipeline
from torch import nn

from vqad_nerfstudio.encodings.vertex_features import CodebookFeatures
from vqad_nerfstudio.models.vqad import VQADModel, VQADModelConfig


def _model(seed: int) -> VQADModel:
    torch.manual_seed(seed)
    config = VQADModelConfig(num_levels=2, base_resolution=2, dense_resolution=4, num_samples=8, hidden_dim=8)
    return config.setup(scene_box=SceneBox(aabb=torch.tensor([[-1.0] * 3, [1.0] * 3])), num_train_data=1)


def _pipeline(model: VQADModel) -> VanillaPipeline:
    """nerfstudio's pipeline around ``model`` (no data): its load_pipeline is what ns-eval, ns-render, the viewer,
    ns-export and ns-train --load-dir call."""
    pipeline = VanillaPipeline.__new__(VanillaPipeline)
    nn.Module.__init__(pipeline)
    pipeline._model = model
    return pipeline


def _stores(model: VQADModel) -> list:
    return [level.features for level in model.grid.levels]


def test_a_warm_up_checkpoint_keeps_its_float_rows_through_the_pipeline():
    saved = _model(0)
    assert all(store.in_float_warmup for store in _stores(saved))
    state = _pipeline(saved).state_dict()
    before = dict(state)
    loaded = _model(1)
    _pipeline(loaded).load_pipeline(state, step=40)
    assert state.keys() == before.keys() and all(state[key] is before[key] for key in before)
    for ours, theirs in zip(_stores(loaded), _stores(saved)):
        assert ours.in_float_warmup
        assert torch.equal(ours.warmup_features, theirs.warmup_features)


def test_a_checkpoint_from_after_the_warm_up_empties_the_warm_up_table():
    saved = _model(0)
    for store in _stores(saved):
        store.quantize_float_warmup(generator=torch.Generator().manual_seed(0))
    loaded = _model(1)
    _pipeline(loaded).load_pipeline(_pipeline(saved).state_dict(), step=400)
    for ours, theirs in zip(_stores(loaded), _stores(saved)):
        assert not ours.in_float_warmup
        assert torch.equal(ours.hard_indices(), theirs.hard_indices())


def test_a_checkpoint_without_the_warm_up_table_loads_strictly_and_unchanged():
    """Checkpoints from before the table existed: their stores were past any warm-up."""
    saved = _model(0)
    for store in _stores(saved):
        store.quantize_float_warmup(generator=torch.Generator().manual_seed(0))
    state = {key: value for key, value in saved.state_dict().items() if not key.endswith("warmup_features")}
    keys = set(state)
    loaded = _model(1)
    loaded.load_state_dict(state, strict=True)
    assert set(state) == keys
    assert not any(store.in_float_warmup for store in _stores(loaded))
    assert all(isinstance(store, CodebookFeatures) for store in _stores(loaded))
