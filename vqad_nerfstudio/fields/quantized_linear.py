"""Decoder weights on the grid a file stores them on: per-row symmetric quantisation, trained straight-through.

A ``bits``-bit matrix keeps one fp16 scale per output row, ``scale = fp16(max |row| / q)`` with
``q = 2**(bits - 1) - 1``, and integers ``v = clamp(round(w / scale), -q, q)``; it decodes to ``v * scale``
(docs/format.md, "Quantised parameters payload"). :func:`quantize_rows` is that rule, for the writer and for
training alike, so a model trained through :class:`QuantizedLinear` renders after decoding exactly as it did in
training.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn
from torch.nn import functional as F

QUANTIZED_BITS = range(2, 9)
"""Bit widths of quantised weights: a ``bits``-bit weight is an integer in ``[-q, q]``, ``q = 2**(bits-1) - 1``."""

_SMALLEST_FP16 = 2.0**-24
"""The smallest positive (subnormal) fp16: the scale of an all-zero row."""


def quantize_rows(weight: Float[Tensor, "out *in"], bits: int) -> Tuple[Int[Tensor, "out n"], Tensor]:
    """The integers ``v`` (``[out, prod(in)]``, int64) and the fp16 row scales of ``weight`` at ``bits`` bits.

    ``scale = fp16(fp32(max |row| / q))`` (an all-zero row gets the smallest positive fp16 and stays zero),
    ``v = clamp(round(w / scale), -q, q)`` in float64, halves to even. Nothing waits for the device."""
    if bits not in QUANTIZED_BITS:
        raise ValueError(f"quantised weights take 2..8 bits, got {bits!r}")
    top = 2 ** (bits - 1) - 1
    rows = weight.detach().float().reshape(weight.shape[0], -1)
    scale = (rows.abs().amax(dim=1) / top).half().clamp_min(_SMALLEST_FP16)
    levels = torch.round(rows.double() / scale.double()[:, None]).clamp_(-top, top).long()
    return levels, scale


def dequantize_rows(levels: Int[Tensor, "out n"], scale: Tensor, shape: torch.Size) -> Float[Tensor, "out *in"]:
    """``v * scale`` in float32 (exact: at most 8 + 11 significant bits), in the weight's ``shape``."""
    return (levels.float() * scale.float()[:, None]).reshape(shape)


class QuantizedLinear(nn.Linear):
    """``nn.Linear`` whose forward pass can use its weight rounded to ``bits`` bits (:func:`quantize_rows`), with
    straight-through gradients to the float weight; its parameters and state-dict keys are ``nn.Linear``'s."""

    bits: Optional[int] = None
    """None: the float weight; 2..8: the weight as a file of that many bits per weight stores it."""
    _held: Optional[Tensor] = None
    """The rounded weight while :meth:`hold_rounding` holds it."""

    @classmethod
    def like(cls, linear: nn.Linear) -> "QuantizedLinear":
        """A QuantizedLinear holding ``linear``'s parameters (the same tensors)."""
        quantized = cls.__new__(cls)
        nn.Module.__init__(quantized)
        quantized.in_features, quantized.out_features = linear.in_features, linear.out_features
        quantized.weight, quantized.bias = linear.weight, linear.bias
        return quantized

    @torch.no_grad()
    def _rounded(self) -> Float[Tensor, "out in"]:
        assert self.bits is not None
        return dequantize_rows(*quantize_rows(self.weight, self.bits), self.weight.shape)

    def rounded_weight(self) -> Float[Tensor, "out in"]:
        """The weight the forward pass uses (rounded once per :meth:`hold_rounding` span, else at every call)."""
        if self.bits is None:
            return self.weight
        rounded = self._held if self._held is not None else self._rounded()
        if torch.is_grad_enabled() and self.weight.requires_grad:  # straight through to the float weight
            return self.weight + (rounded - self.weight).detach()
        return rounded

    def hold_rounding(self, hold: bool) -> None:
        """Round the weight now and reuse it until ``hold_rounding(False)`` (the weight must not change meanwhile:
        optimisers update in place without telling)."""
        self._held = self._rounded() if hold and self.bits is not None else None

    def forward(self, x: Float[Tensor, "*b in"]) -> Float[Tensor, "*b out"]:
        return F.linear(x, self.rounded_weight(), self.bias)


def quantizable_layers(mlp: nn.Module) -> Tuple[QuantizedLinear, ...]:
    """Turn every ``nn.Linear`` inside ``mlp`` into a :class:`QuantizedLinear` sharing its parameters (in place,
    state-dict keys unchanged); return them."""
    layers = []
    for name, child in list(mlp.named_children()):
        if isinstance(child, QuantizedLinear):
            layers.append(child)
        elif isinstance(child, nn.Linear):
            replacement = QuantizedLinear.like(child)
            setattr(mlp, name, replacement)
            layers.append(replacement)
        else:
            layers.extend(quantizable_layers(child))
    return tuple(layers)


__all__ = ["QUANTIZED_BITS", "quantize_rows", "dequantize_rows", "QuantizedLinear", "quantizable_layers"]
