"""The Adam pass of two-factor indices (kernels/factored_indices.py) against the PyTorch reference
(straight_through.relaxed_logit_adam_ with use_kernel=False): the updated logits and moments, and the forecast."""

from __future__ import annotations

import pytest
import torch

from vqad_nerfstudio.encodings import straight_through
from vqad_nerfstudio.kernels import factored_indices
from vqad_nerfstudio.optim import AdamStep

from kernel_device import DEVICE, needs_kernel
from model_steps import straight_through_steps

pytestmark = needs_kernel


def _update(logits: torch.Tensor, exp_avg_dtype: torch.dtype = torch.bfloat16) -> AdamStep:
    moments = (torch.full_like(logits, 0.01, dtype=exp_avg_dtype), torch.full_like(logits, 1e-4))
    return AdamStep(*moments, lr=0.05, beta1=0.9, beta2=0.999, eps=1e-15, weight_decay=0.01, step=3)


@pytest.mark.parametrize("exp_avg_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("terms", ["rows", "share", "rows+share+scale"])
@pytest.mark.parametrize("size,rows", [(16, 0), (16, 1), (16, 300), (4, 300), (32, 37)])
def test_the_update_matches_the_reference(size: int, rows: int, terms: str, exp_avg_dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(size + rows)
    start = (torch.randn(rows, 2 * size, generator=generator) * 2).to(DEVICE)
    grad_rows = torch.randn(rows, 5, generator=generator).to(DEVICE) if "rows" in terms else None
    codebook = torch.randn(size * size, 5, generator=generator).to(DEVICE) if "rows" in terms else None
    share = torch.randn(size * size, generator=generator).to(DEVICE) if "share" in terms else None
    scale = torch.tensor(-2.5, device=DEVICE) if "scale" in terms else None
    results = []
    for use_kernel in (True, False):
        logits = start.clone()
        update = _update(logits, exp_avg_dtype)
        forecast = straight_through.relaxed_logit_adam_(
            logits, 0.4, update, grad_rows, codebook, share, use_kernel, scale, forecast=True, factors=2
        )
        results.append((logits, update.exp_avg, update.exp_avg_sq, forecast))
    (logits, exp_avg, exp_avg_sq, forecast), (want, want_avg, want_avg_sq, none) = results
    assert none is None  # the reference forecasts nothing: the next step reads the logits
    # float32 within 1e-4 as the one-factor kernel's test: the softmax gradient's cancellation leaves the GPU's
    # exponentials and sums a few 1e-6 from PyTorch's (1.3e-5 seen in a second moment on an H100)
    torch.testing.assert_close(logits, want, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(exp_avg.float(), want_avg.float(), rtol=2**-7, atol=1e-7)
    torch.testing.assert_close(exp_avg_sq, want_avg_sq, rtol=1e-4, atol=1e-10)
    hard, sums = straight_through.hard_indices_and_shares(logits, 0.4, use_kernel=False, factors=2)
    assert torch.equal(forecast[0], hard)  # of the kernel's own update, as the next step reads it
    torch.testing.assert_close(forecast[1], sums * max(rows, 1), rtol=1e-5, atol=1e-5)
    if rows:
        assert not torch.equal(logits, start)


def test_what_the_kernel_takes_and_refuses() -> None:
    logits = torch.zeros(10, 32, device=DEVICE)
    assert factored_indices.available(logits, _update(logits))
    half = logits.half()
    assert not factored_indices.available(half, _update(half))  # float16 logits stay on the reference path
    odd = torch.zeros(10, 24, device=DEVICE)  # factors of 12 choices: not a power of two
    assert not factored_indices.available(odd, _update(odd))
    with pytest.raises(ValueError, match="not 64"):
        factored_indices.factored_logit_adam_(logits, 1.0, _update(logits), torch.zeros(10, 3, device=DEVICE),
                                              torch.zeros(64, 3, device=DEVICE))  # fmt: skip
    with pytest.raises(ValueError, match="float32 logits"):
        factored_indices.factored_logit_adam_(half, 1.0, _update(half))


def test_a_models_training_steps_with_two_factors_run_the_kernel(monkeypatch) -> None:
    """vqad's model with two-factor indices under its trainer's optimisers (the logits' Adam in the backward pass),
    straight-through from the first step with the rate in the loss: its steps update the logits through the kernel
    and take the next step's indices from its forecast, with the losses of the PyTorch path."""
    launches = []
    kernel_update = factored_indices.factored_logit_adam_

    def counted(*args, **kwargs):
        launches.append(1)
        return kernel_update(*args, **kwargs)

    def train(with_kernel: bool):
        monkeypatch.setattr(factored_indices, "factored_logit_adam_", counted)
        if not with_kernel:
            monkeypatch.setattr(factored_indices, "available", lambda logits, update: False)
        losses, model = straight_through_steps(index_factors=2)
        stores = [level.features for level in model.grid.levels if level.features.num_rows]
        return losses, stores

    kernel_losses, stores = train(True)
    assert len(launches) == 3 * len(stores) and all(store._forecast is not None for store in stores)
    assert all(store.logits.shape[1] == 8 and store.logits.dtype == torch.float32 for store in stores)
    launches.clear()
    losses, _ = train(False)
    assert not launches
    torch.testing.assert_close(kernel_losses, losses, rtol=1e-4, atol=1e-6)
