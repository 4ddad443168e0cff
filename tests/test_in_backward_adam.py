"""InBackwardAdam: torch.optim.Adam's update, applied by the index logits' backward pass without storing their
gradient (the PyTorch path; tests/test_relaxed_indices_kernel.py compares the kernel with it)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vqad_nerfstudio.encodings import straight_through
from vqad_nerfstudio.encodings.straight_through import straight_through_codewords_and_rate
from vqad_nerfstudio.optim import InBackwardAdam, pending_update, stochastically_rounded

SETTINGS = dict(lr=0.05, eps=1e-15, weight_decay=0.0)


def _loss(logits: torch.Tensor, codebook: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    table, bits = straight_through_codewords_and_rate(logits, codebook, 0.5, use_kernel=False)
    return ((table - target) ** 2).sum() + 1e-3 * bits


def _train(optimizer_class, steps: int = 4, **options):
    generator = torch.Generator().manual_seed(0)
    logits = nn.Parameter(torch.randn(300, 16, generator=generator))
    codebook = torch.randn(16, 3, generator=generator)
    target = torch.randn(300, 3, generator=generator)
    optimizer = optimizer_class([logits], **SETTINGS, **options)
    grads = []
    for _ in range(steps):
        optimizer.zero_grad()
        _loss(logits, codebook, target).backward()
        grads.append(logits.grad)
        optimizer.step()
    return logits.detach(), optimizer, grads


@pytest.mark.parametrize("row_chunk", [straight_through.ROW_CHUNK, 64])
def test_update_in_backward_equals_torch_adam(monkeypatch, row_chunk: int) -> None:
    monkeypatch.setattr(straight_through, "ROW_CHUNK", row_chunk)
    expected, _, _ = _train(torch.optim.Adam)
    logits, optimizer, grads = _train(InBackwardAdam, exp_avg_dtype="float32")
    assert all(grad is None for grad in grads)  # updated in the backward pass: no gradient was stored
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-6)
    assert optimizer.state[next(iter(optimizer.state))]["step"] == 4


def test_bfloat16_first_moment_stays_close_to_adam() -> None:
    expected, _, _ = _train(torch.optim.Adam, steps=10)
    logits, optimizer, _ = _train(InBackwardAdam, steps=10)
    state = next(iter(optimizer.state.values()))
    assert state["exp_avg"].dtype == torch.bfloat16 and state["exp_avg_sq"].dtype == torch.float32
    moved = (expected - _train(torch.optim.Adam, steps=0)[0]).abs()
    error = (logits - expected).abs()
    assert error.max() < 0.05 * moved.max() and error.mean() < 0.005 * moved.mean()


def test_step_updates_parameters_with_ordinary_gradients() -> None:
    generator = torch.Generator().manual_seed(1)
    start = torch.randn(5, 4, generator=generator)
    weights = [nn.Parameter(start.clone()) for _ in range(2)]
    optimizers = [
        torch.optim.Adam([weights[0]], **SETTINGS),
        InBackwardAdam([weights[1]], **SETTINGS, exp_avg_dtype="float32"),
    ]
    for _ in range(3):
        for weight, optimizer in zip(weights, optimizers):
            optimizer.zero_grad()
            (weight**3).sum().backward()
            optimizer.step()
    torch.testing.assert_close(weights[1], weights[0], rtol=1e-5, atol=1e-6)


def test_ordinary_gradients_when_not_in_backward() -> None:
    expected, _, _ = _train(torch.optim.Adam)
    logits, _, grads = _train(InBackwardAdam, exp_avg_dtype="float32", in_backward=False)
    assert all(grad is not None for grad in grads)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-6)


def test_a_second_backward_through_updated_logits_is_refused() -> None:
    logits = nn.Parameter(torch.randn(20, 8))
    optimizer = InBackwardAdam([logits], **SETTINGS)
    loss = _loss(logits, torch.randn(8, 2), torch.randn(20, 2))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    assert optimizer.state[logits]["step"] == 1


def test_state_survives_a_checkpoint_in_its_dtypes() -> None:
    _, optimizer, _ = _train(InBackwardAdam)
    logits = nn.Parameter(torch.zeros(300, 16))
    restored = InBackwardAdam([logits], **SETTINGS)
    restored.load_state_dict(optimizer.state_dict())
    state = restored.state[logits]
    assert state["exp_avg"].dtype == torch.bfloat16 and state["exp_avg_sq"].dtype == torch.float32
    assert state["step"] == 4 and pending_update(logits) is restored


def test_a_checkpoint_of_torch_adam_resumes_in_the_moments_dtypes() -> None:
    """Runs from before the in-backward update saved torch's Adam state (a tensor step, float32 moments)."""
    _, torch_adam, _ = _train(torch.optim.Adam)
    logits = nn.Parameter(torch.zeros(300, 16))
    resumed = InBackwardAdam([logits], **SETTINGS)
    resumed.load_state_dict(torch_adam.state_dict())
    assert resumed.state[logits]["exp_avg"].dtype == torch.bfloat16
    assert resumed.begin_update(logits).step == 5


