"""Per-vertex feature stores: learned b-bit indices into a codebook, or plain float vectors.

A store holds one feature vector per row (a grid vertex or a hash-table slot) and answers
``store(rows) -> features``. Two stores share that interface so that a grid can be built with
either, and a grid can prune rows (``remap``) without knowing which store it holds:

- :class:`CodebookFeatures` (VQAD): each row holds logits over ``2**bits`` codewords. The forward
  pass uses the hard codeword (argmax), the backward pass the softmax relaxation
  (straight-through estimator), so the loss sees exactly what will be stored.
- :class:`FloatFeatures`: each row holds a float vector; the uncompressed reference.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn


class _StraightThroughCodewords(torch.autograd.Function):
    """Hard codeword per row forward, softmax-relaxed gradient backward.

    Equivalent to ``keys = hard - softmax(C).detach() + softmax(C); out = keys @ codebook`` for every
    row of ``C``, without keeping ``[m, 2**b]`` activations: the backward pass recomputes the softmax.
    Callers gather per-sample rows from the result, so memory never grows with ``N * 2**b * k``.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, codebook: Tensor) -> Tensor:  # type: ignore[override]
        hard = logits.argmax(dim=-1)
        ctx.save_for_backward(hard, logits, codebook)
        return codebook.index_select(0, hard)

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> Tuple[Optional[Tensor], Optional[Tensor]]:  # type: ignore[override]
        hard, logits, codebook = ctx.saved_tensors
        grad_logits = grad_codebook = None
        if ctx.needs_input_grad[0]:
            soft = torch.softmax(logits, dim=-1)
            grad_soft = grad_out @ codebook.t()
            grad_logits = soft * (grad_soft - (soft * grad_soft).sum(dim=-1, keepdim=True))
        if ctx.needs_input_grad[1]:
            grad_codebook = torch.zeros_like(codebook).index_add_(0, hard, grad_out)
        return grad_logits, grad_codebook


def straight_through_codewords(logits: Float[Tensor, "m c"], codebook: Float[Tensor, "c k"]) -> Float[Tensor, "m k"]:
    """Codewords ``codebook[argmax(logits)]`` of every row, with straight-through softmax gradients."""
    return _StraightThroughCodewords.apply(logits, codebook)


def straight_through_lookup(
    rows: Int[Tensor, "n"], logits: Float[Tensor, "m c"], codebook: Float[Tensor, "c k"]
) -> Float[Tensor, "n k"]:
    """Codewords of ``rows``, with straight-through gradients (computed per row, not per lookup)."""
    if rows.numel() < logits.shape[0]:  # few lookups: relax only the rows that are used
        used, inverse = torch.unique(rows, return_inverse=True)
        return straight_through_codewords(logits.index_select(0, used), codebook).index_select(0, inverse)
    return straight_through_codewords(logits, codebook).index_select(0, rows)


class FeatureStore(nn.Module):
    """Common interface of the per-row feature stores."""

    feature_dim: int

    @property
    def num_rows(self) -> int:
        raise NotImplementedError

    def forward(self, rows: Int[Tensor, "n"]) -> Float[Tensor, "n k"]:
        raise NotImplementedError

    def remap(self, source_rows: Int[Tensor, "m_new"], in_place: bool = False) -> List[ParameterSwap]:
        """Rebuild the rows: new row i copies old row ``source_rows[i]``, or is freshly initialised where -1.

        By default the row parameters are replaced by new ``nn.Parameter`` objects (autograd caches a
        parameter's shape, so a used parameter cannot change shape in place) and the (old, new) pairs
        are returned so that optimisers can follow. ``in_place=True`` keeps the objects and changes
        ``.data``; it is only safe before the parameters took part in a backward pass (loading).
        """
        raise NotImplementedError

    def row_parameters(self) -> Tuple[nn.Parameter, ...]:
        """Parameters with one entry per row (remapped on pruning, together with optimiser state)."""
        raise NotImplementedError

    def stored_bits(self) -> int:
        """Bits this store needs in a compressed file without entropy coding (fp16 floats)."""
        raise NotImplementedError


ParameterSwap = Tuple[nn.Parameter, nn.Parameter]
"""(old, new) parameter after a row remap."""


