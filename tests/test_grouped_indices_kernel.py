"""Several levels' learned indices stepped together (one launch per kernel for all levels) against the same levels
stepped one by one: equal updates, forecasts, rates, tables and codebook gradients.

These run where CUDA and Triton are present, or on the CPU under Triton's interpreter (``TRITON_INTERPRET=1``)."""

from __future__ import annotations

from typing import List

import pytest
import torch

from vqad_nerfstudio.encodings import grouped_indices, vertex_features
from vqad_nerfstudio.encodings.sparse_grid import SparseFeatureGrid
from vqad_nerfstudio.kernels import relaxed_indices
from vqad_nerfstudio.optim import AdamStep, InBackwardAdam

from kernel_device import DEVICE, ON_GPU, needs_kernel
from model_steps import straight_through_steps

pytestmark = needs_kernel

LEVEL_ROWS = [300, 0, 1, 2000] if ON_GPU else [70, 0, 1, 150]
"""Rows per level: an empty level and a one-row level among them (the interpreter is slow)."""
CODEWORDS = 64


def _level_logits(dtype: torch.dtype) -> List[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(rows, CODEWORDS, generator=generator) * 3).to(DEVICE, dtype) for rows in LEVEL_ROWS]


def _updates(logits: List[torch.Tensor], moment_dtype: torch.dtype) -> List[AdamStep]:
    return [
        AdamStep(
            torch.full_like(level, 0.01, dtype=moment_dtype),
            torch.full_like(level, 1e-4, dtype=moment_dtype),
            lr=0.3,
            beta1=0.9,
            beta2=0.999,
            eps=1e-15,
            weight_decay=0.01,
            step=3 + number,
            seed=11 * number + 1,
        )  # fmt: skip
        for number, level in enumerate(logits)
    ]


@pytest.mark.parametrize("logit_dtype,moment_dtype", [(torch.float32, torch.float32), (torch.float16, torch.bfloat16)])
@pytest.mark.parametrize("with_rate", [False, True])
def test_one_launch_updates_every_level_as_its_own_launch_does(logit_dtype, moment_dtype, with_rate: bool) -> None:
    """Bit for bit: the same arithmetic, the same random bits for the stochastic rounding (each level's seed and
    offsets); the forecast's hard indices offset by each level's first codeword, its sums per level."""
    generator = torch.Generator().manual_seed(2)
    width, levels = 4, len(LEVEL_ROWS)
    grad_rows = torch.randn(sum(LEVEL_ROWS), width, generator=generator).to(DEVICE)
    codebooks = torch.randn(levels, CODEWORDS, width, generator=generator).to(DEVICE)
    grad_counts = torch.randn(levels, CODEWORDS, generator=generator).to(DEVICE)
    grad_bits = torch.rand(levels, generator=generator).to(DEVICE)
    rate = (grad_counts, grad_bits) if with_rate else (None, None)

    grouped_logits = _level_logits(logit_dtype)
    grouped_updates = _updates(grouped_logits, moment_dtype)
    codebooks_t = codebooks.transpose(1, 2).contiguous()
    forecast = relaxed_indices.grouped_logit_adam_(
        grouped_logits, 0.4, grouped_updates, grad_rows, codebooks_t, *rate, forecast=True
    )

    logits = _level_logits(logit_dtype)
    updates = _updates(logits, moment_dtype)
    for level, (level_rows, update) in enumerate(zip(grad_rows.split(LEVEL_ROWS), updates)):
        share = (grad_counts[level], grad_bits[level]) if with_rate else (None, None)
        hard, sums = relaxed_indices.relaxed_logit_adam_(
            logits[level], 0.4, update, level_rows, codebooks[level], share[0], share[1], forecast=True
        )
        exactly = dict(rtol=0, atol=0)  # assert_close reports where and by how much
        torch.testing.assert_close(grouped_logits[level], logits[level], **exactly)
        torch.testing.assert_close(grouped_updates[level].exp_avg, update.exp_avg, **exactly)
        torch.testing.assert_close(grouped_updates[level].exp_avg_sq, update.exp_avg_sq, **exactly)
        torch.testing.assert_close(forecast.hard.split(LEVEL_ROWS)[level], hard + level * CODEWORDS, **exactly)
        torch.testing.assert_close(forecast.sums[level], sums, rtol=1e-6, atol=1e-6)
    assert forecast.rows.tolist() == LEVEL_ROWS
    assert not torch.equal(grouped_logits[0], _level_logits(logit_dtype)[0])


