"""Volume rendering of packed samples on the GPU (Triton): each ray's transmittance, visibility and composite in one
pass, forward and backward.

:mod:`~vqad_nerfstudio.rendering.packed` is the reference: there a ray's transmittance is a running sum over the
whole batch in float64 (with each ray's offset subtracted), its weights, colour, opacity and depth are separate
PyTorch operations, and autograd records each of them: about 40 operations forward and 26 backward for one
training batch, each a kernel launch. Here one program per ray walks its samples in order (as nerfacc's CUDA
kernels do), in float32 within the ray:

- :func:`visible`: which samples are in front of the point where the ray's transmittance falls below
  ``early_stop_eps`` (and at least ``alpha_threshold`` opaque), and the transmittance in front of each.
- :func:`composite`: per ray the weighted sums of the samples' colours, of 1 (the opacity) and of their midpoint
  distances (the depth before normalisation), and the sample count; its backward pass gives the samples' density
  and colour gradients in one more pass, with nerfacc's identity: the gradient of a sample's density needs the
  weighted sum over the samples behind it, which is the ray's total (known from the forward outputs) minus the
  running sum so far.

A ray finds its samples by a binary search in the sorted ray indices, so no offsets are computed beforehand.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from vqad_nerfstudio.kernels import runs_on
from vqad_nerfstudio.kernels.binary_search import search_steps
from vqad_nerfstudio.rendering.packed import OPAQUE_OPTICAL_DEPTH, PackedSamples

try:
    import triton
    import triton.language as tl

    from vqad_nerfstudio.kernels.binary_search import lower_bound
except ImportError:  # CPU-only installs: the PyTorch path is used
    triton = None

SUMS = 6
"""Columns of :func:`composite`'s output: colour (3), opacity, depth numerator, sample count."""


def available(density: Tensor) -> bool:
    """Whether the kernels can composite samples on ``density``'s device (see :func:`runs_on`) with 32-bit sample
    offsets."""
    return runs_on(density) and density.shape[0] < 2**31


