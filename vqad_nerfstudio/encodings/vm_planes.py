"""TensoRF's vector-matrix encoding whose planes can come from elsewhere (decoded latents) and whose line factors
can train on the grid a file stores them on."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from jaxtyping import Float
from nerfstudio.field_components.encodings import TensorVMEncoding
from torch import Tensor

from vqad_nerfstudio.rounding import rounded_rows, straight_through

__all__ = ["DecodableVMEncoding"]


class DecodableVMEncoding(TensorVMEncoding):
    """nerfstudio's ``TensorVMEncoding`` (same parameters, same features) reading ``decoded_planes``
    instead of its own ``plane_coef`` while they are set, and its line factors rounded to ``line_bits`` bits while
    that is set."""

    decoded_planes: Optional[Float[Tensor, "3 num_components resolution resolution"]] = None
    line_bits: Optional[int] = None
    """None: the float line factors; 2..8: each line rounded to that many bits (:func:`rounded_rows` of
    :meth:`line_rows`, one scale per line), straight-through gradients to the float ones."""

    def line_rows(self) -> Float[Tensor, "lines resolution"]:
        """The line factors as a matrix of one row per line (orientation-major), a view of ``line_coef``."""
        return self.line_coef.view(-1, self.line_coef.shape[2])

    def lines(self) -> Float[Tensor, "3 num_components resolution 1"]:
        """The line factors the features use (see ``line_bits``)."""
        if self.line_bits is None:
            return self.line_coef
        return straight_through(self.line_coef, rounded_rows(self.line_rows(), self.line_bits).view_as(self.line_coef))

    def forward(self, in_tensor: Float[Tensor, "*bs 3"]) -> Float[Tensor, "*bs output_dim"]:
        planes = self.plane_coef if self.decoded_planes is None else self.decoded_planes
        plane_coord = torch.stack([in_tensor[..., [0, 1]], in_tensor[..., [0, 2]], in_tensor[..., [1, 2]]])
        line_coord = torch.stack([in_tensor[..., 2], in_tensor[..., 1], in_tensor[..., 0]])
        line_coord = torch.stack([torch.zeros_like(line_coord), line_coord], dim=-1)
        plane_coord = plane_coord.view(3, -1, 1, 2).detach()
        line_coord = line_coord.view(3, -1, 1, 2).detach()
        plane_features = F.grid_sample(planes, plane_coord, align_corners=True)
        line_features = F.grid_sample(self.lines(), line_coord, align_corners=True)
        features = (plane_features * line_features).view(3 * self.num_components, *in_tensor.shape[:-1])
        return torch.moveaxis(features, 0, -1)

    @torch.no_grad()
    def resize(self, resolution: int) -> None:
        """Plane and line parameters of side ``resolution`` (zeros), keeping parameter identity."""
        self.plane_coef.data = self.plane_coef.new_zeros(3, self.num_components, resolution, resolution)
        self.line_coef.data = self.line_coef.new_zeros(3, self.num_components, resolution, 1)
        self.resolution = resolution
