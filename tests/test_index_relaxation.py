"""The soft-to-hard schedule of the learned indices, as the VQAD model's training callbacks drive it."""

import math
from types import SimpleNamespace

import pytest
import torch
from nerfstudio.data.scene_box import SceneBox
from nerfstudio.engine.callbacks import TrainingCallbackAttributes, TrainingCallbackLocation

from vqad_nerfstudio.encodings.vertex_features import CodebookFeatures
from vqad_nerfstudio.models.vqad import VQADModelConfig


def _model_and_callbacks(max_iterations: int, relaxation_steps: int):
    config = VQADModelConfig(
        num_levels=2,
        base_resolution=4,
        dense_resolution=8,
        index_warmup_steps=relaxation_steps,
        index_temperature=(1.0, 0.05),
        index_warmup="soft",
    )
    model = config.setup(scene_box=SceneBox(aabb=torch.tensor([[-1.0] * 3, [1.0] * 3])), num_train_data=1)
    trainer = SimpleNamespace(config=SimpleNamespace(max_num_iterations=max_iterations))
    attributes = TrainingCallbackAttributes(optimizers=None, grad_scaler=None, pipeline=None, trainer=trainer)
    return model, model.get_training_callbacks(attributes)


def _state_at(model, callbacks, step: int):
    for callback in callbacks:
        if TrainingCallbackLocation.BEFORE_TRAIN_ITERATION in callback.where_to_run and callback.iters is None:
            callback.run_callback_at_location(step, TrainingCallbackLocation.BEFORE_TRAIN_ITERATION)
    stores = [level.features for level in model.grid.levels if isinstance(level.features, CodebookFeatures)]
    assert stores
    return {(store.relaxed, round(store.temperature, 6)) for store in stores}


def test_temperature_falls_geometrically_then_straight_through():
    model, callbacks = _model_and_callbacks(max_iterations=3000, relaxation_steps=100)
    assert _state_at(model, callbacks, 0) == {(True, 1.0)}
    assert _state_at(model, callbacks, 50) == {(True, round(math.sqrt(0.05), 6))}
    assert _state_at(model, callbacks, 100) == {(False, 0.05)}
    assert _state_at(model, callbacks, 2000) == {(False, 0.05)}


def test_short_runs_cap_the_warm_up_at_a_third():
    model, callbacks = _model_and_callbacks(max_iterations=300, relaxation_steps=1000)
    assert _state_at(model, callbacks, 99) == {(True, round(0.05 ** (99 / 100), 6))}
    assert _state_at(model, callbacks, 100) == {(False, 0.05)}


@pytest.mark.parametrize("temperature", [(1.0,), (1.0, 0.0), (-1.0, 0.1)])
def test_bad_temperatures_are_rejected(temperature):
    with pytest.raises(ValueError, match="index_temperature"):
        VQADModelConfig(index_temperature=temperature)


def test_float_warm_up_quantises_at_its_end():
    config = VQADModelConfig(
        num_levels=2, base_resolution=4, dense_resolution=8, index_warmup_steps=100, index_warmup="float"
    )
    model = config.setup(scene_box=SceneBox(aabb=torch.tensor([[-1.0] * 3, [1.0] * 3])), num_train_data=1)
    trainer = SimpleNamespace(config=SimpleNamespace(max_num_iterations=3000))
    attributes = TrainingCallbackAttributes(optimizers=None, grad_scaler=None, pipeline=None, trainer=trainer)
    callbacks = model.get_training_callbacks(attributes)
    stores = [level.features for level in model.grid.levels]
    _state_at(model, callbacks, 99)
    assert all(store.in_float_warmup for store in stores)
    assert set(model.get_param_groups()) >= {"grid_features", "grid_logits", "codebooks"}
    assert _state_at(model, callbacks, 100) == {(False, 0.2)}  # straight-through at the end temperature
    assert not any(store.in_float_warmup for store in stores)
