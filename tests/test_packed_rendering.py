"""Packed volume rendering against the dense [rays, samples] formulas."""

from __future__ import annotations

import math

import torch

from vqad_nerfstudio.rendering import packed


def _random_packed(generator: torch.Generator, num_rays: int = 7, per_ray: int = 9):
    starts = torch.sort(torch.rand(num_rays, per_ray, generator=generator) * 4, dim=-1).values
    ends = starts + torch.rand(num_rays, per_ray, generator=generator) * 0.3
    keep = torch.rand(num_rays, per_ray, generator=generator) < 0.6
    keep[2] = False  # a ray without samples
    density = torch.rand(num_rays, per_ray, generator=generator) * 5
    return starts, ends, keep, density


def _dense_weights(starts, ends, keep, density):
    """nerfstudio's dense formula with the dropped samples at zero density."""
    tau = torch.where(keep, density * (ends - starts), torch.zeros_like(density))
    before = torch.cumsum(tau, dim=-1) - tau
    transmittance = torch.exp(-before)
    return transmittance, transmittance * (1 - torch.exp(-tau))


def test_pack_keeps_the_kept_candidates_ray_by_ray() -> None:
    starts, ends, keep, _ = _random_packed(torch.Generator().manual_seed(0))
    samples = packed.pack(starts, ends, keep)
    assert torch.equal(samples.ray_indices, torch.nonzero(keep)[:, 0])
    assert torch.equal(samples.starts, starts[keep]) and torch.equal(samples.ends, ends[keep])
    assert bool((samples.ray_indices.diff() >= 0).all())


def test_weights_and_transmittance_match_the_dense_formula() -> None:
    starts, ends, keep, density = _random_packed(torch.Generator().manual_seed(1))
    samples = packed.pack(starts, ends, keep)
    dense_transmittance, dense_weights = _dense_weights(starts, ends, keep, density)
    tau = density[keep] * samples.deltas
    transmittance = packed.transmittance(tau, samples.ray_indices)
    torch.testing.assert_close(transmittance, dense_transmittance[keep])
    torch.testing.assert_close(packed.render_weights(density[keep], samples), dense_weights[keep])


def test_transmittance_of_a_ray_ignores_the_rays_before_it() -> None:
    """A ray behind thousands of opaque rays keeps its exact transmittance (float64 running sum)."""
    ray_indices = torch.arange(2001).repeat_interleave(4)
    tau = torch.full((ray_indices.shape[0],), 30.0)
    tau[-4:] = torch.tensor([0.01, 0.02, 0.03, 0.04])
    result = packed.transmittance(tau, ray_indices)[-4:]
    torch.testing.assert_close(result, torch.exp(-torch.tensor([0.0, 0.01, 0.03, 0.06])))


def test_a_diverging_density_leaves_the_other_rays_exact() -> None:
    """One sample of a diverging density (optical depth 1e22, or inf) makes its own ray opaque behind it and changes
    nothing for the rays after it in the batch."""
    ray_indices = torch.arange(3).repeat_interleave(3)
    for huge in (1e22, math.inf):
        tau = torch.full((9,), 0.1)
        tau[1] = huge
        result = packed.transmittance(tau, ray_indices)
        expected = torch.exp(-torch.tensor([0.0, 0.1, 0.2]))
        torch.testing.assert_close(result[[0, 1]], expected[:2])
        assert result[2] == 0
        torch.testing.assert_close(result[3:], expected.repeat(2))
        weights = packed.render_weights(
            tau, packed.PackedSamples(torch.arange(9), ray_indices, torch.zeros(9), torch.ones(9), 3)
        )
        assert torch.isfinite(weights).all() and weights.max() <= 1


def test_visible_keeps_a_prefix_of_each_ray() -> None:
    starts, ends, keep, density = _random_packed(torch.Generator().manual_seed(2), num_rays=50, per_ray=40)
    samples = packed.pack(starts, ends, keep)
    visible, in_front = packed.visible(density[keep], samples, early_stop_eps=1e-2)
    assert 0 < int(visible.sum()) < visible.numel()
    for ray in range(samples.num_rays):
        mine = visible[samples.ray_indices == ray]
        assert not bool((mine[1:] & ~mine[:-1]).any())  # once dropped, the rest of the ray is dropped
    dense_transmittance, _ = _dense_weights(starts, ends, keep, density)
    assert torch.equal(visible, dense_transmittance[keep] > 1e-2)
    torch.testing.assert_close(in_front, dense_transmittance[keep])


