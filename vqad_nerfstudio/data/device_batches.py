"""nerfstudio's VanillaDataManager, drawing training batches on the model's device.

nerfstudio samples training pixels on the CPU and makes their rays with its general camera model
(every camera type, distortion, stereo): some hundred small operations and several waits for the
GPU per step, a fifth of a fast training step. For what most scenes are (perspective cameras, with
or without OpenCV lens distortion, no per-camera times or metadata, no masks, every image cached),
:class:`DeviceDataManager` keeps the training images on the model's device, samples pixels there
exactly as nerfstudio's pixel sampler does, and makes the same rays (tested against nerfstudio's ray
generator) in a few tensor operations. Anything else, and evaluation batches, take nerfstudio's path unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple, Type

import torch
from jaxtyping import Float, Int
from nerfstudio.cameras.camera_utils import radial_and_tangential_undistort
from nerfstudio.cameras.cameras import Cameras, CameraType
from nerfstudio.cameras.rays import RayBundle
from nerfstudio.data.datamanagers.base_datamanager import VanillaDataManager, VanillaDataManagerConfig
from nerfstudio.utils.rich_utils import CONSOLE
from torch import Tensor

DEVICE_MEMORY_SHARE = 0.25
"""Training images stay on the CPU (nerfstudio's path) when they would take more than this share of the device."""


@dataclass
class DeviceDataManagerConfig(VanillaDataManagerConfig):
    """nerfstudio's VanillaDataManager config; training batches are drawn on the model's device where they can be."""

    _target: Type = field(default_factory=lambda: DeviceDataManager)
    device_batches: bool = True
    """Draw each step's pixels and make their rays on the model's device, the training images kept there (perspective
    cameras without masks, all images cached, at most a quarter of the device's memory); False, or
    any other scene: nerfstudio's pixel sampler and ray generator on the CPU (nerfstudio's images_on_gpu only moves
    the images)."""


def perspective_rays(
    cameras: Cameras,
    camera_indices: Int[Tensor, "n"],
    rows: Int[Tensor, "n"],
    columns: Int[Tensor, "n"],
    lens_distortion: bool = False,
) -> RayBundle:
    """The rays through the centres of pixels (``rows``, ``columns``) of perspective cameras: what nerfstudio's
    ``RayGenerator`` makes for them (directions, origins, pixel areas, camera indices and the directions' norms), in
    a few tensor operations. ``lens_distortion``: undistort with the cameras' OpenCV radial and tangential parameters
    (nerfstudio's own function; a camera whose parameters are zero keeps its coordinates exactly)."""
    pixels = torch.stack([columns, rows], dim=-1).float() + 0.5  # (x, y): nerfstudio's coordinates, pixel centres
    intrinsics = torch.cat([cameras.fx, cameras.fy, cameras.cx, cameras.cy], dim=-1)[camera_indices]
    focal, centre = intrinsics[:, :2], intrinsics[:, 2:]
    # the pixel and its neighbours one pixel right and one down (for the pixel area): offsets (0, 0), (1, 0), (0, 1)
    offsets = torch.eye(3, 2, dtype=pixels.dtype, device=pixels.device).roll(1, dims=0)
    coords = ((pixels - centre) + offsets[:, None, :]) / focal  # [3, n, 2]
    if lens_distortion:
        coords = radial_and_tangential_undistort(coords, cameras.distortion_params[camera_indices])
    # camera axes: x right, y up, looking down -z; float32 whatever the intrinsics' precision, as nerfstudio's
    coords = coords.float()
    directions = torch.stack([coords[..., 0], -coords[..., 1], torch.full_like(coords[..., 0], -1.0)], -1)  # [3, n, 3]
    c2w = cameras.camera_to_worlds[camera_indices]
    directions = torch.sum(directions[..., None, :] * c2w[..., :3, :3], dim=-1)
    norms = torch.linalg.vector_norm(directions, dim=-1, keepdim=True)
    directions = directions / norms
    spans = torch.sqrt(torch.sum((directions[0] - directions[1:]) ** 2, dim=-1))  # to the right and down neighbour
    return RayBundle(
        origins=c2w[..., :3, 3],
        directions=directions[0],
        pixel_area=(spans[0] * spans[1])[..., None],
        camera_indices=camera_indices[:, None],
        metadata={"directions_norm": norms[0].detach()},
    )


def unsupported_cameras(cameras: Cameras) -> Optional[str]:
    """Why :func:`perspective_rays` would not make ``cameras``' rays as nerfstudio does, or None when it would."""
    if cameras.ndim != 1:
        return "cameras in more than one batch dimension"
    if bool((cameras.camera_type != CameraType.PERSPECTIVE.value).any()):
        return "cameras that are not perspective"
    if cameras.times is not None or cameras.metadata:
        return "per-camera times or metadata"
    return None


def has_lens_distortion(cameras: Cameras) -> bool:
    """Whether any of ``cameras`` has nonzero distortion parameters (nerfstudio then undistorts every ray)."""
    return cameras.distortion_params is not None and bool((cameras.distortion_params != 0).any())


class DeviceDataManager(VanillaDataManager):
    """A VanillaDataManager whose training batches are drawn on the model's device where the scene allows it (see
    the module's docstring)."""

    config: DeviceDataManagerConfig
    _device_images: Optional[Tuple[Float[Tensor, "i h w c"], Int[Tensor, "i"], Int[Tensor, "3"]]] = None
    """The training images on the device, their image ids and (images, height, width); None: nerfstudio's path."""
    _device_checked = False
    _lens_distortion = False
    """Whether the training cameras have lens distortion (checked once, with the images)."""

    def _prepare_device_images(self, image_batch: Dict) -> None:
        """Move the cached training images to the device once, or say why the batches stay on nerfstudio's path."""
        self._device_checked = True
        reason = self._why_not_on_device(image_batch)
        if reason is not None:
            if self.config.device_batches:
                CONSOLE.print(f"Training pixels are sampled on the CPU: {reason}.", soft_wrap=True, markup=False)
            return
        images = image_batch["image"]
        shape = torch.tensor(images.shape[:3], device=self.device)
        self._device_images = (images.to(self.device), image_batch["image_idx"].to(self.device), shape)
        self._lens_distortion = has_lens_distortion(self.train_dataset.cameras)

    def _why_not_on_device(self, image_batch: Dict) -> Optional[str]:
        if not self.config.device_batches:
            return "device_batches is off"
        if self.config.train_num_images_to_sample_from != -1:
            return "only a subset of the images is cached at a time"
        if self.config.patch_size > 1:
            return "patches are sampled"
        images = image_batch.get("image")
        if not isinstance(images, Tensor) or images.dim() != 4:
            return "the images differ in size"
        if any(key not in ("image", "image_idx") for key in image_batch):
            return f"the images come with {sorted(set(image_batch) - {'image', 'image_idx'})}"
        cameras_problem = unsupported_cameras(self.train_dataset.cameras)
        if cameras_problem is not None:
            return cameras_problem
        device = torch.device(self.device)
        if device.type == "cuda":
            capacity = torch.cuda.get_device_properties(device).total_memory
            if images.numel() * images.element_size() > DEVICE_MEMORY_SHARE * capacity:
                return f"the images would take more than {DEVICE_MEMORY_SHARE:.0%} of the device's memory"
        return None

    def next_train(self, step: int) -> Tuple[RayBundle, Dict]:
        """A batch of training rays and their pixels, as nerfstudio's ``next_train`` draws them."""
        if not self._device_checked:
            self._prepare_device_images(next(self.iter_train_image_dataloader))
        if self._device_images is None:
            return super().next_train(step)
        self.train_count += 1
        images, image_ids, shape = self._device_images
        num_rays = self.train_pixel_sampler.num_rays_per_batch  # the batch size nerfstudio's sampler would draw
        # as nerfstudio's PixelSampler.sample_method: uniform image, row and column per ray
        indices = (torch.rand((num_rays, 3), device=images.device) * shape).long()
        image, rows, columns = indices.unbind(-1)
        pixels = images[image, rows, columns]
        cameras = image_ids[image]
        indices[:, 0] = cameras
        device_cameras = self.train_ray_generator.cameras
        rays = perspective_rays(device_cameras, cameras, rows, columns, self._lens_distortion)
        return rays, {"image": pixels, "indices": indices}


__all__ = [
    "DeviceDataManager",
    "DeviceDataManagerConfig",
    "has_lens_distortion",
    "perspective_rays",
    "unsupported_cameras",
]
