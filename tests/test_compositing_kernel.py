"""The compositing kernels against the packed-rendering reference: visibility, per-ray sums, their gradients, and
a model's renders and gradients with and without them.

They run where CUDA and Triton are present, or on the CPU under Triton's interpreter (``TRITON_INTERPRET=1``)."""

from __future__ import annotations

import pytest
import torch

from vqad_nerfstudio.kernels import compositing
from vqad_nerfstudio.rendering import packed

from kernel_device import DEVICE, needs_kernel

pytestmark = needs_kernel


def _samples(seed: int, num_rays: int = 11, per_ray: int = 45, occupied: float = 0.7) -> packed.PackedSamples:
    """Packed samples of random sorted intervals; ray 3 has none, ray 5 all its candidates (more than a block)."""
    generator = torch.Generator().manual_seed(seed)
    keep = torch.rand(num_rays, per_ray, generator=generator) < occupied
    keep[3], keep[5] = False, True
    starts = torch.sort(torch.rand(num_rays, per_ray, generator=generator) * 4, dim=1).values
    ends = starts + 0.01 + torch.rand(num_rays, per_ray, generator=generator) * 0.1
    return packed.pack(starts.to(DEVICE), ends.to(DEVICE), keep.to(DEVICE))


def _densities(samples: packed.PackedSamples, seed: int, scale: float = 20.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(samples.ray_indices.shape[0], generator=generator) * scale).to(DEVICE)


def _reference_sums(density: torch.Tensor, rgb: torch.Tensor, samples: packed.PackedSamples) -> torch.Tensor:
    weights = packed.render_weights(density, samples)[:, None]
    rays, count = samples.ray_indices, samples.num_rays
    midpoints = ((samples.starts + samples.ends) / 2)[:, None]
    return torch.cat(
        [
            packed.accumulate(weights * rgb, rays, count),
            packed.accumulate(weights, rays, count),
            packed.accumulate(weights * midpoints, rays, count),
            packed.accumulate(torch.ones_like(weights), rays, count),
        ],
        dim=1,
    )


@pytest.mark.parametrize("alpha_threshold", [0.0, 0.05])
def test_visible_matches_the_reference(alpha_threshold):
    samples = _samples(0)
    density = _densities(samples, 1)
    keep, in_front = compositing.visible(density, samples, 1e-3, alpha_threshold)
    expected_keep, expected_in_front = packed.visible(density, samples, 1e-3, alpha_threshold)
    torch.testing.assert_close(in_front, expected_in_front, rtol=1e-5, atol=1e-7)
    assert torch.equal(keep, expected_keep)
    assert 0 < int(keep.sum()) < keep.numel()  # the rays end early: the test sees both outcomes


