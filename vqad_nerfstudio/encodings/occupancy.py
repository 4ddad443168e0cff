"""Occupancy estimated from the field itself: where the scene is, learned from images alone.

A dense grid over the unit cube keeps, per voxel, a running maximum of the field's density at
random points inside it (decayed over time, as in Instant-NGP's occupancy grid; the threshold
starts at the mean density, as in nerfacc, so that training can begin from a uniform field). Thresholded, it
tells the sampler which space it can skip while training. No depth maps or point clouds are needed.
"""

from __future__ import annotations

from typing import Callable

import torch
from jaxtyping import Bool, Float
from torch import Tensor, nn

from vqad_nerfstudio.encodings.sparse_grid import coords_of, in_unit_cube, voxel_ids

DensityFn = Callable[[Float[Tensor, "n 3"]], Float[Tensor, "n"]]
"""Density (in world units) at points given in unit-cube coordinates."""

UNKNOWN = -1.0


class OccupancyEstimator(nn.Module):
    """Decayed running maximum of density per voxel of a ``resolution**3`` grid."""

    density: Tensor
    binary: Tensor

    def __init__(
        self, resolution: int, density_threshold: float, decay: float = 0.95, samples_per_update: int = 2**18
    ) -> None:
        super().__init__()
        self.resolution = resolution
        self.density_threshold = density_threshold
        self.decay = decay
        self.samples_per_update = samples_per_update
        # Not saved: it is training bookkeeping; a loaded model starts from "unknown" (occupied).
        self.register_buffer("density", torch.full((resolution**3,), UNKNOWN), persistent=False)
        self.register_buffer("binary", torch.ones(resolution**3, dtype=torch.bool), persistent=False)

    @torch.no_grad()
    def update(self, density_fn: DensityFn) -> None:
        """Evaluate the field at a random point of voxels not yet known to be empty.

        The first call evaluates every voxel (in batches); later calls a random subset.
        """
        candidates = torch.nonzero(self.density != 0).squeeze(-1)
        if candidates.numel() == 0:
            return
        if not bool((self.density == UNKNOWN).any()) and candidates.numel() > self.samples_per_update:
            pick = torch.randint(0, candidates.numel(), (self.samples_per_update,), device=candidates.device)
            candidates = torch.unique(candidates[pick])
        for batch in torch.split(candidates, self.samples_per_update):
            points = coords_of(batch, self.resolution) + torch.rand(batch.numel(), 3, device=batch.device)
            new = density_fn(points / self.resolution).float()
            old = self.density[batch]
            self.density[batch] = torch.where(old == UNKNOWN, new, torch.maximum(old * self.decay, new))
        self.binary = (self.density == UNKNOWN) | (self.density > self.threshold())

    def threshold(self) -> float:
        """The density threshold, lowered to the mean known density while the field is still uniform."""
        known = self.density[self.density > 0]
        if known.numel() == 0:
            return self.density_threshold
        return min(self.density_threshold, float(known.mean()))

    def occupied(self) -> Bool[Tensor, "r r r"]:
        """Voxels whose density may exceed the threshold (unknown voxels count as occupied)."""
        return self.binary.reshape(self.resolution, self.resolution, self.resolution)

    def occupied_at(self, unit_positions: Float[Tensor, "n 3"]) -> Bool[Tensor, "n"]:
        """Occupancy of the voxel holding each point (points outside the cube are empty)."""
        return in_unit_cube(unit_positions) & self.binary[voxel_ids(unit_positions, self.resolution)]
