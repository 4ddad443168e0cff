"""Per-vertex feature stores: learned b-bit indices into a codebook, or plain float vectors.

A store holds one feature vector per row (a grid vertex or a hash-table slot) and answers
``store(rows) -> features``. Two stores share that interface so that a grid can be built with
either, and a grid can prune rows (``remap``) without knowing which store it holds:

- :class:`CodebookFeatures` (VQAD): each row holds logits over ``2**index_bits`` codewords. The forward
  pass uses the hard codeword (argmax), the backward pass the softmax relaxation
  (straight-through estimator), so the loss sees exactly what will be stored. It can start from a
  float warm-up: free float rows that k-means then turns into the codebook and the indices, except a share of
  float rows it may keep (those whose quantisation would cost the loss most, as VQRF keeps its important voxels).
  A frozen store (a decoded file) holds each row's index as an integer instead of its logits.
- :class:`FloatFeatures`: each row holds a float vector; the uncompressed reference.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from vqad_nerfstudio.encodings import index_factors as factored
from vqad_nerfstudio.encodings.kmeans import vector_quantize
from vqad_nerfstudio.kernels import column_rounding, factored_indices, relaxed_indices
from vqad_nerfstudio.kernels.captured import CapturedWork, place
from vqad_nerfstudio.optim import AdamStep, adam_update_, pending_update, widened
from vqad_nerfstudio.rounding import QUANTIZED_BITS, rounded_columns, straight_through, straight_through_group
from vqad_nerfstudio.transient_state import TransientState

ROW_CHUNK = 1 << 17
"""Rows per chunk of the softmax gradients below: their temporaries stay at ``ROW_CHUNK x 2**b`` values whatever
the number of rows (with 8-bit indices a full-size temporary is 1 GB per million vertices)."""


def _row_chunks(*tensors: Tensor) -> Iterator[Tuple[Tensor, ...]]:
    """The tensors' rows, ROW_CHUNK at a time (views: writing into a chunk writes into the tensor)."""
    return zip(*(t.split(ROW_CHUNK) for t in tensors))


def relaxed_logit_grad(
    logits: Float[Tensor, "m c"],
    temperature: float,
    grad_soft: Optional[Float[Tensor, "m c"]] = None,
    grad_rows: Optional[Float[Tensor, "m k"]] = None,
    codebook: Optional[Float[Tensor, "c k"]] = None,
    grad_share: Optional[Float[Tensor, "c"]] = None,
    use_kernel: bool = True,
    share_scale: Optional[Float[Tensor, ""]] = None,
    factors: int = 1,
) -> Float[Tensor, "m w"]:
    """Gradient of the logits through ``softmax(logits / temperature)``, given the gradient of the softmax as the sum
    of ``grad_soft``, ``grad_rows @ codebook.T`` and ``grad_share`` (one value per codeword, for every row; times
    ``share_scale``, a one-value tensor, if given: no operation of its own on the GPU), any of them absent.

    ``grad_soft`` (a temporary of the caller's), if given, is overwritten and returned; nothing else of the logits'
    size is allocated. On the GPU (``use_kernel``) one kernel pass (:mod:`vqad_nerfstudio.kernels.relaxed_indices`),
    else in chunks of rows. Logits of two ``factors`` (:mod:`~vqad_nerfstudio.encodings.index_factors`) take no
    ``grad_soft`` and get a new float32 gradient, in chunks of rows."""
    if factors > 1 and grad_soft is not None:
        raise ValueError("factored indices take the codewords' gradient (grad_rows), not the soft indices'")
    if use_kernel and factors == 1 and relaxed_indices.available(logits):
        return relaxed_indices.relaxed_logit_grad(
            logits, temperature, grad_soft, grad_rows, codebook, grad_share, share_scale
        )
    if grad_share is not None and share_scale is not None:
        grad_share = grad_share * share_scale
    if factors > 1:
        chunks = range(0, logits.shape[0], ROW_CHUNK)
        grads = [_factored_logit_grad(logits, temperature, start, grad_rows, codebook, grad_share) for start in chunks]
        return torch.cat(grads) if grads else logits.new_zeros(logits.shape, dtype=torch.float32)
    out = grad_soft if grad_soft is not None else torch.zeros_like(logits)
    for start, (chunk_logits, chunk_out) in zip(range(0, logits.shape[0], ROW_CHUNK), _row_chunks(logits, out)):
        chunk_grad = widened(chunk_out)  # chunk_out itself unless 16-bit
        if grad_rows is not None:
            chunk_grad += grad_rows[start : start + ROW_CHUNK] @ codebook.t()
        if grad_share is not None:
            chunk_grad += grad_share
        soft = torch.softmax(widened(chunk_logits) / temperature, dim=-1)
        chunk_grad.sub_((soft * chunk_grad).sum(dim=-1, keepdim=True)).mul_(soft).div_(temperature)
        if chunk_grad is not chunk_out:
            chunk_out.copy_(chunk_grad)
    return out


def _factored_logit_grad(
    logits: Float[Tensor, "m w"],
    temperature: float,
    start: int,
    grad_rows: Optional[Float[Tensor, "m k"]],
    codebook: Optional[Float[Tensor, "c k"]],
    grad_share: Optional[Float[Tensor, "c"]],
) -> Float[Tensor, "r w"]:
    """:func:`~vqad_nerfstudio.encodings.index_factors.logit_grad` of the ROW_CHUNK rows of ``logits`` from
    ``start``."""
    rows = slice(start, start + ROW_CHUNK)
    chunk_rows = None if grad_rows is None else grad_rows[rows]
    return factored.logit_grad(logits[rows], temperature, chunk_rows, codebook, grad_share)


def relaxed_logit_adam_(
    logits: Float[Tensor, "m c"],
    temperature: float,
    update: AdamStep,
    grad_rows: Optional[Float[Tensor, "m k"]] = None,
    codebook: Optional[Float[Tensor, "c k"]] = None,
    grad_share: Optional[Float[Tensor, "c"]] = None,
    use_kernel: bool = True,
    share_scale: Optional[Float[Tensor, ""]] = None,
    forecast: bool = False,
    factors: int = 1,
) -> Optional[Tuple[Int[Tensor, "m"], Float[Tensor, "c"]]]:
    """Adam's ``update`` of ``logits`` in place from the gradient :func:`relaxed_logit_grad` gives for the same
    arguments, without allocating that gradient: on the GPU (``use_kernel``) tile by tile in one kernel pass
    (:mod:`~vqad_nerfstudio.kernels.factored_indices` for two ``factors``), else ROW_CHUNK rows at a time. With
    ``forecast``, on the GPU the kernel also returns the updated logits' hard indices and soft-index column sums at
    ``temperature`` (else None: the next step computes them)."""
    logits = logits.detach()
    if use_kernel and factors > 1 and factored_indices.available(logits, update):
        return factored_indices.factored_logit_adam_(
            logits, temperature, update, grad_rows, codebook, grad_share, share_scale, forecast
        )
    if use_kernel and factors == 1 and relaxed_indices.available(logits):
        return relaxed_indices.relaxed_logit_adam_(
            logits, temperature, update, grad_rows, codebook, grad_share, share_scale, forecast
        )
    if grad_share is not None and share_scale is not None:
        grad_share = grad_share * share_scale
    for start in range(0, logits.shape[0], ROW_CHUNK):
        rows = slice(start, start + ROW_CHUNK)
        if factors > 1:
            grad = _factored_logit_grad(logits, temperature, start, grad_rows, codebook, grad_share)
        else:
            grad = widened(logits[rows].new_zeros(logits[rows].shape))
            chunk_rows = None if grad_rows is None else grad_rows[rows]
            relaxed_logit_grad(logits[rows], temperature, grad, chunk_rows, codebook, grad_share, False)
        chunk_update = replace(
            update, exp_avg=update.exp_avg[rows], exp_avg_sq=update.exp_avg_sq[rows], seed=update.seed + start
        )
        adam_update_(logits[rows], grad, chunk_update)
    return None


def codebook_grad(
    hard: Int[Tensor, "m"], grad_rows: Float[Tensor, "m k"], codebook: Float[Tensor, "c k"], use_kernel: bool = True
) -> Float[Tensor, "c k"]:
    """The codebook's gradient through the rows' hard indices: each row's gradient added to its codeword. On the GPU
    (``use_kernel``) one kernel that skips untouched rows, else ``index_add_``."""
    if use_kernel and relaxed_indices.available(grad_rows):
        return relaxed_indices.codebook_grad(hard, grad_rows, codebook.shape[0]).to(codebook.dtype)
    return torch.zeros_like(codebook).index_add_(0, hard, grad_rows)


