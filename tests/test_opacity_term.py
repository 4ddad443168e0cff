"""The opacity term (``opacity_weight``): the evaluated samples' summed opacity per ray, on both render paths."""

from __future__ import annotations

import pytest
import torch
from nerfstudio.cameras.rays import RayBundle
from nerfstudio.data.scene_box import SceneBox

from vqad_nerfstudio.models.vqad import VQADModelConfig


def _rays(count: int = 32) -> RayBundle:
    generator = torch.Generator().manual_seed(0)
    origins = torch.tensor([0.0, 0.0, -3.0]).expand(count, 3).clone()
    directions = torch.nn.functional.normalize(
        torch.randn(count, 3, generator=generator) * 0.1 + torch.tensor([0, 0, 1.0]), dim=-1
    )
    return RayBundle(
        origins=origins,
        directions=directions,
        pixel_area=torch.full((count, 1), 1e-4),
        camera_indices=torch.zeros(count, 1, dtype=torch.long),
    )


@pytest.mark.parametrize("sampling", ["packed", "dense"])
@pytest.mark.parametrize("weight", [0.0, 0.5])
def test_opacity_term_is_added_when_weighted_and_reaches_the_density(sampling: str, weight: float) -> None:
    torch.manual_seed(0)
    config = VQADModelConfig(
        num_levels=2, base_resolution=4, dense_resolution=8, num_samples=32, sampling=sampling, opacity_weight=weight
    )
    model = config.setup(scene_box=SceneBox(aabb=torch.tensor([[-1.0] * 3, [1.0] * 3])), num_train_data=1)
    model.train()
    outputs = model(_rays())
    losses = model.get_loss_dict(outputs, {"image": torch.rand(32, 3)})
    assert ("opacity" in losses) == (weight > 0)
    if weight > 0:
        assert 0 < float(losses["opacity"]) < weight * config.num_samples
        losses["opacity"].backward()
        grads = [p.grad for p in model.field.density_mlp.parameters()]
        assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_negative_opacity_weight_is_refused() -> None:
    with pytest.raises(ValueError, match="opacity_weight"):
        VQADModelConfig(opacity_weight=-0.1)
