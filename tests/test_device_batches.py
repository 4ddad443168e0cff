"""Training batches drawn on the device: the same rays and pixels as nerfstudio's sampler and ray generator."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from nerfstudio.cameras.cameras import Cameras, CameraType
from nerfstudio.data.dataparsers.nerfstudio_dataparser import NerfstudioDataParserConfig
from nerfstudio.model_components.ray_generators import RayGenerator

from vqad_nerfstudio.data.device_batches import (
    DeviceDataManagerConfig,
    has_lens_distortion,
    perspective_rays,
    unsupported_cameras,
)
from vqad_nerfstudio.demo.scene import DemoSceneConfig, write_demo_scene


def _cameras(num: int = 4, **kwargs) -> Cameras:
    generator = torch.Generator().manual_seed(0)
    rotation, _ = torch.linalg.qr(torch.randn(num, 3, 3, generator=generator))
    c2w = torch.cat([rotation, torch.randn(num, 3, 1, generator=generator)], dim=-1)
    return Cameras(
        camera_to_worlds=c2w,
        fx=300.0 + 50 * torch.rand(num, 1, generator=generator, dtype=torch.float64),  # as the Blender parser's
        fy=280.0 + 50 * torch.rand(num, 1, generator=generator),
        cx=40.0 + torch.rand(num, 1, generator=generator),
        cy=30.0 + torch.rand(num, 1, generator=generator),
        width=80,
        height=60,
        **kwargs,
    )


def _assert_same_rays(ours, theirs) -> None:
    for name in ("origins", "directions", "pixel_area"):  # assert_close also compares the dtypes
        torch.testing.assert_close(getattr(ours, name), getattr(theirs, name), rtol=1e-5, atol=1e-6)
    assert torch.equal(ours.camera_indices, theirs.camera_indices)
    torch.testing.assert_close(ours.metadata["directions_norm"], theirs.metadata["directions_norm"])


DISTORTIONS = {
    "none": None,
    "zero": torch.zeros(4, 6),
    "opencv": torch.tensor([[-0.1, 0.02, 0.0, 0.0, 0.001, -0.002]]).expand(4, 6),  # k1 k2 k3 k4 p1 p2
    "one camera": torch.cat([torch.zeros(3, 6), torch.tensor([[0.2, 0.0, 0.0, 0.0, 0.0, 0.0]])]),
}


@pytest.mark.parametrize("distortion", DISTORTIONS)
def test_perspective_rays_are_nerfstudios_rays(distortion):
    cameras = _cameras(distortion_params=DISTORTIONS[distortion])
    generator = torch.Generator().manual_seed(1)
    indices = torch.stack([torch.randint(0, high, (500,), generator=generator) for high in (4, 60, 80)], dim=-1)
    theirs = RayGenerator(cameras)(indices)
    lens_distortion = has_lens_distortion(cameras)
    assert lens_distortion == (distortion in ("opencv", "one camera"))
    ours = perspective_rays(cameras, indices[:, 0], indices[:, 1], indices[:, 2], lens_distortion)
    _assert_same_rays(ours, theirs)


def test_perspective_rays_of_an_empty_batch():
    empty = torch.zeros(0, dtype=torch.long)
    rays = perspective_rays(_cameras(), empty, empty, empty)
    assert rays.origins.shape == rays.directions.shape == (0, 3)


@pytest.mark.parametrize(
    "kwargs, reason",
    [
        ({}, None),
        ({"distortion_params": DISTORTIONS["opencv"]}, None),
        ({"camera_type": CameraType.FISHEYE}, "not perspective"),
        ({"times": torch.zeros(4, 1)}, "times"),
    ],
)
def test_only_perspective_cameras_take_the_device_path(kwargs, reason):
    problem = unsupported_cameras(_cameras(**kwargs))
    assert problem is None if reason is None else reason in problem


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> Path:
    config = DemoSceneConfig(resolution=24, num_train=3, num_eval=1, supersample=1)
    return write_demo_scene(tmp_path_factory.mktemp("scene") / "demo", config, show_progress=False)


def _datamanager(scene: Path, **kwargs):
    config = DeviceDataManagerConfig(
        dataparser=NerfstudioDataParserConfig(), data=scene, train_num_rays_per_batch=256, **kwargs
    )
    return config.setup(device="cpu", test_mode="val", world_size=1, local_rank=0)


def test_device_batches_are_pixels_and_rays_of_the_images(scene):
    datamanager = _datamanager(scene)
    torch.manual_seed(0)
    rays, batch = datamanager.next_train(0)
    assert datamanager._device_images is not None  # the scene takes the device path
    images = torch.stack([datamanager.train_dataset[i]["image"] for i in range(len(datamanager.train_dataset))])
    camera, row, column = batch["indices"].unbind(-1)
    assert batch["image"].shape == (256, images.shape[-1])
    assert torch.equal(batch["image"], images[camera, row, column])  # image ids are camera ids in one dataset
    assert len(set(camera.tolist())) > 1 and row.max() > row.min()  # pixels drawn across images and rows
    _assert_same_rays(rays, datamanager.train_ray_generator(batch["indices"]))
    assert datamanager.train_count == 1


def test_device_batches_can_be_turned_off(scene):
    datamanager = _datamanager(scene, device_batches=False)
    rays, batch = datamanager.next_train(0)
    assert datamanager._device_images is None
    assert rays.shape == (256,) and batch["image"].shape[0] == 256


@pytest.mark.parametrize(
    "change, reason",
    [
        ({"train_num_images_to_sample_from": 2}, "subset of the images"),
        ({"patch_size": 4}, "patches"),
    ],
)
def test_scenes_the_device_path_does_not_cover_take_nerfstudios_path(scene, change, reason):
    datamanager = _datamanager(scene, **change)
    image_batch = next(datamanager.iter_train_image_dataloader)
    assert reason in datamanager._why_not_on_device(image_batch)
    masked = dict(image_batch, mask=torch.ones_like(image_batch["image"][..., :1]))
    assert "mask" in _datamanager(scene)._why_not_on_device(masked)
    rays, batch = datamanager.next_train(0)  # nerfstudio's sampler and ray generator
    assert datamanager._device_images is None and rays.shape[0] == batch["image"].shape[0]


def test_device_batches_follow_the_samplers_batch_size(scene):
    datamanager = _datamanager(scene)
    datamanager.train_pixel_sampler.set_num_rays_per_batch(100)  # as a model changing its batch size would
    rays, batch = datamanager.next_train(0)
    assert datamanager._device_images is not None and rays.shape == (100,) and batch["image"].shape[0] == 100
