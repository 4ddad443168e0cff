"""Learned indices' lookups: the straight-through estimator and the index rate, as functions of logits and codebook.

Forward, each row reads its hard codeword (the argmax of its logits); backward, the gradient follows the softmax
relaxation ``softmax(logits / temperature)``, without materialising ``[rows, codewords]`` activations (the
backward pass recomputes the softmax in chunks). The order-zero index rate (bits a row's hard index costs under
the codebook's usage, with a soft gradient) trains the indices to be cheap to code. On the GPU the kernels of
:mod:`~vqad_nerfstudio.kernels.relaxed_indices` do the heavy passes, including the logits' Adam update inside the
backward pass; the PyTorch code here is the reference. The stores of
:mod:`~vqad_nerfstudio.encodings.vertex_features` hold the parameters and call these.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import torch
from jaxtyping import Float, Int
from torch import Tensor

from vqad_nerfstudio.encodings import index_factors as factored
from vqad_nerfstudio.kernels import column_rounding, factored_indices, relaxed_indices
from vqad_nerfstudio.kernels.captured import CapturedWork, place
from vqad_nerfstudio.optim import AdamStep, adam_update_, pending_update, widened
from vqad_nerfstudio.rounding import rounded_columns

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


__all__ = [
    "MIN_SHARE",
    "ROW_CHUNK",
    "StepIndices",
    "candidate_rows",
    "codebook_grad",
    "codeword_table",
    "hard_indices_and_rate",
    "hard_indices_and_shares",
    "hard_indices_of",
    "interpolated_codewords",
    "nonzero_gradient_lookups",
    "relaxed_logit_adam_",
    "relaxed_logit_grad",
    "rounded_codebooks",
    "soft_codewords",
    "soft_index_rate_bits",
    "step_indices",
    "step_indices_of_sums",
    "straight_through_codewords",
    "straight_through_codewords_and_rate",
    "straight_through_lookup",
]
