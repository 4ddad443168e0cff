"""The softmax side of learned indices on the GPU (Triton): hard indices with the soft indices' column sums, and the
logits' gradient through the softmax, each in one pass over the ``[rows, 2**b]`` logits.

With 8-bit indices the logits are 256 floats per vertex, and a training step's PyTorch path walks them about twenty
times (argmax, softmax for the rate, and in the backward pass the codeword products, the softmax recomputed and
its Jacobian, op by op and chunk by chunk). Here the forward pass reads the logits once, and the backward pass
reads them once and writes their gradient once, the only ``[rows, 2**b]`` tensor it allocates.

:mod:`vqad_nerfstudio.encodings.straight_through` uses these on CUDA tensors when Triton imports; its PyTorch
functions are the reference the tests compare against.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Tuple

import torch
from jaxtyping import Float, Int
from torch import Tensor

from vqad_nerfstudio.kernels import runs_on
from vqad_nerfstudio.optim import dropped_bits, saturation

if TYPE_CHECKING:
    from vqad_nerfstudio.optim import AdamStep

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the PyTorch path is used
    triton = None

MAX_CODEWORDS = 4096
"""Largest codebook (``2**b``) the kernels take: a block holds whole rows of logits in registers."""
_TILE_BYTES = 8192
"""Bytes of logits per block (rows x codewords, whole rows): 2048 float32 or 4096 16-bit logits, each block one read
of a program's chain of reads whatever the dtype."""
ROWS_PER_PROGRAM = 64
"""Rows one program of the forward kernel reads (at least one block; one partial sum of soft indices each). A program
is a latency-bound chain of block after block: at 1024 rows (up to ``830f8a5``) it read 128 blocks of 8 rows of 256
logits one after the other, and the passes over lego's 8-bit logits (1.1 M rows) took 2.1 ms per training step,
about 6x the time their bytes need (one H100, ``--profile vqad``); ``benchmarks/relaxed_index_speed.py`` times
the choices."""


@dataclass(frozen=True)
class Tiling:
    """How a pass over the logits is cut into programs: ``tile_bytes`` of logits per block (whole rows), blocks
    chained into ``rows_per_program`` rows per program (raised to a whole block; one partial sum of soft indices
    each), and ``warps`` per program (None: 4 for float32 logits, 8 for 16-bit ones, so that each thread holds the
    same share of a block)."""

    tile_bytes: int = _TILE_BYTES
    rows_per_program: int = ROWS_PER_PROGRAM
    warps: Optional[int] = None


ADAM_TILING = Tiling(tile_bytes=4096, rows_per_program=256, warps=4)
"""The logits' Adam pass's tiling: on one H100, 1.46 ms for 1.1 M rows of 256 float16 logits (bfloat16 moments, with
the forecast) against 1.81 ms at the forward pass's tiling (8192 bytes, 64 rows, 8 warps; `858ae09`,
``benchmarks/relaxed_index_speed.py --adam-tilings``, which times others)."""

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
"""The dtypes of logits the kernels read (and update)."""


def available(logits: Tensor) -> bool:
    """Whether the kernels can run on ``logits`` (float32 or 16-bit on their device, see :func:`runs_on`; at most
    MAX_CODEWORDS columns)."""
    return runs_on(logits) and logits.dtype in _DTYPES and logits.shape[-1] <= MAX_CODEWORDS