def test_the_grouped_update_refuses_unlike_levels() -> None:
    logits = _level_logits(torch.float32)
    updates = _updates(logits, torch.float32)
    with pytest.raises(ValueError, match="one Adam update per level"):
        relaxed_indices.grouped_logit_adam_(logits, 0.4, updates[:-1])
    updates[1].beta1 = 0.5
    with pytest.raises(ValueError, match="share"):
        relaxed_indices.grouped_logit_adam_(logits, 0.4, updates)
    updates = _updates(logits, torch.float32)
    shifted = torch.zeros(logits[0].numel() + 1, device=DEVICE)[1:].view_as(logits[0])  # contiguous, 4 bytes off
    misaligned = [shifted, *logits[1:]]
    with pytest.raises(ValueError, match="aligned"):
        relaxed_indices.grouped_logit_adam_(misaligned, 0.4, _updates(misaligned, torch.float32))
    with pytest.raises(ValueError, match="grad_rows has 3 rows"):
        codebooks_t = torch.zeros(len(logits), 2, CODEWORDS, device=DEVICE)
        relaxed_indices.grouped_logit_adam_(logits, 0.4, updates, torch.zeros(3, 2, device=DEVICE), codebooks_t)


def test_rates_and_tables_of_several_levels_equal_each_level_s() -> None:
    generator = torch.Generator().manual_seed(3)
    sums = (torch.rand(4, CODEWORDS, generator=generator) * 5).to(DEVICE)
    sums[1] = 0  # an empty level
    rows = [90, 0, 3, 1000]
    bits, grad_counts = relaxed_indices.rate_per_row_of_sums(sums, torch.tensor(rows, device=DEVICE), 1e-12)
    per_level = [relaxed_indices.rate_of_sums(sums[level], n, 1e-12) for level, n in enumerate(rows)]
    torch.testing.assert_close(bits, sum(level_bits for level_bits, _ in per_level) / sum(rows))
    torch.testing.assert_close(grad_counts, torch.stack([level_grad for _, level_grad in per_level]) / sum(rows))
    assert float(bits) > 0
    with pytest.raises(ValueError, match="as many rows"):
        relaxed_indices.rate_per_row_of_sums(sums, torch.tensor(rows[:3], device=DEVICE), 1e-12)

    codebooks = torch.randn(3, CODEWORDS, 5, generator=generator).to(DEVICE)
    local = torch.randint(0, CODEWORDS, (3, 40), generator=generator).to(DEVICE)
    offset = local + torch.arange(3, device=DEVICE)[:, None] * CODEWORDS
    for stored in (codebooks, codebooks.transpose(1, 2).contiguous().transpose(1, 2)):  # either layout
        table = relaxed_indices.codeword_table(offset.reshape(-1), stored, CODEWORDS)
        assert torch.equal(table, torch.cat([codebooks[level][local[level]] for level in range(3)]))
    with pytest.raises(ValueError, match="codewords per codebook"):
        relaxed_indices.codeword_table(offset.reshape(-1), codebooks)


def _grid(codebook_bits) -> SparseFeatureGrid:
    """Three levels of 6-bit learned indices (dense, 4 to 16 cells a side), with the rate and in-backward Adam."""

    def store(level: int, rows: int) -> vertex_features.CodebookFeatures:
        features = vertex_features.CodebookFeatures(
            rows,
            6,
            4,
            logit_init_std=2.0,
            codebook_init_std=0.5,
            fuse_rate=True,
            codebook_bits=codebook_bits,
        )
        features.temperature = 0.3
        return features

    torch.manual_seed(0)
    grid = SparseFeatureGrid(4, 3, store, dense_resolution=16).to(DEVICE).train()
    stores = [level.features for level in grid.levels]
    grid.logit_optimizer = InBackwardAdam(
        [s.logits for s in stores], lr=0.2
    )  # kept: stores find it by a weak reference
    grid.codebook_optimizer = torch.optim.SGD([s.codebook for s in stores], lr=1.0)
    return grid


def _train(grid: SparseFeatureGrid, steps: int) -> List[torch.Tensor]:
    """``steps`` training steps as the model runs them (a pass without gradients, then the graded pass with the
    rate in the loss); returns the last step's features and loss."""
    generator = torch.Generator().manual_seed(5)
    stores = [level.features for level in grid.levels if not level.features.frozen]  # frozen: no rate
    for _ in range(steps):
        points = torch.rand(300, 3, generator=generator).to(DEVICE)
        target = torch.randn(300, 4, generator=generator).to(DEVICE)
        with grid.indices_once():
            with torch.no_grad():
                grid(points)
            features, _ = grid(points)
        loss = ((features - target) ** 2).mean() + (0.1 * grid.index_bits_per_row(stores) if stores else 0.0)
        loss.backward()
        grid.codebook_optimizer.step()
        grid.codebook_optimizer.zero_grad()
    return [features.detach(), loss.detach()]


