"""Packed sampling with early termination renders what the dense reference path renders, and trains."""

from __future__ import annotations

import copy

import torch


def _render(trained, sampling: str, early_stop_eps: float) -> torch.Tensor:
    model = copy.deepcopy(trained.model)
    model.config.sampling, model.config.early_stop_eps = sampling, early_stop_eps
    camera, _ = trained.views()[0]
    return trained.render(model, camera)


def test_packed_without_early_termination_equals_dense(trained) -> None:
    dense = _render(trained, "dense", 0.0)
    torch.testing.assert_close(_render(trained, "packed", 0.0), dense, rtol=0, atol=1e-5)


def test_early_termination_changes_the_image_below_its_tolerance(trained) -> None:
    dense = _render(trained, "dense", 0.0)
    terminated = _render(trained, "packed", 1e-4)
    assert float((terminated - dense).abs().max()) < 2e-4


def test_packed_training_step_reaches_every_grown_level(trained) -> None:
    model = copy.deepcopy(trained.model)
    model.config.sampling = "packed"
    model.train()
    camera, _ = trained.views("train")[0]
    bundle = camera.generate_rays(camera_indices=0).flatten()[::7]
    outputs = model(bundle)  # the collider sets near and far first
    outputs["rgb"].sum().backward()
    assert outputs["samples_per_ray"].mean() > 0
    for level in model.grid.levels[: model.grid.grown_levels()]:
        grads = [p.grad for p in level.features.parameters() if p.numel()]
        assert grads and all(g is not None and bool(g.abs().sum() > 0) for g in grads[:1])