if triton is not None:

    @triton.jit
    def _softmax_rows(logits, first_row, n_rows, inv_temperature, C: tl.constexpr, C_POW2: tl.constexpr,
                      BLOCK: tl.constexpr):  # fmt: skip
        """A block of rows from ``first_row``: their ids, which exist, the logits and ``softmax(logits * inv_t)``
        (0 outside the block's existing rows and columns)."""
        row = first_row + tl.arange(0, BLOCK)
        row_ok = row < n_rows
        column = tl.arange(0, C_POW2)
        mask = row_ok[:, None] & (column < C)[None, :]
        x = tl.load(logits + row[:, None].to(tl.int64) * C + column[None, :], mask=mask, other=float("-inf"))
        x = x.to(tl.float32)
        return row, row_ok, column, mask, x, _softmax(x, row_ok, mask, inv_temperature)

    @triton.jit
    def _adam_arithmetic(x, grad, m, v, step_size, beta1, beta2, eps, sqrt_bias2, weight_decay):
        """torch.optim.Adam's update of ``x`` from ``grad`` and its moments ``m`` and ``v`` (float32 values): the
        updated ``x``, ``m`` and ``v``."""
        grad += weight_decay * x
        m = m * beta1 + (1.0 - beta1) * grad
        v = v * beta2 + (1.0 - beta2) * grad * grad
        return x - step_size * m / (tl.sqrt(v) / sqrt_bias2 + eps), m, v

    @triton.jit
    def _softmax(x, row_ok, mask, inv_temperature):
        """``softmax(x * inv_t)`` of a block's rows, whose ``x`` is -inf outside ``mask`` (0 there)."""
        scaled = x * inv_temperature
        peak = tl.where(row_ok, tl.max(scaled, axis=1), 0.0)
        exponentials = tl.where(mask, tl.exp(scaled - peak[:, None]), 0.0)
        total = tl.where(row_ok, tl.sum(exponentials, axis=1), 1.0)
        return exponentials / total[:, None]

    @triton.jit
    def _hard_and_shares_kernel(
        logits,
        hard,
        partial_sums,
        n_rows,
        inv_temperature,
        C: tl.constexpr,
        C_POW2: tl.constexpr,
        BLOCK: tl.constexpr,
        ROWS_PER_PROGRAM: tl.constexpr,
        WITH_SHARES: tl.constexpr,
    ):
        program = tl.program_id(0)
        blocks = tl.zeros((BLOCK, C_POW2), dtype=tl.float32)  # summed over the rows once, after the last block
        for start in range(0, ROWS_PER_PROGRAM, BLOCK):
            row, row_ok, column, mask, x, soft = _softmax_rows(
                logits, program * ROWS_PER_PROGRAM + start, n_rows, inv_temperature, C, C_POW2, BLOCK
            )
            tl.store(hard + row, tl.argmax(x, axis=1).to(tl.int64), mask=row_ok)
            if WITH_SHARES:
                blocks += soft
        if WITH_SHARES:
            column = tl.arange(0, C_POW2)
            tl.store(partial_sums + program * C + column, tl.sum(blocks, axis=0), mask=column < C)

    @triton.jit
    def _rate_kernel(sums, n_rows, bits, grad_counts, C: tl.constexpr, C_POW2: tl.constexpr, MIN_SHARE: tl.constexpr):
        """The shares (the soft indices' column ``sums`` over ``n_rows``), the order-0 bits of ``n_rows`` indices
        under them and the bits' gradient in each count, in one program (a few thousand values)."""
        column = tl.arange(0, C_POW2)
        column_ok = column < C
        rows = tl.where(column_ok, n_rows, 0).to(tl.float32)  # a tensor: n_rows may be specialised to a constant
        shares = tl.load(sums + column, mask=column_ok, other=0.0) / tl.maximum(rows, 1.0)
        log_shares = tl.log2(tl.maximum(shares, MIN_SHARE))
        tl.store(bits, -tl.sum(tl.where(column_ok, shares * rows * log_shares, 0.0), axis=0))
        used = tl.where(shares >= MIN_SHARE, 1.4426950408889634, 0.0)  # 1 / ln 2
        tl.store(grad_counts + column, -(log_shares + used), mask=column_ok)

    @triton.jit
    def _hash(x):
        """A uint32 hash of uint32 ``x`` (C. Wellons' lowbias32): random bits for stochastic rounding in five
        operations per value (Philox takes ten rounds of multiplications)."""
        x ^= x >> 16
        x *= 0x7FEB352D
        x ^= x >> 15
        x *= 0x846CA68B
        x ^= x >> 16
        return x

    @triton.jit
    def _stochastically_rounded(x, noise, DROPPED: tl.constexpr, LARGEST: tl.constexpr):
        """float32 ``x`` on the grid of a dtype that keeps all but ``DROPPED`` low bits (``LARGEST``: its largest
        finite value, 0 for none), rounded up or down with ``noise`` (random uint32) as
        :func:`vqad_nerfstudio.optim.stochastically_rounded` rounds."""
        if DROPPED == 0:
            return x
        if LARGEST > 0:
            x = tl.minimum(tl.maximum(x, -LARGEST), LARGEST)
        bits = x.to(tl.int32, bitcast=True) + (noise & ((1 << DROPPED) - 1)).to(tl.int32)
        return (bits & -(1 << DROPPED)).to(tl.float32, bitcast=True)

    @triton.jit(do_not_specialize=["seed"])
    def _logit_grad_kernel(
        logits,
        grad_soft,
        grad_rows,
        codebook_t,
        grad_share,
        share_scale,
        out,
        exp_avg,
        exp_avg_sq,
        next_hard,
        next_sums,
        n_rows,
        inv_temperature,
        step_size,
        beta1,
        beta2,
        eps,
        sqrt_bias2,
        weight_decay,
        seed,
        scalars,
        C: tl.constexpr,
        C_POW2: tl.constexpr,
        K: tl.constexpr,
        BLOCK: tl.constexpr,
        ROWS_PER_PROGRAM: tl.constexpr,
        HAS_SOFT: tl.constexpr,
        HAS_ROWS: tl.constexpr,
        HAS_SHARE: tl.constexpr,
        HAS_SCALE: tl.constexpr,
        ADAM: tl.constexpr,
        LOGIT_DROPPED: tl.constexpr,
        LOGIT_LARGEST: tl.constexpr,
        EXP_AVG_SQ_DROPPED: tl.constexpr,
        FORECAST: tl.constexpr,
        SCALARS_IN_MEMORY: tl.constexpr,
    ):
        """The logits' gradient into ``out``, or with ``ADAM`` Adam's update of the logits (``out`` is the logits) and
        of their moments from it, block by block (``ROWS_PER_PROGRAM`` rows a program): the gradient is never
        stored. 16-bit logits and second moments (``*_DROPPED`` > 0) are stored stochastically rounded with random
        bits hashed from ``seed`` and each element's offset (the logits' from the hash's low bits, the moment's from
        its high 16); the first moment rounds to nearest, as :func:`vqad_nerfstudio.optim.adam_update_` rounds them.
        With ``FORECAST`` (and ``ADAM``) also the updated logits' hard indices into ``next_hard`` and the column
        sums of their softmax into ``next_sums`` (one row per program), as :func:`_hard_and_shares_kernel` would
        read them back. With ``SCALARS_IN_MEMORY`` the scalars from ``inv_temperature`` to ``seed`` are read from
        ``scalars`` (float32 values, the seed's bits last) instead of the arguments: a recorded graph replays
        with the step's values (:func:`adam_scalars`)."""
        if SCALARS_IN_MEMORY:
            inv_temperature = tl.load(scalars)
            step_size = tl.load(scalars + 1)
            beta1 = tl.load(scalars + 2)
            beta2 = tl.load(scalars + 3)
            eps = tl.load(scalars + 4)
            sqrt_bias2 = tl.load(scalars + 5)
            weight_decay = tl.load(scalars + 6)
            seed = tl.load(scalars + 7).to(tl.int32, bitcast=True)
        program = tl.program_id(0)
        sums = tl.zeros((BLOCK, C_POW2), dtype=tl.float32)  # summed over the rows once, after the last block
        for start in range(0, ROWS_PER_PROGRAM, BLOCK):
            sums += _logit_grad_block(
                logits, grad_soft, grad_rows, codebook_t, grad_share, share_scale, out, exp_avg, exp_avg_sq,
                next_hard, program * ROWS_PER_PROGRAM + start, n_rows, inv_temperature, step_size, beta1, beta2, eps,
                sqrt_bias2, weight_decay, seed, C, C_POW2, K, BLOCK, HAS_SOFT, HAS_ROWS, HAS_SHARE, HAS_SCALE, ADAM,
                LOGIT_DROPPED, LOGIT_LARGEST, EXP_AVG_SQ_DROPPED, FORECAST,
            )  # fmt: skip
        if FORECAST:
            column = tl.arange(0, C_POW2)
            tl.store(next_sums + program * C + column, tl.sum(sums, axis=0), mask=column < C)

    @triton.jit
    def _logit_grad_block(
        logits, grad_soft, grad_rows, codebook_t, grad_share, share_scale, out, exp_avg, exp_avg_sq, next_hard,
        first_row, n_rows, inv_temperature, step_size, beta1, beta2, eps, sqrt_bias2, weight_decay, seed,
        C: tl.constexpr, C_POW2: tl.constexpr, K: tl.constexpr, BLOCK: tl.constexpr, HAS_SOFT: tl.constexpr,
        HAS_ROWS: tl.constexpr, HAS_SHARE: tl.constexpr, HAS_SCALE: tl.constexpr, ADAM: tl.constexpr,
        LOGIT_DROPPED: tl.constexpr, LOGIT_LARGEST: tl.constexpr, EXP_AVG_SQ_DROPPED: tl.constexpr,
        FORECAST: tl.constexpr,
    ):  # fmt: skip
        """One block of :func:`_logit_grad_kernel` from ``first_row``; returns the softmax of its updated logits
        with ``FORECAST`` (zeros otherwise), whose hard indices it stores."""
        row, row_ok, column, mask, x, soft = _softmax_rows(logits, first_row, n_rows, inv_temperature, C, C_POW2, BLOCK)
        offsets = row[:, None].to(tl.int64) * C + column[None, :]
        column_ok = column < C
        if HAS_SOFT:
            grad = tl.load(grad_soft + offsets, mask=mask, other=0.0)
        else:
            grad = tl.zeros((BLOCK, C_POW2), dtype=tl.float32)
        if HAS_ROWS:  # grad_rows @ codebook.T, one feature channel (a contiguous row of codebook_t) at a time
            for k in range(K):
                row_grad = tl.load(grad_rows + row.to(tl.int64) * K + k, mask=row_ok, other=0.0)
                codeword = tl.load(codebook_t + k * C + column, mask=column_ok, other=0.0)
                grad += row_grad[:, None] * codeword[None, :]
        if HAS_SHARE:
            share = tl.load(grad_share + column, mask=column_ok, other=0.0)
            if HAS_SCALE:
                share *= tl.load(share_scale).to(tl.float32)
            grad += share[None, :]
        expected = tl.sum(soft * grad, axis=1)
        grad = soft * (grad - expected[:, None]) * inv_temperature
        if ADAM:  # in float32; the moments are stored in their own dtype
            m = tl.load(exp_avg + offsets, mask=mask, other=0.0).to(tl.float32)
            v = tl.load(exp_avg_sq + offsets, mask=mask, other=0.0).to(tl.float32)
            x, m, v = _adam_arithmetic(
                tl.where(mask, x, 0.0), grad, m, v, step_size, beta1, beta2, eps, sqrt_bias2, weight_decay
            )
            noise = _hash(offsets.to(tl.uint32) ^ seed.to(tl.uint32))
            x = _stochastically_rounded(x, noise, LOGIT_DROPPED, LOGIT_LARGEST)
            v = _stochastically_rounded(v, noise >> 16, EXP_AVG_SQ_DROPPED, 0.0)
            stored = x.to(out.dtype.element_ty)
            tl.store(out + offsets, stored, mask=mask)
            tl.store(exp_avg + offsets, m.to(exp_avg.dtype.element_ty), mask=mask)
            tl.store(exp_avg_sq + offsets, v.to(exp_avg_sq.dtype.element_ty), mask=mask)
            if FORECAST:  # the stored logits, as the next read of them sees them
                x = tl.where(mask, stored.to(tl.float32), float("-inf"))
                tl.store(next_hard + row, tl.argmax(x, axis=1).to(tl.int64), mask=row_ok)
                return _softmax(x, row_ok, mask, inv_temperature)
        else:
            tl.store(out + offsets, grad.to(out.dtype.element_ty), mask=mask)
        return tl.zeros((BLOCK, C_POW2), dtype=tl.float32)

    @triton.jit
    def _codebook_grad_kernel(
        hard, grad_rows, partials, n_rows, C, GROUPS, K: tl.constexpr, K_POW2: tl.constexpr, BLOCK: tl.constexpr
    ):
        """Adds each row's gradient to its hard index's codeword in partial sum ``program % GROUPS``; rows whose
        gradient is zero (vertices no sample touched) add nothing."""
        program = tl.program_id(0)
        row = program * BLOCK + tl.arange(0, BLOCK)
        row_ok = row < n_rows
        channel = tl.arange(0, K_POW2)
        mask = row_ok[:, None] & (channel < K)[None, :]
        grad = tl.load(grad_rows + row[:, None].to(tl.int64) * K + channel[None, :], mask=mask, other=0.0)
        index = tl.load(hard + row, mask=row_ok, other=0)
        target = ((program % GROUPS) * C + index).to(tl.int64)
        tl.atomic_add(partials + target[:, None] * K + channel[None, :], grad, mask=mask & (grad != 0.0), sem="relaxed")

    @triton.jit
    def _codeword_table_kernel(indices, codebook, table, n_rows, codeword_stride, channel_stride, K: tl.constexpr,
                               K_POW2: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
        """Row ``r`` of ``table`` = row ``indices[r]`` of ``codebook`` (a few kB, read from cache, in any layout)."""
        row = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        row_ok = row < n_rows
        channel = tl.arange(0, K_POW2)
        mask = row_ok[:, None] & (channel < K)[None, :]
        index = tl.load(indices + row, mask=row_ok, other=0).to(tl.int64)
        values = tl.load(codebook + index[:, None] * codeword_stride + channel[None, :] * channel_stride, mask=mask)
        tl.store(table + row[:, None].to(tl.int64) * K + channel[None, :], values, mask=mask)


CODEBOOK_GRAD_GROUPS = 32
"""Partial sums the codebook's gradient is spread over: each codeword's additions wait on one another (atomics on
one address), and ``torch.index_add_`` makes every row of a level wait on the rows that share its codeword."""
_CODEBOOK_GRAD_BLOCK = 128
"""Rows per program of the codebook's gradient."""


def codebook_grad(hard: Int[Tensor, "m"], grad_rows: Float[Tensor, "m k"], codewords: int) -> Float[Tensor, "c k"]:
    """``zeros(codewords, k).index_add_(0, hard, grad_rows)`` (float32; the codebook's gradient through the hard
    indices), skipping the rows whose gradient is zero and spreading the additions over
    :data:`CODEBOOK_GRAD_GROUPS` partial sums. Atomic additions, as ``index_add_``'s on CUDA: the order, and so the
    last bits, may differ from run to run."""
    rows, channels = grad_rows.shape
    partials = torch.zeros(CODEBOOK_GRAD_GROUPS, codewords, channels, device=grad_rows.device)
    if rows:
        _codebook_grad_kernel[(triton.cdiv(rows, _CODEBOOK_GRAD_BLOCK),)](
            hard.contiguous(), grad_rows.float().contiguous(), partials, rows, codewords, CODEBOOK_GRAD_GROUPS,
            K=channels, K_POW2=triton.next_power_of_2(channels), BLOCK=_CODEBOOK_GRAD_BLOCK,
        )  # fmt: skip
    return partials.sum(dim=0)


_CODEWORD_TABLE_BLOCK = 256
"""Rows per program of the codeword table."""


def codeword_table(indices: Int[Tensor, "m"], codebook: Float[Tensor, "c k"]) -> Float[Tensor, "m k"]:
    """``codebook.index_select(0, indices)``: each row's codeword, one index read and one row written per vertex.
    On lego's 1.1 M vertices 0.031 ms against ``index_select``'s 0.666 (one H100,
    ``benchmarks/relaxed_index_speed.py``): torch's gather was 0.67 ms of each training step there. The codebook
    may be strided (a transposed one is read as it is)."""
    rows, channels = indices.shape[0], codebook.shape[1]
    table = codebook.new_empty(rows, channels)
    if rows and channels:
        _codeword_table_kernel[(triton.cdiv(rows, _CODEWORD_TABLE_BLOCK),)](
            indices.contiguous(), codebook, table, rows, *codebook.stride(),
            K=channels, K_POW2=triton.next_power_of_2(channels), BLOCK=_CODEWORD_TABLE_BLOCK,
        )  # fmt: skip
    return table


def _block_rows(logits: Tensor, tiling: Tiling = Tiling()) -> Tuple[int, int, int]:
    """The column tile (a power of two), the rows per block and the warps per program for ``logits``' columns and
    dtype under ``tiling`` (by default 16-bit blocks hold twice the logits: twice the warps keep each thread's
    share)."""
    columns = triton.next_power_of_2(logits.shape[-1])
    block = max(1, tiling.tile_bytes // (logits.element_size() * columns))
    return columns, block, tiling.warps or 16 // logits.element_size()


def _whole_blocks(rows_per_program: int, block: int) -> int:
    """Rows per program: ``rows_per_program`` raised to a power of two of at least one ``block`` (no row read twice).
    At the default tilings the forward pass and the Adam pass's forecast sum the soft indices over the same rows per
    program."""
    return max(triton.next_power_of_2(rows_per_program), block)


def hard_indices_and_shares(
    logits: Float[Tensor, "m c"], temperature: float, with_shares: bool, rows_per_program: int = ROWS_PER_PROGRAM
) -> Tuple[Int[Tensor, "m"], Float[Tensor, "c"]]:
    """``logits.argmax(-1)`` and, with ``with_shares``, the column sums of ``softmax(logits / temperature)``
    (else an empty tensor), in one read of the logits. Sums are per ``rows_per_program`` rows (raised to a block),
    then added in a fixed order: the same logits give the same sums."""
    logits = logits.detach().contiguous()
    rows, codewords = logits.shape
    hard = torch.empty(rows, dtype=torch.long, device=logits.device)
    columns, block, warps = _block_rows(logits)
    rows_per_program = _whole_blocks(rows_per_program, block)
    programs = triton.cdiv(rows, rows_per_program)
    partial_sums = torch.empty(programs if with_shares else 0, codewords, device=logits.device)  # each row written
    if rows:
        _hard_and_shares_kernel[(programs,)](
            logits, hard, partial_sums, rows, 1.0 / temperature,
            C=codewords, C_POW2=columns, BLOCK=block, ROWS_PER_PROGRAM=rows_per_program, WITH_SHARES=with_shares,
            num_warps=warps,
        )  # fmt: skip
    return hard, partial_sums.sum(dim=0) if with_shares else logits.new_empty(0)


def hard_indices_and_rate(
    logits: Float[Tensor, "m c"], temperature: float, min_share: float
) -> Tuple[Int[Tensor, "m"], Float[Tensor, ""], Float[Tensor, "c"]]:
    """``logits.argmax(-1)``, the bits of an order-0 code of the rows' soft indices ``softmax(logits /
    temperature)`` under their mean (``-sum_c counts[c] * log2(max(shares[c], min_share))``, ``counts = shares *
    rows``) and its gradient in each count: one read of the logits and one small kernel, where the PyTorch path
    takes a dozen operations."""
    hard, sums = hard_indices_and_shares(logits, temperature, True)
    return (hard, *rate_of_sums(sums, logits.shape[0], min_share))


def rate_of_sums(sums: Float[Tensor, "c"], rows: int, min_share: float) -> Tuple[Float[Tensor, ""], Float[Tensor, "c"]]:
    """:func:`hard_indices_and_rate`'s bits and their gradient per count, from the soft indices' column ``sums`` over
    ``rows`` rows (:func:`hard_indices_and_shares`, or a forecast of :func:`relaxed_logit_adam_`): one small kernel."""
    out = torch.empty((), device=sums.device)
    grad_counts = torch.empty(sums.shape, device=sums.device)
    codewords = sums.shape[0]
    _rate_kernel[(1,)](
        sums.contiguous(), rows, out, grad_counts, C=codewords, C_POW2=triton.next_power_of_2(codewords),
        MIN_SHARE=min_share,
    )  # fmt: skip
    return out, grad_counts


def relaxed_logit_grad(
    logits: Float[Tensor, "m c"],
    temperature: float,
    grad_soft: Optional[Float[Tensor, "m c"]] = None,
    grad_rows: Optional[Float[Tensor, "m k"]] = None,
    codebook: Optional[Float[Tensor, "c k"]] = None,
    grad_share: Optional[Float[Tensor, "c"]] = None,
    share_scale: Optional[Float[Tensor, ""]] = None,
) -> Float[Tensor, "m c"]:
    """Gradient of the logits through ``softmax(logits / temperature)`` given the gradient of the softmax, the sum
    of ``grad_soft``, ``grad_rows @ codebook.T`` and ``grad_share`` (one value per codeword, every row; times
    ``share_scale``, a one-value tensor, if given), any of them absent. ``grad_soft``, if given, is overwritten and
    returned."""
    logits = logits.detach().contiguous()
    rows, codewords = logits.shape
    if grad_soft is not None and not grad_soft.is_contiguous():
        raise ValueError("grad_soft must be contiguous (it is overwritten with the result)")
    out = grad_soft if grad_soft is not None else torch.empty_like(logits)
    grad_rows, codebook_t, share = _gradient_terms(logits, grad_rows, codebook, grad_share)
    _launch_logit_grad(logits, temperature, out, grad_soft is not None, grad_rows, codebook_t, share, share_scale, None)
    return out


def relaxed_logit_adam_(
    logits: Float[Tensor, "m c"],
    temperature: float,
    update: "AdamStep",
    grad_rows: Optional[Float[Tensor, "m k"]] = None,
    codebook: Optional[Float[Tensor, "c k"]] = None,
    grad_share: Optional[Float[Tensor, "c"]] = None,
    share_scale: Optional[Float[Tensor, ""]] = None,
    forecast: bool = False,
    tiling: Optional[Tiling] = None,
    scalars: Optional[Float[Tensor, "8"]] = None,
) -> Optional[Tuple[Int[Tensor, "m"], Float[Tensor, "c"]]]:
    """Adam's ``update`` of ``logits`` (and of its moments) in place from the gradient :func:`relaxed_logit_grad`
    gives for the same arguments, without storing that gradient. ``logits`` and the moments must be contiguous.
    With ``forecast``, also what :func:`hard_indices_and_shares` (with shares) would return for the updated logits
    at ``temperature``, from the same pass: the next step need not read them for it. ``tiling``: the pass's (None:
    :data:`ADAM_TILING`). ``scalars``: :func:`adam_scalars` of ``temperature`` and ``update`` on the logits' device,
    which the kernel then reads instead of them (a recorded graph's launch replays with new values)."""
    _check_updated_in_place(logits, update)
    grad_rows, codebook_t, share = _gradient_terms(logits, grad_rows, codebook, grad_share)
    return _launch_logit_grad(
        logits.detach(), temperature, logits.detach(), False, grad_rows, codebook_t, share, share_scale, update,
        forecast, tiling or ADAM_TILING, scalars,
    )  # fmt: skip


def adam_scalars(temperature: float, update: "AdamStep") -> Float[Tensor, "8"]:
    """The scalars of :func:`relaxed_logit_adam_`'s pass as its kernel reads them from memory, on the CPU: float32
    ``1 / temperature``, step size, betas, eps, the second moment's bias correction's root and the weight decay,
    then the rounding seed's int32 bits."""
    values = torch.tensor(
        [1.0 / temperature, update.step_size, update.beta1, update.beta2, update.eps, update.sqrt_bias2,
         update.weight_decay, 0.0],
        dtype=torch.float32,
    )  # fmt: skip
    values.view(torch.int32)[7] = update.seed
    return values


def _check_updated_in_place(logits: Tensor, update: "AdamStep") -> None:
    """``ValueError`` unless ``logits`` and ``update``'s moments are contiguous (the kernels update them in place)."""
    if not (logits.is_contiguous() and update.exp_avg.is_contiguous() and update.exp_avg_sq.is_contiguous()):
        raise ValueError("the logits and their moments must be contiguous (they are updated in place)")


def _gradient_terms(
    logits: Tensor, grad_rows: Optional[Tensor], codebook: Optional[Tensor], grad_share: Optional[Tensor]
) -> Tuple[Tensor, Tensor, Tensor]:
    """The kernel's operands for the softmax's gradient terms, empty where absent: the rows' gradient, the codebook
    transposed to ``[k, c]`` (each feature channel's codewords one contiguous read; ``[c, k]`` made a block read the
    whole codebook once per channel, the step's largest cost at 1024 codewords; no copy where the codebook is
    stored transposed, as a training step's rounded codebooks are) and the shares' gradient."""
    if (grad_rows is None) != (codebook is None):
        raise ValueError("grad_rows and codebook come together")
    empty = logits.new_empty(0)
    share = empty if grad_share is None else grad_share.contiguous().float()
    if grad_rows is None:
        return empty, empty, share
    return grad_rows.contiguous().float(), codebook.detach().float().t().contiguous(), share


def _launch_logit_grad(
    logits: Tensor,
    temperature: float,
    out: Tensor,
    has_soft: bool,
    grad_rows: Tensor,
    codebook_t: Tensor,
    share: Tensor,
    share_scale: Optional[Tensor],
    update: Optional["AdamStep"],
    forecast: bool = False,
    tiling: Tiling = Tiling(),
    device_scalars: Optional[Tensor] = None,
) -> Optional[Tuple[Tensor, Tensor]]:
    """Launches :func:`_logit_grad_kernel` (with an Adam ``update`` cut by ``tiling``, else a block per program);
    with ``forecast`` (and ``update``) returns the updated logits' hard indices and softmax column sums; with
    ``device_scalars`` (and ``update``) the kernel reads its scalars from them."""
    rows, codewords = logits.shape
    columns, block, warps = _block_rows(logits, tiling)
    rows_per_program = _whole_blocks(tiling.rows_per_program, block) if update is not None else block
    programs = triton.cdiv(rows, rows_per_program)
    next_hard = torch.empty(rows if forecast else 0, dtype=torch.long, device=logits.device)
    next_sums = torch.empty(programs if forecast else 0, codewords, device=logits.device)  # each row written
    if not rows:
        return (next_hard, next_sums.sum(dim=0)) if forecast else None
    moments = (update.exp_avg, update.exp_avg_sq) if update is not None else (out, out)
    scalars = (
        (update.step_size, update.beta1, update.beta2, update.eps, update.sqrt_bias2, update.weight_decay)
        if update is not None
        else (0.0, 0.0, 0.0, 1.0, 1.0, 0.0)
    )
    rounding = (
        dict(
            LOGIT_DROPPED=dropped_bits(out.dtype),
            LOGIT_LARGEST=saturation(out.dtype),
            EXP_AVG_SQ_DROPPED=dropped_bits(update.exp_avg_sq.dtype),
        )
        if update is not None
        else dict(LOGIT_DROPPED=0, LOGIT_LARGEST=0.0, EXP_AVG_SQ_DROPPED=0)
    )
    _logit_grad_kernel[(programs,)](
        logits, out, grad_rows, codebook_t, share, share if share_scale is None else share_scale, out, *moments,
        next_hard, next_sums, rows, 1.0 / temperature, *scalars,
        update.seed if update is not None else 0, out if device_scalars is None else device_scalars,
        C=codewords, C_POW2=columns, K=codebook_t.shape[0] if grad_rows.numel() else 1, BLOCK=block,
        ROWS_PER_PROGRAM=rows_per_program, HAS_SOFT=has_soft, HAS_ROWS=grad_rows.numel() > 0,
        HAS_SHARE=share.numel() > 0, HAS_SCALE=share_scale is not None, ADAM=update is not None,
        **rounding, FORECAST=forecast, SCALARS_IN_MEMORY=device_scalars is not None and update is not None,
        num_warps=warps,
    )  # fmt: skip
    return (next_hard, next_sums.sum(dim=0)) if forecast else None


__all__ = [
    "MAX_CODEWORDS",
    "adam_scalars",
    "available",
    "codebook_grad",
    "codeword_table",
    "hard_indices_and_shares",
    "hard_indices_and_rate",
    "rate_of_sums",
    "relaxed_logit_adam_",
    "relaxed_logit_grad",
]
