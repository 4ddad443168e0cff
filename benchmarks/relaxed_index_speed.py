"""Speed of the learned indices' per-vertex passes on the GPU, against the time their bytes need: the hard indices
with the soft indices' shares (one read of the logits; at each ``rows_per_program``), the same with the index
rate, and the logits' Adam update in the backward pass (logits, bfloat16 first and float32 second moment, read and
written; also with float16 logits and a bfloat16 second moment, stochastically rounded, and with the next step's
hard indices and shares forecast from the updated logits; and that update over several levels, a launch per level),
with ``torch.argmax`` over the same logits as a yardstick of what one read costs. Also the codebook's
gradient through the hard indices (``torch.index_add_`` against the kernel that skips untouched rows), and the
table of every vertex's codeword that the straight-through lookup gathers each step (index_select and the kernel).

    python benchmarks/relaxed_index_speed.py                         # 1.1 M rows of 256 logits: lego's 8-bit grid
    python benchmarks/relaxed_index_speed.py --rows 1100000 --codewords 16

Each row is the mean over ``--repeats`` calls, from the first launch to the GPU's completion; GB/s counts the bytes
each pass must move (logits read once; for Adam also its moments, and all three written).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Tuple

import torch
import tyro

from vqad_nerfstudio.kernels import relaxed_indices
from vqad_nerfstudio.optim import AdamStep

from gpu_timing import seconds_per_call


@dataclass
class Args:
    rows: int = 1_100_000
    """Vertices (rows of logits); lego's vqad grid at the defaults has about 1.1 M over its levels."""
    codewords: int = 256
    """Logits per row (``2**index_bits``)."""
    rows_per_program: Tuple[int, ...] = (16, 32, 64, 128, 256, 1024)
    """The forward kernel's rows per program to time (see ``relaxed_indices.ROWS_PER_PROGRAM``)."""
    channels: int = 16
    """Features per codeword (the codebook gradient's width)."""
    level_shares: Tuple[float, ...] = (0.002, 0.01, 0.06, 0.25, 0.678)
    """Shares of the rows in each level of detail, for the Adam update level by level (about lego's five levels)."""
    adam_tilings: Tuple[str, ...] = tuple(
        f"{tile}:{rows}:{warps}" for tile in (4096, 8192, 16384) for rows in (16, 64, 256) for warps in (4, 8, 16)
    )
    """Tilings of the logits' Adam pass (float16 logits, bfloat16 moments, with the forecast) to time, each
    ``TILE_BYTES:ROWS_PER_PROGRAM:WARPS`` (see ``relaxed_indices.Tiling``); the default's row is marked."""
    touched_share: float = 0.5
    """Share of vertices with a nonzero gradient in the codebook-gradient rows."""
    repeats: int = 50
    """Calls per row."""


def _tiling(text: str) -> relaxed_indices.Tiling:
    """A ``TILE_BYTES:ROWS_PER_PROGRAM:WARPS`` tiling (``SystemExit`` on another form)."""
    try:
        tile_bytes, rows_per_program, warps = (int(value) for value in text.split(":"))
    except ValueError:
        raise SystemExit(f"--adam-tilings takes TILE_BYTES:ROWS_PER_PROGRAM:WARPS, got {text!r}") from None
    return relaxed_indices.Tiling(tile_bytes, rows_per_program, warps)


