"""Candidate intervals: the edges nerfstudio's stratified samplers would place, jittered within their strata."""

from __future__ import annotations

import pytest
import torch
from nerfstudio.cameras.rays import RayBundle
from nerfstudio.model_components.ray_samplers import UniformLinDispPiecewiseSampler, UniformSampler

from vqad_nerfstudio.rendering.candidate_intervals import candidate_edges

SAMPLERS = {"uniform": UniformSampler, "lin-disp": UniformLinDispPiecewiseSampler}


def _planes(num_rays: int, unbounded: bool):
    generator = torch.Generator().manual_seed(0)
    nears = torch.rand(num_rays, 1, generator=generator) * (0.1 if unbounded else 2.0)
    fars = nears + torch.rand(num_rays, 1, generator=generator) * (500.0 if unbounded else 3.0) + 0.5
    return nears, fars


def _nerfstudio_edges(spacing: str, nears, fars, num_samples: int, training: bool) -> torch.Tensor:
    sampler = SAMPLERS[spacing](num_samples=num_samples).train(training)
    bundle = RayBundle(
        origins=torch.zeros(nears.shape[0], 3),
        directions=torch.tensor([[0.0, 0.0, 1.0]]).expand(nears.shape[0], 3),
        pixel_area=torch.ones(nears.shape[0], 1),
        nears=nears,
        fars=fars,
    )
    samples = sampler(bundle)
    return torch.cat([samples.frustums.starts[..., 0], samples.frustums.ends[:, -1:, 0]], dim=-1)


@pytest.mark.parametrize("spacing", ["uniform", "lin-disp"])
@pytest.mark.parametrize("training", [False, True])
def test_the_edges_are_nerfstudios(spacing: str, training: bool) -> None:
    """Same seed, same random draw: the edges of nerfstudio's sampler, within float32 rounding of the
    interpolation between the planes (which the disparity spacing amplifies by 1 / (1 - s) towards the far plane)."""
    nears, fars = _planes(50, unbounded=spacing == "lin-disp")
    torch.manual_seed(3)
    expected = _nerfstudio_edges(spacing, nears, fars, 32, training)
    torch.manual_seed(3)
    edges = candidate_edges(nears, fars, 32, jitter=training, spacing=spacing)
    assert edges.shape == (50, 33)
    rtol = 3e-5 if spacing == "lin-disp" else 2e-6
    torch.testing.assert_close(edges, expected, rtol=rtol, atol=2e-6)
    assert bool((edges.diff(dim=-1) >= 0).all())


def test_jittered_edges_stay_in_their_strata() -> None:
    nears, fars = torch.zeros(2000, 1), torch.full((2000, 1), 8.0)
    torch.manual_seed(4)
    edges = candidate_edges(nears, fars, 8, jitter=True, spacing="uniform")
    unjittered = torch.arange(9.0)
    low = torch.clamp(unjittered - 0.5, min=0.0)
    high = torch.clamp(unjittered + 0.5, max=8.0)
    assert bool(((edges >= low) & (edges <= high)).all())
    # the draw covers each stratum: its edges' mean is the stratum's middle
    torch.testing.assert_close(edges.mean(dim=0), (low + high) / 2, atol=0.03, rtol=0)
    assert not torch.equal(edges[0], edges[1])


def test_bad_arguments_are_refused() -> None:
    nears, fars = _planes(3, unbounded=False)
    with pytest.raises(ValueError, match="num_samples must be at least 1"):
        candidate_edges(nears, fars, 0, jitter=False, spacing="uniform")
    with pytest.raises(ValueError, match="spacing must be"):
        candidate_edges(nears, fars, 4, jitter=False, spacing="log")  # type: ignore[arg-type]