class _CodewordTable(torch.autograd.Function):
    """``codebook.index_select(0, indices)`` with the kernels: their gather forward (or ``known``, the same table
    gathered before without gradients), :func:`codebook_grad` backward."""

    @staticmethod
    def forward(ctx, codebook: Tensor, indices: Tensor, known: Optional[Tensor]) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(indices)
        ctx.codewords, ctx.dtype = codebook.shape[0], codebook.dtype
        return relaxed_indices.codeword_table(indices, codebook) if known is None else known

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tuple[Tensor, None, None]:  # type: ignore[override]
        (indices,) = ctx.saved_tensors
        return relaxed_indices.codebook_grad(indices, grad, ctx.codewords).to(ctx.dtype), None, None


def rounded_codebooks(
    codebooks: Float[Tensor, "*b c k"], bits: int, use_kernel: bool = True, transposed_storage: bool = False
) -> Float[Tensor, "*b c k"]:
    """:func:`~vqad_nerfstudio.rounding.rounded_columns` of ``codebooks``: on the GPU (``use_kernel``) one kernel
    launch, equal bit for bit, stored transposed with ``transposed_storage`` (see
    :func:`~vqad_nerfstudio.kernels.column_rounding.rounded_columns`)."""
    if use_kernel and column_rounding.available(codebooks):
        return column_rounding.rounded_columns(codebooks, bits, transposed_storage)
    return rounded_columns(codebooks, bits)


def codeword_table(
    codebook: Float[Tensor, "c k"],
    indices: Int[Tensor, "m"],
    use_kernel: bool = True,
    known_table: Optional[Float[Tensor, "m k"]] = None,
) -> Float[Tensor, "m k"]:
    """Each row's codeword, ``codebook.index_select(0, indices)``, differentiable in the codebook; on the GPU
    (``use_kernel``) the kernels' gather and codebook gradient, and ``known_table`` (this table, gathered without
    gradients for the same codebook values) returned instead of a second gather."""
    if use_kernel and relaxed_indices.available(codebook):
        return _CodewordTable.apply(codebook, indices, known_table)
    return codebook.index_select(0, indices)


def hard_indices_of(logits: Float[Tensor, "m w"], factors: int) -> Int[Tensor, "m"]:
    """Each row's hard index: the argmax of one factor's logits, or of two factors' (see
    :func:`~vqad_nerfstudio.encodings.index_factors.hard_indices`)."""
    return logits.argmax(dim=-1) if factors == 1 else factored.hard_indices(logits)


