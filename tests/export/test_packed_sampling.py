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


def test_packed_equals_dense_at_every_level_of_detail(trained) -> None:
    """A coarser level of detail locates the candidates' cells at fewer levels; packed and dense agree at each."""
    model = copy.deepcopy(trained.model)
    model.config.early_stop_eps = 0.0
    camera, _ = trained.views()[0]
    bundle = camera.generate_rays(camera_indices=0).flatten()[::3]
    for lod in range(model.grid.grown_levels()):
        model.lod_slider.value = lod
        with torch.no_grad():
            model.config.sampling = "dense"
            dense = model(bundle)
            model.config.sampling = "packed"
            packed = model(bundle)
        assert float(packed["samples_per_ray"].mean()) > 1
        for key in ("rgb", "accumulation"):
            torch.testing.assert_close(packed[key], dense[key], rtol=0, atol=1e-5, msg=f"{key} at LOD {lod}")


def test_weights_without_gradients_equal_the_recomputed_weights(trained) -> None:
    """Without gradients the kept samples' transmittance comes from the early-termination pass; with gradients it
    is recomputed from the second pass's densities: the renders agree."""
    model = copy.deepcopy(trained.model)
    model.config.sampling, model.config.early_stop_eps = "packed", 1e-3
    camera, _ = trained.views()[0]
    bundle = camera.generate_rays(camera_indices=0).flatten()[::3]
    with torch.no_grad():
        reused = model(bundle)
    with torch.enable_grad():
        recomputed = model(bundle)
    assert recomputed["rgb"].requires_grad and not reused["rgb"].requires_grad
    for key in ("rgb", "accumulation", "depth", "samples_per_ray"):
        torch.testing.assert_close(reused[key], recomputed[key].detach(), rtol=1e-5, atol=1e-6, msg=key)


def test_skipped_samples_are_skipped_alike_by_packed_and_dense(trained) -> None:
    """With an alpha threshold both paths drop the samples below it (the dense one composites them as empty), and
    renders without gradients, which then recompute the kept samples' transmittance, equal those with gradients."""
    model = copy.deepcopy(trained.model)
    camera, _ = trained.views()[0]
    bundle = camera.generate_rays(camera_indices=0).flatten()[::3]
    outputs = {}
    for threshold, sampling, grad in [(0.0, "packed", False), (0.05, "dense", False), (0.05, "packed", False)]:
        model.config.alpha_threshold, model.config.sampling, model.config.early_stop_eps = threshold, sampling, 0.0
        with torch.set_grad_enabled(grad):
            outputs[threshold, sampling] = model(bundle)
    model.config.early_stop_eps = 1e-4
    with torch.enable_grad():
        graded = model(bundle)
    with torch.no_grad():
        plain = model(bundle)
    skipped, every = outputs[0.05, "packed"], outputs[0.0, "packed"]
    assert float(skipped["samples_per_ray"].mean()) < 0.9 * float(every["samples_per_ray"].mean())
    assert float((skipped["rgb"] - every["rgb"]).abs().max()) > 2e-4  # the threshold matters on this model (2e-3 seen)
    for key in ("rgb", "accumulation"):
        torch.testing.assert_close(skipped[key], outputs[0.05, "dense"][key], rtol=0, atol=1e-5, msg=key)
        torch.testing.assert_close(plain[key], graded[key].detach(), rtol=1e-5, atol=1e-6, msg=key)


def test_the_alpha_threshold_defaults_by_scene_kind() -> None:
    from vqad_nerfstudio.models.vqad import UNBOUNDED_ALPHA_THRESHOLD, VQADModelConfig

    assert VQADModelConfig().skipped_alpha == 0.0
    assert VQADModelConfig(unbounded=True).skipped_alpha == UNBOUNDED_ALPHA_THRESHOLD
    assert VQADModelConfig(unbounded=True, alpha_threshold=0.0).skipped_alpha == 0.0
    assert VQADModelConfig(alpha_threshold=0.02).skipped_alpha == 0.02