@pytest.mark.parametrize("codebook_bits", [None, 6])
def test_a_grid_steps_its_levels_together_as_one_by_one(monkeypatch, codebook_bits) -> None:
    """Training steps of a grid whose levels step together, and of the same grid stepping them one by one: after
    the first step logits, features, losses and codebooks within rounding (the codebooks' gradients are added, and
    the rate's divided by the rows, in another order); after two more (indices and rate from the forecast, whose
    soft-index sums are added in another order too) all within looser rounding; the grouped grid launched the
    per-level Adam update not once. (float32 logits: float16 ones round stochastically with seeds drawn in the order
    of the updates, which autograd runs one by one in another order.)"""
    per_level_updates = []
    single = relaxed_indices.relaxed_logit_adam_
    counted = lambda *args, **kwargs: per_level_updates.append(1) or single(*args, **kwargs)  # noqa: E731
    monkeypatch.setattr(relaxed_indices, "relaxed_logit_adam_", counted)
    grouped, one_by_one = _grid(codebook_bits), _grid(codebook_bits)
    for steps, tolerance in ((1, 1e-4), (2, 1e-3)):
        got = _train(grouped, steps)
        assert not per_level_updates and grouped._grouped._forecast is not None
        with monkeypatch.context() as patch:
            patch.setattr(grouped_indices, "groupable", lambda stores: False)
            expected = _train(one_by_one, steps)
        assert len(per_level_updates) == 3 * steps
        per_level_updates.clear()
        for value, want in zip(got, expected):
            torch.testing.assert_close(value, want, rtol=tolerance, atol=tolerance)
        for ours, theirs in zip(grouped.levels, one_by_one.levels):
            for name in ("logits", "codebook"):
                ours_value, theirs_value = getattr(ours.features, name), getattr(theirs.features, name)
                torch.testing.assert_close(ours_value, theirs_value, rtol=tolerance, atol=tolerance)


def test_frozen_levels_step_together_as_one_by_one(monkeypatch) -> None:
    """Levels whose indices are frozen (their codebooks still train): one codebook gradient a step for all levels,
    equal features and codebooks."""
    results, gradients = [], []
    single = relaxed_indices.codebook_grad
    counted = lambda *args: gradients.append(1) or single(*args)  # noqa: E731
    monkeypatch.setattr(relaxed_indices, "codebook_grad", counted)
    for grouped in (True, False):
        with monkeypatch.context() as patch:
            if not grouped:
                patch.setattr(grouped_indices, "groupable", lambda stores: False)
            grid = _grid(6)
            for level in grid.levels:
                level.features.freeze_indices()
            results.append((_train(grid, 2), [level.features.codebook.detach() for level in grid.levels]))
            assert grid._grouped.stores or not grouped
        gradients.append(None)
    assert gradients == [1, 1, None] + [1] * 6 + [None]
    for got, expected in zip(*(outputs + codebooks for outputs, codebooks in results)):
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_levels_step_one_by_one_where_they_are_not_alike() -> None:
    grid = _grid(None)
    stores = [level.features for level in grid.levels]
    assert grouped_indices.groupable(stores)
    stores[1].temperature = 0.5
    assert not grouped_indices.groupable(stores)
    stores[1].temperature = stores[0].temperature
    stores[2].freeze_indices()
    assert not grouped_indices.groupable(stores)
    assert not grouped_indices.groupable(stores[:2] + [vertex_features.FloatFeatures(3, 4)])
    grid = _grid(None)
    assert not grouped_indices.groupable([level.features for level in grid.eval().levels])


def test_a_models_training_steps_step_its_levels_together() -> None:
    """vqad's model under its trainer's optimisers (the logits' Adam in the backward pass), straight-through from the
    first step with the rate in the loss: its steps step the grown levels together (the finest, grown by a pruning
    not run here, has no rows yet), with the losses the levels stepped one by one give."""

    def train(grouped: bool):
        losses, model = straight_through_steps(grouped_levels=grouped)
        return losses, model.grid._grouped

    grouped_losses, group = train(True)
    assert len(group.stores) == 2 and group._forecast is not None  # the grown levels
    losses, group = train(False)
    assert not group.stores
    torch.testing.assert_close(grouped_losses, losses, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("grouped", [True, False])
def test_each_step_reads_the_indices_its_last_update_forecast(monkeypatch: pytest.MonkeyPatch, grouped: bool) -> None:
    """Past the first step, no step reads its logits for their hard indices and soft-index sums: the last step's
    Adam update forecast them, and the forecast outlives the train() that nerfstudio's trainer calls before every
    step (when that call dropped it, every step read every level's logits once more)."""
    reads = []
    read = relaxed_indices.hard_indices_and_shares

    def counted(*args, **kwargs):
        reads.append(args[0].shape)
        return read(*args, **kwargs)

    monkeypatch.setattr(relaxed_indices, "hard_indices_and_shares", counted)
    straight_through_steps(steps=1, grouped_levels=grouped)
    first_step = len(reads)
    assert first_step == 2  # the two grown levels' logits, once
    straight_through_steps(steps=3, grouped_levels=grouped)
    assert len(reads) == 2 * first_step