def main(args: Args) -> None:
    tilings = [_tiling(text) for text in args.adam_tilings]
    if not torch.cuda.is_available() or relaxed_indices.triton is None:
        raise SystemExit("this benchmark needs CUDA and Triton")
    torch.manual_seed(0)
    logits = torch.randn(args.rows, args.codewords, device="cuda") * 3
    logit_bytes = logits.numel() * logits.element_size()
    update = AdamStep(
        exp_avg=torch.zeros_like(logits, dtype=torch.bfloat16),
        exp_avg_sq=torch.zeros_like(logits),
        lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-15, weight_decay=0.0, step=10,
    )  # fmt: skip
    grad_rows = torch.randn(args.rows, 4, device="cuda")
    codebook = torch.randn(args.codewords, 4, device="cuda")
    rows: List[Tuple[str, Callable[[], object], int]] = [
        ("torch.argmax (one read)", lambda: logits.argmax(dim=-1), logit_bytes)
    ]
    for count in args.rows_per_program:
        call = lambda count=count: relaxed_indices.hard_indices_and_shares(logits, 0.5, True, count)  # noqa: E731
        marker = " (default)" if count == relaxed_indices.ROWS_PER_PROGRAM else ""
        rows.append((f"hard indices + shares, {count} rows per program{marker}", call, logit_bytes))
    rows.append(
        ("hard indices + rate (default)", lambda: relaxed_indices.hard_indices_and_rate(logits, 0.5, 1e-6), logit_bytes)
    )
    adam_bytes = 2 * (logit_bytes + update.exp_avg.numel() * 2 + update.exp_avg_sq.numel() * 4)
    rows.append(
        (
            "logits' Adam in the backward pass",
            lambda: relaxed_indices.relaxed_logit_adam_(logits, 0.5, update, grad_rows, codebook),
            adam_bytes,
        )
    )
    half_logits = logits.half()
    half_update = AdamStep(
        exp_avg=torch.zeros_like(half_logits, dtype=torch.bfloat16),
        exp_avg_sq=torch.zeros_like(half_logits, dtype=torch.bfloat16),
        lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-15, weight_decay=0.0, step=10, seed=1,
    )  # fmt: skip
    rows.append(
        (
            "hard indices alone, float16 logits",
            lambda: relaxed_indices.hard_indices_and_shares(half_logits, 0.5, False),
            logit_bytes // 2,
        )
    )
    rows.append(
        (
            "hard indices + rate, float16 logits",
            lambda: relaxed_indices.hard_indices_and_rate(half_logits, 0.5, 1e-6),
            logit_bytes // 2,
        )
    )
    rows.append(
        (
            "logits' Adam, float16 logits, bfloat16 moments (stochastic rounding)",
            lambda: relaxed_indices.relaxed_logit_adam_(half_logits, 0.5, half_update, grad_rows, codebook),
            adam_bytes * 6 // 10,
        )
    )
    rows.append(
        (
            "the same, forecasting the next step's hard indices and shares",
            lambda: relaxed_indices.relaxed_logit_adam_(
                half_logits, 0.5, half_update, grad_rows, codebook, forecast=True
            ),
            adam_bytes * 6 // 10,
        )
    )
    for text, tiling in zip(args.adam_tilings, tilings):
        default = " (default)" if tiling == relaxed_indices.ADAM_TILING else ""
        rows.append(
            (
                f"the same, tiling {text}{default}",
                lambda tiling=tiling: relaxed_indices.relaxed_logit_adam_(
                    half_logits, 0.5, half_update, grad_rows, codebook, forecast=True, tiling=tiling
                ),
                adam_bytes * 6 // 10,
            )
        )
    level_rows = [round(share * args.rows) for share in args.level_shares[:-1]]
    level_rows.append(args.rows - sum(level_rows))
    levels = list(half_logits.split(level_rows))
    level_updates = [
        AdamStep(exp_avg, exp_avg_sq, 1e-3, 0.9, 0.999, 1e-15, 0.0, 10, seed=1)
        for exp_avg, exp_avg_sq in zip(half_update.exp_avg.split(level_rows), half_update.exp_avg_sq.split(level_rows))
    ]
    level_grads = grad_rows.split(level_rows)

    def level_by_level() -> None:
        for level, update_of_level, grad_of_level in zip(levels, level_updates, level_grads):
            relaxed_indices.relaxed_logit_adam_(level, 0.5, update_of_level, grad_of_level, codebook, forecast=True)

    rows.append(
        (f"the same in {len(levels)} levels, a launch per level (default)", level_by_level, adam_bytes * 6 // 10)
    )
    hard = half_logits.argmax(dim=-1)
    table_grad = torch.randn(args.rows, args.channels, device="cuda")
    table_grad *= torch.rand(args.rows, 1, device="cuda") < args.touched_share  # untouched vertices: zero rows
    codebook16 = torch.zeros(args.codewords, args.channels, device="cuda")
    grad_bytes = table_grad.numel() * 4 + hard.numel() * 8
    rows.append(
        (
            "codebook gradient, torch index_add_",
            lambda: torch.zeros_like(codebook16).index_add_(0, hard, table_grad),
            grad_bytes,
        )
    )
    rows.append(
        (
            "codebook gradient, kernel (default)",
            lambda: relaxed_indices.codebook_grad(hard, table_grad, args.codewords),
            grad_bytes,
        )
    )
    table_bytes = table_grad.numel() * 4 + hard.numel() * 8
    rows.append(
        ("codeword table, codebook.index_select(0, hard)", lambda: codebook16.index_select(0, hard), table_bytes)
    )
    rows.append(
        ("codeword table, kernel (default)", lambda: relaxed_indices.codeword_table(hard, codebook16), table_bytes)
    )
    print(f"\n{torch.cuda.get_device_name()}: {args.rows} rows x {args.codewords} logits, {args.repeats} calls a row")
    print("| pass | ms | GB/s |")
    print("|---|---|---|")
    for name, call, moved in rows:
        seconds = seconds_per_call(call, args.repeats)
        print(f"| {name} | {1000 * seconds:.3f} | {moved / seconds / 1e9:.0f} |")


if __name__ == "__main__":
    main(tyro.cli(Args))