def test_visible_skips_samples_below_the_alpha_threshold() -> None:
    """nerfacc's alpha_thre: a sample less opaque than the threshold is dropped wherever it lies, and the
    transmittance still counts it (it decides where the ray ends)."""
    starts, ends, keep, density = _random_packed(torch.Generator().manual_seed(8), num_rays=50, per_ray=40)
    samples = packed.pack(starts, ends, keep)
    unskipped, in_front = packed.visible(density[keep], samples, early_stop_eps=1e-2)
    skipping, in_front_skipping = packed.visible(density[keep], samples, early_stop_eps=1e-2, alpha_threshold=0.05)
    alpha = 1 - torch.exp(-density[keep] * samples.deltas)
    assert torch.equal(skipping, unskipped & (alpha >= 0.05))
    assert 0 < int(skipping.sum()) < int(unskipped.sum())
    torch.testing.assert_close(in_front_skipping, in_front)


def test_weights_of_the_visible_samples_reuse_their_transmittance() -> None:
    """Visible samples are a prefix of each ray: weights from the transmittance ``visible`` returns are the weights
    recomputed on the kept samples alone (the rendering path without gradients relies on it)."""
    starts, ends, keep, density = _random_packed(torch.Generator().manual_seed(5), num_rays=50, per_ray=40)
    samples = packed.pack(starts, ends, keep)
    visible, in_front = packed.visible(density[keep], samples, early_stop_eps=1e-2)
    kept = torch.nonzero(visible).squeeze(-1)
    front = samples[kept]
    assert torch.equal(front.ray_indices, samples.ray_indices[visible])
    assert torch.equal(front.candidate_ids, samples.candidate_ids[visible])
    recomputed = packed.render_weights(density[keep][kept], front)
    torch.testing.assert_close(packed.render_weights(density[keep][kept], front, in_front[kept]), recomputed)
    _, dense_weights = _dense_weights(starts, ends, keep, density)
    torch.testing.assert_close(recomputed, dense_weights[keep][kept])


def test_gradients_reach_every_sample_before_termination() -> None:
    starts, ends, keep, density = _random_packed(torch.Generator().manual_seed(3))
    samples = packed.pack(starts, ends, keep)
    sigma = density[keep].clone().requires_grad_()
    colour = torch.rand(sigma.shape[0], 3, generator=torch.Generator().manual_seed(4))
    weights = packed.render_weights(sigma, samples)[:, None]
    packed.accumulate(weights * colour, samples.ray_indices, samples.num_rays).sum().backward()
    assert sigma.grad is not None and bool((sigma.grad != 0).all())


def test_accumulated_ones_count_each_rays_samples() -> None:
    starts, ends, keep, _ = _random_packed(torch.Generator().manual_seed(6))
    samples = packed.pack(starts, ends, keep)
    ones = torch.ones(samples.ray_indices.shape[0], 1)
    assert torch.equal(packed.accumulate(ones, samples.ray_indices, samples.num_rays)[:, 0], keep.sum(dim=-1).float())


def test_an_empty_batch_renders_nothing() -> None:
    samples = packed.pack(torch.zeros(3, 0), torch.zeros(3, 0), torch.zeros(3, 0, dtype=torch.bool))
    weights = packed.render_weights(torch.zeros(0), samples)
    assert weights.shape == (0,)
    visible, in_front = packed.visible(torch.zeros(0), samples, early_stop_eps=1e-4)
    assert visible.shape == in_front.shape == (0,)
    assert packed.render_weights(torch.zeros(0), samples[torch.nonzero(visible).squeeze(-1)], in_front).shape == (0,)
    assert torch.equal(packed.accumulate(weights[:, None], samples.ray_indices, 3), torch.zeros(3, 1))
