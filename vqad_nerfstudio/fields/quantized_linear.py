"""Decoder weights on the grid a file stores them on: per-row symmetric quantisation, trained straight-through.

Used by vqad's decoder MLPs (linear layers) and tensorf-compressed's plane decoder (transposed convolutions).

A ``bits``-bit matrix keeps one fp16 scale per output row, ``scale = fp16(max |row| / q)`` with
``q = 2**(bits - 1) - 1``, and integers ``v = clamp(round(w / scale), -q, q)``; it decodes to ``v * scale``
(docs/format.md, "Quantised parameters payload"). :func:`quantize_rows` is that rule, for the writer and for
training alike, so a model trained through these layers renders after decoding exactly as it did in
training.
"""

from __future__ import annotations

from typing import List, Optional, Tuple, Union

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn
from torch.nn import functional as F

QUANTIZED_BITS = range(2, 9)
"""Bit widths of quantised weights: a ``bits``-bit weight is an integer in ``[-q, q]``, ``q = 2**(bits-1) - 1``."""


def check_weight_bits(name: str, bits: int) -> None:
    """``ValueError`` naming ``name`` unless ``bits`` is 16 (fp16 weights) or a quantised width in 2..8."""
    if bits != 16 and bits not in QUANTIZED_BITS:
        raise ValueError(f"{name} must be 16 (fp16) or an integer in 2..8, got {bits!r}")


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


class _RoundedWeight(nn.Module):
    """A layer whose forward pass can use its weight rounded to ``bits`` bits (:func:`quantize_rows`), with
    straight-through gradients to the float weight; its parameters and state-dict keys are its base layer's."""

    weight: nn.Parameter
    bits: Optional[int] = None
    """None: the float weight; 2..8: the weight as a file of that many bits per weight stores it."""
    _held: Optional[Tensor] = None
    """The rounded weight while :meth:`hold_rounding` holds it."""

    @classmethod
    def like(cls, layer: nn.Module) -> "_RoundedWeight":
        """A layer of this class holding ``layer``'s parameters (the same tensors) and settings."""
        quantized = cls.__new__(cls)
        quantized.__dict__.update(layer.__dict__)
        return quantized

    @torch.no_grad()
    def _rounded(self) -> Tensor:
        assert self.bits is not None
        return dequantize_rows(*quantize_rows(self.weight, self.bits), self.weight.shape)

    def rounded_weight(self) -> Tensor:
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


class QuantizedLinear(_RoundedWeight, nn.Linear):
    """``nn.Linear`` with its weight optionally rounded to ``bits`` bits (see :class:`_RoundedWeight`)."""

    def forward(self, x: Float[Tensor, "*b in"]) -> Float[Tensor, "*b out"]:
        return F.linear(x, self.rounded_weight(), self.bias)


class QuantizedConvTranspose2d(_RoundedWeight, nn.ConvTranspose2d):
    """``nn.ConvTranspose2d`` with its weight optionally rounded to ``bits`` bits, one scale per input channel
    (the weight's first dimension; see :class:`_RoundedWeight`)."""

    def forward(self, x: Float[Tensor, "b c h w"], output_size: Optional[List[int]] = None) -> Tensor:
        assert isinstance(self.padding, tuple)
        padding = self._output_padding(x, output_size, self.stride, self.padding, self.kernel_size, 2, self.dilation)
        return F.conv_transpose2d(
            x, self.rounded_weight(), self.bias, self.stride, self.padding, padding, self.groups, self.dilation
        )


QuantizedLayer = Union[QuantizedLinear, QuantizedConvTranspose2d]
_QUANTIZED_CLASS = {nn.Linear: QuantizedLinear, nn.ConvTranspose2d: QuantizedConvTranspose2d}


def quantizable_layers(network: nn.Module) -> Tuple[QuantizedLayer, ...]:
    """Turn every ``nn.Linear`` and ``nn.ConvTranspose2d`` inside ``network`` into its quantisable class sharing its
    parameters (in place, state-dict keys unchanged); return them."""
    layers = []
    for name, child in list(network.named_children()):
        if isinstance(child, _RoundedWeight):
            layers.append(child)
        elif type(child) in _QUANTIZED_CLASS:
            replacement = _QUANTIZED_CLASS[type(child)].like(child)
            setattr(network, name, replacement)
            layers.append(replacement)
        else:
            layers.extend(quantizable_layers(child))
    return tuple(layers)


__all__ = [
    "QUANTIZED_BITS",
    "check_weight_bits",
    "quantize_rows",
    "dequantize_rows",
    "QuantizedLinear",
    "QuantizedConvTranspose2d",
    "QuantizedLayer",
    "quantizable_layers",
]
