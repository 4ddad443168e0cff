"""Vector quantisation of float vertex features into a codebook: importance-weighted k-means (k-means++ seeding,
Lloyd iterations, dead-codeword revival) and entropy-constrained refinement of its assignment (ECVQ)."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from jaxtyping import Float, Int
from torch import Tensor

from vqad_nerfstudio.progress import track

_CHUNK = 1 << 18
"""Points per chunk of a distance computation (bounds memory at chunk * clusters floats)."""

MAX_CODE_BITS = 32.0
"""Code length given to a codeword no point uses (finite, so that costs and logits stay finite)."""


def _pairwise(points: Tensor, centroids: Tensor) -> Tensor:
    """Squared Euclidean distances, ``[n, c]``, clamped at 0 against rounding."""
    return (
        points.square().sum(dim=-1, keepdim=True) - 2 * points @ centroids.t() + centroids.square().sum(dim=-1)
    ).clamp_min(0)


def squared_distances(points: Float[Tensor, "n k"], centroids: Float[Tensor, "c k"]) -> Float[Tensor, "n c"]:
    """Squared Euclidean distance of every point to every centroid (computed in chunks of points)."""
    return torch.cat([_pairwise(chunk, centroids) for chunk in points.split(_CHUNK)])


def _cheapest(
    points: Tensor, centroids: Tensor, weights: Tensor, code_bits: Optional[Tensor], rate: float
) -> Tuple[Tensor, Tensor]:
    """Per point, the centroid of least cost ``weight * distance + rate * code_bits`` and the squared distance to it
    (in chunks, never all distances at once)."""
    chosen, distance = [], []
    for chunk, chunk_weights in zip(points.split(_CHUNK), weights.split(_CHUNK)):
        squared = _pairwise(chunk, centroids)
        cost = squared if code_bits is None else chunk_weights[:, None] * squared + rate * code_bits
        best = cost.argmin(dim=-1)
        chosen.append(best)
        distance.append(squared.gather(1, best[:, None])[:, 0])
    return torch.cat(chosen), torch.cat(distance)


def code_lengths(assignment: Int[Tensor, "n"], clusters: int) -> Float[Tensor, "c"]:
    """Bits an order-0 entropy coder spends on each codeword, ``-log2(share of the points assigned to it)``
    (:data:`MAX_CODE_BITS` for unused codewords)."""
    counts = torch.bincount(assignment, minlength=clusters).float()
    return (-torch.log2(counts / assignment.numel())).clamp_max(MAX_CODE_BITS)


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
    first = torch.randint(points.shape[0], (1,), generator=generator, device="cpu").item()
    centroids = points[first : first + 1]
    nearest_sq = squared_distances(points, centroids)[:, 0]
    for _ in range(clusters - 1):
        seeding = weights * nearest_sq
        total = seeding.sum()
        if total <= 0:  # every point already is a seed
            pick = torch.randint(points.shape[0], (1,), generator=generator, device="cpu").to(points.device)
        else:
            pick = torch.multinomial((seeding / total).cpu(), 1, generator=generator).to(points.device)
        centroids = torch.cat([centroids, points[pick]])
        nearest_sq = torch.minimum(nearest_sq, squared_distances(points, points[pick])[:, 0])

    assignment, distance = _cheapest(points, centroids, weights, None, 0.0)
    for _ in track(range(iterations), f"k-means: {points.shape[0]:,} points into {clusters} centroids"):
        centroids, counts = _weighted_means(points, weights, assignment, centroids)
        error = weights * distance
        for empty in torch.nonzero(counts == 0).squeeze(-1).tolist():
            worst = int(error.argmax())
            centroids[empty] = points[worst]
            error[worst] = 0
        assignment, distance = _cheapest(points, centroids, weights, None, 0.0)
    return centroids, assignment


@torch.no_grad()
def entropy_constrained(
    points: Float[Tensor, "n k"],
    centroids: Float[Tensor, "c k"],
    weights: Float[Tensor, "n"],
    rate: float,
    iterations: int = 10,
) -> Tuple[Float[Tensor, "c k"], Int[Tensor, "n"], Float[Tensor, "c"]]:
    """Entropy-constrained vector quantisation (Chou, Lookabaugh and Gray 1989), started from ``centroids``.

    Alternates: codewords move to the weighted means of their points and take code lengths in bits from their
    shares of the points, then each point takes the codeword of least ``weight * squared distance + rate * code
    length``. ``rate`` is the weighted squared error one bit is worth: the larger, the fewer codewords carry most
    points and the fewer bits an entropy coder spends on the indices. Codewords that lose all their points stay
    unused (:data:`MAX_CODE_BITS`). Returns the centroids, the assignment and the code lengths; the assignment is
    the least-cost choice under exactly these centroids and code lengths.
    """
    weights = _check(points, centroids.shape[0], weights)
    if rate < 0:
        raise ValueError(f"the rate of entropy-constrained quantisation must be >= 0, got {rate}")
    points, clusters = points.float(), centroids.shape[0]
    assignment, _ = _cheapest(points, centroids, weights, None, 0.0)
    bits = code_lengths(assignment, clusters)
    for _ in track(range(iterations), f"entropy-constrained quantisation of {points.shape[0]:,} points"):
        centroids, _ = _weighted_means(points, weights, assignment, centroids)
        bits = code_lengths(assignment, clusters)
        assignment, _ = _cheapest(points, centroids, weights, bits, rate)
    return centroids, assignment, bits


MIN_RELATIVE_IMPORTANCE = 1e-3
"""Floor of a row's importance relative to the mean when quantising (rows no ray saw still get a codeword that is
near, among those of similar cost)."""


@torch.no_grad()
def vector_quantize(
    features: Float[Tensor, "n k"],
    clusters: int,
    importance: Optional[Float[Tensor, "n"]] = None,
    rate: float = 0.0,
    iterations: int = 25,
    generator: Optional[torch.Generator] = None,
) -> Tuple[Float[Tensor, "c k"], Float[Tensor, "n c"]]:
    """A codebook of ``clusters`` codewords for ``features`` and each row's cost of each codeword.

    The codebook is the k-means of the rows weighted by ``importance`` (how much each row's error costs, e.g. the
    Fisher information of its features; uniform when None or all zero). With ``rate > 0`` the assignment is then
    refined by entropy-constrained quantisation (:func:`entropy_constrained`), each bit of a row's index worth
    ``rate`` times the mean weighted quantisation error: rows that matter little share a few frequent codewords,
    which an entropy coder stores in few bits. A row's cost of a codeword is its squared distance plus the rate
    term over its importance, in units of that mean error: the argmin is the row's codeword.
    """
    features = features.float()
    weights = torch.ones(features.shape[0], device=features.device)
    if importance is not None and features.shape[0] and bool(importance.sum() > 0):
        weights = (importance.float() / importance.float().mean()).clamp_min(MIN_RELATIVE_IMPORTANCE)
    centroids, assignment = kmeans(features, clusters, iterations, generator, weights)
    costs = squared_distances(features, centroids)
    unit = (weights * costs.gather(1, assignment[:, None])[:, 0]).mean().clamp_min(1e-12)
    if rate > 0:
        centroids, _, bits = entropy_constrained(features, centroids, weights, rate * float(unit))
        costs = squared_distances(features, centroids) + rate * float(unit) * bits / weights[:, None]
    return centroids, costs / unit


__all__ = [
    "MAX_CODE_BITS",
    "MIN_RELATIVE_IMPORTANCE",
    "code_lengths",
    "entropy_constrained",
    "kmeans",
    "squared_distances",
    "vector_quantize",
]