def test_composite_matches_the_reference_and_its_gradients():
    samples = _samples(2)
    density = _densities(samples, 3, scale=5.0).requires_grad_()
    rgb = torch.rand(density.shape[0], 3, generator=torch.Generator().manual_seed(4)).to(DEVICE).requires_grad_()
    sums = compositing.composite(density, rgb, samples)
    expected = _reference_sums(density, rgb, samples)
    torch.testing.assert_close(sums, expected, rtol=1e-5, atol=1e-6)
    assert torch.all(sums[3] == 0) and sums[5, 5] == 45  # a ray without samples, one spanning two blocks

    upstream = torch.randn(sums.shape, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    upstream[:, 5] = 0  # the count has no gradient
    got = torch.autograd.grad((sums * upstream).sum(), [density, rgb])
    want = torch.autograd.grad((expected * upstream).sum(), [density, rgb])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_an_opaque_sample_hides_the_rest_of_its_ray():
    samples = _samples(6, num_rays=6, per_ray=40, occupied=1.0)  # rays 0 and 1: samples 0..39 and 40..79
    density = torch.ones(samples.ray_indices.shape[0], device=DEVICE)
    density[10] = 1e9  # optical depth far above the cap
    density.requires_grad_()
    rgb = torch.full((density.shape[0], 3), 0.5, device=DEVICE, requires_grad=True)
    sums = compositing.composite(density, rgb, samples)
    expected = _reference_sums(density, rgb, samples)
    # float32 with the GPU's fast exp against float64: 1.9e-5 apart on an H200 where a ray turns opaque
    torch.testing.assert_close(sums, expected, rtol=1e-4, atol=1e-5)
    assert float(sums[0, 3].detach()) == pytest.approx(1.0, abs=1e-4)
    got = torch.autograd.grad(sums[:, :5].sum(), [density, rgb])
    want = torch.autograd.grad(expected[:, :5].sum(), [density, rgb])
    for a, b in zip(got, want):  # float32 running sums within a ray (the reference's are float64)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert torch.all(got[1][11:40] == 0) and torch.all(got[1][40:80] > 0)


def test_strided_inputs_and_empty_batches():
    samples = _samples(7)
    wide = torch.rand(samples.ray_indices.shape[0], 16, device=DEVICE, requires_grad=True)  # density[:, 0] strided
    rgb = torch.rand(wide.shape[0], 3, device=DEVICE)
    sums = compositing.composite(wide[:, 0], rgb, samples)
    torch.testing.assert_close(sums, _reference_sums(wide[:, 0], rgb, samples), rtol=1e-5, atol=1e-6)
    sums[:, 3].sum().backward()
    assert torch.all(wide.grad[:, 1:] == 0) and wide.grad[:, 0].abs().sum() > 0

    empty = samples[torch.empty(0, dtype=torch.long, device=DEVICE)]
    none = torch.empty(0, device=DEVICE, requires_grad=True)
    sums = compositing.composite(none, torch.empty(0, 3, device=DEVICE), empty)
    assert sums.shape == (samples.num_rays, compositing.SUMS) and torch.all(sums == 0)
    sums.sum().backward()
    assert none.grad.shape == (0,)
    keep, in_front = compositing.visible(none.detach(), empty, 1e-4)
    assert keep.shape == in_front.shape == (0,) and keep.dtype == torch.bool


def test_composite_refuses_mismatched_colours():
    samples = _samples(8)
    density = _densities(samples, 9)
    with pytest.raises(ValueError, match="rgb must be"):
        compositing.composite(density, torch.rand(density.shape[0], 4, device=DEVICE), samples)


@pytest.mark.parametrize("training,background", [(True, "white"), (False, "white"), (True, "random"), (False, "black")])
def test_a_models_render_is_the_same_with_the_kernels(monkeypatch, training, background):
    from nerfstudio.cameras.rays import RayBundle
    from nerfstudio.data.scene_box import SceneBox

    from vqad_nerfstudio.models.vqad import VQADModelConfig

    torch.manual_seed(0)
    config = VQADModelConfig(num_levels=2, base_resolution=4, dense_resolution=8, num_samples=48, hidden_dim=16,
                             index_warmup_steps=0, coarse_lod_fraction=0.0, tf32=False,
                             background_color=background)  # fmt: skip
    model = config.setup(scene_box=SceneBox(aabb=torch.tensor([[-1.0] * 3, [1.0] * 3])), num_train_data=1)
    model = model.to(DEVICE).train(training)
    with torch.no_grad():  # a dense field, so that rays end early
        model.field.density_mlp.layers[-1].bias[0] = 4.0
    origins = torch.randn(64, 3, generator=torch.Generator().manual_seed(1))
    origins = 3 * origins / origins.norm(dim=-1, keepdim=True)
    directions = -origins / origins.norm(dim=-1, keepdim=True)
    bundle = RayBundle(
        origins=origins.to(DEVICE),
        directions=directions.to(DEVICE),
        pixel_area=torch.ones(64, 1, device=DEVICE),
        camera_indices=torch.zeros(64, 1, dtype=torch.long, device=DEVICE),
    )
    bundle = model.collider(bundle)

    def render(kernels: bool):
        monkeypatch.setattr(compositing, "available", lambda _: kernels)
        model.zero_grad()
        torch.manual_seed(2)  # the sampler's jitter
        with torch.set_grad_enabled(training):
            outputs = model.get_outputs(bundle)
            if training:
                outputs["rgb"].sum().backward()
        grads = [p.grad.clone() for p in model.field.parameters() if p.grad is not None]
        return outputs, grads

    from nerfstudio.model_components.renderers import RGBRenderer

    requested = []  # the shapes the fused path asks nerfstudio's background colour in
    colour_of = RGBRenderer.get_background_color
    monkeypatch.setattr(
        RGBRenderer,
        "get_background_color",
        lambda *a, shape, **k: requested.append(shape) or colour_of(*a, shape=shape, **k),
    )
    fused, fused_grads = render(True)
    monkeypatch.setattr(RGBRenderer, "get_background_color", colour_of)
    # one colour broadcast over the rays, not a [rays, 3] tensor made on the host and copied every step
    assert requested == ([] if background == "random" else [(3,)])
    reference, reference_grads = render(False)
    assert float(reference["samples_per_ray"].mean()) < 48 and float(reference["accumulation"].detach().min()) > 0.5
    for key in ("rgb", "accumulation", "depth", "samples_per_ray"):
        torch.testing.assert_close(fused[key], reference[key], rtol=1e-4, atol=1e-5)
    assert len(fused_grads) == len(reference_grads) and (len(fused_grads) > 0) == training
    for a, b in zip(fused_grads, reference_grads):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
