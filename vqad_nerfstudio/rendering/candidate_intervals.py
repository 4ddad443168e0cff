"""Candidate intervals along rays: the edges of each ray's ``num_samples`` intervals between its near and far plane.

The edges are placed as nerfstudio's stratified samplers place them: uniformly in distance (``UniformSampler``) or,
for unbounded scenes, in its linear-then-disparity spacing (``UniformLinDispPiecewiseSampler``: the first half of
the candidates up to distance 1, the second half uniform in disparity beyond), each edge jittered in training within
its stratum (between the neighbouring bins' centres). nerfstudio's samplers build a ``RaySamples`` around them
(frustums, deltas, spacings: about fifteen operations per batch, each a launch on a GPU); the packed renderer needs
only the edges, which here take a random draw and two fused operations, and none at all without jitter beyond the
interpolation between the planes. Interval ``i`` of a ray runs from its edge ``i`` to edge ``i + 1``.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Literal, Tuple

import torch
from jaxtyping import Float
from torch import Tensor

Spacing = Literal["uniform", "lin-disp"]


@lru_cache(maxsize=16)
def _strata(num_samples: int, device: torch.device) -> Tuple[Tensor, Tensor, Tensor]:
    """The unjittered edges (``linspace(0, 1, num_samples + 1)``), and each edge's stratum: its lower end and width
    (from the previous bin's centre to the next one's, clipped to [0, 1]), all ``[1, num_samples + 1]``."""
    edges = torch.linspace(0.0, 1.0, num_samples + 1, device=device)[None]
    centres = (edges[:, 1:] + edges[:, :-1]) / 2.0
    lower = torch.cat([edges[:, :1], centres], dim=-1)
    upper = torch.cat([centres, edges[:, -1:]], dim=-1)
    return edges, lower, upper - lower


def _lin_disp(distance: Tensor) -> Tensor:
    """nerfstudio's linear-then-disparity spacing: ``x / 2`` below 1, ``1 - 1 / (2x)`` beyond."""
    return torch.where(distance < 1, distance / 2, 1 - 1 / (2 * distance))


def _lin_disp_inverse(spacing: Tensor) -> Tensor:
    return torch.where(spacing < 0.5, 2 * spacing, 1 / (2 - 2 * spacing))


def candidate_edges(
    nears: Float[Tensor, "r 1"], fars: Float[Tensor, "r 1"], num_samples: int, jitter: bool, spacing: Spacing
) -> Float[Tensor, "r e"]:
    """The ``num_samples + 1`` edges (``e``) of each ray's candidate intervals between ``nears`` and ``fars``,
    non-decreasing; ``jitter``: each edge drawn uniformly within its stratum (training)."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be at least 1, got {num_samples}")
    if spacing not in ("uniform", "lin-disp"):
        raise ValueError(f"spacing must be 'uniform' or 'lin-disp', got {spacing!r}")
    edges, lower, width = _strata(num_samples, nears.device)
    if jitter:
        draw = torch.rand(nears.shape[0], num_samples + 1, device=nears.device, dtype=lower.dtype)
        edges = torch.addcmul(lower, width, draw)
    if spacing == "lin-disp":
        return _lin_disp_inverse(torch.lerp(_lin_disp(nears), _lin_disp(fars), edges))
    return torch.lerp(nears, fars, edges)


__all__ = ["Spacing", "candidate_edges"]
