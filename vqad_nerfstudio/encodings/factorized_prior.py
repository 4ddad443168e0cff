"""A learned fully factorized prior (Ballé et al. 2018, appendix 6.1) over integer latents.

Each channel has its own non-parametric, monotone cumulative density c(x) built from small
per-channel dense layers; the probability of an integer value v is c(v + 1/2) - c(v - 1/2). This is
the density model of CompressAI's ``EntropyBottleneck``, written here on plain tensors so that the
training code needs no image-compression framework. Coding itself happens elsewhere: the file
stores integer frequency tables quantised from :meth:`FactorizedPrior.integer_pmfs`, so the decoder
never re-evaluates floats.
"""

from __future__ import annotations

import math
from typing import List, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn

__all__ = ["FactorizedPrior"]

LIKELIHOOD_BOUND = 1e-9
"""Smallest probability a value gets in training (keeps -log2 p finite)."""


class FactorizedPrior(nn.Module):
    """Per-channel learned density of integer values, independent across channels and positions.

    Args:
        channels: number of independent channels.
        filters: widths of the hidden layers of each channel's cumulative-density network.
        init_scale: rough initial width of the densities (the latents' expected range).
    """

    def __init__(self, channels: int, filters: Sequence[int] = (3, 3, 3), init_scale: float = 10.0) -> None:
        super().__init__()
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        widths = (1, *filters, 1)
        scale = init_scale ** (1 / (len(widths) - 1))
        self.matrices = nn.ParameterList()
        self.biases = nn.ParameterList()
        self.factors = nn.ParameterList()
        for i in range(len(widths) - 1):
            init = math.log(math.expm1(1 / scale / widths[i + 1]))
            self.matrices.append(nn.Parameter(torch.full((channels, widths[i + 1], widths[i]), init)))
            self.biases.append(nn.Parameter(torch.rand(channels, widths[i + 1], 1) - 0.5))
            if i < len(widths) - 2:
                self.factors.append(nn.Parameter(torch.zeros(channels, widths[i + 1], 1)))
        self.channels = channels

    def _cdf_logits(self, values: Float[Tensor, "channels n"]) -> Float[Tensor, "channels n"]:
        logits = values[:, None, :]
        dtype = values.dtype
        for i, (matrix, bias) in enumerate(zip(self.matrices, self.biases)):
            logits = torch.matmul(F.softplus(matrix.to(dtype)), logits) + bias.to(dtype)
            if i < len(self.factors):
                logits = logits + torch.tanh(self.factors[i].to(dtype)) * torch.tanh(logits)
        return logits[:, 0, :]

    def likelihood(self, values: Float[Tensor, "channels n"]) -> Float[Tensor, "channels n"]:
        """Probability mass of the unit interval around each value, under its channel's density."""
        if values.dim() != 2 or values.shape[0] != self.channels:
            raise ValueError(f"expected values of shape [{self.channels}, n], got {tuple(values.shape)}")
        lower = self._cdf_logits(values - 0.5)
        upper = self._cdf_logits(values + 0.5)
        sign = -torch.sign(lower + upper).detach()  # evaluate in the tail where the sigmoid is accurate
        probability = torch.abs(torch.sigmoid(sign * upper) - torch.sigmoid(sign * lower))
        return probability.clamp_min(LIKELIHOOD_BOUND)

    def bits(self, values: Float[Tensor, "channels n"]) -> Float[Tensor, "channels n"]:
        """-log2 of :meth:`likelihood`: the ideal code length of each value."""
        return -torch.log2(self.likelihood(values))

    @torch.no_grad()
    def integer_pmfs(self, low: Int[Tensor, " channels"], high: Int[Tensor, " channels"]) -> List[np.ndarray]:
        """Per channel, the probabilities of the integers ``low[c] .. high[c]`` (float64, for coding tables)."""
        if low.shape != (self.channels,) or high.shape != (self.channels,) or bool((high < low).any()):
            raise ValueError("low and high must be [channels] integer tensors with low <= high")
        sizes = (high - low + 1).tolist()
        width = max(sizes)
        device = self.matrices[0].device
        grid = low.to(device)[:, None].double() + torch.arange(width, dtype=torch.float64, device=device)
        probabilities = self.likelihood(grid).cpu().numpy()
        return [probabilities[c, : sizes[c]] for c in range(self.channels)]
