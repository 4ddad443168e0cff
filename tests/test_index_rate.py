"""The indices' rate term: an estimate of their entropy-coded size that training can lower."""

import math

import numpy as np
import pytest
import torch
from nerfstudio.data.scene_box import SceneBox

from vqad_nerfstudio.codec import encode_categorical
from vqad_nerfstudio.encodings import straight_through
from vqad_nerfstudio.encodings.vertex_features import CodebookFeatures
from vqad_nerfstudio.models.vqad import VQADModelConfig


def _entropy_bits(indices: torch.Tensor, alphabet: int) -> float:
    counts = torch.bincount(indices, minlength=alphabet).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(counts[counts > 0] * torch.log2(p)).sum())


def test_rate_of_hard_indices_is_their_order0_coded_size():
    torch.manual_seed(0)
    store = CodebookFeatures(500, index_bits=3, feature_dim=2)
    indices = torch.multinomial(torch.tensor([0.5, 0.2, 0.1, 0.1, 0.05, 0.05, 0.0, 0.0]), 500, replacement=True)
    store.logits.data = torch.nn.functional.one_hot(indices, 8).float() * 40.0  # one-hot after the softmax
    assert float(store.index_rate_bits()) == pytest.approx(_entropy_bits(indices, 8), rel=1e-4)


def test_rate_gradient_concentrates_the_indices():
    torch.manual_seed(1)
    store = CodebookFeatures(2000, index_bits=4, feature_dim=2, logit_init_std=1.0)
    before = _entropy_bits(store.hard_indices(), 16)
    optimizer = torch.optim.Adam([store.logits], lr=0.05)
    for _ in range(100):
        optimizer.zero_grad()
        store.index_rate_bits().backward()
        optimizer.step()
    assert _entropy_bits(store.hard_indices(), 16) < 0.5 * before


def _fit(rate_weight: float) -> tuple:
    """Fit noisy targets with a codebook store; return (coded index bytes, mean squared error)."""
    torch.manual_seed(2)
    codebook = torch.randn(16, 3)
    targets = codebook[torch.randint(0, 16, (4000,))] + 0.3 * torch.randn(4000, 3)
    store = CodebookFeatures(4000, index_bits=4, feature_dim=3, logit_init_std=0.1)
    store.codebook.data = codebook.clone()
    store.temperature = 0.5
    optimizer = torch.optim.Adam(store.parameters(), lr=0.05)
    rows = torch.arange(4000)
    for _ in range(150):
        optimizer.zero_grad()
        loss = (store(rows) - targets).square().mean() + rate_weight * store.index_rate_bits() / 4000
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        error = float((store(rows) - targets).square().mean())
    coded = encode_categorical(store.hard_indices().numpy().astype(np.int64), 16)
    return len(coded), error


def test_rate_weight_trades_error_for_smaller_coded_indices():
    """A rate-distortion curve: each larger weight gives fewer range-coded bytes (real bytes, not the estimate)
    and a larger error."""
    points = [_fit(weight) for weight in (0.0, 0.2, 0.5)]
    sizes, errors = [size for size, _ in points], [error for _, error in points]
    assert sizes[0] > sizes[1] > sizes[2] and sizes[1] < 0.8 * sizes[0]
    assert errors[0] < errors[1] < errors[2]


def test_reference_path_models_keep_the_indices_softmax_off_the_kernels():
    box = SceneBox(aabb=torch.tensor([[-1.0] * 3, [1.0] * 3]))
    config = VQADModelConfig(num_levels=2, base_resolution=4, dense_resolution=8, fused_kernels=False)
    model = config.setup(scene_box=box, num_train_data=1)
    assert not model.grid.fused and not any(level.features.use_kernels for level in model.grid.levels)