def test_owner_is_found_only_while_it_exists() -> None:
    logits = nn.Parameter(torch.zeros(3, 4))
    assert pending_update(logits) is None
    optimizer = InBackwardAdam([logits], **SETTINGS)
    assert pending_update(logits) is optimizer
    del optimizer
    assert pending_update(logits) is None


def test_bad_moment_dtype_is_refused() -> None:
    with pytest.raises(ValueError, match="float32, bfloat16, float16 or param"):
        InBackwardAdam([nn.Parameter(torch.zeros(2))], exp_avg_dtype="int8")


def test_pruning_hands_the_replaced_logits_and_their_moments_over() -> None:
    from vqad_nerfstudio.encodings.sparse_grid import RowRemap
    from vqad_nerfstudio.models.vqad import _remap_optimizer_state

    _, optimizer, _ = _train(InBackwardAdam)
    old = optimizer.param_groups[0]["params"][0]
    row_five = optimizer.state[old]["exp_avg"][5].clone()
    row_seven = optimizer.state[old]["exp_avg_sq"][7].clone()
    source_rows = torch.tensor([5, -1, 7])
    new = nn.Parameter(torch.zeros(3, 16))
    _remap_optimizer_state([optimizer], RowRemap(source_rows, [(old, new)]))
    assert pending_update(new) is optimizer and optimizer.param_groups[0]["params"] == [new]
    moments = optimizer.state[new]
    assert moments["exp_avg"].dtype == torch.bfloat16 and moments["step"] == 4
    assert torch.equal(moments["exp_avg"][0], row_five) and row_five.abs().sum() > 0
    assert torch.equal(moments["exp_avg_sq"][2], row_seven) and row_seven.abs().sum() > 0
    assert torch.equal(moments["exp_avg_sq"][1], torch.zeros(16))
    assert old.shape == (0, 16) and old not in optimizer.state  # the replaced rows are released, not kept beside


def test_gradient_clipping_needs_ordinary_gradients() -> None:
    from vqad_nerfstudio.training import InBackwardAdamOptimizerConfig

    params = [nn.Parameter(torch.zeros(2, 3))]
    with pytest.raises(ValueError, match="in_backward False"):
        InBackwardAdamOptimizerConfig(lr=0.1, max_norm=1.0).setup(params)
    optimizer = InBackwardAdamOptimizerConfig(lr=0.1, max_norm=1.0, in_backward=False).setup(params)
    assert isinstance(optimizer, InBackwardAdam) and pending_update(params[0]) is None