def hard_indices_and_shares(
    logits: Float[Tensor, "m w"],
    temperature: float,
    with_shares: bool = True,
    use_kernel: bool = True,
    factors: int = 1,
) -> Tuple[Int[Tensor, "m"], Float[Tensor, "c"]]:
    """Each row's hard index (argmax) and, with ``with_shares``, the mean of the rows' ``softmax(logits /
    temperature)`` (else an empty tensor). On the GPU (``use_kernel``) one kernel pass over the logits, else in chunks
    of rows. Two ``factors``: :mod:`~vqad_nerfstudio.encodings.index_factors`' hard index and soft index."""
    if use_kernel and factors == 1 and relaxed_indices.available(logits):
        hard, sums = relaxed_indices.hard_indices_and_shares(logits, temperature, with_shares)
    else:
        hard = hard_indices_of(logits, factors)
        codewords = logits.shape[-1] if factors == 1 else (logits.shape[-1] // 2) ** 2
        sums = widened(logits.new_zeros(codewords if with_shares else 0))
        for (chunk,) in _row_chunks(logits) if with_shares else ():
            if factors == 1:
                sums += torch.softmax(widened(chunk) / temperature, dim=-1).sum(dim=0)
            else:
                sums += factored.share_sums(factored.factor_softmax(chunk, temperature))
    return hard, sums / max(logits.shape[0], 1) if with_shares else sums


MIN_SHARE = 1e-12
"""Smallest codeword share inside the rate's logarithm (an unused codeword costs nothing, not -inf)."""


def _order_zero_bits(shares: Float[Tensor, "c"], num_rows: int) -> Float[Tensor, ""]:
    """``sum_c -counts[c] * log2(shares[c])`` with ``counts = shares * num_rows``."""
    return -(shares * num_rows * torch.log2(shares.clamp_min(MIN_SHARE))).sum()


def _order_zero_soft_grad(shares: Float[Tensor, "c"], grad_bits: Tensor) -> Float[Tensor, "c"]:
    """Gradient of :func:`_order_zero_bits` in every row's soft index (the same for every row): d/dcounts of
    ``-counts * log2(max(share, eps))``, the log plus counts' own term where the clamp lets it through."""
    return -(torch.log2(shares.clamp_min(MIN_SHARE)) + (shares >= MIN_SHARE) / math.log(2)) * grad_bits


def hard_indices_and_rate(
    logits: Float[Tensor, "m w"], temperature: float, use_kernel: bool = True, factors: int = 1
) -> Tuple[Int[Tensor, "m"], Float[Tensor, ""], Float[Tensor, "c"]]:
    """Each row's hard index, :func:`_order_zero_bits` of the soft indices ``softmax(logits / temperature)`` and its
    gradient in every row's soft index (:func:`_order_zero_soft_grad` per bit). On the GPU (``use_kernel``) one pass
    over the logits and one small kernel."""
    if use_kernel and factors == 1 and relaxed_indices.available(logits):
        return relaxed_indices.hard_indices_and_rate(logits, temperature, MIN_SHARE)
    hard, shares = hard_indices_and_shares(logits, temperature, use_kernel=False, factors=factors)
    return hard, _order_zero_bits(shares, logits.shape[0]), _order_zero_soft_grad(shares, shares.new_ones(()))


StepIndices = Tuple[Tensor, Tensor, Tensor]
"""What a straight-through step needs of its logits before its backward pass (:func:`step_indices`)."""


def step_indices_of_sums(hard: Int[Tensor, "m"], sums: Float[Tensor, "c"], with_rate: bool) -> StepIndices:
    """:func:`step_indices` from the hard indices and soft-index column sums of the same logits (a forecast of
    :func:`relaxed_logit_adam_`, on a device the kernels run on), without reading the logits."""
    if not with_rate:
        return hard, sums.new_zeros(()), sums.new_zeros(0)
    return (hard, *relaxed_indices.rate_of_sums(sums, hard.shape[0], MIN_SHARE))


@torch.no_grad()
def step_indices(
    logits: Float[Tensor, "m w"], temperature: float, with_rate: bool, use_kernel: bool, factors: int = 1
) -> StepIndices:
    """The rows' hard indices and, with ``with_rate``, :func:`hard_indices_and_rate`'s rate and its gradient per
    count (else 0 and an empty tensor), for logits of ``factors`` factors."""
    if with_rate:
        return hard_indices_and_rate(logits, temperature, use_kernel, factors)
    hard, _ = hard_indices_and_shares(logits, temperature, False, use_kernel, factors)
    return hard, logits.new_zeros(()), logits.new_zeros(0)


class _OrderZeroRate(torch.autograd.Function):
    """:func:`_order_zero_bits` of the soft indices ``softmax(logits / temperature)``, whose softmax is recomputed in
    chunks of rows in both passes instead of being kept: no ``[m, c]`` activation."""

    @staticmethod
    def forward(ctx, logits: Tensor, temperature: float, use_kernel: bool, factors: int) -> Tensor:  # type: ignore[override]
        _, shares = hard_indices_and_shares(logits, temperature, use_kernel=use_kernel, factors=factors)
        ctx.save_for_backward(logits, shares)
        ctx.temperature, ctx.use_kernel, ctx.factors = temperature, use_kernel, factors
        return _order_zero_bits(shares, logits.shape[0])

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> Tuple[Optional[Tensor], None, None, None]:  # type: ignore[override]
        logits, shares = ctx.saved_tensors
        grad_share = _order_zero_soft_grad(shares, grad_out)
        grad = relaxed_logit_grad(
            logits, ctx.temperature, grad_share=grad_share, use_kernel=ctx.use_kernel, factors=ctx.factors
        )
        return grad.to(logits.dtype), None, None, None


def soft_index_rate_bits(
    logits: Float[Tensor, "m w"], temperature: float, use_kernel: bool = True, factors: int = 1
) -> Float[Tensor, ""]:
    """Bits of an order-0 code of the soft indices ``softmax(logits / temperature)`` under their own marginal,
    differentiable (see :meth:`CodebookFeatures.index_rate_bits`), for logits of ``factors`` factors."""
    return _OrderZeroRate.apply(logits, temperature, use_kernel, factors)


class _StraightThroughCodewords(torch.autograd.Function):
    """Hard codeword per row forward, softmax-relaxed gradient backward; with ``with_rate`` also the rate of
    :class:`_OrderZeroRate` (else a constant 0).

    Equivalent to ``keys = hard - soft.detach() + soft; out = keys @ codebook`` with
    ``soft = softmax(C / temperature)``, without keeping ``[m, c]`` activations: the backward pass
    recomputes the softmax. Callers gather per-sample rows from the result, so memory never grows
    with ``N * c * k``. With the rate, both gradients of the logits share one ``[m, c]`` buffer and one softmax
    pass instead of two of each.

    Logits whose optimiser is an :class:`~vqad_nerfstudio.optim.InBackwardAdam` are updated here, as their gradient
    is computed, and get no ``.grad`` (their version is bumped: autograd then refuses any other backward pass that
    saved them). On the GPU that update also forecasts the updated logits' hard indices and soft-index sums, which
    it hands to ``forecast_to`` (if given) for the next step.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        logits: Tensor,
        codebook: Tensor,
        temperature: float,
        with_rate: bool,
        use_kernel: bool,
        known: Optional[StepIndices],
        known_table: Optional[Tensor],
        forecast_to: Optional[Callable[[Tensor, Tensor, float], None]],
        factors: int,
        update_graph: Optional[CapturedWork],
    ) -> Tuple[Tensor, Tensor]:
        if known is None:
            known = step_indices(logits, temperature, with_rate, use_kernel, factors)
        hard, bits, grad_counts = known
        ctx.save_for_backward(hard, logits, codebook, grad_counts)
        ctx.temperature, ctx.with_rate, ctx.use_kernel, ctx.factors = temperature, with_rate, use_kernel, factors
        ctx.forecast_to, ctx.update_graph = forecast_to, update_graph
        optimizer = pending_update(logits)
        ctx.in_backward = None if optimizer is None else (optimizer, logits)  # the parameter itself, to update
        ctx.set_materialize_grads(False)
        table = codeword_table(codebook.detach(), hard, use_kernel) if known_table is None else known_table
        return table, bits

    @staticmethod
    def backward(  # type: ignore[override]
        ctx, grad_out: Optional[Tensor], grad_bits: Optional[Tensor]
    ) -> Tuple[Optional[Tensor], Optional[Tensor], None, None, None, None, None, None, None, None]:
        hard, logits, codebook, grad_counts = ctx.saved_tensors
        grad_bits = grad_bits if ctx.with_rate else None
        grad_logits = grad_codebook = None
        if ctx.needs_input_grad[0] and (grad_out is not None or grad_bits is not None):
            grad_share = grad_counts if grad_bits is not None else None  # times grad_bits
            terms = (grad_out, None if grad_out is None else codebook, grad_share, ctx.use_kernel, grad_bits)
            if ctx.in_backward is not None:
                optimizer, parameter = ctx.in_backward
                update = optimizer.begin_update(parameter)
                wanted = ctx.forecast_to is not None
                graphed = (  # the Adam pass and the codebook's gradient as one replay
                    ctx.update_graph is not None
                    and grad_out is not None
                    and ctx.needs_input_grad[1]
                    and ctx.use_kernel
                    and ctx.factors == 1
                    and relaxed_indices.available(logits)
                )
                if graphed:
                    forecast, grad_codebook = _graphed_update(
                        ctx.update_graph, logits, codebook, hard, grad_out, grad_share, grad_bits, update,
                        ctx.temperature, wanted,
                    )  # fmt: skip
                else:
                    forecast = relaxed_logit_adam_(
                        logits, ctx.temperature, update, *terms, forecast=wanted, factors=ctx.factors
                    )
                torch.autograd.graph.increment_version(parameter)
                if forecast is not None:
                    ctx.forecast_to(*forecast, ctx.temperature)
            else:
                grad_logits = relaxed_logit_grad(logits, ctx.temperature, None, *terms, factors=ctx.factors)
        if ctx.needs_input_grad[1] and grad_out is not None and grad_codebook is None:
            grad_codebook = codebook_grad(hard, grad_out, codebook, ctx.use_kernel)
        return grad_logits, grad_codebook, None, None, None, None, None, None, None, None


def _graphed_update(
    graph: CapturedWork,
    logits: Float[Tensor, "m c"],
    codebook: Float[Tensor, "c k"],
    hard: Int[Tensor, "m"],
    grad_rows: Float[Tensor, "m k"],
    grad_share: Optional[Float[Tensor, "c"]],
    share_scale: Optional[Float[Tensor, ""]],
    update: AdamStep,
    temperature: float,
    forecast: bool,
) -> Tuple[Optional[Tuple[Tensor, Tensor]], Float[Tensor, "c k"]]:
    """The straight-through backward pass's work on the kernels' path, :func:`relaxed_logit_adam_` of the logits (with
    the forecast if ``forecast``) and :func:`codebook_grad`, as one replay of ``graph``: the Adam pass reads its
    scalars from memory, and what varies from step to step is copied in (the codebook and indices included, a few
    kB and MB); the logits and moments, updated in place, are the graph's as long as they stay where they are."""
    inputs = [grad_rows, codebook.detach(), hard, relaxed_indices.adam_scalars(temperature, update)]
    if grad_share is not None and share_scale is not None:
        inputs += [grad_share, share_scale]

    def work(inputs: Sequence[Tensor]) -> List[Tensor]:
        rows, book, indices, scalars, *share = inputs
        predicted = relaxed_indices.relaxed_logit_adam_(
            logits.detach(), temperature, update, rows, book, *(share or (None, None)), forecast, None, scalars
        )
        return [*(predicted or ()), relaxed_indices.codebook_grad(indices, rows, book.shape[0]).to(book.dtype)]

    key = (place(logits), logits.dtype, *(place(m) + (m.dtype,) for m in (update.exp_avg, update.exp_avg_sq)))
    outputs = graph.run((key, forecast), inputs, work, logits.device)
    return (tuple(outputs[:2]) if forecast else None), outputs[-1]


def straight_through_codewords(
    logits: Float[Tensor, "m c"],
    codebook: Float[Tensor, "c k"],
    temperature: float = 1.0,
    use_kernel: bool = True,
    known: Optional[StepIndices] = None,
    known_table: Optional[Float[Tensor, "m k"]] = None,
    forecast_to: Optional[Callable[[Tensor, Tensor, float], None]] = None,
    factors: int = 1,
    update_graph: Optional[CapturedWork] = None,
) -> Float[Tensor, "m k"]:
    """Chosen codewords of every row, ``codebook[argmax(logits)]``, with straight-through softmax gradients
    to the logits and the chosen codewords. ``known``: :func:`step_indices` of these logits without the rate, if
    already computed; ``known_table``: the codewords of its indices, if already gathered (returned as the table);
    ``forecast_to``: receives the hard indices and soft-index sums of the logits as an in-backward Adam on the GPU
    leaves them, and the temperature of the sums; ``factors``: the logits' (see
    :mod:`~vqad_nerfstudio.encodings.index_factors`); ``update_graph``: replays the backward pass's in-backward Adam
    update and codebook gradient on the GPU (:func:`_graphed_update`; None: launched one by one)."""
    return _StraightThroughCodewords.apply(
        logits, codebook, temperature, False, use_kernel, known, known_table, forecast_to, factors, update_graph
    )[0]


def straight_through_codewords_and_rate(
    logits: Float[Tensor, "m c"],
    codebook: Float[Tensor, "c k"],
    temperature: float = 1.0,
    use_kernel: bool = True,
    known: Optional[StepIndices] = None,
    known_table: Optional[Float[Tensor, "m k"]] = None,
    forecast_to: Optional[Callable[[Tensor, Tensor, float], None]] = None,
    factors: int = 1,
    update_graph: Optional[CapturedWork] = None,
) -> Tuple[Float[Tensor, "m k"], Float[Tensor, ""]]:
    """:func:`straight_through_codewords` and :func:`soft_index_rate_bits` in one pass: equal values and gradients,
    one gradient buffer and one softmax recomputation for both. ``known``: :func:`step_indices` of these logits and
    temperature with the rate, if already computed; ``known_table``, ``forecast_to``, ``factors`` and
    ``update_graph``: as in :func:`straight_through_codewords`."""
    return _StraightThroughCodewords.apply(
        logits, codebook, temperature, True, use_kernel, known, known_table, forecast_to, factors, update_graph
    )


def nonzero_gradient_lookups(grad: Float[Tensor, "n k"], *indices: Int[Tensor, "n"]) -> Tuple[Tensor, ...]:
    """``grad`` and each of ``indices`` restricted to the lookups whose gradient row is nonzero. The others add
    nothing to a scatter-add, and where many of them read one row (samples a field masks out all read one
    vertex) they would serialise it on a GPU."""
    used = grad.ne(0).any(dim=-1).nonzero().squeeze(-1)
    return tuple(t.index_select(0, used) for t in (grad, *indices))


def candidate_rows(first: Int[Tensor, "*b"], choices: Int[Tensor, "*b"], codebook_size: int) -> Int[Tensor, "*b"]:
    """Rows of concatenated codebooks (``codebook_size`` rows each) that ``choices`` pick for lookups whose
    candidates start at row ``first``: candidate ``c`` is the ``c``-th row after ``first``, wrapping around
    within ``first``'s codebook."""
    start = first - torch.remainder(first, codebook_size)
    return start + torch.remainder(first - start + choices, codebook_size)


class _InterpolatedCodewords(torch.autograd.Function):
    """Weighted sum over each sample's cell corners of the codewords their index entries choose.

    The straight-through estimator of :class:`_StraightThroughCodewords` for lookups whose candidates
    depend on the vertex (hashed buckets: each lookup chooses among the rows from its ``first`` on),
    fused with the trilinear interpolation: the forward pass gathers one codeword per corner, and the
    backward pass accumulates the softmax gradient per index entry before applying the softmax
    Jacobian once per entry, so nothing of size ``lookups * candidates * width`` is kept between the
    passes (the backward pass works in chunks).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        logits: Tensor,
        codebook: Tensor,
        entries: Tensor,
        first: Tensor,
        weights: Tensor,
        codebook_size: int,
        temperature: float,
        use_kernel: bool,
    ) -> Tensor:
        rows = candidate_rows(first, logits.argmax(dim=-1)[entries], codebook_size)
        ctx.save_for_backward(logits, codebook, entries, first, weights, rows)
        ctx.codebook_size, ctx.temperature, ctx.use_kernel = codebook_size, temperature, use_kernel
        return (codebook[rows] * weights[..., None]).sum(dim=-2)  # tiny matrices: a batched matmul is far slower

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> Tuple[Optional[Tensor], ...]:  # type: ignore[override]
        logits, codebook, entries, first, weights, rows = ctx.saved_tensors
        grad_logits = grad_codebook = grad_weights = None
        if ctx.needs_input_grad[4]:
            grad_weights = (codebook[rows] * grad_out[..., None, :]).sum(dim=-1)
        grad_corners = (weights[..., None] * grad_out[..., None, :]).reshape(-1, codebook.shape[-1])
        grad_corners, rows, entries, first = nonzero_gradient_lookups(
            grad_corners, rows.reshape(-1), entries.reshape(-1), first.reshape(-1)
        )
        if ctx.needs_input_grad[1]:
            grad_codebook = torch.zeros_like(codebook).index_add_(0, rows, grad_corners)
        if ctx.needs_input_grad[0]:
            # windows[r] = the candidates of a lookup starting at row r: one gather per lookup, not one per candidate
            rows_of_codebook = torch.arange(codebook.shape[0], device=codebook.device)[:, None]
            choices = torch.arange(logits.shape[-1], device=codebook.device)
            windows = codebook[candidate_rows(rows_of_codebook, choices, ctx.codebook_size)]  # [rows, c, k]
            grad_soft = torch.zeros_like(logits)
            chunks = (t.split(_BACKWARD_CHUNK) for t in (first, entries, grad_corners))
            for chunk_first, chunk_entries, chunk_grad in zip(*chunks):
                per_lookup = (windows.index_select(0, chunk_first) * chunk_grad[:, None, :]).sum(dim=-1)
                grad_soft.index_add_(0, chunk_entries, per_lookup)
            grad_logits = relaxed_logit_grad(logits, ctx.temperature, grad_soft, use_kernel=ctx.use_kernel)
        return grad_logits, grad_codebook, None, None, grad_weights, None, None, None


_BACKWARD_CHUNK = 1 << 21
"""Lookups per chunk of the backward pass of :class:`_InterpolatedCodewords` (bounds its memory)."""


def interpolated_codewords(
    logits: Float[Tensor, "entries c"],
    codebook: Float[Tensor, "rows k"],
    entries: Int[Tensor, "*b corners"],
    first: Int[Tensor, "*b corners"],
    weights: Float[Tensor, "*b corners"],
    codebook_size: int,
    temperature: float = 1.0,
    use_kernel: bool = True,
) -> Float[Tensor, "*b k"]:
    """``sum_corners weights * codebook[candidate_rows(first, argmax(logits[entries]))]``, with straight-through
    softmax gradients to the logits, gradients to the chosen codewords and to the weights.

    ``codebook`` is one or more codebooks of ``codebook_size`` rows concatenated; each lookup chooses among
    the ``c`` rows from ``first`` on, with the logits of its index entry.
    """
    return _InterpolatedCodewords.apply(
        logits, codebook, entries, first, weights, codebook_size, temperature, use_kernel
    )


def soft_codewords(
    logits: Float[Tensor, "m w"], codebook: Float[Tensor, "c k"], temperature: float = 1.0, factors: int = 1
) -> Float[Tensor, "m k"]:
    """Relaxed codewords ``softmax(C / temperature) @ codebook`` of every row (soft indices, forward too), for logits
    of ``factors`` factors."""
    if factors > 1:
        return factored.soft_codewords(logits, codebook, temperature)
    return torch.softmax(widened(logits) / temperature, dim=-1) @ codebook


def straight_through_lookup(
    rows: Int[Tensor, "n"],
    logits: Float[Tensor, "m c"],
    codebook: Float[Tensor, "c k"],
    temperature: float = 1.0,
    relaxed: bool = False,
    use_kernel: bool = True,
    factors: int = 1,
) -> Float[Tensor, "n k"]:
    """Codewords of ``rows``, with straight-through gradients (computed per row, not per lookup).

    ``relaxed=True`` returns the soft codewords instead (soft-to-hard annealing warm-up). ``use_kernel``: the
    softmax side on the GPU by :mod:`vqad_nerfstudio.kernels.relaxed_indices` (else the PyTorch reference).
    ``factors``: the logits' (see :mod:`~vqad_nerfstudio.encodings.index_factors`).
    """

    def per_row(row_logits: Tensor) -> Tensor:
        if relaxed:
            return soft_codewords(row_logits, codebook, temperature, factors)
        return straight_through_codewords(row_logits, codebook, temperature, use_kernel, factors=factors)

    if rows.numel() < logits.shape[0]:  # few lookups: relax only the rows that are used
        used, inverse = torch.unique(rows, return_inverse=True)
        return per_row(logits.index_select(0, used)).index_select(0, inverse)
    return per_row(logits).index_select(0, rows)


class FeatureStore(nn.Module):
    """Common interface of the per-row feature stores."""

    feature_dim: int

    @property
    def num_rows(self) -> int:
        raise NotImplementedError

    def forward(self, rows: Int[Tensor, "n"]) -> Float[Tensor, "n k"]:
        raise NotImplementedError

    def table(self) -> Float[Tensor, "m k"]:
        """The feature of every row, as :meth:`forward` gives it (and with its gradients): for kernels that
        gather rows themselves."""
        raise NotImplementedError

    def remap(self, source_rows: Int[Tensor, "m_new"], in_place: bool = False) -> List[ParameterSwap]:
        """Rebuild the rows: new row i copies old row ``source_rows[i]``, or is freshly initialised where -1.

        By default the row parameters are replaced by new ``nn.Parameter`` objects (autograd caches a
        parameter's shape, so a used parameter cannot change shape in place) and the (old, new) pairs
        are returned so that optimisers can follow. ``in_place=True`` keeps the objects and changes
        ``.data``; it is only safe before the parameters took part in a backward pass (loading).
        """
        raise NotImplementedError

    def parameter_groups(self) -> Dict[str, List[nn.Parameter]]:
        """This store's parameters by optimiser group: ``grid_logits``, ``grid_features``, ``codebooks``."""
        raise NotImplementedError

    def hold_indices(self, hold: bool) -> None:
        """Reuse what the tables derive from learned indices until ``hold_indices(False)`` (stores without learned
        indices hold nothing)."""


ParameterSwap = Tuple[nn.Parameter, nn.Parameter]
"""(old, new) parameter after a row remap."""


def check_codewords(
    codebook: Tensor, indices: Tensor, like: Tensor, rows: int, choices: int, frozen: bool, what: str
) -> None:
    """``ValueError`` naming ``what`` unless it is frozen, ``codebook`` is shaped ``like`` its codebook and ``indices``
    are ``rows`` indices in ``[0, choices)``."""
    if not frozen:
        raise ValueError(f"{what}: decoded codewords load into frozen indices only (frozen_indices), not into logits")
    if codebook.shape != like.shape or indices.shape != (rows,):
        raise ValueError(
            f"{what}: expected a codebook {tuple(like.shape)} and {rows} indices, "
            f"got {tuple(codebook.shape)} and {tuple(indices.shape)}"
        )
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= choices):
        raise ValueError(f"{what}: indices must lie in [0, {choices})")


def rows_from(values: Tensor, source_rows: Int[Tensor, "m_new"]) -> Tensor:
    """New row ``i`` is ``values[source_rows[i]]``, or zero where ``source_rows[i]`` is -1: gathered straight into
    one new tensor (no full-size temporary beside it, which at 10-bit indices would be 4 kB a row)."""
    keep = source_rows >= 0
    if values.shape[0] == 0 or not bool(keep.any()):
        return values.new_zeros(source_rows.shape[0], *values.shape[1:])
    rows = values.index_select(0, source_rows.clamp_min(0))
    rows[~keep] = 0
    return rows


def _remap_rows(
    module: nn.Module,
    name: str,
    source_rows: Int[Tensor, "m_new"],
    fresh: Optional[Callable[[int], Tensor]],
    in_place: bool,
) -> List[ParameterSwap]:
    """Make parameter ``name`` of ``module`` the rows :func:`rows_from` gives, with ``fresh(n)`` for the ``n`` new
    rows (where ``source_rows`` is -1; zero if ``fresh`` is None), in place or as a new parameter whose swap is
    returned."""
    param: nn.Parameter = getattr(module, name)
    new = rows_from(param.data, source_rows)
    new_rows = source_rows < 0
    if fresh is not None and bool(new_rows.any()):
        new[new_rows] = fresh(int(new_rows.sum())).to(new)
    return _replace_parameter(module, name, new, in_place)


def _normal_rows(width: int, std: float, device: torch.device) -> Callable[[int], Tensor]:
    """Makes ``n`` fresh rows of ``width`` normal values of standard deviation ``std``."""
    return lambda n: torch.randn(n, width, device=device) * std


def _replace_parameter(module: nn.Module, name: str, new: Tensor, in_place: bool) -> List[ParameterSwap]:
    """Make ``new`` the data of parameter ``name`` of ``module``: in place (same parameter, no gradient), or as a new
    parameter whose swap is returned for optimisers to follow."""
    param: nn.Parameter = getattr(module, name)
    if in_place:
        param.data = new
        param.grad = None
        return []
    replacement = nn.Parameter(new, requires_grad=param.requires_grad)
    setattr(module, name, replacement)
    return [(param, replacement)]


class CodebookFeatures(TransientState, FeatureStore):
    """``num_rows`` learned ``index_bits``-bit indices into a codebook of ``2**index_bits`` vectors of width
    ``feature_dim``.

    ``temperature`` (softmax temperature of the relaxation) and ``relaxed`` (soft codewords in the
    forward pass too, in training mode only) are training-schedule state set by the model; in eval
    mode lookups always use the hard indices, as a decoded file does.

    ``float_warmup=True`` adds a float row table (the float twin's features) that lookups read instead,
    until :meth:`quantize_float_warmup` turns it into the codebook (k-means) and the indices (nearest
    codeword) and empties it. Until then the logits are empty (no rows): with 10-bit indices they would hold 4 kB
    per row that nothing reads.

    A store may keep some rows in float (:meth:`quantize_float_warmup`'s ``float_fraction``): their lookups read
    ``float_features`` instead of their codeword, and their indices, still stored, carry nothing.

    ``frozen=True`` holds every row's index as an int32 (the ``indices`` buffer) instead of ``2**index_bits`` float
    logits (``logits`` is None): what a decoded file holds, in memory in proportion to the file. The codebook can
    still train; the indices cannot, and there is no warm-up. :meth:`freeze_indices` turns a trained store into a
    frozen one (its ``logits`` then an empty parameter).

    ``codebook_bits`` (2..8) makes lookups read the codebook rounded to that many bits per value, one scale per
    feature channel, as a file stores it (:mod:`vqad_nerfstudio.rounding`), with straight-through gradients to the
    float codebook; None reads it as it is (fp16 in a file).

    ``fuse_rate=True`` computes the index rate in :meth:`table`'s pass (for a loss with the rate term).
    ``use_kernels=False`` keeps the softmax side of the indices on the PyTorch reference path on a GPU too.
    ``logit_dtype`` is the logits' storage (float16: half the memory and bytes of float32; every computation on them
    is float32, and Adam's updates round stochastically, see :mod:`vqad_nerfstudio.optim`).
    ``index_factors=2`` learns each index as two ``index_bits / 2``-bit factors
    (:mod:`~vqad_nerfstudio.encodings.index_factors`): ``2 * 2**(b/2)`` logits a row instead of ``2**b``, the same
    codebook and hard indices; on the GPU its Adam pass has a kernel of its own, the rest runs in PyTorch.
    """

    temperature: float = 1.0
    relaxed: bool = False
    TRANSIENT = frozenset(
        {"temperature", "relaxed", "_rate_of_table", "_held_indices", "_held_table", "_held_codebook", "_holding",
         "_hard_table", "_forecast"}
    )  # fmt: skip

    def __init__(
        self,
        num_rows: int,
        index_bits: int,
        feature_dim: int,
        logit_init_std: float = 0.01,
        codebook_init_std: float = 0.01,
        float_warmup: bool = False,
        frozen: bool = False,
        fuse_rate: bool = False,
        use_kernels: bool = True,
        codebook_bits: Optional[int] = None,
        logit_dtype: torch.dtype = torch.float32,
        index_factors: int = 1,
    ) -> None:
        super().__init__()
        if not 1 <= index_bits <= 16:
            raise ValueError(f"index_bits must be in 1..16, got {index_bits}")
        factored.check_factors(index_bits, index_factors)
        if codebook_bits is not None and codebook_bits not in QUANTIZED_BITS:
            raise ValueError(f"codebook_bits must be None (as trained) or 2..8, got {codebook_bits!r}")
        self.codebook_bits = codebook_bits
        """None: lookups read the codebook as it is; 2..8: rounded per feature channel to that many bits."""
        self.index_bits = index_bits
        self.index_factors = index_factors
        """Factors each index is learned as (1: ``2**b`` logits a row; 2: two ``2**(b/2)``-way factors)."""
        self.feature_dim = feature_dim
        self.logit_init_std = logit_init_std
        self.codebook_init_std = codebook_init_std
        self.frozen = frozen
        self.logits: Optional[nn.Parameter]
        self.indices: Optional[Tensor]
        self._float_warmup = float_warmup and not frozen
        if frozen:
            self.register_parameter("logits", None)
            self.register_buffer("indices", torch.zeros(num_rows, dtype=torch.int32))
        else:
            logit_rows = 0 if self._float_warmup else num_rows
            width = factored.logit_width(index_bits, index_factors)
            self.logits = nn.Parameter((torch.randn(logit_rows, width) * logit_init_std).to(logit_dtype))
            self.register_buffer("indices", None)
        self.codebook = nn.Parameter(torch.randn(2**index_bits, feature_dim) * codebook_init_std)
        warmup_rows = num_rows if self._float_warmup else 0
        self.warmup_features = nn.Parameter(torch.randn(warmup_rows, feature_dim) * codebook_init_std)
        self.float_features = nn.Parameter(torch.zeros(0, feature_dim))
        """Every row's float features where some rows are kept in float (``float_rows``), else empty."""
        self.register_buffer("float_rows", torch.zeros(0, dtype=torch.bool))
        """Which rows read ``float_features`` instead of their codeword (empty: none)."""
        self.fuse_rate = fuse_rate
        """Whether :meth:`table` in training also computes the index rate, which the next :meth:`index_rate_bits`
        returns: both gradients then share one buffer (with 8-bit indices 1 GB per million rows less at the peak)."""
        self.use_kernels = use_kernels
        """Whether the softmax side of the indices runs as :mod:`vqad_nerfstudio.kernels.relaxed_indices` on a GPU."""
        self._rate_of_table: Optional[Tuple[Tensor, int]] = None
        """The rate the last :meth:`table` computed, and the logits' version it belongs to."""
        self._held_indices: Optional[StepIndices] = None
        """Inside :meth:`hold_indices`, the :func:`step_indices` of the first training table without gradients."""
        self._held_table: Optional[Tensor] = None
        """Inside :meth:`hold_indices`, the codewords of the held indices, gathered by the first training table without
        gradients (the graded table returns them: the step gathers them once)."""
        self._held_codebook: Optional[Tensor] = None
        """Inside :meth:`hold_indices`, the codebook rounded to ``codebook_bits`` by the step's first lookup."""
        self._holding = False
        self._hard_table: Optional[Tuple[Tuple, Tensor]] = None
        """In eval mode, the hard table of the first lookup without gradients, and the parameters' state it belongs to
        (kept until the mode changes or the parameters are replaced: renders then share one table)."""
        self.update_graph = CapturedWork(slots=1)
        """Replays the straight-through backward pass's in-backward Adam update of the logits and the codebook
        gradient on the GPU (see :func:`straight_through_codewords`; one graph: the logits' last place); disabled:
        launched one by one."""
        self._forecast: Optional[Tuple[Tensor, Tensor, Tuple]] = None
        """The hard indices and soft-index column sums that the last in-backward Adam update of the logits forecast
        on the GPU, and the logits' state and temperature they hold for: the next step's indices, without a pass
        over the logits (:meth:`_indices_of_step`)."""

    @property
    def num_rows(self) -> int:
        if self.frozen:
            return self.indices.shape[0]
        return self.warmup_features.shape[0] if self._float_warmup else self.logits.shape[0]

    def train(self, mode: bool = True) -> "CodebookFeatures":
        # optimisers may change the codebook in place without a version bump (fused Adam). The forecast stays: it
        # is checked against the logits' version, and nerfstudio's trainer calls train() before every step.
        self._hard_table = None
        return super().train(mode)

    @property
    def in_float_warmup(self) -> bool:
        """Whether lookups still read the float warm-up rows (see :meth:`quantize_float_warmup`). A store without
        rows yet (a level the first pruning grows) built with a warm-up is in it: the rows it grows start float."""
        return self._float_warmup

    @property
    def has_float_rows(self) -> bool:
        """Whether some rows are kept in float (see :meth:`quantize_float_warmup`)."""
        return self.float_rows.shape[0] > 0

    def forward(self, rows: Int[Tensor, "n"]) -> Float[Tensor, "n k"]:
        codewords = self._codewords(rows)
        if not self.has_float_rows:
            return codewords
        kept = self.float_rows.index_select(0, rows)[:, None]
        return torch.where(kept, self.float_features.index_select(0, rows), codewords)

    def table(self) -> Float[Tensor, "m k"]:
        codewords = self._codeword_table()
        if not self.has_float_rows:
            return codewords
        return torch.where(self.float_rows[:, None], self.float_features, codewords)

    def hold_indices(self, hold: bool) -> None:
        """From now until ``hold_indices(False)``, training tables compute the hard indices (and with ``fuse_rate``
        the rate) once: a training step's density pass without gradients and its graded pass then read the logits
        once instead of twice. The logits and the temperature must not change meanwhile."""
        self._holding = hold
        self._held_indices = None
        self._held_table = None
        self._held_codebook = None

    def lookup_codebook(self) -> Float[Tensor, "c k"]:
        """The codebook as lookups read it: rounded to ``codebook_bits`` per feature channel (once inside
        :meth:`hold_indices`), gradients straight through to the float codebook; as it is without ``codebook_bits``."""
        if self.codebook_bits is None:
            return self.codebook
        rounded = self._held_codebook
        if rounded is not None and (rounded.requires_grad or not torch.is_grad_enabled()):
            return rounded  # held already straight-through (prepare_held_steps)
        if rounded is None:
            rounded = rounded_codebooks(self.codebook, self.codebook_bits, self.use_kernels)
            if self._holding:
                self._held_codebook = rounded
        return straight_through(self.codebook, rounded)

    def _logit_state(self, temperature: float) -> Tuple:
        """What a forecast of the indices must match: the logits' storage, shape and version, and the temperature."""
        return self.logits.data_ptr(), self.logits.shape, self.logits._version, temperature

    def _keep_forecast(self, hard: Int[Tensor, "m"], sums: Float[Tensor, "c"], temperature: float) -> None:
        """Keep the indices an in-backward Adam update forecast at ``temperature`` for the logits it has just
        updated."""
        self._forecast = hard, sums, self._logit_state(temperature)

    def _table_from_held_state(self) -> bool:
        """Whether this step's training table can be derived without reading the logits (on the kernels' path):
        from frozen indices, or from a forecast that holds for the logits as they are (:func:`prepare_held_steps`)."""
        if not (self.training and self._holding and self.use_kernels and relaxed_indices.available(self.codebook)):
            return False
        if self.in_float_warmup or self.relaxed:
            return False
        forecast = self._forecast
        return self.frozen or (forecast is not None and forecast[2] == self._logit_state(self.temperature))

    def _take_forecast(self) -> Tuple[Tensor, Tensor]:
        """The forecast hard indices and soft-index sums, consumed (see :meth:`_table_from_held_state`)."""
        assert self._forecast is not None
        hard, sums, _ = self._forecast
        self._forecast = None
        return hard, sums

    def _indices_of_step(self) -> StepIndices:
        """:func:`step_indices` of the logits as they are, held inside :meth:`hold_indices`: the last update's
        forecast where it holds for them, else one pass over the logits."""
        if self._held_indices is not None:
            return self._held_indices
        with_rate = self.fuse_rate and self._holding
        forecast, self._forecast = self._forecast, None
        if forecast is not None and forecast[2] == self._logit_state(self.temperature):
            known = step_indices_of_sums(forecast[0], forecast[1], with_rate)
        else:
            known = step_indices(self.logits, self.temperature, with_rate, self.use_kernels, self.index_factors)
        if self._holding:
            self._held_indices = known
        return known

    def _hard_table_of_step(self) -> Float[Tensor, "m k"]:
        """The codewords of :meth:`_indices_of_step`'s hard indices, held with them inside :meth:`hold_indices`."""
        if self._held_table is not None:
            return self._held_table
        table = codeword_table(self.lookup_codebook(), self._indices_of_step()[0], self.use_kernels)
        if self._holding:
            self._held_table = table
        return table

    def _codewords(self, rows: Int[Tensor, "n"]) -> Float[Tensor, "n k"]:
        """:meth:`forward` without the rows kept in float."""
        if self.in_float_warmup:
            return self.warmup_features.index_select(0, rows)
        codebook = self.lookup_codebook()
        if self.frozen:
            return codebook.index_select(0, self.indices.index_select(0, rows))
        relaxed = self.relaxed and self.training
        if not torch.is_grad_enabled() and not relaxed:
            return codebook.index_select(0, hard_indices_of(self.logits.index_select(0, rows), self.index_factors))
        return straight_through_lookup(
            rows, self.logits, codebook, self.temperature, relaxed, self.use_kernels, self.index_factors
        )

    def _codeword_table(self) -> Float[Tensor, "m k"]:
        """:meth:`table` without the rows kept in float."""
        if self.in_float_warmup:
            return self.warmup_features
        if self.frozen:
            return self._frozen_table()
        if self.relaxed and self.training:
            return soft_codewords(self.logits, self.lookup_codebook(), self.temperature, self.index_factors)
        if not torch.is_grad_enabled():
            if self.training:
                return self._hard_table_of_step()
            state = (self.codebook_bits, *((t.data_ptr(), t._version, t.shape) for t in (self.logits, self.codebook)))
            if self._hard_table is None or self._hard_table[0] != state:
                hard = hard_indices_of(self.logits, self.index_factors)
                self._hard_table = state, codeword_table(self.lookup_codebook(), hard, self.use_kernels)
            return self._hard_table[1]
        held, held_table = (self._held_indices, self._held_table) if self.training else (None, None)
        codebook = self.lookup_codebook()
        forecast_to = self._keep_forecast if self.training else None
        graph = self.update_graph if self.update_graph.enabled else None
        if self.fuse_rate and self.training:
            table, rate = straight_through_codewords_and_rate(
                self.logits, codebook, self.temperature, self.use_kernels, held, held_table, forecast_to,
                self.index_factors, graph,
            )  # fmt: skip
            self._rate_of_table = rate, self.logits._version
            return table
        return straight_through_codewords(
            self.logits, codebook, self.temperature, self.use_kernels, held, held_table, forecast_to,
            self.index_factors, graph,
        )  # fmt: skip

    def _frozen_table(self) -> Float[Tensor, "m k"]:
        """The frozen indices' codewords; inside :meth:`hold_indices` the table a lookup without gradients gathers is
        held, and the step's graded lookup returns it (its codebook gradient still flows) instead of gathering it
        again."""
        held = self._held_table
        table = codeword_table(self.lookup_codebook(), self.indices, self.use_kernels, held)
        if self._holding and held is None and not torch.is_grad_enabled():
            self._held_table = table
        return table

    def hard_indices(self) -> Int[Tensor, "m"]:
        """The b-bit index of every row: what a compressed file stores (``RuntimeError`` in the float warm-up)."""
        if self.in_float_warmup:
            raise RuntimeError("a store in its float warm-up has no indices yet (see quantize_float_warmup)")
        return self.indices.long() if self.frozen else hard_indices_of(self.logits.detach(), self.index_factors)

    def index_rate_bits(self) -> Float[Tensor, ""]:
        """Differentiable estimate of the bits an order-0 entropy coder spends on this store's indices.

        Each row's soft index ``softmax(C / temperature)`` coded with the level's marginal (the mean soft
        index): ``sum_rows sum_c soft[r, c] * -log2(mean_soft[c])``. For one-hot rows this is the coded size
        of the hard indices under their own histogram; lowering it concentrates the indices on fewer codewords.
        Frozen indices have no such estimate (``RuntimeError``). After a :meth:`table` that computed it
        (``fuse_rate``) for the logits as they are, that one, once. "As they are" is the logits' version, which
        in-place updates bump but torch's fused Adam does not: read the rate in the step that computed the table
        (the model does).
        """
        if self.frozen:
            raise RuntimeError("frozen indices cannot be trained, so they have no rate estimate")
        pending, self._rate_of_table = self._rate_of_table, None
        if pending is not None and pending[1] == self.logits._version:
            return pending[0]
        return soft_index_rate_bits(self.logits, self.temperature, self.use_kernels, self.index_factors)

    @torch.no_grad()
    def freeze_indices(self) -> List[ParameterSwap]:
        """Fix every row's index at its hard value, as a file stores it: the store becomes ``frozen`` (the codebook
        and float rows still train, the indices no longer do) and its logits are replaced by an empty parameter,
        whose swap is returned for optimisers to follow (releasing the logits' moments). Nothing to do when frozen
        already; a store in its float warm-up has no indices yet (``RuntimeError``)."""
        if self.frozen:
            return []
        indices = self.hard_indices().to(torch.int32)
        self.frozen = True
        self.indices = indices
        self._hard_table = self._rate_of_table = self._forecast = None
        empty = self.logits.data.new_empty(0, self.logits.shape[1])
        return _replace_parameter(self, "logits", empty, in_place=False)

    @torch.no_grad()
    def load_codewords(
        self,
        codebook: Float[Tensor, "c k"],
        indices: Int[Tensor, "m"],
        float_rows: Optional[Bool[Tensor, "m"]] = None,
        float_features: Optional[Float[Tensor, "f k"]] = None,
    ) -> None:
        """Make ``codebook`` the codebook and ``indices`` every row's index, and the ``float_rows`` (if given) read
        ``float_features`` (one row per kept row, in row order) instead: what decoding a file does, into a frozen
        store."""
        check_codewords(codebook, indices, self.codebook, self.num_rows, 2**self.index_bits, self.frozen, "store")
        kept = int(float_rows.sum()) if float_rows is not None else 0
        if float_rows is not None and (
            float_rows.shape != (self.num_rows,)
            or float_features is None
            or float_features.shape != (kept, self.feature_dim)
        ):
            got = None if float_features is None else tuple(float_features.shape)
            raise ValueError(
                f"store: expected {self.num_rows} float-row flags and their ({kept}, {self.feature_dim}) features, got "
                f"{tuple(float_rows.shape)} flags and features {got}"
            )
        self.codebook.copy_(codebook)
        self.indices.copy_(indices)
        if kept:
            self.float_rows = float_rows.to(self.codebook.device, torch.bool)
            features = torch.zeros(self.num_rows, self.feature_dim, device=self.codebook.device)
            features[self.float_rows] = float_features.to(features)
            self.float_features = nn.Parameter(features)
        else:
            self.float_rows = self.float_rows.new_zeros(0)
            self.float_features = nn.Parameter(self.float_features.data.new_zeros(0, self.feature_dim))
        self._hard_table = None

    @torch.no_grad()
    def quantize_float_warmup(
        self,
        iterations: int = 25,
        generator: Optional[torch.Generator] = None,
        importance: Optional[Float[Tensor, "m"]] = None,
        float_fraction: float = 0.0,
    ) -> List[ParameterSwap]:
        """End the float warm-up: the warm-up rows become the codebook and every row's index logits.

        :func:`vector_quantize` picks the codebook (k-means of the rows weighted by ``importance``, how much each
        row's error costs; uniform when None); each row's logits are minus its squared distances to the codewords
        over the mean weighted quantisation error, so the argmax is the nearest codeword and the softmax keeps the
        next nearest within reach of the straight-through gradient.

        ``float_fraction`` of the rows (rounded down) stay float instead (VQRF's kept voxels): those whose
        quantisation would cost the loss most, ``importance x`` squared distance to the nearest codeword of a
        first k-means of all rows; the codebook is then fitted to the other rows. The warm-up table is replaced
        by an empty parameter; returns the swaps for optimisers."""
        if not self.in_float_warmup:
            return []
        if not 0.0 <= float_fraction < 1.0:
            raise ValueError(f"float_fraction must be in [0, 1), got {float_fraction}")
        self._float_warmup = False
        if self.warmup_features.shape[0] == 0:  # rows grown later start straight-through from fresh logits
            return []
        features, codewords = self.warmup_features.detach(), 2**self.index_bits
        kept = self._costliest_rows(features, int(float_fraction * features.shape[0]), importance, generator)
        quantized = ~kept
        weights = None if importance is None else importance[quantized]
        centroids, logits = vector_quantize(features[quantized], codewords, weights, iterations, generator)
        logits = logits.neg_() if self.index_factors == 1 else factored.logits_of_joint(logits.neg_())
        lowest = -torch.finfo(self.logits.dtype).max  # float16 logits saturate instead of becoming -inf
        logits = logits.clamp_(min=lowest).to(self.logits.dtype)  # the costs' own memory: no second table
        if bool(kept.any()):
            logits = logits.new_zeros(features.shape[0], logits.shape[1]).index_copy_(
                0, quantized.nonzero()[:, 0], logits
            )
        self.codebook.data = centroids.to(self.codebook.dtype)
        self.codebook.grad = None
        swaps = _replace_parameter(self, "logits", logits, in_place=False)
        self._hard_table = None
        if bool(kept.any()):
            old_float = self.float_features
            self.float_features = nn.Parameter(torch.where(kept[:, None], features, 0.0))
            self.float_rows = kept
            swaps.append((old_float, self.float_features))
        old = self.warmup_features
        self.warmup_features = nn.Parameter(old.data.new_empty(0, self.feature_dim))
        return [(old, self.warmup_features)] + swaps

    def _costliest_rows(
        self,
        features: Float[Tensor, "m k"],
        count: int,
        importance: Optional[Float[Tensor, "m"]],
        generator: Optional[torch.Generator],
    ) -> Bool[Tensor, "m"]:
        """The ``count`` rows whose quantisation into this store's codebook would cost the loss most (importance x
        squared distance to the nearest codeword of a k-means of all rows)."""
        kept = torch.zeros(features.shape[0], dtype=torch.bool, device=features.device)
        if count == 0:
            return kept
        _, costs = vector_quantize(features, 2**self.index_bits, importance, generator=generator)
        scores = costs.min(dim=-1).values * (1.0 if importance is None else importance.float())
        kept[scores.topk(count).indices] = True
        return kept

    def remap(self, source_rows: Int[Tensor, "m_new"], in_place: bool = False) -> List[ParameterSwap]:
        device = self.codebook.device
        self._hard_table = self._forecast = None
        swaps = []
        if self.has_float_rows:
            self.float_rows = rows_from(self.float_rows, source_rows)
            swaps += _remap_rows(self, "float_features", source_rows, None, in_place or self.frozen)
        if self.frozen:
            self.indices = rows_from(self.indices, source_rows)
            return []
        if self.in_float_warmup:
            fresh = _normal_rows(self.feature_dim, self.codebook_init_std, device)
            swaps += _remap_rows(self, "warmup_features", source_rows, fresh, in_place)
            if self.logits.shape[0] == 0:  # no logits until the warm-up ends (a checkpoint from before may have them)
                return swaps
        fresh = _normal_rows(self.logits.shape[1], self.logit_init_std, device)
        return swaps + _remap_rows(self, "logits", source_rows, fresh, in_place)

    def _load_from_state_dict(  # type: ignore[override]
        self,
        state_dict: Dict[str, Tensor],
        prefix: str,
        local_metadata: Dict,
        strict: bool,
        missing_keys: List[str],
        unexpected_keys: List[str],
        error_msgs: List[str],
    ) -> None:
        """Size the warm-up table, the logits and the float rows like the saved ones (empty logits in the warm-up,
        an empty table after it, or without float rows), without changing ``state_dict``; a store with rows is in its
        warm-up when the saved one was.

        A checkpoint from before one of them existed has this store's logits (or indices) but not it: its store was
        past any warm-up and had no float rows, so it is emptied and not reported missing. A state dict without this
        store's keys (nerfstudio's pipeline loads a second time, without the ``_model.`` prefix) leaves the store as
        it is.
        """
        ours = prefix + "logits" in state_dict or prefix + "indices" in state_dict
        self._forecast = None
        saved_indices = state_dict.get(prefix + "indices")
        if saved_indices is not None and not self.frozen:  # saved after freeze_indices
            self.frozen = True
            self.indices = torch.empty(saved_indices.shape, dtype=torch.int32, device=self.codebook.device)
        added_later = {
            "warmup_features": (0, self.feature_dim),
            "float_features": (0, self.feature_dim),
            "float_rows": (0,),
        }
        absent = []
        for name, empty in added_later.items():
            saved = state_dict.get(prefix + name)
            if saved is None and ours:
                absent.append(prefix + name)
            shape = empty if saved is None and ours else None if saved is None else saved.shape
            tensor = getattr(self, name)
            if shape is not None and shape != tensor.shape:
                tensor.data = tensor.data.new_empty(shape)
        saved_logits = state_dict.get(prefix + "logits")
        if saved_logits is not None and self.logits is not None and saved_logits.shape[1:] != self.logits.shape[1:]:
            raise ValueError(
                f"{prefix}logits: the checkpoint has {saved_logits.shape[1]} logits a row, this store "
                f"{self.logits.shape[1]} ({self.index_bits}-bit indices in {self.index_factors} factor(s)): train or "
                "load with the run's index_bits and index_factors"
            )
        if saved_logits is not None and self.logits is not None and saved_logits.shape != self.logits.shape:
            self.logits.data = self.logits.data.new_empty(saved_logits.shape)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        stored_rows = self.indices.shape[0] if self.frozen else self.logits.shape[0]
        if ours and max(stored_rows, self.warmup_features.shape[0]) > 0:
            self._float_warmup = self.warmup_features.shape[0] > 0
        for key in absent:
            if key in missing_keys:
                missing_keys.remove(key)

    def parameter_groups(self) -> Dict[str, List[nn.Parameter]]:
        logits = [] if self.frozen else [self.logits]
        return {
            "grid_logits": logits,
            "codebooks": [self.codebook],
            "grid_features": [self.warmup_features, self.float_features],
        }


def prepare_held_steps(stores: Sequence[FeatureStore], graph: Optional[CapturedWork] = None) -> None:
    """What the lookups of ``stores`` inside :meth:`~CodebookFeatures.hold_indices` derive from their parameters,
    computed now in one pass, on the GPU one replay of ``graph`` (None: run as it is):

    - the codebooks rounded to ``codebook_bits`` (past their float warm-up), those of equal shape and bits
      together; on the GPU stored transposed, as the logits' gradient kernel reads each channel's codewords; where
      gradients are recorded, all of them straight-through to their float codebooks by one autograd node;
    - for stores that train on hard indices, the codeword table: of the frozen indices, or of the hard indices that
      the last in-backward update forecast (with their rate where the table computes it), where that forecast
      holds for the logits as they are. Other stores derive theirs at their first lookup, as before.
    """
    holding = [s for s in stores if isinstance(s, CodebookFeatures) and s._holding]
    groups: Dict[Tuple[int, torch.Size, torch.device, bool], List[CodebookFeatures]] = {}
    for store in holding:
        if store.codebook_bits is not None and not store.in_float_warmup:
            key = (store.codebook_bits, store.codebook.shape, store.codebook.device, store.use_kernels)
            groups.setdefault(key, []).append(store)
    rounded_stores = [store for group in groups.values() for store in group]
    tabled = [store for store in holding if store._table_from_held_state()]
    if not rounded_stores and not tabled:
        return
    forecasts = [store._take_forecast() for store in tabled if not store.frozen]
    inputs = [t for forecast in forecasts for t in forecast]

    def work(inputs: Sequence[Tensor]) -> List[Tensor]:
        outputs: List[Tensor] = []
        for (bits, _, _, use_kernel), group in groups.items():
            outputs += rounded_codebooks(torch.stack([s.codebook for s in group]), bits, use_kernel, True).unbind(0)
        codebook_of = {id(store): codebook for store, codebook in zip(rounded_stores, outputs)}
        forecast = iter(inputs)
        for store in tabled:
            codebook = codebook_of.get(id(store), store.codebook).detach()
            if store.frozen:
                outputs.append(codeword_table(codebook, store.indices, store.use_kernels))
                continue
            known = step_indices_of_sums(next(forecast), next(forecast), store.fuse_rate)
            outputs += [*known, codeword_table(codebook, known[0], store.use_kernels)]
        return outputs

    key = (
        tuple((k, tuple(place(s.codebook) for s in group)) for k, group in groups.items()),
        tuple((place(s.codebook), s.frozen and place(s.indices), s.fuse_rate, s.use_kernels) for s in tabled),
    )
    device = (rounded_stores or tabled)[0].codebook.device
    with torch.no_grad():
        outputs = iter(work(inputs) if graph is None else graph.run(key, inputs, work, device))
    codebooks = [next(outputs) for _ in rounded_stores]
    for store, codebook in zip(rounded_stores, straight_through_group([s.codebook for s in rounded_stores], codebooks)):
        store._held_codebook = codebook
    for store in tabled:
        if not store.frozen:
            store._held_indices = (next(outputs), next(outputs), next(outputs))
        store._held_table = next(outputs)


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

    def table(self) -> Float[Tensor, "m k"]:
        return self.features

    def remap(self, source_rows: Int[Tensor, "m_new"], in_place: bool = False) -> List[ParameterSwap]:
        fresh = _normal_rows(self.feature_dim, self.init_std, self.features.device)
        return _remap_rows(self, "features", source_rows, fresh, in_place)

    def parameter_groups(self) -> Dict[str, List[nn.Parameter]]:
        return {"grid_features": [self.features]}

    @torch.no_grad()
    def load_features(self, features: Float[Tensor, "m k"]) -> None:
        """Make ``features`` every row's feature vector (what decoding a file does)."""
        if features.shape != self.features.shape:
            raise ValueError(f"expected features {tuple(self.features.shape)}, got {tuple(features.shape)}")
        self.features.copy_(features)


__all__ = [
    "ParameterSwap",
    "MIN_SHARE",
    "check_codewords",
    "FeatureStore",
    "CodebookFeatures",
    "FloatFeatures",
    "prepare_held_steps",
    "soft_codewords",
    "straight_through_codewords",
    "straight_through_codewords_and_rate",
    "straight_through_lookup",
    "candidate_rows",
    "nonzero_gradient_lookups",
    "interpolated_codewords",
    "rows_from",
]
