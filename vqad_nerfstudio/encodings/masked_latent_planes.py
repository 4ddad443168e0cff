"""Feature planes coded as masked integer latents and a tiny decoder (Pham & Mandt 2024, sections 3.1, 3.3).

Each of the three planes P_i (C x R x R) is represented by a latent code Z_i (C_z x R/4 x R/4, zeros at
the start) and a binary mask M_i (R/4 x R/4, shared across channels). A decoder of two transposed
convolutions (kernel 3, stride 2) with a SELU between, shared by the three planes, reconstructs
P_i = D(round(Z_i) * M_i). The entropy model is a spike-and-slab: masked positions are zero and cost
nothing; the others follow a learned factorized prior per channel. Masks are learned with the
straight-through Gumbel-softmax estimator.

Training: the decoder sees straight-through rounded latents (hard values forward, identity backward);
the rate is the prior's code length of the latents plus uniform noise (Ballé et al. 2017), so both
sides of the rate-distortion trade-off get useful gradients. Evaluation: rounded latents and hard
masks (mask on where its logit is positive), exactly what a file stores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from vqad_nerfstudio.encodings.factorized_prior import FactorizedPrior

__all__ = ["DecodedPlanes", "MaskedLatentPlanes", "PlaneDecoder", "latent_resolution"]

UPSAMPLING = 4
"""Plane resolution / latent resolution (two stride-2 layers)."""


def latent_resolution(plane_resolution: int) -> int:
    """Side of the latent grid of a plane: a quarter of the plane's, rounded up."""
    return math.ceil(plane_resolution / UPSAMPLING)


class PlaneDecoder(nn.Sequential):
    """Two transposed convolutions (kernel 3, stride 2, padding 1, output padding 1): x4 upsampling, SELU between."""

    def __init__(self, latent_channels: int, hidden_channels: int, plane_channels: int) -> None:
        super().__init__(
            nn.ConvTranspose2d(latent_channels, hidden_channels, 3, stride=2, padding=1, output_padding=1),
            nn.SELU(),
            nn.ConvTranspose2d(hidden_channels, plane_channels, 3, stride=2, padding=1, output_padding=1),
        )


@dataclass
class DecodedPlanes:
    """Output of :class:`MaskedLatentPlanes`."""

    planes: Float[Tensor, "planes channels res res"]
    bits: Float[Tensor, ""]
    """Code length of the latents under the entropy model (training: with noise; evaluation: exact ideal)."""


def _straight_through_round(x: Tensor) -> Tensor:
    return x + (torch.round(x) - x).detach()


class MaskedLatentPlanes(nn.Module):
    """Latent codes, masks, shared decoder and factorized prior of a set of square feature planes.

    Args:
        num_planes: planes coded (three for TensoRF-VM).
        plane_channels: channels of each decoded plane.
        plane_resolution: side R of the decoded planes.
        latent_channels: C_z, channels of each latent code.
        decoder_channels: hidden channels of the decoder.
        mask_init_logit: initial logit of every mask position being on.
    """

    def __init__(
        self,
        num_planes: int,
        plane_channels: int,
        plane_resolution: int,
        latent_channels: int,
        decoder_channels: int,
        mask_init_logit: float = 2.0,
    ) -> None:
        super().__init__()
        self.num_planes, self.plane_channels, self.latent_channels = num_planes, plane_channels, latent_channels
        self.mask_init_logit = mask_init_logit
        self.latents = nn.Parameter(torch.zeros(0))
        self.mask_logits = nn.Parameter(torch.zeros(0))
        self.decoder = PlaneDecoder(latent_channels, decoder_channels, plane_channels)
        self.prior = FactorizedPrior(latent_channels)
        self.temperature = 1.0
        """Gumbel-softmax temperature of the masks' backward pass (training only)."""
        self.plane_resolution = 0
        self.reset(plane_resolution)

    def reset(self, plane_resolution: int) -> None:
        """Zero latents and fresh masks for planes of side ``plane_resolution`` (keeps parameter identity)."""
        if plane_resolution < 1:
            raise ValueError(f"plane_resolution must be >= 1, got {plane_resolution}")
        side = latent_resolution(plane_resolution)
        device = self.latents.device
        self.latents.data = torch.zeros(self.num_planes, self.latent_channels, side, side, device=device)
        self.mask_logits.data = torch.full((self.num_planes, side, side), self.mask_init_logit, device=device)
        self.plane_resolution = plane_resolution

    def masks(self) -> Float[Tensor, "planes side side"]:
        """Binary masks: straight-through Gumbel-softmax samples in training, ``logit > 0`` otherwise."""
        if not self.training:
            return (self.mask_logits > 0).to(self.mask_logits.dtype)
        # Two-class Gumbel-softmax on logits (l, 0): the difference of two Gumbel samples is logistic.
        uniform = torch.rand_like(self.mask_logits).clamp(1e-6, 1 - 1e-6)
        soft = torch.sigmoid((self.mask_logits + torch.log(uniform) - torch.log1p(-uniform)) / self.temperature)
        return soft + ((soft > 0.5).to(soft.dtype) - soft).detach()

    def hard_masks(self) -> Bool[Tensor, "planes side side"]:
        """The masks a file stores."""
        return self.mask_logits.detach() > 0

    def hard_latents(self) -> Int[Tensor, "planes channels side side"]:
        """The integer latents a file stores: rounded, zero where masked."""
        return torch.round(self.latents.detach()).to(torch.int64) * self.hard_masks()[:, None]

    @torch.no_grad()
    def load_hard(self, latents: Int[Tensor, "planes channels side side"], masks: Bool[Tensor, "planes side side"]):
        """Set latents and masks to decoded integer values (the evaluation forward then reproduces them)."""
        if latents.shape != self.latents.shape or masks.shape != self.mask_logits.shape:
            raise ValueError(
                f"expected latents {tuple(self.latents.shape)} and masks {tuple(self.mask_logits.shape)}, "
                f"got {tuple(latents.shape)} and {tuple(masks.shape)}"
            )
        self.latents.data = latents.to(self.latents)
        self.mask_logits.data = torch.where(masks, 1.0, -1.0).to(self.mask_logits)

    def decode(self, latents: Float[Tensor, "planes channels side side"]) -> Float[Tensor, "planes c res res"]:
        """Planes from (rounded, masked) latents, cropped to the plane resolution."""
        planes = self.decoder(latents)
        return planes[..., : self.plane_resolution, : self.plane_resolution]

    def forward(self) -> DecodedPlanes:
        masks = self.masks()
        if self.training:
            rounded = _straight_through_round(self.latents)
            noisy = self.latents + torch.empty_like(self.latents).uniform_(-0.5, 0.5)
        else:
            rounded = noisy = torch.round(self.latents)
        planes = self.decode(rounded * masks[:, None])
        channels_first = noisy.transpose(0, 1).reshape(self.latent_channels, -1)
        bits = self.prior.bits(channels_first).reshape(self.latent_channels, self.num_planes, -1).sum(0)
        return DecodedPlanes(planes, (bits * masks.reshape(self.num_planes, -1)).sum())

    def extra_repr(self) -> str:
        return (
            f"planes={self.num_planes}, plane_channels={self.plane_channels}, resolution={self.plane_resolution}, "
            f"latent_channels={self.latent_channels}, latent_side={latent_resolution(self.plane_resolution)}"
        )
