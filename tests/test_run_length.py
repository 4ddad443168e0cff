"""Schedules follow the run's length: short runs prune and decay their learning rates within the run."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from nerfstudio.data.scene_box import SceneBox
from nerfstudio.engine.callbacks import TrainingCallbackAttributes
from vqad_nerfstudio.method_configs.vqad import (
    CPU_INDEX_BITS,
    GPU_DECAY_STEPS,
    GPU_INDEX_BITS,
    GPU_INDEX_FREEZE_STEP,
    GPU_INDEX_WARMUP_STEPS,
    GPU_STEPS,
    IN_BACKWARD_GROUPS,
    VQAD_GPU_STEPS,
    vqad,
    vqad_model_config,
    vqad_trainer_config,
)

from vqad_nerfstudio.models.vqad import VQADModelConfig
from vqad_nerfstudio.training import InBackwardAdamOptimizerConfig, shorten_schedules


def _prune_steps(run: int, prune_steps) -> tuple:
    config = VQADModelConfig(num_levels=2, base_resolution=4, dense_resolution=8, prune_steps=prune_steps)
    model = config.setup(scene_box=SceneBox(aabb=torch.tensor([[-1.0] * 3, [1.0] * 3])), num_train_data=2)
    trainer = SimpleNamespace(config=SimpleNamespace(max_num_iterations=run))
    attributes = TrainingCallbackAttributes(optimizers=None, grad_scaler=None, pipeline=None, trainer=trainer)
    (prune,) = [c for c in model.get_training_callbacks(attributes) if c.func.__name__ == "prune"]
    return prune.iters


@pytest.mark.parametrize(
    "run, prune_steps, expected",
    [
        (400, (500, 1000, 2000), (66, 133, 266)),  # ends before the last pruning: scaled by 400 / 3000
        (5000, (500, 1000, 2000), (500, 1000, 2000)),
        (250, (200,), (200,)),  # the user's steps fit the run: kept
    ],
)
def test_prune_steps_fit_the_run(run: int, prune_steps, expected) -> None:
    assert _prune_steps(run, prune_steps) == expected


def test_learning_rates_decay_within_a_short_run() -> None:
    config = copy.deepcopy(vqad.config)
    config.max_num_iterations = 600
    shorten_schedules(config)
    assert {group["scheduler"].max_steps for group in config.optimizers.values()} == {600}
    longer = copy.deepcopy(vqad.config)
    longer.max_num_iterations = 9000  # longer runs keep the schedule and train on at the final rate
    shorten_schedules(longer)
    assert {group["scheduler"].max_steps for group in longer.optimizers.values()} == {3000}


@pytest.mark.skipif(torch.cuda.is_available(), reason="the note is for runs without CUDA")
def test_a_cpu_run_is_told_what_its_defaults_change() -> None:
    assert f"3000 steps of 1024 rays (GPU: {VQAD_GPU_STEPS} of 32768" in vqad.config.device_note
    assert "192 samples per ray" in vqad.config.device_note
    assert f"{CPU_INDEX_BITS}-bit indices (GPU: {GPU_INDEX_BITS})" in vqad.config.device_note
    assert vqad.config.pipeline.model.index_bits == CPU_INDEX_BITS
    assert not vqad.config.pipeline.model.warmup_grown_levels and "grown levels" in vqad.config.device_note
    assert vqad.config.pipeline.model.index_freeze_step == 0 and f"frozen from step {GPU_INDEX_FREEZE_STEP}" in (
        vqad.config.device_note
    )


def test_vqad_takes_wider_indices_on_a_gpu(monkeypatch) -> None:
    assert vqad_model_config().index_bits == (GPU_INDEX_BITS if torch.cuda.is_available() else CPU_INDEX_BITS)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert vqad_model_config().index_bits == GPU_INDEX_BITS > CPU_INDEX_BITS
    gpu_model = vqad_model_config()  # and a longer float warm-up that the grown levels share
    assert gpu_model.warmup_grown_levels and gpu_model.index_warmup_steps == GPU_INDEX_WARMUP_STEPS
    assert GPU_DECAY_STEPS < gpu_model.index_freeze_step == GPU_INDEX_FREEZE_STEP < VQAD_GPU_STEPS  # at final rates
    config = vqad_trainer_config("vqad", vqad_model_config(), VQAD_GPU_STEPS)  # wider indices, slower steps: fewer
    assert config.max_num_iterations == VQAD_GPU_STEPS < GPU_STEPS


def test_a_gpu_run_is_longer_with_larger_batches_and_fused_adam(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    config = vqad_trainer_config("vqad", VQADModelConfig())
    assert config.machine.device_type == "cuda" and config.device_note == ""
    assert (config.max_num_iterations, config.pipeline.datamanager.train_num_rays_per_batch) == (GPU_STEPS, 1 << 15)
    assert {group["scheduler"].max_steps for group in config.optimizers.values()} == {GPU_DECAY_STEPS}
    for name, group in config.optimizers.items():  # the logits' Adam runs in their backward pass, the rest fused
        if name in IN_BACKWARD_GROUPS:
            assert isinstance(group["optimizer"], InBackwardAdamOptimizerConfig) and group["optimizer"].in_backward
        else:
            assert group["optimizer"].fused
    assert config.pipeline.model.num_samples == VQADModelConfig().num_samples


def test_a_diverged_loss_stops_training_with_a_clear_error() -> None:
    from vqad_nerfstudio.models.vqad import TrainingDiverged

    config = VQADModelConfig(num_levels=2, base_resolution=4, dense_resolution=8)
    model = config.setup(scene_box=SceneBox(aabb=torch.tensor([[-1.0] * 3, [1.0] * 3])), num_train_data=2)
    attributes = TrainingCallbackAttributes(optimizers=None, grad_scaler=None, pipeline=None, trainer=None)
    (check,) = [c for c in model.get_training_callbacks(attributes) if c.func.__name__ == "stop_if_diverged"]
    batch = {"image": torch.rand(4, 3)}
    for rgb in (torch.rand(4, 3), torch.full((4, 3), float("nan"))):
        model.get_loss_dict({"rgb": rgb, "accumulation": torch.ones(4, 1)}, batch)
        if torch.isfinite(rgb).all():
            check.run_callback_at_location(100, check.where_to_run[0])
        else:
            with pytest.raises(TrainingDiverged, match="training loss is nan at step 200"):
                check.run_callback_at_location(200, check.where_to_run[0])
