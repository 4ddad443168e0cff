"""Codebooks rounded to a file's grid in one GPU pass (Triton): :func:`vqad_nerfstudio.rounding.rounded_columns`,
and decoder weights by rows (:func:`vqad_nerfstudio.rounding.rounded_rows`) as the columns of their transpose.

A training step with ``codebook_bits`` reads every level's codebook rounded to its bits, one fp16 scale per feature
channel. PyTorch's path takes about 17 operations (a launch each on a GPU) for the stacked codebooks of a grid, in
every step. This kernel computes the same numbers, bit for bit: the column peak in float32, the scale
``fp16(fp32(peak / q))``, and ``clamp(round(w / scale), -q, q) * scale`` in float64, halves to even. The PyTorch
function stays the reference and the CPU path.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from vqad_nerfstudio.kernels import runs_on
from vqad_nerfstudio.rounding import SMALLEST_FP16, quantized_top

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the PyTorch path is used
    triton = None

_ROW_BLOCK = 64
"""Rows of a matrix a program reads at a time (its columns whole)."""
MAX_COLUMNS = 256
"""Widest matrix the kernel takes (a block holds whole rows)."""


def available(matrices: Tensor) -> bool:
    """Whether the kernel can round ``matrices`` (float32 ``[..., rows, cols]`` on a device it runs on, at most
    MAX_COLUMNS columns)."""
    return (
        runs_on(matrices)
        and matrices.dtype == torch.float32
        and matrices.dim() >= 2
        and 0 < matrices.shape[-1] <= MAX_COLUMNS
    )


if triton is not None:

    @triton.jit
    def _rounded_columns_kernel(
        values, out, n_rows, n_cols, TOP: tl.constexpr, SMALLEST: tl.constexpr, COLS_POW2: tl.constexpr,
        ROW_BLOCK: tl.constexpr, TRANSPOSED: tl.constexpr,
    ):  # fmt: skip
        """Matrix ``program_id(0)`` of ``values`` rounded per column into ``out`` (with ``TRANSPOSED``, each matrix
        of ``out`` is ``[cols, rows]``): two passes over its rows (the column peaks, then the rounded values)."""
        first = tl.program_id(0).to(tl.int64) * n_rows * n_cols
        column = tl.arange(0, COLS_POW2)
        column_ok = column < n_cols
        peak = tl.zeros((COLS_POW2,), dtype=tl.float32)
        for start in range(0, n_rows, ROW_BLOCK):
            row = start + tl.arange(0, ROW_BLOCK)
            mask = (row < n_rows)[:, None] & column_ok[None, :]
            x = tl.load(values + first + row[:, None] * n_cols + column[None, :], mask=mask, other=0.0)
            peak = tl.maximum(peak, tl.max(tl.abs(x), axis=0))
        # fp16(fp32(peak / q)): float64's quotient rounds to float32's correctly rounded one, since q = 2**(b-1) - 1
        # has a binary period of at most 7 bits (no tie can appear where none was)
        scale = (peak.to(tl.float64) / TOP).to(tl.float32).to(tl.float16).to(tl.float64)
        scale = tl.maximum(scale, SMALLEST)
        for start in range(0, n_rows, ROW_BLOCK):
            row = start + tl.arange(0, ROW_BLOCK)
            mask = (row < n_rows)[:, None] & column_ok[None, :]
            offsets = first + row[:, None] * n_cols + column[None, :]
            quotient = tl.load(values + offsets, mask=mask, other=0.0).to(tl.float64) / scale[None, :]
            below = tl.floor(quotient)
            fraction = quotient - below  # exact: |quotient| is at most about q
            odd = (below.to(tl.int64) & 1) == 1
            up = (fraction > 0.5) | ((fraction == 0.5) & odd)  # halves to even, as torch.round
            levels = tl.minimum(tl.maximum(below + up.to(tl.float64), -TOP), TOP)
            if TRANSPOSED:
                offsets = first + column[None, :] * n_rows + row[:, None]
            tl.store(out + offsets, (levels * scale[None, :]).to(tl.float32), mask=mask)


def rounded_columns(
    matrices: Float[Tensor, "*b rows cols"], bits: int, transposed_storage: bool = False
) -> Float[Tensor, "*b rows cols"]:
    """:func:`vqad_nerfstudio.rounding.rounded_columns` in one launch, equal bit for bit (see :func:`available`).
    With ``transposed_storage`` the result is the transpose of a contiguous ``[*b, cols, rows]`` tensor: its
    ``.transpose(-1, -2)`` is contiguous, as kernels that read one column at a time want it."""
    top = quantized_top(bits)
    values = matrices.detach().contiguous()
    rows, cols = values.shape[-2:]
    out = values.new_empty(*values.shape[:-2], cols, rows) if transposed_storage else torch.empty_like(values)
    count = values.numel() // max(rows * cols, 1)
    if values.numel():
        _rounded_columns_kernel[(count,)](
            values, out, rows, cols, TOP=top, SMALLEST=SMALLEST_FP16,
            COLS_POW2=triton.next_power_of_2(cols), ROW_BLOCK=_ROW_BLOCK, TRANSPOSED=transposed_storage,
        )  # fmt: skip
    return out.transpose(-1, -2) if transposed_storage else out


def rows_available(weight: Tensor) -> bool:
    """Whether :func:`rounded_rows` can round ``weight`` (float32, at least 2-d, at most MAX_COLUMNS rows, on a
    device the kernel runs on)."""
    return weight.dim() >= 2 and available(weight.reshape(weight.shape[0], -1).t())


def rounded_rows(weight: Float[Tensor, "out *in"], bits: int) -> Float[Tensor, "out *in"]:
    """:func:`vqad_nerfstudio.rounding.rounded_rows` (one scale per row of ``weight`` flattened to 2-d), equal bit
    for bit, in two launches instead of about a dozen: the transpose made contiguous, then :func:`rounded_columns`,
    which writes the result back in ``weight``'s layout (see :func:`rows_available`)."""
    rows = weight.reshape(weight.shape[0], -1)
    return rounded_columns(rows.t(), bits, transposed_storage=True).t().reshape(weight.shape)


__all__ = ["MAX_COLUMNS", "available", "rounded_columns", "rounded_rows", "rows_available"]
