"""Volume rendering over packed samples: the samples of many rays one after another, ray by ray.

As in nerfacc and nerfstudio's instant-ngp model, a batch holds only the samples that matter, each
with the index of its ray, instead of a ``[rays, samples]`` tensor: a sampler proposes candidates,
empty space is dropped (:func:`pack`), a density pass without gradients finds where each ray's
transmittance falls below ``early_stop_eps`` (:func:`visible`, which can also skip samples below an opacity
threshold), and only the samples kept are evaluated and composited (:func:`render_weights`, :func:`accumulate`).
Without skipping they are a prefix of each ray, so the transmittance of the first pass is theirs too: without
gradients it is not recomputed. On CUDA :mod:`vqad_nerfstudio.kernels.compositing` does the same per ray in one
kernel each; these functions are its reference and the CPU path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor


@dataclass
class PackedSamples:
    """Samples of ``num_rays`` rays, sorted by ray."""

    candidate_ids: Int[Tensor, "n"]
    """Flat index of each sample in the candidates' ``[rays * candidates_per_ray]`` layout."""
    ray_indices: Int[Tensor, "n"]
    """The ray each sample belongs to (non-decreasing)."""
    starts: Float[Tensor, "n"]
    """Distance along the ray where the sample's interval starts."""
    ends: Float[Tensor, "n"]
    """Distance along the ray where it ends."""
    num_rays: int

    @property
    def deltas(self) -> Float[Tensor, "n"]:
        return self.ends - self.starts

    def __getitem__(self, index: Int[Tensor, "m"]) -> "PackedSamples":
        """The samples at ``index`` (increasing, to keep them sorted by ray)."""
        return PackedSamples(
            self.candidate_ids[index], self.ray_indices[index], self.starts[index], self.ends[index], self.num_rays
        )


def pack(starts: Float[Tensor, "r s"], ends: Float[Tensor, "r s"], keep: Bool[Tensor, "r s"]) -> PackedSamples:
    """The candidates (intervals ``starts..ends`` of each ray) where ``keep`` is true, packed ray by ray."""
    candidate_ids = torch.nonzero(keep.reshape(-1)).squeeze(-1)
    rays = torch.div(candidate_ids, keep.shape[1], rounding_mode="floor")
    columns = torch.remainder(candidate_ids, keep.shape[1])  # indexing the rows copies no strided view of edges
    return PackedSamples(candidate_ids, rays, starts[rays, columns], ends[rays, columns], keep.shape[0])


OPAQUE_OPTICAL_DEPTH = 1000.0
"""A sample's optical depth counts as at most this in the running sums: behind it the transmittance,
``exp(-1000)``, is 0 in float32 and float64 either way, and a batch's sum stays far inside float64's exact range.
Without the cap one sample of a diverging density (``exp`` of a large activation, ``1e22`` seen in training)
swamps the float64 running sum, and every ray after it in the batch got a transmittance of
``exp(±rounding error)``, up to ``1e14``."""


def transmittance(optical_depth: Float[Tensor, "n"], ray_indices: Int[Tensor, "n"]) -> Float[Tensor, "n"]:
    """Transmittance in front of each sample: ``exp(-sum of optical_depth over the ray's earlier samples)``.

    The running sum is taken over the whole batch in float64 (each sample capped at :data:`OPAQUE_OPTICAL_DEPTH`)
    and each ray's offset subtracted, so that a ray's value does not depend on how much optical depth the rays
    before it hold. Each ray's first sample is found by a binary search in the sorted ray indices: nothing waits
    for the GPU (a histogram of the rays would)."""
    capped = optical_depth.double().clamp(max=OPAQUE_OPTICAL_DEPTH)
    before = torch.cumsum(capped, dim=0) - capped  # exclusive running sum
    first = torch.searchsorted(ray_indices, ray_indices)  # index of each sample's ray's first sample
    return torch.exp(-(before - before.index_select(0, first))).to(optical_depth.dtype)


def opacity(optical_depth: Float[Tensor, "*n"]) -> Float[Tensor, "*n"]:
    """A sample's opacity (alpha), ``1 - exp(-sigma delta)``, from its optical depth ``sigma delta``."""
    return -torch.expm1(-optical_depth)


def visible(
    density: Float[Tensor, "n"], samples: PackedSamples, early_stop_eps: float, alpha_threshold: float = 0.0
) -> Tuple[Bool[Tensor, "n"], Float[Tensor, "n"]]:
    """Samples in front of the point where their ray's transmittance falls below ``early_stop_eps`` and, with
    ``alpha_threshold`` > 0, at least that opaque (nerfacc's ``alpha_thre``); and the transmittance in front of
    every sample (through all of them, skipped ones included)."""
    optical_depth = density * samples.deltas
    in_front = transmittance(optical_depth, samples.ray_indices)
    keep = in_front > early_stop_eps
    if alpha_threshold > 0:
        keep &= opacity(optical_depth) >= alpha_threshold
    return keep, in_front


def render_weights(
    density: Float[Tensor, "n"], samples: PackedSamples, in_front: Optional[Float[Tensor, "n"]] = None
) -> Float[Tensor, "n"]:
    """Volume-rendering weights ``T_i (1 - exp(-sigma_i delta_i))`` of the samples (differentiable in density).

    ``in_front``: the transmittance ``T_i`` if known (:func:`visible`'s, for samples that are a prefix of each of
    its rays); computed from ``density`` otherwise."""
    optical_depth = density * samples.deltas
    if in_front is None:
        in_front = transmittance(optical_depth, samples.ray_indices)
    return in_front * opacity(optical_depth)


def accumulate(
    values: Float[Tensor, "n c"], ray_indices: Int[Tensor, "n"], num_rays: int
) -> Float[Tensor, "num_rays c"]:
    """Per-ray sums of the samples' values."""
    return values.new_zeros(num_rays, values.shape[-1]).index_add_(0, ray_indices, values)


__all__ = ["PackedSamples", "pack", "transmittance", "opacity", "visible", "render_weights", "accumulate"]
