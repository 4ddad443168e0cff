"""The box collider against nerfstudio's AABBBoxCollider: the same near and far planes to the bit."""

from __future__ import annotations

import pytest
import torch
from nerfstudio.cameras.rays import RayBundle
from nerfstudio.data.scene_box import SceneBox
from nerfstudio.model_components.scene_colliders import AABBBoxCollider

from vqad_nerfstudio.rendering.box_collider import BoxCollider


def _rays(count: int = 500) -> RayBundle:
    """Rays from outside, inside and beside the box, some along an axis (zero direction components)."""
    generator = torch.Generator().manual_seed(0)
    origins = torch.randn(count, 3, generator=generator) * 3
    directions = torch.nn.functional.normalize(torch.randn(count, 3, generator=generator), dim=-1)
    directions[:20] = torch.tensor([0.0, 0.0, 1.0])
    directions[20:40] = torch.tensor([-1.0, 0.0, 0.0])
    return RayBundle(origins=origins, directions=directions, pixel_area=torch.ones(count, 1))


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("near_plane", [0.0, 0.5])
def test_planes_equal_nerfstudios_to_the_bit(training: bool, near_plane: float) -> None:
    box = SceneBox(aabb=torch.tensor([[-1.5, -1.0, -0.5], [1.5, 1.0, 2.0]]))
    ours, theirs = BoxCollider(box, near_plane).train(training), AABBBoxCollider(box, near_plane).train(training)
    got, expected = ours(_rays()), theirs(_rays())
    assert got.nears is not None and got.fars is not None and expected.nears is not None
    assert got.nears.shape == expected.nears.shape == (500, 1)
    assert torch.equal(got.nears, expected.nears) and torch.equal(got.fars, expected.fars)
    span = got.fars - got.nears
    assert (span > 0.1).any() and (span < 1e-3).any()  # rays that cross the box, and rays that miss it


def test_the_box_follows_the_model_and_stays_out_of_checkpoints() -> None:
    collider = BoxCollider(SceneBox(aabb=torch.tensor([[-1.0] * 3, [1.0] * 3])))
    assert collider.state_dict() == {}
    collider.to(torch.float64)
    assert collider.box.dtype == torch.float64
