"""Indices learned as two factors (index_factors=2): the factored gradients equal those of the outer-product soft
index they stand for, the hard indices and files equal a one-factor store's, and bad settings are refused."""

from __future__ import annotations

import pytest
import torch

from vqad_nerfstudio.encodings import index_factors, straight_through
from vqad_nerfstudio.encodings.straight_through import (
    _order_zero_bits,
    soft_index_rate_bits,
    straight_through_codewords_and_rate,
    straight_through_lookup,
)
from vqad_nerfstudio.encodings.vertex_features import CodebookFeatures
from vqad_nerfstudio.export.vqad_codec import load_compressed
from vqad_nerfstudio.models.vqad import VQADModelConfig
from vqad_nerfstudio.optim import InBackwardAdam


def _inputs(rows: int = 60, size: int = 4, width: int = 3, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, 2 * size, dtype=torch.float64, generator=generator)
    codebook = torch.randn(size * size, width, dtype=torch.float64, generator=generator)
    return logits, codebook, generator


def _joint_soft(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """The soft index the factors stand for, over all codewords (formed explicitly)."""
    return index_factors.joint(index_factors.factor_softmax(logits, temperature))


@pytest.mark.parametrize("temperature", [1.0, 0.3])
def test_the_logits_gradient_is_that_of_the_outer_product_soft_index(temperature: float) -> None:
    logits, codebook, generator = _inputs()
    grad_rows = torch.randn(logits.shape[0], codebook.shape[1], dtype=torch.float64, generator=generator)
    grad_share = torch.randn(codebook.shape[0], dtype=torch.float64, generator=generator)
    reference = logits.clone().requires_grad_()
    soft = _joint_soft(reference, temperature)
    ((soft @ codebook) * grad_rows).sum().add((soft * grad_share).sum()).backward()
    torch.testing.assert_close(index_factors.logit_grad(logits, temperature, grad_rows, codebook, grad_share),
                               reference.grad)  # fmt: skip
    assert reference.grad.abs().min() > 0  # every factor's every logit gets a gradient


def test_hard_indices_shares_and_soft_codewords_match_the_joint() -> None:
    logits, codebook, _ = _inputs(size=8)
    soft = _joint_soft(logits, 0.5)
    assert torch.equal(index_factors.hard_indices(logits), soft.argmax(dim=-1))
    torch.testing.assert_close(index_factors.share_sums(index_factors.factor_softmax(logits, 0.5)), soft.sum(dim=0))
    torch.testing.assert_close(index_factors.soft_codewords(logits, codebook, 0.5), soft @ codebook)


def test_factor_logits_from_joint_logits_keep_the_joint_argmax() -> None:
    joint_logits = torch.randn(500, 64, generator=torch.Generator().manual_seed(1))
    factored = index_factors.logits_of_joint(joint_logits)
    assert factored.shape == (500, 16)
    assert torch.equal(index_factors.hard_indices(factored), joint_logits.argmax(dim=-1))
    with pytest.raises(ValueError, match="not the square"):
        index_factors.logits_of_joint(torch.zeros(3, 8))


@pytest.mark.parametrize("num_rows,num_lookups", [(40, 300), (500, 64)])  # full-table and unique-rows paths
def test_straight_through_lookup_of_factors_matches_the_reference(num_rows: int, num_lookups: int) -> None:
    logits, codebook, generator = _inputs(rows=num_rows)
    logits.requires_grad_()
    codebook.requires_grad_()
    rows = torch.randint(0, num_rows, (num_lookups,), generator=generator)
    upstream = torch.randn(num_lookups, codebook.shape[1], dtype=torch.float64, generator=generator)
    out = straight_through_lookup(rows, logits, codebook, 0.5, use_kernel=False, factors=2)
    assert torch.equal(out, codebook[index_factors.hard_indices(logits[rows])])
    (out * upstream).sum().backward()

    logits_ref = logits.detach().clone().requires_grad_()
    codebook_ref = codebook.detach().clone().requires_grad_()
    soft = _joint_soft(logits_ref[rows], 0.5)
    hard = torch.nn.functional.one_hot(soft.argmax(dim=-1), soft.shape[1]).to(soft.dtype)
    (((hard - soft.detach() + soft) @ codebook_ref) * upstream).sum().backward()
    torch.testing.assert_close(logits.grad, logits_ref.grad)
    torch.testing.assert_close(codebook.grad, codebook_ref.grad)


@pytest.mark.parametrize("row_chunk", [straight_through.ROW_CHUNK, 16])
def test_the_rate_of_factors_is_the_order_zero_rate_of_the_joint(monkeypatch, row_chunk: int) -> None:
    monkeypatch.setattr(straight_through, "ROW_CHUNK", row_chunk)
    logits, codebook, _ = _inputs(rows=50)
    logits.requires_grad_()
    bits = soft_index_rate_bits(logits, 0.7, use_kernel=False, factors=2)
    bits.backward()
    reference = logits.detach().clone().requires_grad_()
    expected = _order_zero_bits(_joint_soft(reference, 0.7).mean(dim=0), 50)
    expected.backward()
    torch.testing.assert_close(bits, expected)
    torch.testing.assert_close(logits.grad, reference.grad)

    # with the codewords in one pass: equal values and the two gradients summed
    logits.grad = None
    table, fused_bits = straight_through_codewords_and_rate(logits, codebook, 0.7, use_kernel=False, factors=2)
    (table.sum() + fused_bits).backward()
    reference.grad = None
    soft = _joint_soft(reference, 0.7)
    hard = torch.nn.functional.one_hot(soft.argmax(dim=-1), soft.shape[1]).to(soft.dtype)
    ((hard - soft.detach() + soft) @ codebook).sum().add(_order_zero_bits(soft.mean(dim=0), 50)).backward()
    torch.testing.assert_close(fused_bits, expected)
    torch.testing.assert_close(logits.grad, reference.grad)


def test_a_factored_store_holds_fewer_logits_and_trains_through_the_in_backward_adam() -> None:
    store = CodebookFeatures(300, 8, feature_dim=3, fuse_rate=True, use_kernels=False, index_factors=2)
    assert store.logits.shape == (300, 32)  # 16 + 16 instead of 256
    optimizer = InBackwardAdam([store.logits], lr=0.05, exp_avg_dtype="float32")
    target = torch.randn(300, 3, generator=torch.Generator().manual_seed(0))
    before = store.hard_indices().clone()
    store.temperature = 0.5
    for _ in range(3):
        ((store.table() - target) ** 2).sum().add(1e-3 * store.index_rate_bits()).backward()
    assert store.logits.grad is None and optimizer.state[store.logits]["step"] == 3
    assert not torch.equal(store.hard_indices(), before)  # the indices moved
    assert int(store.hard_indices().max()) < 256


def test_quantising_a_float_warm_up_picks_the_same_codewords_in_factors() -> None:
    stores = [CodebookFeatures(200, 4, 4, float_warmup=True, index_factors=factors) for factors in (1, 2)]
    features = torch.randn(200, 4, generator=torch.Generator().manual_seed(2))
    for store in stores:
        store.warmup_features.data = features.clone()
        store.quantize_float_warmup(generator=torch.Generator().manual_seed(0))
    one, two = stores
    assert two.logits.shape == (200, 8) and torch.equal(one.codebook, two.codebook)
    assert torch.equal(two.hard_indices(), one.hard_indices())
    two.remap(torch.tensor([5, -1, 7]))
    assert two.logits.shape == (3, 8) and two.freeze_indices() and two.indices.shape == (3,)


def test_a_checkpoint_of_another_factoring_is_refused_clearly() -> None:
    saved = CodebookFeatures(20, 4, 3).state_dict()
    with pytest.raises(ValueError, match="index_factors"):
        CodebookFeatures(20, 4, 3, index_factors=2).load_state_dict(saved)


def test_a_factored_model_exports_the_file_a_one_factor_model_would(tiny_vqad, vqad_file) -> None:
    model = tiny_vqad(3, index_bits=4, index_factors=2)
    stores = [level.features for level in model.grid.levels]
    assert all(store.logits.shape[1] == 8 for store in stores)
    decoded, _ = load_compressed(vqad_file(model))
    for original, level in zip(stores, decoded.grid.levels):
        assert torch.equal(level.features.hard_indices(), original.hard_indices())
    assert decoded.config.index_factors == 1  # how the indices were learned is not part of the file


@pytest.mark.parametrize(
    "settings,message",
    [
        (dict(index_factors=3), "index_factors must be one of"),
        (dict(index_factors=2, index_bits=7), "index_bits"),
        (dict(index_factors=2, index_bits=8, base_index_bits=5), "base_index_bits"),
    ],
)
def test_bad_factor_settings_are_refused(settings, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        VQADModelConfig(**settings)
    with pytest.raises(ValueError, match="index_factors|index_bits"):
        CodebookFeatures(4, 7, 2, index_factors=2)
