"""The spherical-harmonics kernel against nerfstudio's components, and the field's colour with and without it.

The kernel tests run where CUDA and Triton are present, or on the CPU under Triton's interpreter
(``TRITON_INTERPRET=1``); the others run everywhere."""

from __future__ import annotations

import pytest
import torch
from nerfstudio.utils.math import components_from_spherical_harmonics

from vqad_nerfstudio.kernels import spherical_harmonics

from kernel_device import DEVICE, needs_kernel


def _directions(count: int, seed: int = 0) -> torch.Tensor:
    """Unit directions, the six axis directions among them."""
    directions = torch.randn(count, 3, generator=torch.Generator().manual_seed(seed))
    directions[:6] = torch.tensor([[1.0, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]])
    return (directions / directions.norm(dim=-1, keepdim=True)).to(DEVICE)


@needs_kernel
@pytest.mark.parametrize("levels", [1, 2, 3, 4])
def test_the_kernel_computes_nerfstudios_components(levels):
    directions = _directions(1000)
    expected = components_from_spherical_harmonics(levels, directions)
    got = spherical_harmonics.spherical_harmonics(directions, levels)
    assert got.shape == (1000, levels**2) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-6)


@needs_kernel
def test_strided_directions_and_an_empty_batch():
    directions = _directions(301)
    strided = torch.cat([directions, directions], dim=1)[:, :3]  # rows 6 floats apart
    torch.testing.assert_close(
        spherical_harmonics.spherical_harmonics(strided, 4), components_from_spherical_harmonics(4, directions)
    )
    assert spherical_harmonics.spherical_harmonics(directions[:0], 4).shape == (0, 16)


@needs_kernel
def test_the_fields_colour_is_the_same_with_the_kernel():
    from nerfstudio.data.scene_box import SceneBox

    from vqad_nerfstudio.models.vqad import VQADModelConfig

    torch.manual_seed(0)
    config = VQADModelConfig(num_levels=2, base_resolution=4, dense_resolution=8, index_warmup_steps=0)
    model = config.setup(scene_box=SceneBox(aabb=torch.tensor([[-1.0] * 3, [1.0] * 3])), num_train_data=1)
    field = model.field.to(DEVICE)
    geo = torch.randn(500, field.geo_feat_dim, device=DEVICE)
    directions = _directions(500, seed=1)
    fused = field.rgb_at(geo, directions)
    field.grid.fused = False
    torch.testing.assert_close(fused, field.rgb_at(geo, directions), rtol=0, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize(
    "directions, levels",
    [
        (torch.zeros(4, 3, dtype=torch.float64), 4),
        (torch.zeros(4, 2), 4),
        (torch.zeros(4, 3), 5),
    ],
)
def test_inputs_the_kernel_does_not_take_are_refused(directions, levels):
    directions = directions.to(DEVICE)  # on a device the kernel runs on: refused for what they are
    assert spherical_harmonics.available(torch.zeros(4, 3, device=DEVICE), 4)
    assert not spherical_harmonics.available(directions, levels)
    with pytest.raises(ValueError, match="spherical-harmonics kernel"):
        spherical_harmonics.spherical_harmonics(directions, levels)
