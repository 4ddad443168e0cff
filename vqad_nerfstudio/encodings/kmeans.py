"""Vector quantisation of float vertex features into a codebook: importance-weighted k-means (k-means++ seeding,
Lloyd iterations, dead-codeword revival)."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from jaxtyping import Float, Int
from torch import Tensor

from vqad_nerfstudio.progress import track

_CHUNK = 1 << 18
"""Points per chunk of a distance computation (bounds memory at chunk * clusters floats)."""


def _pairwise(points: Tensor, centroids: Tensor) -> Tensor:
    """Squared Euclidean distances, ``[n, c]``, clamped at 0 against rounding (one ``[n, c]`` tensor, updated in
    place)."""
    cross = torch.addmm(centroids.square().sum(dim=-1), points, centroids.t(), alpha=-2)
    return cross.add_(points.square().sum(dim=-1, keepdim=True)).clamp_min_(0)


def squared_distances(points: Float[Tensor, "n k"], centroids: Float[Tensor, "c k"]) -> Float[Tensor, "n c"]:
    """Squared Euclidean distance of every point to every centroid (computed in chunks of points, written into one
    ``[n, c]`` tensor: no second copy at the peak)."""
    out = points.new_empty(points.shape[0], centroids.shape[0])
    for rows, chunk in zip(out.split(_CHUNK), points.split(_CHUNK)):
        rows.copy_(_pairwise(chunk, centroids))
    return out


def _nearest(points: Tensor, centroids: Tensor) -> Tuple[Tensor, Tensor]:
    """Index of and squared distance to the nearest centroid, per point (never all distances at once)."""
    best = [_pairwise(chunk, centroids).min(dim=-1) for chunk in points.split(_CHUNK)]
    return torch.cat([b.indices for b in best]), torch.cat([b.values for b in best])


def _weighted_means(points: Tensor, weights: Tensor, assignment: Tensor, centroids: Tensor) -> Tuple[Tensor, Tensor]:
    """Importance-weighted mean of each cluster's points (the old centroid where a cluster is empty) and the
    number of points per cluster."""
    clusters = centroids.shape[0]
    sums = torch.zeros_like(centroids).index_add_(0, assignment, points * weights[:, None])
    mass = torch.zeros(clusters, device=points.device).index_add_(0, assignment, weights)
    counts = torch.bincount(assignment, minlength=clusters)
    return torch.where(counts[:, None] > 0, sums / mass.clamp_min(1e-30)[:, None], centroids), counts


def _check(points: Tensor, clusters: int, weights: Optional[Tensor]) -> Tensor:
    if points.dim() != 2 or points.shape[0] == 0:
        raise ValueError(f"k-means needs a non-empty [n, k] tensor, got shape {tuple(points.shape)}")
    if clusters < 1:
        raise ValueError(f"k-means needs at least one cluster, got {clusters}")
    if weights is None:
        return torch.ones(points.shape[0], device=points.device)
    if weights.shape != points.shape[:1] or not bool(torch.isfinite(weights).all()) or bool((weights <= 0).any()):
        raise ValueError(f"k-means weights must be {points.shape[0]} positive finite numbers, one per point")
    return weights.float()


def _seed_indices(
    points: Float[Tensor, "n k"], weights: Float[Tensor, "n"], clusters: int, generator: Optional[torch.Generator]
) -> Int[Tensor, "c"]:
    """k-means++ seeds: the first point uniformly, each next one with probability proportional to its weighted
    squared distance to the nearest seed so far (sampled on the points' device by inverting the cumulative
    distribution at uniforms drawn up front from ``generator``, so that seeding never waits for the device)."""
    uniforms = torch.rand(clusters, generator=generator, dtype=torch.float64)
    count = points.shape[0]
    seeds = torch.empty(clusters, dtype=torch.long, device=points.device)
    seeds[0] = min(int(uniforms[0] * count), count - 1)
    uniforms = uniforms.to(points.device)
    nearest_sq = squared_distances(points, points[seeds[:1]])[:, 0]
    for i in range(1, clusters):
        cumulative = (weights * nearest_sq).double().cumsum(0)
        # right=True never lands on a point of zero probability; when all are zero (every point already is a
        # seed) it runs past the end, clamped to the last point: a duplicate, harmless for a codebook
        pick = torch.searchsorted(cumulative, uniforms[i : i + 1] * cumulative[-1:], right=True).clamp_max_(count - 1)
        seeds[i : i + 1] = pick
        nearest_sq = torch.minimum(nearest_sq, squared_distances(points, points[pick])[:, 0])
    return seeds


@torch.no_grad()
def kmeans(
    points: Float[Tensor, "n k"],
    clusters: int,
    iterations: int = 25,
    generator: Optional[torch.Generator] = None,
    weights: Optional[Float[Tensor, "n"]] = None,
) -> Tuple[Float[Tensor, "c k"], Int[Tensor, "n"]]:
    """``clusters`` centroids of ``points`` minimising the ``weights``-weighted squared error (uniform weights by
    default), and each point's nearest centroid.

    Seeded by k-means++ (each next seed drawn with probability proportional to the weighted squared distance to
    the nearest seed so far), then ``iterations`` Lloyd steps with weighted means. A cluster that loses all its
    points is revived at the point of largest weighted error. With fewer distinct points than clusters the
    surplus centroids duplicate points (distances 0), which is harmless for a codebook.
    """
    weights = _check(points, clusters, weights)
    points = points.float()
    centroids = points[_seed_indices(points, weights, clusters, generator)]
    assignment, distance = _nearest(points, centroids)
    for _ in track(range(iterations), f"k-means: {points.shape[0]:,} points into {clusters} centroids"):
        centroids, counts = _weighted_means(points, weights, assignment, centroids)
        empty = torch.nonzero(counts == 0).squeeze(-1)
        if empty.numel():  # revive each at one of the points of largest weighted error, the worst first
            worst = (weights * distance).topk(min(empty.numel(), points.shape[0])).indices
            centroids[empty[: worst.numel()]] = points[worst]
        assignment, distance = _nearest(points, centroids)
    return centroids, assignment


MIN_RELATIVE_IMPORTANCE = 1e-3
"""Floor of a row's importance relative to the mean when quantising: rows no ray saw still pull the codebook a
little (and never make the weights zero, which k-means refuses)."""


@torch.no_grad()
def vector_quantize(
    features: Float[Tensor, "n k"],
    clusters: int,
    importance: Optional[Float[Tensor, "n"]] = None,
    iterations: int = 25,
    generator: Optional[torch.Generator] = None,
) -> Tuple[Float[Tensor, "c k"], Float[Tensor, "n c"]]:
    """A codebook of ``clusters`` codewords for ``features``, and each row's squared distance to each codeword in
    units of the mean weighted quantisation error (the argmin is the row's codeword).

    The codebook is the k-means of the rows weighted by ``importance`` (how much each row's error costs, e.g. the
    Fisher information of its features; uniform when None or all zero), as VQRF weights its voxels.
    """
    features = features.float()
    weights = torch.ones(features.shape[0], device=features.device)
    if importance is not None and features.shape[0] and bool(importance.sum() > 0):
        weights = (importance.float() / importance.float().mean()).clamp_min(MIN_RELATIVE_IMPORTANCE)
    centroids, assignment = kmeans(features, clusters, iterations, generator, weights)
    distances = squared_distances(features, centroids)
    unit = (weights * distances.gather(1, assignment[:, None])[:, 0]).mean().clamp_min(1e-12)
    return centroids, distances.div_(unit)


__all__ = ["MIN_RELATIVE_IMPORTANCE", "kmeans", "squared_distances", "vector_quantize"]