def test_model_adds_the_rate_loss_only_when_asked_and_after_the_float_warm_up():
    box = SceneBox(aabb=torch.tensor([[-1.0] * 3, [1.0] * 3]))
    rays = 64
    outputs = {"rgb": torch.rand(rays, 3), "accumulation": torch.ones(rays, 1)}
    batch = {"image": torch.rand(rays, 3)}
    for weight in (0.0, 0.01):
        config = VQADModelConfig(num_levels=2, base_resolution=4, dense_resolution=8, index_rate_weight=weight)
        model = config.setup(scene_box=box, num_train_data=1)
        model.train()
        assert all(level.features.fuse_rate == (weight > 0) for level in model.grid.levels)  # one gradient buffer
        assert all(level.features.use_kernels for level in model.grid.levels)
        assert "index_rate" not in model.get_loss_dict(outputs, batch)  # the float warm-up has no indices yet
        for level in model.grid.levels:
            level.features.quantize_float_warmup()
        losses = model.get_loss_dict(outputs, batch)
        assert ("index_rate" in losses) == (weight > 0)
        if weight > 0:
            losses["index_rate"].backward()
            assert all(level.features.logits.grad is not None for level in model.grid.levels)
            assert math.isfinite(float(losses["index_rate"]))


def test_negative_rate_weight_is_rejected():
    with pytest.raises(ValueError, match="index_rate_weight"):
        VQADModelConfig(index_rate_weight=-1.0)


@pytest.mark.parametrize("rows", [0, 1, 700])
def test_chunked_softmax_gradients_equal_plain_autograd(monkeypatch, rows: int) -> None:
    """The rate and the straight-through gradients, computed chunk by chunk without [rows, 2**b] activations, are the
    plain formulas' (chunks of 256 rows here, so 700 rows take three); unused codewords (clamped shares) included."""
    monkeypatch.setattr(straight_through, "ROW_CHUNK", 256)
    generator = torch.Generator().manual_seed(4)
    logits = (3 * torch.randn(rows, 32, generator=generator, dtype=torch.float64)).requires_grad_()
    codebook = torch.randn(32, 5, generator=generator, dtype=torch.float64).requires_grad_()
    with torch.no_grad():
        logits[:, 7] = -1e4  # a codeword no row uses: its share is clamped inside the logarithm
    target = torch.randn(rows, 5, generator=generator, dtype=torch.float64)
    temperature = 0.7

    def plain() -> torch.Tensor:
        soft = torch.softmax(logits / temperature, dim=-1)
        hard = torch.nn.functional.one_hot(logits.argmax(dim=-1), 32).to(soft)
        features = (hard - soft.detach() + soft) @ codebook
        counts = soft.sum(dim=0)
        rate = -(counts * torch.log2((counts / max(rows, 1)).clamp_min(1e-12))).sum()
        return (features - target).square().sum() + 0.1 * rate

    def chunked() -> torch.Tensor:
        features = straight_through.straight_through_codewords(logits, codebook, temperature)
        rate = straight_through.soft_index_rate_bits(logits, temperature) if rows else 0.0
        return (features - target).square().sum() + 0.1 * rate

    expected = torch.autograd.grad(plain(), (logits, codebook))
    value = chunked()
    got = torch.autograd.grad(value, (logits, codebook))
    assert float(value) == pytest.approx(float(plain()), rel=1e-10, abs=1e-10)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-12)


def test_rate_fused_with_the_table_has_the_same_values_and_gradients():
    """``fuse_rate``: the table's pass computes the rate too; values and gradients equal the separate computation
    (float64), and a rate left over from before an optimiser step is not used."""
    losses = {}
    for fuse in (False, True):
        torch.manual_seed(3)
        store = CodebookFeatures(700, index_bits=3, feature_dim=2, logit_init_std=1.0, fuse_rate=fuse).double()
        store.temperature = 0.7
        loss = store.table().square().sum() + 0.3 * store.index_rate_bits()
        loss.backward()
        losses[fuse] = (loss.detach(), store.logits.grad.clone(), store.codebook.grad.clone())
        if fuse:
            assert store._rate_of_table is None  # consumed
            store.table()
            with torch.no_grad():
                store.logits.add_(1.0)  # an optimiser step
            stale = store.index_rate_bits()
            torch.testing.assert_close(stale, straight_through.soft_index_rate_bits(store.logits, store.temperature))
    for separate, fused in zip(losses[False], losses[True]):
        torch.testing.assert_close(separate, fused)
