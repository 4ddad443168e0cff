"""k-means (k-means++ seeding, Lloyd iterations) for turning float vertex features into a codebook."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from jaxtyping import Float, Int
from torch import Tensor

from vqad_nerfstudio.progress import track

_CHUNK = 1 << 18
"""Points per chunk of a distance computation (bounds memory at chunk * clusters floats)."""


def _pairwise(points: Tensor, centroids: Tensor) -> Tensor:
    """Squared Euclidean distances, ``[n, c]``, clamped at 0 against rounding."""
    return (
        points.square().sum(dim=-1, keepdim=True) - 2 * points @ centroids.t() + centroids.square().sum(dim=-1)
    ).clamp_min(0)


def squared_distances(points: Float[Tensor, "n k"], centroids: Float[Tensor, "c k"]) -> Float[Tensor, "n c"]:
    """Squared Euclidean distance of every point to every centroid (computed in chunks of points)."""
    return torch.cat([_pairwise(chunk, centroids) for chunk in points.split(_CHUNK)])


def _nearest(points: Tensor, centroids: Tensor) -> Tuple[Tensor, Tensor]:
    """Index of and squared distance to the nearest centroid, per point (never all distances at once)."""
    best = [_pairwise(chunk, centroids).min(dim=-1) for chunk in points.split(_CHUNK)]
    return torch.cat([b.indices for b in best]), torch.cat([b.values for b in best])


@torch.no_grad()
def kmeans(
    points: Float[Tensor, "n k"],
    clusters: int,
    iterations: int = 25,
    generator: Optional[torch.Generator] = None,
) -> Tuple[Float[Tensor, "c k"], Int[Tensor, "n"]]:
    """``clusters`` centroids of ``points`` and each point's nearest centroid.

    Seeded by k-means++ (each next seed drawn with probability proportional to the squared distance to
    the nearest seed so far), then ``iterations`` Lloyd steps. A cluster that loses all its points is
    re-seeded at the point farthest from its centroid. With fewer distinct points than clusters the
    surplus centroids duplicate points (distances 0), which is harmless for a codebook.
    """
    if points.dim() != 2 or points.shape[0] == 0:
        raise ValueError(f"k-means needs a non-empty [n, k] tensor, got shape {tuple(points.shape)}")
    if clusters < 1:
        raise ValueError(f"k-means needs at least one cluster, got {clusters}")
    points = points.float()
    first = torch.randint(points.shape[0], (1,), generator=generator, device="cpu").item()
    centroids = points[first : first + 1]
    nearest_sq = squared_distances(points, centroids)[:, 0]
    for _ in range(clusters - 1):
        total = nearest_sq.sum()
        if total <= 0:  # every point already is a seed
            pick = torch.randint(points.shape[0], (1,), generator=generator, device="cpu").to(points.device)
        else:
            pick = torch.multinomial((nearest_sq / total).cpu(), 1, generator=generator).to(points.device)
        centroids = torch.cat([centroids, points[pick]])
        nearest_sq = torch.minimum(nearest_sq, squared_distances(points, points[pick])[:, 0])

    assignment, distance = _nearest(points, centroids)
    for _ in track(range(iterations), f"k-means: {points.shape[0]:,} points into {clusters} centroids"):
        sums = torch.zeros_like(centroids).index_add_(0, assignment, points)
        counts = torch.zeros(clusters, device=points.device).index_add_(0, assignment, torch.ones_like(distance))
        centroids = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], centroids)
        for empty in torch.nonzero(counts == 0).squeeze(-1).tolist():
            farthest = int(distance.argmax())
            centroids[empty] = points[farthest]
            distance[farthest] = 0
        assignment, distance = _nearest(points, centroids)
    return centroids, assignment


__all__ = ["kmeans", "squared_distances"]
