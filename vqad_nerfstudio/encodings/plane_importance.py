"""Importance-weighted plane distortion (Pham & Mandt 2024, section 3.2, eqs. 4, 5 and 9).

Plane positions that rendering uses matter; the others may be reconstructed poorly. Importance is
the rendering weight T_k * alpha_k of each sample splatted bilinearly onto the planes, log-transformed
and normalised to [0, 1]; the distortion is the squared plane error weighted by it.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

__all__ = ["splat_importance", "importance_weights", "weighted_plane_error"]


def splat_importance(
    coordinates: Float[Tensor, "planes n 2"], weights: Float[Tensor, " n"], resolution: int
) -> Float[Tensor, "planes res res"]:
    """Eq. 4 of the paper: each sample's weight distributed bilinearly onto the plane cells around it.

    ``coordinates`` are in [-1, 1] with ``grid_sample``'s ``align_corners=True`` convention (x indexes
    columns, y rows), as TensoRF's planes are read.
    """
    planes = coordinates.shape[0]
    position = (coordinates.clamp(-1, 1) + 1) / 2 * (resolution - 1)
    low = position.floor().clamp(0, resolution - 2 if resolution > 1 else 0)
    frac = position - low
    low = low.long()
    importance = torch.zeros(planes, resolution * resolution, device=coordinates.device, dtype=weights.dtype)
    for dx in (0, 1):
        for dy in (0, 1):
            wx = frac[..., 0] if dx else 1 - frac[..., 0]
            wy = frac[..., 1] if dy else 1 - frac[..., 1]
            column = (low[..., 0] + dx).clamp(max=resolution - 1)
            row = (low[..., 1] + dy).clamp(max=resolution - 1)
            importance.scatter_add_(1, row * resolution + column, wx * wy * weights[None])
    return importance.reshape(planes, resolution, resolution)


def importance_weights(
    importance: Float[Tensor, "planes res res"], eps: float = 0.01
) -> Float[Tensor, "planes res res"]:
    """Eq. 5: ``log(importance + eps)`` normalised to [0, 1] per plane."""
    logs = torch.log(importance + eps)
    low = logs.flatten(1).min(1).values[:, None, None]
    high = logs.flatten(1).max(1).values[:, None, None]
    return (logs - low) / (high - low).clamp_min(1e-12)


def weighted_plane_error(
    planes: Float[Tensor, "planes c res res"],
    target: Float[Tensor, "planes c res res"],
    weights: Float[Tensor, "planes res res"],
) -> Float[Tensor, ""]:
    """Eq. 9's distortion term: squared error weighted per plane position, summed over all values."""
    return ((planes - target) * weights[:, None]).square().sum()