if triton is not None:
    OPAQUE = tl.constexpr(OPAQUE_OPTICAL_DEPTH)
    SUMS_ = tl.constexpr(SUMS)

    @triton.jit
    def _ray_samples(ray_indices, n, steps):
        """This program's ray and the range of its samples."""
        ray = tl.program_id(0).to(tl.int64)
        return ray, lower_bound(ray_indices, n, ray, steps), lower_bound(ray_indices, n, ray + 1, steps)

    @triton.jit
    def _block(density, starts, ends, index, mask):
        """Density, interval length and midpoint of the samples at ``index``, their optical depth capped at
        OPAQUE_OPTICAL_DEPTH (as the reference's running sum caps it) and uncapped."""
        sigma = tl.load(density + index, mask=mask, other=0.0)
        start = tl.load(starts + index, mask=mask, other=0.0)
        end = tl.load(ends + index, mask=mask, other=0.0)
        delta = end - start
        optical_depth = sigma * delta
        return delta, (start + end) * 0.5, tl.minimum(optical_depth, OPAQUE), optical_depth

    @triton.jit
    def _opacity(optical_depth):
        """``1 - exp(-x)``, to float32 precision for small x too (a Taylor polynomial below 1e-3, as expm1)."""
        x = optical_depth
        return tl.where(x < 1e-3, x * (1.0 - x * 0.5 * (1.0 - x * (1.0 / 3.0))), 1.0 - tl.exp(-x))

    @triton.jit
    def _visible(
        density, starts, ends, ray_indices, keep, in_front, n, early_stop_eps, alpha_threshold,
        steps, BLOCK: tl.constexpr,
    ):  # fmt: skip
        _ray, first, last = _ray_samples(ray_indices, n, steps)
        before = tl.zeros((), dtype=tl.float32)
        for offset in range(first, last, BLOCK):
            index = offset + tl.arange(0, BLOCK)
            mask = index < last
            _delta, _midpoint, capped, optical_depth = _block(density, starts, ends, index, mask)
            transmittance = tl.exp(-(before + tl.cumsum(capped, 0) - capped))
            shown = (transmittance > early_stop_eps) & (_opacity(optical_depth) >= alpha_threshold)
            tl.store(keep + index, shown.to(tl.int8), mask=mask)
            tl.store(in_front + index, transmittance, mask=mask)
            before += tl.sum(capped, 0)

    @triton.jit
    def _composite_forward(density, rgb, starts, ends, ray_indices, sums, n, steps, BLOCK: tl.constexpr):
        ray, first, last = _ray_samples(ray_indices, n, steps)
        before = tl.zeros((), dtype=tl.float32)
        red = tl.zeros((), dtype=tl.float32)
        green = tl.zeros((), dtype=tl.float32)
        blue = tl.zeros((), dtype=tl.float32)
        opacity = tl.zeros((), dtype=tl.float32)
        depth = tl.zeros((), dtype=tl.float32)
        for offset in range(first, last, BLOCK):
            index = offset + tl.arange(0, BLOCK)
            mask = index < last
            _delta, midpoint, capped, optical_depth = _block(density, starts, ends, index, mask)
            weight = tl.exp(-(before + tl.cumsum(capped, 0) - capped)) * _opacity(optical_depth)
            red += tl.sum(weight * tl.load(rgb + index * 3, mask=mask, other=0.0), 0)
            green += tl.sum(weight * tl.load(rgb + index * 3 + 1, mask=mask, other=0.0), 0)
            blue += tl.sum(weight * tl.load(rgb + index * 3 + 2, mask=mask, other=0.0), 0)
            opacity += tl.sum(weight, 0)
            depth += tl.sum(weight * midpoint, 0)
            before += tl.sum(capped, 0)
        row = sums + ray * SUMS_
        tl.store(row, red)
        tl.store(row + 1, green)
        tl.store(row + 2, blue)
        tl.store(row + 3, opacity)
        tl.store(row + 4, depth)
        tl.store(row + 5, (last - first).to(tl.float32))

    @triton.jit
    def _composite_backward(
        density, rgb, starts, ends, ray_indices, sums, grad_sums, grad_density, grad_rgb, n,
        steps, BLOCK: tl.constexpr,
    ):  # fmt: skip
        ray, first, last = _ray_samples(ray_indices, n, steps)
        row = ray * SUMS_
        grad_red = tl.load(grad_sums + row)
        grad_green = tl.load(grad_sums + row + 1)
        grad_blue = tl.load(grad_sums + row + 2)
        grad_opacity = tl.load(grad_sums + row + 3)
        grad_depth = tl.load(grad_sums + row + 4)
        # sum over the ray's samples of weight x (gradient . sample's values): the forward sums dotted with theirs
        total = (
            grad_red * tl.load(sums + row)
            + grad_green * tl.load(sums + row + 1)
            + grad_blue * tl.load(sums + row + 2)
            + grad_opacity * tl.load(sums + row + 3)
            + grad_depth * tl.load(sums + row + 4)
        )
        before = tl.zeros((), dtype=tl.float32)
        so_far = tl.zeros((), dtype=tl.float32)
        for offset in range(first, last, BLOCK):
            index = offset + tl.arange(0, BLOCK)
            mask = index < last
            delta, midpoint, capped, optical_depth = _block(density, starts, ends, index, mask)
            red = tl.load(rgb + index * 3, mask=mask, other=0.0)
            green = tl.load(rgb + index * 3 + 1, mask=mask, other=0.0)
            blue = tl.load(rgb + index * 3 + 2, mask=mask, other=0.0)
            in_front = tl.exp(-(before + tl.cumsum(capped, 0) - capped))
            weight = in_front * _opacity(optical_depth)
            # d(loss)/d(weight) of each sample, and the same summed over the samples behind it
            grad_weight = grad_red * red + grad_green * green + grad_blue * blue + grad_opacity + grad_depth * midpoint
            behind = total - (so_far + tl.cumsum(weight * grad_weight, 0))
            # d weight_i / d sigma_i = delta T_i exp(-x_i); d weight_j / d sigma_i = -delta weight_j (j > i)
            grad = delta * (in_front * tl.exp(-optical_depth) * grad_weight - behind)
            tl.store(grad_density + index, tl.where(optical_depth <= OPAQUE, grad, 0.0), mask=mask)
            tl.store(grad_rgb + index * 3, weight * grad_red, mask=mask)
            tl.store(grad_rgb + index * 3 + 1, weight * grad_green, mask=mask)
            tl.store(grad_rgb + index * 3 + 2, weight * grad_blue, mask=mask)
            before += tl.sum(capped, 0)
            so_far += tl.sum(weight * grad_weight, 0)


