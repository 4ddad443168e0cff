"""Parameters on the grid a file stores them on: per-row symmetric quantisation, trained straight-through.

One rule for every quantised parameter a file holds (decoder weights, codebooks): a ``bits``-bit matrix keeps one
fp16 scale per row, ``scale = fp16(max |row| / q)`` with ``q = 2**(bits - 1) - 1``, and integers
``v = clamp(round(w / scale), -q, q)``; it decodes to ``v * scale`` (docs/format.md, "Quantised parameters
payload"). Writers and training use the same functions, so a model trained through :func:`straight_through` renders
after decoding exactly as it did in training; rounding a rounded matrix again changes nothing.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from jaxtyping import Float, Int
from torch import Tensor

QUANTIZED_BITS = range(2, 9)
"""Bit widths of quantised parameters: a ``bits``-bit value is an integer in ``[-q, q]``, ``q = 2**(bits-1) - 1``."""


def check_weight_bits(name: str, bits: int) -> None:
    """``ValueError`` naming ``name`` unless ``bits`` is 16 (fp16) or a quantised width in 2..8."""
    if bits != 16 and bits not in QUANTIZED_BITS:
        raise ValueError(f"{name} must be 16 (fp16) or an integer in 2..8, got {bits!r}")


SMALLEST_FP16 = 2.0**-24
"""The smallest positive (subnormal) fp16: the scale of an all-zero row."""


def quantized_top(bits: int) -> int:
    """``q = 2**(bits - 1) - 1``, the largest level of a ``bits``-bit quantised value (``ValueError`` outside
    QUANTIZED_BITS)."""
    if bits not in QUANTIZED_BITS:
        raise ValueError(f"quantised parameters take 2..8 bits, got {bits!r}")
    return 2 ** (bits - 1) - 1


def _levels_and_scales(values: Float[Tensor, "..."], bits: int, dim: int) -> Tuple[Tensor, Tensor]:
    """The rule on slices along ``dim`` (rows: the last dim; columns: the one before): float64 integers ``v`` and
    float64 scales holding fp16 values, broadcastable against ``values``."""
    top = quantized_top(bits)
    values = values.detach().float()
    scale = (values.abs().amax(dim=dim, keepdim=True) / top).half().clamp_min(SMALLEST_FP16).double()
    return torch.round(values.double() / scale).clamp_(-top, top), scale


def quantize_rows(weight: Float[Tensor, "out *in"], bits: int) -> Tuple[Int[Tensor, "out n"], Tensor]:
    """The integers ``v`` (``[out, prod(in)]``, int64) and the fp16 row scales of ``weight`` at ``bits`` bits.

    ``scale = fp16(fp32(max |row| / q))`` (an all-zero row gets the smallest positive fp16 and stays zero),
    ``v = clamp(round(w / scale), -q, q)`` in float64, halves to even. Nothing waits for the device."""
    levels, scale = _levels_and_scales(weight.reshape(weight.shape[0], -1), bits, dim=-1)
    return levels.long(), scale[:, 0].half()


def dequantize_rows(levels: Int[Tensor, "out n"], scale: Tensor, shape: torch.Size) -> Float[Tensor, "out *in"]:
    """``v * scale`` in float32 (exact: at most 8 + 11 significant bits), in the weight's ``shape``."""
    return (levels.float() * scale.float()[:, None]).reshape(shape)


def rounded_rows(weight: Float[Tensor, "out *in"], bits: int) -> Float[Tensor, "out *in"]:
    """``weight`` as a file of ``bits`` bits per value stores it (:func:`quantize_rows`) and decodes it, float32."""
    levels, scale = _levels_and_scales(weight.reshape(weight.shape[0], -1), bits, dim=-1)
    return (levels * scale).float().reshape(weight.shape)


def rounded_columns(matrices: Float[Tensor, "*b rows cols"], bits: int) -> Float[Tensor, "*b rows cols"]:
    """Each matrix rounded with one scale per column: ``rounded_rows`` of its transpose, transposed back (float32,
    same layout), for a batch of matrices in one pass."""
    levels, scale = _levels_and_scales(matrices, bits, dim=-2)
    return (levels * scale).float()


class _StraightThrough(torch.autograd.Function):
    """``rounded`` forward, the gradient unchanged to ``parameter`` backward; no operation either way."""

    @staticmethod
    def forward(ctx, parameter: Tensor, rounded: Tensor) -> Tensor:  # type: ignore[override]
        return rounded.view_as(rounded)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tuple[Tensor, None]:  # type: ignore[override]
        return grad, None


def straight_through(parameter: Tensor, rounded: Tensor) -> Tensor:
    """``rounded`` in the forward pass; where gradients are recorded, they flow to ``parameter`` unchanged. A
    ``rounded`` that carries gradients already (a :func:`straight_through_group` output) is returned as it is."""
    if torch.is_grad_enabled() and parameter.requires_grad and not rounded.requires_grad:
        return _StraightThrough.apply(parameter, rounded)
    return rounded


class _StraightThroughGroup(torch.autograd.Function):
    """:class:`_StraightThrough` for several parameters as one autograd node (one Python call each way)."""

    @staticmethod
    def forward(ctx, count: int, *tensors: Tensor) -> Tuple[Tensor, ...]:  # type: ignore[override]
        ctx.set_materialize_grads(False)  # a rounded tensor no pass read gets None, not zeros
        return tuple(rounded.view_as(rounded) for rounded in tensors[count:])

    @staticmethod
    def backward(ctx, *grads: Optional[Tensor]) -> Tuple[Optional[Tensor], ...]:  # type: ignore[override]
        return (None, *grads, *(None for _ in grads))


def straight_through_group(parameters: Sequence[Tensor], rounded: Sequence[Tensor]) -> List[Tensor]:
    """:func:`straight_through` of each pair, as one autograd node where gradients are recorded: the host pays one
    node a step for all of a model's rounded weights, not one per weight and pass."""
    if len(parameters) != len(rounded):
        raise ValueError(f"{len(parameters)} parameters but {len(rounded)} rounded tensors")
    if parameters and torch.is_grad_enabled() and any(parameter.requires_grad for parameter in parameters):
        return list(_StraightThroughGroup.apply(len(parameters), *parameters, *rounded))
    return list(rounded)


__all__ = [
    "QUANTIZED_BITS",
    "SMALLEST_FP16",
    "check_weight_bits",
    "quantize_rows",
    "quantized_top",
    "dequantize_rows",
    "rounded_rows",
    "rounded_columns",
    "straight_through",
    "straight_through_group",
]
