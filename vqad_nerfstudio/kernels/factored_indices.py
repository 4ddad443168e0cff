"""The Adam pass of indices learned as two factors on the GPU (Triton): the logits' gradient through the two
softmaxes, Adam's update and the next step's hard indices and soft-index sums, in one pass over the logits.

A vertex holds ``2 * S`` logits (:mod:`vqad_nerfstudio.encodings.index_factors`, ``S = 2**(b/2)``); its gradient
in the ``S * S`` soft index, ``grad_rows[r] . codebook[i * S + j] + grad_share[i * S + j]``, is formed in registers
a block of rows at a time and reduced against the other factor's softmax, so that only the ``2 * S`` logits, their
moments and the row's feature gradient cross memory: 32 logits a vertex at 8 bits where one factor reads 256.
:func:`vqad_nerfstudio.encodings.straight_through.relaxed_logit_adam_` uses it on float32 logits with a float32
second moment (what ``logit_dtype='auto'`` gives two factors); its PyTorch path is the reference the tests compare
against.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Tuple

import torch
from jaxtyping import Float, Int
from torch import Tensor

from vqad_nerfstudio.kernels import relaxed_indices, runs_on

if TYPE_CHECKING:
    from vqad_nerfstudio.optim import AdamStep

triton = relaxed_indices.triton
if triton is not None:
    import triton.language as tl

    from vqad_nerfstudio.kernels.relaxed_indices import _adam_arithmetic, _softmax

_TILE_VALUES = 2048
"""Values of the ``[rows, S, S]`` soft-index gradient a block holds in registers (8 rows at 8 bits)."""
ROWS_PER_PROGRAM = relaxed_indices.ROWS_PER_PROGRAM
"""Rows one program updates (at least one block; one partial sum of the forecast's soft indices each)."""


def available(logits: Tensor, update: "AdamStep") -> bool:
    """Whether the kernel can update ``logits`` of two factors: float32 on a device the kernels run on, a float32
    second moment, a factor of at most 64 choices (12-bit indices)."""
    width = logits.shape[-1]
    return (
        runs_on(logits)
        and logits.dtype == torch.float32
        and update.exp_avg_sq.dtype == torch.float32
        and update.exp_avg.dtype in (torch.float32, torch.bfloat16, torch.float16)
        and width % 2 == 0
        and 2 <= width <= 128
        and (width // 2) & (width // 2 - 1) == 0
    )


if triton is not None:

    @triton.jit
    def _factor_softmax(logits, row, row_ok, column, first_column, inv_temperature, S: tl.constexpr):
        """One factor's logits (``S`` from ``first_column`` of each of the block's rows) and their softmax (0 on rows
        that do not exist)."""
        mask = row_ok[:, None] & (column < S)[None, :]
        x = tl.load(logits + row[:, None].to(tl.int64) * (2 * S) + first_column + column[None, :], mask=mask, other=0.0)
        return x, _softmax(x, row_ok, mask, inv_temperature)

    @triton.jit
    def _adam(x, grad, offsets, mask, exp_avg, exp_avg_sq, step_size, beta1, beta2, eps, sqrt_bias2, weight_decay):
        """torch.optim.Adam's update of one factor's logits ``x`` from ``grad``, its moments read and written at
        ``offsets``; returns the updated logits."""
        m = tl.load(exp_avg + offsets, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(exp_avg_sq + offsets, mask=mask, other=0.0)
        x, m, v = _adam_arithmetic(x, grad, m, v, step_size, beta1, beta2, eps, sqrt_bias2, weight_decay)
        tl.store(exp_avg + offsets, m.to(exp_avg.dtype.element_ty), mask=mask)
        tl.store(exp_avg_sq + offsets, v, mask=mask)
        return x

    @triton.jit
    def _factored_adam_kernel(
        logits, grad_rows, codebook_t, grad_share, share_scale, exp_avg, exp_avg_sq, next_hard, next_sums, n_rows,
        inv_temperature, step_size, beta1, beta2, eps, sqrt_bias2, weight_decay,
        S: tl.constexpr, K: tl.constexpr, BLOCK: tl.constexpr, ROWS_PER_PROGRAM: tl.constexpr,
        HAS_ROWS: tl.constexpr, HAS_SHARE: tl.constexpr, HAS_SCALE: tl.constexpr, FORECAST: tl.constexpr,
    ):  # fmt: skip
        """Adam's update of ``ROWS_PER_PROGRAM`` rows of two factors' logits (and their moments) in place, block by
        block; with ``FORECAST`` also the updated logits' hard indices into ``next_hard`` and the column sums of
        their soft indices into row ``program`` of ``next_sums``."""
        program = tl.program_id(0)
        column = tl.arange(0, S)
        pair = column[:, None] * S + column[None, :]  # codeword i * S + j at [i, j]
        share = tl.zeros((S, S), dtype=tl.float32)
        if HAS_SHARE:
            share = tl.load(grad_share + pair)
            if HAS_SCALE:
                share *= tl.load(share_scale).to(tl.float32)
        sums = tl.zeros((S, S), dtype=tl.float32)
        for start in range(0, ROWS_PER_PROGRAM, BLOCK):
            row = program * ROWS_PER_PROGRAM + start + tl.arange(0, BLOCK)
            row_ok = row < n_rows
            mask = row_ok[:, None] & (column < S)[None, :]
            x1, p1 = _factor_softmax(logits, row, row_ok, column, 0, inv_temperature, S)
            x2, p2 = _factor_softmax(logits, row, row_ok, column, S, inv_temperature, S)
            grad = tl.zeros((BLOCK, S, S), dtype=tl.float32) + share[None, :, :]
            if HAS_ROWS:  # grad_rows @ codebook.T, one feature channel (a row of codebook_t) at a time
                for k in range(K):
                    row_grad = tl.load(grad_rows + row.to(tl.int64) * K + k, mask=row_ok, other=0.0)
                    grad += row_grad[:, None, None] * tl.load(codebook_t + k * S * S + pair)[None, :, :]
            grad1 = tl.sum(grad * p2[:, None, :], axis=2)  # each factor's softmax gradient: the other summed out
            grad2 = tl.sum(grad * p1[:, :, None], axis=1)
            grad1 = p1 * (grad1 - tl.sum(p1 * grad1, axis=1)[:, None]) * inv_temperature
            grad2 = p2 * (grad2 - tl.sum(p2 * grad2, axis=1)[:, None]) * inv_temperature
            offsets = row[:, None].to(tl.int64) * (2 * S) + column[None, :]
            x1 = _adam(x1, grad1, offsets, mask, exp_avg, exp_avg_sq, step_size, beta1, beta2, eps, sqrt_bias2,
                       weight_decay)  # fmt: skip
            x2 = _adam(x2, grad2, offsets + S, mask, exp_avg, exp_avg_sq, step_size, beta1, beta2, eps, sqrt_bias2,
                       weight_decay)  # fmt: skip
            tl.store(logits + offsets, x1, mask=mask)
            tl.store(logits + offsets + S, x2, mask=mask)
            if FORECAST:
                hard = tl.argmax(x1, axis=1).to(tl.int64) * S + tl.argmax(x2, axis=1).to(tl.int64)
                tl.store(next_hard + row, hard, mask=row_ok)
                q1, q2 = _softmax(x1, row_ok, mask, inv_temperature), _softmax(x2, row_ok, mask, inv_temperature)
                sums += tl.sum(q1[:, :, None] * q2[:, None, :], axis=0)
        if FORECAST:
            tl.store(next_sums + program * S * S + pair, sums)


def factored_logit_adam_(
    logits: Float[Tensor, "m w"],
    temperature: float,
    update: "AdamStep",
    grad_rows: Optional[Float[Tensor, "m k"]] = None,
    codebook: Optional[Float[Tensor, "c k"]] = None,
    grad_share: Optional[Float[Tensor, "c"]] = None,
    share_scale: Optional[Float[Tensor, ""]] = None,
    forecast: bool = False,
) -> Optional[Tuple[Int[Tensor, "m"], Float[Tensor, "c"]]]:
    """Adam's ``update`` of two factors' ``logits`` (and its moments) in place from the gradient of
    :func:`vqad_nerfstudio.encodings.index_factors.logit_grad` for ``grad_rows @ codebook.T`` plus ``grad_share``
    (times ``share_scale`` if given), without storing that gradient. With ``forecast``, also the updated logits' hard
    indices and soft-index column sums at ``temperature``. See :func:`available` for what it takes."""
    relaxed_indices._check_updated_in_place(logits, update)
    if not available(logits, update):
        raise ValueError("factored_logit_adam_ takes float32 logits of two power-of-two factors and float32 moments")
    rows, width = logits.shape
    size = width // 2
    if codebook is not None and codebook.shape[0] != size * size:
        raise ValueError(f"{width} logits a row choose among {size * size} codewords, not {codebook.shape[0]}")
    grad_rows, codebook_t, share = relaxed_indices._gradient_terms(logits, grad_rows, codebook, grad_share)
    block = max(1, _TILE_VALUES // (size * size))
    rows_per_program = relaxed_indices._whole_blocks(ROWS_PER_PROGRAM, block)
    programs = triton.cdiv(rows, rows_per_program)
    next_hard = torch.empty(rows if forecast else 0, dtype=torch.long, device=logits.device)
    next_sums = torch.empty(programs if forecast else 0, size * size, device=logits.device)  # each row written
    if rows:
        _factored_adam_kernel[(programs,)](
            logits, grad_rows, codebook_t, share, share if share_scale is None else share_scale, update.exp_avg,
            update.exp_avg_sq, next_hard, next_sums, rows, 1.0 / temperature, update.step_size, update.beta1,
            update.beta2, update.eps, update.sqrt_bias2, update.weight_decay,
            S=size, K=codebook_t.shape[0] if grad_rows.numel() else 1, BLOCK=block, ROWS_PER_PROGRAM=rows_per_program,
            HAS_ROWS=grad_rows.numel() > 0, HAS_SHARE=share.numel() > 0, HAS_SCALE=share_scale is not None,
            FORECAST=forecast, num_warps=4,
        )  # fmt: skip
    return (next_hard, next_sums.sum(dim=0)) if forecast else None


__all__ = ["ROWS_PER_PROGRAM", "available", "factored_logit_adam_"]