_BLOCK = 32


def _intervals(samples: PackedSamples) -> Tuple[Tensor, Tensor, Tensor]:
    """The samples as the kernels read them: contiguous float32 starts and ends, int64 ray indices."""
    starts, ends = samples.starts.contiguous().float(), samples.ends.contiguous().float()
    return starts, ends, samples.ray_indices.contiguous().long()


@torch.no_grad()
def visible(
    density: Float[Tensor, "n"], samples: PackedSamples, early_stop_eps: float, alpha_threshold: float = 0.0
) -> Tuple[Bool[Tensor, "n"], Float[Tensor, "n"]]:
    """:func:`vqad_nerfstudio.rendering.packed.visible` in one pass: the samples in front of the point where their
    ray's transmittance falls below ``early_stop_eps`` and at least ``alpha_threshold`` opaque, and the transmittance
    in front of every sample. Not differentiable."""
    n = density.shape[0]
    keep = torch.empty(n, dtype=torch.int8, device=density.device)
    in_front = torch.empty(n, dtype=torch.float32, device=density.device)
    if n and samples.num_rays:
        sigma = density.detach().contiguous().float()
        _visible[(samples.num_rays,)](
            sigma, *_intervals(samples), keep, in_front, n, float(early_stop_eps), float(alpha_threshold),
            search_steps(n), BLOCK=_BLOCK, num_warps=1,
        )  # fmt: skip
    return keep.view(torch.bool), in_front.to(density.dtype)


class _Composite(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx, density: Tensor, rgb: Tensor, starts: Tensor, ends: Tensor, ray_indices: Tensor, num_rays: int
    ) -> Tensor:
        n = density.shape[0]
        sums = torch.zeros(num_rays, SUMS, dtype=torch.float32, device=density.device)
        if n and num_rays:
            _composite_forward[(num_rays,)](
                density, rgb, starts, ends, ray_indices, sums, n, search_steps(n), BLOCK=_BLOCK, num_warps=1
            )
        ctx.save_for_backward(density, rgb, starts, ends, ray_indices, sums)
        ctx.set_materialize_grads(False)
        return sums

    @staticmethod
    def backward(ctx, grad_sums: Optional[Tensor]):  # type: ignore[override]
        if grad_sums is None or not any(ctx.needs_input_grad[:2]):
            return None, None, None, None, None, None
        density, rgb, starts, ends, ray_indices, sums = ctx.saved_tensors
        n, num_rays = density.shape[0], sums.shape[0]
        grad_density = torch.zeros_like(density)
        grad_rgb = torch.zeros_like(rgb)
        if n and num_rays:
            _composite_backward[(num_rays,)](
                density, rgb, starts, ends, ray_indices, sums, grad_sums.contiguous().float(), grad_density,
                grad_rgb, n, search_steps(n), BLOCK=_BLOCK, num_warps=1,
            )  # fmt: skip
        return grad_density, grad_rgb, None, None, None, None


def composite(
    density: Float[Tensor, "n"], rgb: Float[Tensor, "n 3"], samples: PackedSamples
) -> Float[Tensor, "num_rays 6"]:
    """Per ray, the sums over its samples of ``w * rgb`` (3 columns), ``w`` (its opacity) and ``w * midpoint``
    (its depth times its opacity), and its number of samples, where ``w`` are the volume-rendering weights of
    :func:`vqad_nerfstudio.rendering.packed.render_weights`. Differentiable in ``density`` and ``rgb`` (the count
    has no gradient)."""
    if rgb.shape != (density.shape[0], 3):
        raise ValueError(f"rgb must be [{density.shape[0]}, 3] for {density.shape[0]} densities, got {list(rgb.shape)}")
    sigma, colours = density.contiguous().float(), rgb.contiguous().float()
    return _Composite.apply(sigma, colours, *_intervals(samples), samples.num_rays)


__all__ = ["SUMS", "available", "visible", "composite"]
