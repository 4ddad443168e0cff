"""TensoRF's vector-matrix encoding whose planes can come from elsewhere (decoded latents)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from jaxtyping import Float
from nerfstudio.field_components.encodings import TensorVMEncoding
from torch import Tensor

__all__ = ["DecodableVMEncoding"]


class DecodableVMEncoding(TensorVMEncoding):
    """nerfstudio's ``TensorVMEncoding`` (same parameters, same features) reading ``decoded_planes``
    instead of its own ``plane_coef`` while they are set."""

    decoded_planes: Optional[Float[Tensor, "3 num_components resolution resolution"]] = None

    def forward(self, in_tensor: Float[Tensor, "*bs 3"]) -> Float[Tensor, "*bs output_dim"]:
        planes = self.plane_coef if self.decoded_planes is None else self.decoded_planes
        plane_coord = torch.stack([in_tensor[..., [0, 1]], in_tensor[..., [0, 2]], in_tensor[..., [1, 2]]])
        line_coord = torch.stack([in_tensor[..., 2], in_tensor[..., 1], in_tensor[..., 0]])
        line_coord = torch.stack([torch.zeros_like(line_coord), line_coord], dim=-1)
        plane_coord = plane_coord.view(3, -1, 1, 2).detach()
        line_coord = line_coord.view(3, -1, 1, 2).detach()
        plane_features = F.grid_sample(planes, plane_coord, align_corners=True)
        line_features = F.grid_sample(self.line_coef, line_coord, align_corners=True)
        features = (plane_features * line_features).view(3 * self.num_components, *in_tensor.shape[:-1])
        return torch.moveaxis(features, 0, -1)

    @torch.no_grad()
    def resize(self, resolution: int) -> None:
        """Plane and line parameters of side ``resolution`` (zeros), keeping parameter identity."""
        self.plane_coef.data = self.plane_coef.new_zeros(3, self.num_components, resolution, resolution)
        self.line_coef.data = self.line_coef.new_zeros(3, self.num_components, resolution, 1)
        self.resolution = resolution
