"""Decoder layers whose weights train on the grid a file stores them on (:mod:`vqad_nerfstudio.rounding`: one
fp16 scale per output row, straight-through gradients).

Used by vqad's decoder MLPs (linear layers), tensorf-compressed's plane decoder (transposed convolutions) and its
appearance matrix and rendering MLP (``field_bits``).
"""

from __future__ import annotations

from typing import List, Optional, Tuple, Union

from jaxtyping import Float
from torch import Tensor, nn
from torch.nn import functional as F

from vqad_nerfstudio.kernels import column_rounding
from vqad_nerfstudio.rounding import rounded_rows, straight_through
from vqad_nerfstudio.transient_state import TransientState


class _RoundedWeight(TransientState, nn.Module):
    """A layer whose forward pass can use its weight rounded to ``bits`` bits (:func:`quantize_rows`), with
    straight-through gradients to the float weight; its parameters and state-dict keys are its base layer's."""

    weight: nn.Parameter
    bits: Optional[int] = None
    """None: the float weight; 2..8: the weight as a file of that many bits per weight stores it."""
    _held: Optional[Tensor] = None
    """The rounded weight while :meth:`hold_rounding` holds it."""
    TRANSIENT = frozenset({"_held"})

    @classmethod
    def like(cls, layer: nn.Module) -> "_RoundedWeight":
        """A layer of this class holding ``layer``'s parameters (the same tensors) and settings."""
        quantized = cls.__new__(cls)
        quantized.__dict__.update(layer.__dict__)
        return quantized

    def round_weight(self) -> Tensor:
        """The weight rounded to ``bits`` (set), without gradients to it."""
        assert self.bits is not None
        if column_rounding.rows_available(self.weight):  # on the GPU: the same numbers in two launches
            return column_rounding.rounded_rows(self.weight, self.bits)
        return rounded_rows(self.weight, self.bits)

    def rounded_weight(self) -> Tensor:
        """The weight the forward pass uses (rounded once per :meth:`hold_rounding` span, else at every call)."""
        if self.bits is None:
            return self.weight
        return straight_through(self.weight, self._held if self._held is not None else self.round_weight())

    def hold_rounding(self, hold: bool, rounded: Optional[Tensor] = None) -> None:
        """Round the weight now (or take ``rounded``: :meth:`round_weight` computed already, or its
        :func:`~vqad_nerfstudio.rounding.straight_through_group`, used as it is) and reuse it until
        ``hold_rounding(False)`` (the weight must not change meanwhile: optimisers update in place without
        telling)."""
        if not hold or self.bits is None:
            self._held = None
        else:
            self._held = self.round_weight() if rounded is None else rounded


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
    "QuantizedLinear",
    "QuantizedConvTranspose2d",
    "QuantizedLayer",
    "quantizable_layers",
]
