"""A straight-through step of all of a grid's learned-index levels at once, on the GPU.

Stepped level by level (:class:`~vqad_nerfstudio.encodings.vertex_features.CodebookFeatures`), every level of a
training step launches its own kernels: the rate and the codeword table forward, the logits' Adam update, its
forecast's sums and the codebook's gradient backward, seven launches per level and an autograd node each. A
:class:`GroupedIndices` steps the levels together: each of those kernels launches once for all levels (the
levels' logits stay separate parameters; the kernels find them through a table of their addresses), and the
levels' codeword tables are written as one concatenated table, as the fused interpolation reads them.

Frozen levels (indices fixed, codebooks still training) step together too: one codeword table and one codebook
gradient for all levels.

It takes over only where the levels are alike and past every phase that a per-level store handles on its own: all
levels straight-through (past their float warm-up, not relaxed, without float rows), or all frozen, on the kernels,
with equal index bits, codebook bits and feature width, and where they train their logits, equal temperature and
logit dtype and an :class:`~vqad_nerfstudio.optim.InBackwardAdam` that updates them in the backward pass. Elsewhere
the grid steps its stores one by one; both give the same values and updates.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from jaxtyping import Float, Int
from torch import Tensor

from vqad_nerfstudio.encodings.vertex_features import MIN_SHARE, CodebookFeatures, FeatureStore, rounded_codebooks
from vqad_nerfstudio.kernels import column_rounding, relaxed_indices
from vqad_nerfstudio.optim import pending_update


def groupable(stores: Sequence[FeatureStore]) -> bool:
    """Whether :class:`GroupedIndices` can step ``stores`` together (see the module's description)."""
    if not stores or not all(isinstance(store, CodebookFeatures) for store in stores):
        return False
    first: CodebookFeatures = stores[0]  # type: ignore[assignment]
    for store in stores:
        assert isinstance(store, CodebookFeatures)
        if not store.training or store.in_float_warmup or store.relaxed or store.has_float_rows:
            return False
        settings = (store.frozen, store.index_bits, store.codebook_bits, store.feature_dim, store.codebook.device)
        if settings != (first.frozen, first.index_bits, first.codebook_bits, first.feature_dim, first.codebook.device):
            return False
        if not store.use_kernels or not relaxed_indices.available(store.codebook):
            return False
        if not store.frozen and not _trainable_alike(store, first):
            return False
    return first.codebook_bits is None or column_rounding.available(first.codebook)


def _trainable_alike(store: CodebookFeatures, first: CodebookFeatures) -> bool:
    """Whether ``store``'s logits step as ``first``'s do: on the kernels (one factor), by an in-backward Adam, at its
    temperature and dtype, with its rate setting."""
    if store.index_factors > 1 or not relaxed_indices.available(store.logits) or pending_update(store.logits) is None:
        return False
    settings = (store.temperature, store.fuse_rate, store.logits.dtype)
    return settings == (first.temperature, first.fuse_rate, first.logits.dtype)


class GroupedIndices:
    """Steps a grid's learned-index levels together (one training step: :meth:`begin`, the tables, :meth:`end`).

    Holds, between steps, the hard indices and soft-index sums that the last step's Adam update forecast for the
    logits it left (used where the logits are still those), and within a step the indices, rate and codeword table
    that the step's first table computed (the density pass without gradients and the graded pass share them)."""

    def __init__(self) -> None:
        self.stores: Tuple[CodebookFeatures, ...] = ()
        self._forecast: Optional[Tuple[relaxed_indices.GroupedForecast, Tuple]] = None
        self._held: Optional[Tuple[Tensor, Tensor, Tensor, Tensor]] = None
        """Within a step: the hard indices (level-offset), the rate's bits per row and gradient per count, the
        table."""
        self._codebooks: Optional[Tuple[Tensor, Tensor]] = None
        """Within a step: the codebooks as lookups read them (``[l, c, k]``) and transposed (``[l, k, c]``)."""
        self._stacked: Optional[Tensor] = None
        """Within a step: the float codebooks stacked, with their gradients."""
        self._rate: Optional[Tuple[Tensor, Tuple]] = None
        """The rate the last graded table computed, and the logits' state it belongs to."""
        self._frozen_indices: Optional[Tuple[Tuple, Tensor]] = None
        """Frozen levels' indices offset by their first codeword and concatenated, and the indices they are of."""

    @property
    def active(self) -> bool:
        """Whether a step of grouped levels is under way."""
        return self._codebooks is not None

    def forget(self) -> None:
        """Drop the forecast (a load may give the logits new values without a version bump the forecast sees)."""
        self._forecast = None

    def begin(self, stores: Sequence[FeatureStore]) -> bool:
        """Start a training step of ``stores`` if they are :func:`groupable` (returns whether): the codebooks are
        stacked (the graded table's input) and rounded for the step here, once."""
        self.end()
        if not groupable(stores):
            self.forget()
            return False
        self.stores = tuple(stores)  # type: ignore[arg-type]
        self._stacked = torch.stack([store.codebook for store in self.stores])
        codebooks, bits = self._stacked.detach(), self.stores[0].codebook_bits
        if bits is None:
            self._codebooks = codebooks, codebooks.transpose(1, 2).contiguous()
        else:
            rounded = rounded_codebooks(codebooks, bits, transposed_storage=True)
            self._codebooks = rounded, rounded.transpose(1, 2)
        return True

    def end(self) -> None:
        """End the step: what it held is dropped (the forecast for the next step is kept)."""
        self._held = self._codebooks = self._stacked = None

    def table(self) -> Float[Tensor, "m k"]:
        """The levels' codeword tables concatenated: with gradients (straight through to the logits, updated in the
        backward pass, and to the codebooks) where they are recorded."""
        if not torch.is_grad_enabled():
            return self._step()[3]
        codebooks = self._stacked
        if not codebooks.requires_grad:  # stacked where gradients were not recorded
            codebooks = torch.stack([store.codebook for store in self.stores])
        logits = () if self.frozen else (store.logits for store in self.stores)
        table, bits = _GroupedStraightThrough.apply(self, codebooks, *logits)
        if self.stores[0].fuse_rate and not self.frozen:
            self._rate = bits, self._logit_state()
        return table

    def rate_bits_per_row(self, stores: Sequence[FeatureStore]) -> Optional[Float[Tensor, ""]]:
        """The index rate of ``stores`` (those with rows, in order) summed and divided by their rows, if the last
        graded table computed it for their logits as they are, once; else None."""
        pending, self._rate = self._rate, None
        if pending is None or pending[1] != self._logit_state():
            return None
        if list(stores) != [store for store in self.stores if store.num_rows > 0]:
            return None
        return pending[0]

    @property
    def frozen(self) -> bool:
        """Whether the grouped levels' indices are frozen (no logits to step)."""
        return self.stores[0].frozen

    def _logit_state(self) -> Tuple:
        """What a forecast must match: each level's :meth:`CodebookFeatures._logit_state` at its temperature."""
        return tuple(store._logit_state(store.temperature) for store in self.stores)

    def keep_forecast(self, forecast: relaxed_indices.GroupedForecast) -> None:
        """Keep what an Adam update of the levels forecast for the logits it has just left."""
        self._forecast = forecast, self._logit_state()

    @torch.no_grad()
    def _step(self) -> Tuple[Int[Tensor, "m"], Float[Tensor, "_"], Float[Tensor, "l c"], Float[Tensor, "m k"]]:
        """This step's hard indices (offset by ``level * codewords``), rate bits per row and gradient per count (empty
        without ``fuse_rate`` or when frozen) and codeword table: the forecast's indices where it holds, else one
        pass over each level's logits."""
        if self._held is not None:
            return self._held
        codewords = 2 ** self.stores[0].index_bits
        if self.frozen:
            hard = self._frozen_hard(codewords)
            bits = grad_counts = self._codebooks[0].new_empty(0)
        else:
            hard, sums, rows = self._indices_and_sums(codewords)
            if self.stores[0].fuse_rate:
                bits, grad_counts = relaxed_indices.rate_per_row_of_sums(sums, rows, MIN_SHARE)
            else:
                bits = grad_counts = sums.new_empty(0)  # no rate
        table = relaxed_indices.codeword_table(hard, self._codebooks[0], codewords)
        self._held = hard, bits, grad_counts, table
        return self._held

    def _indices_and_sums(self, codewords: int) -> Tuple[Int[Tensor, "m"], Float[Tensor, "l c"], Int[Tensor, "l"]]:
        """The levels' hard indices (offset by ``level * codewords``), soft-index column sums and rows: the forecast
        where it holds for the logits as they are, else one pass over each level's logits."""
        forecast, self._forecast = self._forecast, None
        if forecast is not None and forecast[1] == self._logit_state():
            return forecast[0].hard, forecast[0].sums, forecast[0].rows
        temperature = self.stores[0].temperature
        per_level = [relaxed_indices.hard_indices_and_shares(s.logits, temperature, True) for s in self.stores]
        hard = torch.cat([level_hard + level * codewords for level, (level_hard, _) in enumerate(per_level)])
        sums = torch.stack([level_sums for _, level_sums in per_level])
        return hard, sums, torch.tensor([store.num_rows for store in self.stores], device=hard.device)

    def _frozen_hard(self, codewords: int) -> Int[Tensor, "m"]:
        """The frozen levels' indices offset by ``level * codewords`` and concatenated, kept while they are those."""
        key = tuple((store.indices.data_ptr(), store.indices._version, store.indices.shape) for store in self.stores)
        if self._frozen_indices is None or self._frozen_indices[0] != key:
            offset = [store.indices.long() + level * codewords for level, store in enumerate(self.stores)]
            self._frozen_indices = key, torch.cat(offset)
        return self._frozen_indices[1]


class _GroupedStraightThrough(torch.autograd.Function):
    """The levels' hard codewords forward (the step's held table) and their rate; backward, the softmax-relaxed
    gradient of every level's logits applied by its in-backward Adam in one launch (which forecasts the next step's
    indices), and the codebooks' gradient through the hard indices in one launch, straight through the rounding
    (frozen levels: the codebooks' gradient alone)."""

    @staticmethod
    def forward(ctx, group: GroupedIndices, codebooks: Tensor, *logits: Tensor) -> Tuple[Tensor, Tensor]:  # type: ignore[override]
        hard, bits, grad_counts, table = group._step()
        ctx.group, ctx.stores, ctx.codebooks_t = group, group.stores, group._codebooks[1]
        ctx.save_for_backward(hard, grad_counts)
        ctx.set_materialize_grads(False)
        return table, bits

    @staticmethod
    def backward(ctx, grad_table: Optional[Tensor], grad_bits: Optional[Tensor]):  # type: ignore[override]
        hard, grad_counts = ctx.saved_tensors
        stores, codebooks_t = ctx.stores, ctx.codebooks_t
        grad_bits = grad_bits.expand(len(stores)) if grad_bits is not None and grad_counts.numel() else None
        if not stores[0].frozen and (grad_table is not None or grad_bits is not None):
            parameters = [store.logits for store in stores]
            updates = [pending_update(parameter).begin_update(parameter) for parameter in parameters]
            forecast = relaxed_indices.grouped_logit_adam_(
                [parameter.detach() for parameter in parameters], stores[0].temperature, updates,
                grad_table, None if grad_table is None else codebooks_t,
                None if grad_bits is None else grad_counts, grad_bits, forecast=True,
            )  # fmt: skip
            for parameter in parameters:
                torch.autograd.graph.increment_version(parameter)
            ctx.group.keep_forecast(forecast)
        grad_codebooks = None
        if grad_table is not None and ctx.needs_input_grad[1]:
            codewords = 2 ** stores[0].index_bits
            grad = relaxed_indices.codebook_grad(hard, grad_table, len(stores) * codewords)
            grad_codebooks = grad.view(len(stores), codewords, -1)
        return (None, grad_codebooks, *(None for _ in stores))


__all__ = ["GroupedIndices", "groupable"]