def test_nerfstudio_steps_train_a_store_through_the_in_backward_update() -> None:
    """vqad's trainer settings with nerfstudio's optimiser loop: the logits move without a stored gradient while the
    scheduler decays the rate their backward pass reads; the codebook keeps its ordinary gradient."""
    from nerfstudio.engine.optimizers import Optimizers
    from vqad_nerfstudio.method_configs.vqad import vqad_model_config, vqad_trainer_config

    from vqad_nerfstudio.encodings.vertex_features import CodebookFeatures

    store = CodebookFeatures(200, 4, feature_dim=3, fuse_rate=True, use_kernels=False)
    groups = {name: params for name, params in store.parameter_groups().items() if name != "grid_features"}
    config = vqad_trainer_config("vqad", vqad_model_config())
    optimizers = Optimizers({name: config.optimizers[name] for name in groups}, groups)
    scaler = torch.cuda.amp.GradScaler(enabled=False)
    target = torch.randn(200, 3, generator=torch.Generator().manual_seed(0))
    before = store.logits.detach().clone()
    rates = []
    for step in range(3):
        optimizers.zero_grad_all()
        loss = ((store.table() - target) ** 2).sum() + 1e-3 * store.index_rate_bits()
        loss.backward()
        optimizers.optimizer_scaler_step_all(scaler)
        optimizers.scheduler_step_all(step)
        rates.append(optimizers.optimizers["grid_logits"].param_groups[0]["lr"])
    logits_optimizer = optimizers.optimizers["grid_logits"]
    assert isinstance(logits_optimizer, InBackwardAdam) and store.logits.grad is None
    assert logits_optimizer.state[store.logits]["step"] == 3 and not torch.equal(store.logits, before)
    assert rates[0] > rates[-1]  # the schedule decays the rate the backward pass reads
    assert store.codebook.grad is not None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_rounding_is_exact_on_average_and_picks_a_neighbour(dtype: torch.dtype) -> None:
    """Each value goes to one of its two neighbours in ``dtype``, the nearer more often, their mean the value; a
    step far below half a unit in the last place (which rounding to nearest loses) survives on average."""
    generator = torch.Generator().manual_seed(2)
    values = torch.cat([torch.randn(200, generator=generator) * 3, torch.tensor([4.0 + 2**-12, -4.0 - 2**-12])])
    draws = torch.stack([stochastically_rounded(values, dtype, generator) for _ in range(4000)]).float()
    below, above = values.to(dtype).float(), values.to(dtype).float()  # the nearest, and the other neighbour
    spacing = torch.finfo(dtype).eps * 2 ** torch.floor(torch.log2(values.abs()))
    below = torch.where(below > values, below - spacing, below)
    above = torch.where(above < values, above + spacing, above)
    assert ((draws == below) | (draws == above)).all()
    torch.testing.assert_close(draws.mean(dim=0), values, rtol=0, atol=float(spacing.max()) * 0.05)
    assert values.to(dtype)[-1].float() == -4.0  # to nearest, the step is lost


def test_stochastic_rounding_saturates_float16_and_keeps_float32() -> None:
    values = torch.tensor([1e6, -1e6, 1.5])
    assert stochastically_rounded(values, torch.float16).tolist() == [65504.0, -65504.0, 1.5]
    assert stochastically_rounded(values, torch.float32) is values
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        stochastically_rounded(values, torch.int8)


def test_float16_parameters_train_with_bfloat16_moments_and_unbiased_steps() -> None:
    """A float16 parameter's second moment follows it into 16 bits (bfloat16: a squared gradient underflows
    float16), and a constant gradient far below float16's resolution at the parameter moves it on average as
    Adam moves a float32 one."""
    start = torch.full((20000,), 4.0)
    moved = {}
    for dtype in (torch.float32, torch.float16):
        param = nn.Parameter(start.to(dtype, copy=True))
        optimizer = InBackwardAdam([param], lr=1e-4, eps=1e-15)
        for _ in range(20):
            param.grad = torch.ones_like(param)
            optimizer.step()
        state = optimizer.state[param]
        assert param.dtype == dtype and state["exp_avg_sq"].dtype == (
            torch.float32 if dtype == torch.float32 else torch.bfloat16
        )
        moved[dtype] = (start - param.detach().float()).mean()
    assert abs(moved[torch.float16] - moved[torch.float32]) < 0.05 * moved[torch.float32]
