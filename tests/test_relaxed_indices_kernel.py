"""The learned indices' softmax kernels against their PyTorch references (hard indices, soft-index shares, logit
gradients, and a straight-through step with the rate through both).

These run where CUDA and Triton are present, or on the CPU under Triton's interpreter (``TRITON_INTERPRET=1``)."""

from __future__ import annotations

import pytest
import torch

from vqad_nerfstudio.encodings import straight_through, vertex_features
from vqad_nerfstudio.kernels import relaxed_indices

from kernel_device import DEVICE, ON_GPU, needs_kernel
from model_steps import straight_through_steps

ROWS = 5000 if ON_GPU else 700  # the interpreter is slow
CODEBOOK_SIZES = [16, 256, relaxed_indices.MAX_CODEWORDS]
"""Up to the largest codebook the kernels take, where a block holds a single row."""


def _rows_for(codewords: int) -> int:
    """Rows to test ``codewords`` columns with: fewer for the largest codebooks under the interpreter."""
    return ROWS if ON_GPU or codewords <= 256 else 24


pytestmark = needs_kernel


@pytest.fixture(autouse=True)
def full_precision_matmul():
    """The reference multiplies matrices: compare in full float32."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(before)


@pytest.fixture
def reference(monkeypatch):
    """Calls the PyTorch reference of straight_through's functions (the kernels made unavailable) on demand."""

    def call(function, *args, **kwargs):
        with monkeypatch.context() as patch:
            patch.setattr(relaxed_indices, "available", lambda logits: False)
            return function(*args, **kwargs)

    return call