def _remap_rows(
    module: nn.Module, name: str, source_rows: Tensor, fresh: Tensor, in_place: bool
) -> List[ParameterSwap]:
    param: nn.Parameter = getattr(module, name)
    keep = source_rows >= 0
    new = fresh.to(param.dtype)
    new[keep] = param.data[source_rows[keep]]
    if in_place:
        param.data = new
        param.grad = None
        return []
    replacement = nn.Parameter(new, requires_grad=param.requires_grad)
    setattr(module, name, replacement)
    return [(param, replacement)]


class CodebookFeatures(FeatureStore):
    """``num_rows`` learned ``bits``-bit indices into a codebook of ``2**bits`` vectors of width ``feature_dim``."""

    def __init__(
        self, num_rows: int, bits: int, feature_dim: int, logit_init_std: float = 0.01, codebook_init_std: float = 0.01
    ) -> None:
        super().__init__()
        if not 1 <= bits <= 16:
            raise ValueError(f"index bit width must be in 1..16, got {bits}")
        self.bits = bits
        self.feature_dim = feature_dim
        self.logit_init_std = logit_init_std
        self.logits = nn.Parameter(torch.randn(num_rows, 2**bits) * logit_init_std)
        self.codebook = nn.Parameter(torch.randn(2**bits, feature_dim) * codebook_init_std)

    @property
    def num_rows(self) -> int:
        return self.logits.shape[0]

    def forward(self, rows: Int[Tensor, "n"]) -> Float[Tensor, "n k"]:
        if not torch.is_grad_enabled():
            return self.codebook.index_select(0, self.logits.index_select(0, rows).argmax(dim=-1))
        return straight_through_lookup(rows, self.logits, self.codebook)

    def hard_indices(self) -> Int[Tensor, "m"]:
        """The b-bit index of every row: what a compressed file stores."""
        return self.logits.detach().argmax(dim=-1)

    def set_hard_indices(self, indices: Int[Tensor, "m"]) -> None:
        """Replace the logits by one-hot logits for ``indices`` (used when decoding a file)."""
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= 2**self.bits):
            raise ValueError(f"indices must lie in [0, {2**self.bits})")
        one_hot = torch.zeros(indices.shape[0], 2**self.bits, device=self.logits.device)
        one_hot[torch.arange(indices.shape[0], device=one_hot.device), indices.to(one_hot.device).long()] = 1.0
        self.logits.data = one_hot
        self.logits.grad = None

    def remap(self, source_rows: Int[Tensor, "m_new"], in_place: bool = False) -> List[ParameterSwap]:
        fresh = torch.randn(source_rows.shape[0], 2**self.bits, device=self.logits.device) * self.logit_init_std
        return _remap_rows(self, "logits", source_rows, fresh, in_place)

    def row_parameters(self) -> Tuple[nn.Parameter, ...]:
        return (self.logits,)

    def stored_bits(self) -> int:
        return self.num_rows * self.bits + self.codebook.numel() * 16


class FloatFeatures(FeatureStore):
    """``num_rows`` free float feature vectors: the uncompressed twin of :class:`CodebookFeatures`."""

    def __init__(self, num_rows: int, feature_dim: int, init_std: float = 0.01) -> None:
        super().__init__()
        self.feature_dim = feature_dim
        self.init_std = init_std
        self.features = nn.Parameter(torch.randn(num_rows, feature_dim) * init_std)

    @property
    def num_rows(self) -> int:
        return self.features.shape[0]

    def forward(self, rows: Int[Tensor, "n"]) -> Float[Tensor, "n k"]:
        return self.features.index_select(0, rows)

    def remap(self, source_rows: Int[Tensor, "m_new"], in_place: bool = False) -> List[ParameterSwap]:
        fresh = torch.randn(source_rows.shape[0], self.feature_dim, device=self.features.device) * self.init_std
        return _remap_rows(self, "features", source_rows, fresh, in_place)

    def row_parameters(self) -> Tuple[nn.Parameter, ...]:
        return (self.features,)

    def stored_bits(self) -> int:
        return self.features.numel() * 16


__all__ = [
    "ParameterSwap",
    "FeatureStore",
    "CodebookFeatures",
    "FloatFeatures",
    "straight_through_codewords",
    "straight_through_lookup",
]