def _logits(rows: int, codewords: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, codewords, generator=generator) * 3
    if rows > 2:
        logits[1] = 0.5  # a tie everywhere: the first codeword, as torch.argmax
        logits[2, codewords // 2 :] = logits[2].max() + 1  # a tie in the second half
    return logits.to(DEVICE)


@pytest.mark.parametrize("codewords", CODEBOOK_SIZES)
@pytest.mark.parametrize("rows", [0, 1, ROWS])
def test_hard_indices_and_shares_match_reference(reference, rows: int, codewords: int) -> None:
    rows = min(rows, _rows_for(codewords))
    logits = _logits(rows, codewords)
    assert relaxed_indices.available(logits)
    hard, shares = straight_through.hard_indices_and_shares(logits, 0.3)
    expected_hard, expected_shares = reference(straight_through.hard_indices_and_shares, logits, 0.3)
    assert torch.equal(hard, expected_hard)
    torch.testing.assert_close(shares, expected_shares, rtol=1e-5, atol=1e-7)
    if rows:
        torch.testing.assert_close(shares.sum(), torch.ones((), device=DEVICE))
    hard_only, no_shares = straight_through.hard_indices_and_shares(logits, 0.3, with_shares=False)
    assert torch.equal(hard_only, expected_hard) and no_shares.numel() == 0


@pytest.mark.parametrize("codewords", [16, 256])
@pytest.mark.parametrize("rows_per_program", [1, 64, 4096])
def test_rows_per_program_splits_the_rows_without_overlap(rows_per_program: int, codewords: int) -> None:
    """Programs of fewer rows than a block (128 rows of 16 logits, 8 of 256) read whole blocks; any split gives
    every row's index and the same shares (one program at 4096 rows, several partial sums otherwise)."""
    logits = _logits(ROWS, codewords)
    hard, shares = relaxed_indices.hard_indices_and_shares(logits, 0.3, True, rows_per_program)
    assert torch.equal(hard, logits.argmax(dim=-1))
    expected = torch.softmax(logits.double() / 0.3, dim=-1).sum(dim=0).float()
    torch.testing.assert_close(shares, expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("rows,channels", [(0, 16), (1, 16), (ROWS, 16), (ROWS, 3)])
def test_codebook_grad_matches_index_add(rows: int, channels: int) -> None:
    """Each row's gradient added to its hard index's codeword, untouched (zero) rows skipped; also channels that are
    not a power of two."""
    generator = torch.Generator().manual_seed(3)
    hard = torch.randint(0, 256, (rows,), generator=generator)
    grad_rows = torch.randn(rows, channels, generator=generator) * (torch.rand(rows, 1, generator=generator) < 0.5)
    got = relaxed_indices.codebook_grad(hard.to(DEVICE), grad_rows.to(DEVICE), 256)
    expected = torch.zeros(256, channels, dtype=torch.float64).index_add_(0, hard, grad_rows.double())
    assert got.shape == (256, channels) and got.dtype == torch.float32
    torch.testing.assert_close(got.cpu().double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("rows,channels", [(0, 16), (1, 16), (ROWS, 16), (ROWS, 3)])
def test_codeword_table_matches_index_select(rows: int, channels: int, index_dtype) -> None:
    """Each row's codeword, and the codebook's gradient through them, as index_select gives them; also channels
    that are not a power of two and the int32 indices of frozen stores."""
    generator = torch.Generator().manual_seed(4)
    indices = torch.randint(0, 256, (rows,), generator=generator, dtype=index_dtype).to(DEVICE)
    grad = torch.randn(rows, channels, generator=generator).to(DEVICE)

    def table_and_grad(table_of):
        codebook = torch.randn(256, channels, generator=generator.manual_seed(5)).to(DEVICE).requires_grad_()
        table = table_of(codebook, indices)
        table.backward(grad)
        return table.detach(), codebook.grad

    got = table_and_grad(straight_through.codeword_table)
    expected = table_and_grad(lambda codebook, rows: codebook.index_select(0, rows))
    assert got[0].shape == (rows, channels)
    assert torch.equal(got[0], expected[0])
    torch.testing.assert_close(got[1], expected[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("codewords", CODEBOOK_SIZES)
@pytest.mark.parametrize("inputs", ["soft", "rows", "share", "soft+rows+share", "rows+share", "rows+share+scale"])
def test_logit_grad_matches_reference(reference, inputs: str, codewords: int) -> None:
    """Each gradient term, alone and together; the shares' gradient also times a one-value tensor (the rate's
    gradient, which the kernel multiplies in)."""
    generator = torch.Generator().manual_seed(1)
    rows = _rows_for(codewords)
    logits = _logits(rows, codewords)

    def arguments():
        grad_soft = torch.randn(rows, codewords, generator=generator).to(DEVICE) if "soft" in inputs else None
        grad_rows = torch.randn(rows, 16, generator=generator).to(DEVICE) if "rows" in inputs else None
        codebook = torch.randn(codewords, 16, generator=generator).to(DEVICE) if "rows" in inputs else None
        share = torch.randn(codewords, generator=generator).to(DEVICE) if "share" in inputs else None
        return grad_soft, grad_rows, codebook, share

    scale = torch.tensor(-2.5, device=DEVICE) if "scale" in inputs else None
    generator.manual_seed(1)
    got = straight_through.relaxed_logit_grad(logits, 0.7, *arguments(), share_scale=scale)
    generator.manual_seed(1)
    expected = reference(straight_through.relaxed_logit_grad, logits, 0.7, *arguments(), share_scale=scale)
    if scale is not None:  # the scale reaches the result
        generator.manual_seed(1)
        assert not torch.allclose(got, straight_through.relaxed_logit_grad(logits, 0.7, *arguments()))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    # a softmax gradient sums to zero over each row's codewords
    torch.testing.assert_close(got.sum(dim=-1), torch.zeros(rows, device=DEVICE), rtol=0, atol=1e-4)


def test_logit_grad_overwrites_grad_soft_and_checks_its_arguments() -> None:
    logits = _logits(40, 16)
    grad_soft = torch.randn(40, 16, device=DEVICE)
    assert relaxed_indices.relaxed_logit_grad(logits, 1.0, grad_soft) is grad_soft
    with pytest.raises(ValueError, match="come together"):
        relaxed_indices.relaxed_logit_grad(logits, 1.0, grad_rows=torch.zeros(40, 16, device=DEVICE))
    with pytest.raises(ValueError, match="contiguous"):
        relaxed_indices.relaxed_logit_grad(logits, 1.0, torch.zeros(16, 40, device=DEVICE).t())


def test_empty_logits_have_empty_gradients() -> None:
    logits = _logits(0, 256)
    assert relaxed_indices.relaxed_logit_grad(logits, 1.0, grad_share=torch.ones(256, device=DEVICE)).shape == (0, 256)


@pytest.mark.parametrize("fuse_rate", [False, True])
def test_straight_through_step_with_rate_matches_reference(reference, fuse_rate: bool) -> None:
    """A straight-through lookup and the index rate (fused in one pass or separate): the same table, rate and
    gradients of logits and codebook as the reference."""
    generator = torch.Generator().manual_seed(2)
    logits0 = _logits(ROWS, 256)
    codebook0 = torch.randn(256, 16, generator=generator).to(DEVICE)
    grad_table = torch.randn(ROWS, 16, generator=generator).to(DEVICE)

    def step():
        logits, codebook = logits0.clone().requires_grad_(), codebook0.clone().requires_grad_()
        if fuse_rate:
            table, bits = straight_through.straight_through_codewords_and_rate(logits, codebook, 0.2)
        else:
            table = straight_through.straight_through_codewords(logits, codebook, 0.2)
            bits = straight_through.soft_index_rate_bits(logits, 0.2)
        ((table * grad_table).sum() + 1e-3 * bits).backward()
        return table.detach(), bits.detach(), logits.grad, codebook.grad

    for got, expected in zip(step(), reference(step)):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))


@pytest.mark.parametrize("codebook_bits", [None, 6])
@pytest.mark.parametrize("logit_dtype", [torch.float32, torch.float16])
def test_a_store_step_matches_reference(reference, codebook_bits, logit_dtype) -> None:
    """A store's training step as the model runs it (indices and the codebook's rounding held for the step, a pass
    without gradients, then the graded table with the rate): the kernels read the rounded codebook as the reference
    does, and its gradient reaches the float codebook; also with float16 logits (a float16 gradient)."""
    grad_table = torch.randn(ROWS, 16, generator=torch.Generator().manual_seed(3)).to(DEVICE)

    def step():
        torch.manual_seed(4)
        store = vertex_features.CodebookFeatures(
            ROWS, 8, 16, logit_init_std=3.0, codebook_init_std=0.5, logit_dtype=logit_dtype
        )
        store.codebook_bits, store.fuse_rate, store.temperature = codebook_bits, True, 0.2
        store = store.to(DEVICE).train()
        store.hold_indices(True)
        vertex_features.prepare_held_steps([store])
        with torch.no_grad():
            store.table()
        table = store.table()
        ((table * grad_table).sum() + 1e-3 * store.index_rate_bits()).backward()
        store.hold_indices(False)
        return table.detach(), store.logits.grad, store.codebook.grad

    got, expected = step(), reference(step)
    assert got[1].dtype == logit_dtype
    rtol = 1e-4 if logit_dtype == torch.float32 else 2**-10  # float16 gradients: within a unit of each other
    for value, want in zip(got, expected):
        torch.testing.assert_close(value, want, rtol=rtol, atol=1e-5 * float(want.abs().max()))


def test_use_kernel_false_keeps_the_reference(monkeypatch) -> None:
    def unexpected(*args, **kwargs):
        raise AssertionError("the kernel ran")

    monkeypatch.setattr(relaxed_indices, "relaxed_logit_grad", unexpected)
    monkeypatch.setattr(relaxed_indices, "hard_indices_and_shares", unexpected)
    monkeypatch.setattr(relaxed_indices, "hard_indices_and_rate", unexpected)
    logits = _logits(50, 16).requires_grad_()
    table, bits = straight_through.straight_through_codewords_and_rate(
        logits, torch.ones(16, 4, device=DEVICE), 0.5, False
    )
    (table.sum() + bits).backward()
    with pytest.raises(AssertionError, match="the kernel ran"):
        straight_through.soft_index_rate_bits(logits, 0.5)


@pytest.mark.parametrize(
    "logit_dtype,exp_avg_dtype,exp_avg_sq_dtype",
    [
        (torch.float32, torch.float32, torch.float32),
        (torch.float32, torch.bfloat16, torch.float32),
        (torch.float16, torch.bfloat16, torch.bfloat16),
    ],
)
@pytest.mark.parametrize("rows", [0, 1, ROWS])
def test_in_backward_adam_matches_reference(
    reference, rows: int, logit_dtype: torch.dtype, exp_avg_dtype: torch.dtype, exp_avg_sq_dtype: torch.dtype
) -> None:
    """The kernel's update against the reference's, 16-bit logits and second moments stochastically rounded by each
    (their random numbers differ: within a unit in the last place), bfloat16 first moments rounded to nearest."""
    from vqad_nerfstudio.optim import AdamStep

    codewords, width = 256, 4
    generator = torch.Generator().manual_seed(3)
    grad_rows = torch.randn(rows, width, generator=generator).to(DEVICE)
    codebook = torch.randn(codewords, width, generator=generator).to(DEVICE)
    grad_share = torch.randn(codewords, generator=generator).to(DEVICE)

    def updated(call):
        logits = _logits(rows, codewords).to(logit_dtype)
        moments = (
            torch.full_like(logits, 0.01, dtype=exp_avg_dtype),
            torch.full_like(logits, 1e-4, dtype=exp_avg_sq_dtype),
        )
        update = AdamStep(*moments, lr=0.05, beta1=0.9, beta2=0.999, eps=1e-15, weight_decay=0.01, step=3)
        call(straight_through.relaxed_logit_adam_, logits, 0.4, update, grad_rows, codebook, grad_share)
        return logits, *moments

    kernel = updated(lambda function, *args: function(*args))
    expected = updated(reference)
    units = {torch.float32: 1e-4, torch.bfloat16: 2**-7, torch.float16: 2**-10}
    for value, want in zip(kernel, expected):
        assert value.dtype == want.dtype
        torch.testing.assert_close(value.float(), want.float(), rtol=units[value.dtype], atol=1e-6)
    if rows:
        assert not torch.equal(kernel[0], _logits(rows, codewords).to(logit_dtype))


def test_float16_steps_below_its_resolution_survive_on_average() -> None:
    """The kernel's stochastic rounding is unbiased: Adam steps of 1e-4 at logits of 4 (float16's spacing there is
    2**-8, so rounding to nearest would leave every logit in place) move float16 logits on average as they move
    float32 ones."""
    from vqad_nerfstudio.optim import AdamStep

    rows, codewords = 16384, 16
    share = torch.linspace(-1, 1, codewords).to(DEVICE)
    moved = {}
    for dtype in (torch.float32, torch.float16):
        logits = torch.full((rows, codewords), 4.0, device=DEVICE, dtype=dtype)
        moment_dtype = torch.float32 if dtype == torch.float32 else torch.bfloat16
        update = AdamStep(
            torch.zeros_like(logits, dtype=torch.bfloat16), torch.zeros_like(logits, dtype=moment_dtype),
            lr=1e-4, beta1=0.9, beta2=0.999, eps=1e-15, weight_decay=0.0, step=1, seed=7,
        )  # fmt: skip
        straight_through.relaxed_logit_adam_(logits, 1.0, update, grad_share=share)
        moved[dtype] = (logits.float() - 4.0).mean(dim=0).cpu()
    assert moved[torch.float32].abs().min() > 0.9e-4  # every column moves by lr (the middle ones' sign aside)
    torch.testing.assert_close(moved[torch.float16], moved[torch.float32], rtol=0, atol=0.25e-4)


@pytest.mark.parametrize("logit_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows", [0, 1, ROWS])
def test_the_adam_pass_forecasts_the_next_step_indices(rows: int, logit_dtype: torch.dtype) -> None:
    """With ``forecast``, the Adam pass returns the updated logits' hard indices and soft-index sums as a pass over
    them would: the next step's indices without reading the logits again."""
    from vqad_nerfstudio.optim import AdamStep

    codewords = 256
    logits = _logits(rows, codewords).to(logit_dtype)
    update = AdamStep(
        torch.zeros_like(logits, dtype=torch.bfloat16), torch.zeros_like(logits, dtype=torch.bfloat16),
        lr=0.5, beta1=0.9, beta2=0.999, eps=1e-15, weight_decay=0.0, step=1, seed=5,
    )  # fmt: skip
    share = torch.randn(codewords, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    before = logits.argmax(dim=-1)
    hard, sums = relaxed_indices.relaxed_logit_adam_(logits, 0.4, update, grad_share=share, forecast=True)
    expected_hard, expected_sums = relaxed_indices.hard_indices_and_shares(logits, 0.4, True)
    assert torch.equal(hard, expected_hard) and hard.shape == (rows,)
    torch.testing.assert_close(sums, expected_sums, rtol=1e-6, atol=1e-6)
    if rows == ROWS:
        assert not torch.equal(hard, before)  # steps of 0.5 move some argmax: the forecast is of the update
    assert relaxed_indices.relaxed_logit_adam_(logits, 0.4, update, grad_share=share) is None


@pytest.mark.parametrize("logit_dtype", [torch.float32, torch.float16])
def test_the_adam_pass_reads_its_scalars_from_memory_as_from_its_arguments(logit_dtype: torch.dtype) -> None:
    """With ``scalars`` (:func:`relaxed_indices.adam_scalars` on the device) the Adam pass updates the logits and
    moments and forecasts as with the scalars as arguments, compiled bit for bit (a recorded graph replays it so)."""
    from vqad_nerfstudio.optim import AdamStep

    codewords = 256
    base = _logits(ROWS, codewords).to(logit_dtype)
    grad_rows = torch.randn(ROWS, 4, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    codebook = torch.randn(codewords, 4, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    share = torch.randn(codewords, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    results = []
    for in_memory in (False, True):
        logits = base.clone()
        update = AdamStep(
            torch.full_like(logits, 0.01, dtype=torch.bfloat16), torch.full_like(logits, 1e-4, dtype=logit_dtype),
            lr=0.05, beta1=0.9, beta2=0.999, eps=1e-15, weight_decay=0.01, step=3, seed=2**31 - 5,
        )  # fmt: skip
        scalars = relaxed_indices.adam_scalars(0.3, update).to(DEVICE) if in_memory else None
        forecast = relaxed_indices.relaxed_logit_adam_(
            logits, 0.3, update, grad_rows, codebook, share, torch.tensor(0.5, device=DEVICE), True, None, scalars
        )
        results.append((logits, update.exp_avg, update.exp_avg_sq, *forecast))
    assert not torch.equal(results[0][0], base)
    for got, expected in zip(*results):
        if ON_GPU:  # compiled, the arguments are float32 as the values in memory
            assert torch.equal(got, expected)
        else:  # the interpreter computes with float64 arguments
            torch.testing.assert_close(got.float(), expected.float(), rtol=1e-3, atol=1e-4)


def test_a_store_takes_its_forecast_only_for_the_logits_it_was_made_for() -> None:
    """A store's step under an in-backward Adam keeps the update's forecast; the next step's held indices (and rate)
    equal a pass over the logits, without that pass; logits changed since, or another temperature, ignore it."""
    from vqad_nerfstudio.optim import InBackwardAdam

    torch.manual_seed(0)
    store = vertex_features.CodebookFeatures(ROWS, 8, 4, logit_init_std=3.0, codebook_init_std=0.5, fuse_rate=True)
    store.temperature = 0.3
    store = store.to(DEVICE).train()
    optimizer = InBackwardAdam([store.logits], lr=0.5)
    grad_table = torch.randn(ROWS, 4, device=DEVICE)

    def step() -> None:
        store.hold_indices(True)
        ((store.table() * grad_table).sum() + 1e-3 * store.index_rate_bits()).backward()
        store.hold_indices(False)

    def held_indices():
        store.hold_indices(True)
        held = store._indices_of_step()
        store.hold_indices(False)
        return held

    def read(with_rate: bool = True):
        return straight_through.step_indices(store.logits, store.temperature, with_rate, True)

    step()
    assert optimizer.state[store.logits]["step"] == 1 and store._forecast is not None
    expected = read()
    with pytest.MonkeyPatch.context() as patch:
        for module in (vertex_features, straight_through):
            patch.setattr(module, "step_indices", lambda *args: pytest.fail("the logits were read"))
        got = held_indices()
    assert torch.equal(got[0], expected[0])
    torch.testing.assert_close(got[1:], expected[1:], rtol=1e-5, atol=1e-5)
    assert store._forecast is None  # taken once

    step()
    with torch.no_grad():
        store.logits[:, 0] += 100.0  # every row's argmax moves to codeword 0
    assert torch.equal(held_indices()[0], torch.zeros(ROWS, dtype=torch.long, device=DEVICE))
    step()
    store.temperature = 0.5
    torch.testing.assert_close(held_indices()[1:], read()[1:])


def test_each_step_reads_the_indices_its_last_update_forecast(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past the first step, no step reads its logits for their hard indices and soft-index sums: the last step's
    Adam update forecast them, and the forecast outlives the train() that nerfstudio's trainer calls before every
    step (when that call dropped it, every step read every level's logits once more)."""
    reads = []
    read = relaxed_indices.hard_indices_and_shares

    def counted(*args, **kwargs):
        reads.append(args[0].shape)
        return read(*args, **kwargs)

    monkeypatch.setattr(relaxed_indices, "hard_indices_and_shares", counted)
    straight_through_steps(steps=1)
    first_step = len(reads)
    assert first_step == 2  # the two grown levels' logits, once
    straight_through_steps(steps=3)
    assert len(reads) == 2 * first_step


@pytest.mark.parametrize("tiling", [(8192, 64, 8), (16384, 16, 16)])
def test_the_adam_pass_s_tiling_changes_no_update(tiling) -> None:
    """Another tiling of the Adam pass (blocks, rows and warps per program) updates the logits and moments bit for
    bit as the default does (stochastic rounding's noise follows each element, not its program), and forecasts
    the same indices and sums (their partial sums per program added in another order)."""
    from vqad_nerfstudio.optim import AdamStep

    codewords = 256
    base = _logits(300, codewords).half()
    grad_rows = torch.randn(300, 4, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    codebook = torch.randn(codewords, 4, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    results = []
    for chosen in (None, relaxed_indices.Tiling(*tiling)):
        logits = base.clone()
        update = AdamStep(
            torch.zeros_like(logits, dtype=torch.bfloat16), torch.zeros_like(logits, dtype=torch.bfloat16),
            lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-15, weight_decay=0.0, step=3, seed=1,
        )  # fmt: skip
        forecast = relaxed_indices.relaxed_logit_adam_(
            logits, 0.5, update, grad_rows, codebook, forecast=True, tiling=chosen
        )
        results.append((logits, update.exp_avg, update.exp_avg_sq, *forecast))
    (*default, sums), (*other, other_sums) = results
    assert not torch.equal(default[0], base)
    assert all(torch.equal(a, b) for a, b in zip(default, other))
    torch.testing.assert_close(other_sums, sums, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("codebook_bits", [None, 6])
def test_a_frozen_store_gathers_its_table_once_a_step(monkeypatch: pytest.MonkeyPatch, codebook_bits) -> None:
    """Inside a step's hold, frozen indices' codewords are gathered by the density pass (without gradients) and
    returned again by the graded pass, whose codebook gradient is still each row's gradient added to its codeword."""
    store = vertex_features.CodebookFeatures(
        num_rows=300, index_bits=4, feature_dim=3, frozen=True, codebook_bits=codebook_bits
    ).to(DEVICE)
    store.indices = torch.randint(0, 16, (300,), dtype=torch.int32, generator=torch.Generator().manual_seed(0)).to(
        DEVICE
    )
    gathers = []
    gather = relaxed_indices.codeword_table
    monkeypatch.setattr(relaxed_indices, "codeword_table", lambda *args: gathers.append(1) or gather(*args))
    weights = torch.randn(300, 3, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    store.hold_indices(True)
    with torch.no_grad():
        density_pass = store.table()
    graded = store.table()
    (graded * weights).sum().backward()
    store.hold_indices(False)
    assert len(gathers) == 1 and torch.equal(graded, density_pass)
    torch.testing.assert_close(graded, store.lookup_codebook().detach()[store.indices.long()], rtol=0, atol=0)
    expected = torch.zeros_like(store.codebook).index_add_(0, store.indices.long(), weights)
    torch.testing.assert_close(store.codebook.grad, expected)
    store.codebook.grad = None
    (store.table() * weights).sum().backward()  # outside the hold: gathered again
    assert len(gathers) == 2
    torch.testing.assert_close(store.codebook.grad, expected)
