"""Several indices per vertex (index_stages, residual codebooks): the store, its float warm-up, the model's files
(version 2.0) and bad input."""

from __future__ import annotations

import pytest
import torch

from vqad_nerfstudio.codec import REQUIRING_VERSION, FormatError, read_container, write_container
from vqad_nerfstudio.encodings.vertex_features import CodebookFeatures, ResidualCodebookFeatures
from vqad_nerfstudio.export.vqad_codec import load_compressed
from vqad_nerfstudio.models.vqad import VQADModelConfig


def _store(**options) -> ResidualCodebookFeatures:
    torch.manual_seed(0)
    store = ResidualCodebookFeatures(50, 3, 4, 2, use_kernels=False, **options)
    with torch.no_grad():
        for stage in store.stages:
            stage.codebook.normal_()
            stage.logits.normal_()
    return store


def test_a_row_is_the_sum_of_its_stages_codewords_with_gradients_to_every_stage() -> None:
    store = _store()
    rows = torch.tensor([0, 7, 7, 49])
    first, second = store.stages
    expected = first.codebook[first.logits.argmax(-1)[rows]] + second.codebook[second.logits.argmax(-1)[rows]]
    torch.testing.assert_close(store(rows), expected)
    torch.testing.assert_close(store.table()[rows], expected)
    store.table().square().sum().backward()
    for stage in store.stages:
        assert stage.logits.grad.abs().sum() > 0 and stage.codebook.grad.abs().sum() > 0
    assert store.hard_indices().shape == (100,) and store.codebook.shape == (16, 4)
    groups = store.parameter_groups()
    assert [len(groups[name]) for name in ("grid_logits", "codebooks", "grid_features")] == [2, 2, 1]


def test_the_warm_up_ends_in_stages_each_fitting_what_the_ones_before_left() -> None:
    torch.manual_seed(1)
    features = torch.randn(400, 4)
    residual = ResidualCodebookFeatures(400, 3, 4, 2, float_warmup=True, use_kernels=False)
    single = CodebookFeatures(400, 3, 4, float_warmup=True, use_kernels=False)
    errors = []
    for store in (single, residual):
        with torch.no_grad():
            store.warmup_features.copy_(features)
        old = store.warmup_features
        swaps = store.quantize_float_warmup(generator=torch.Generator().manual_seed(2))
        assert swaps == [(old, store.warmup_features)] and not store.in_float_warmup
        with torch.no_grad():
            errors.append((store.table() - features).square().mean().item())
    assert errors[1] < 0.7 * errors[0]  # 64 sums of two codewords fit better than 8 codewords
    assert residual.quantize_float_warmup() == []


def test_rows_remap_in_every_stage() -> None:
    store = _store()
    before = store.table().detach()
    store.remap(torch.tensor([3, -1, 49]), in_place=True)
    assert store.num_rows == 3
    torch.testing.assert_close(store.table().detach()[[0, 2]], before[[3, 49]])


def test_frozen_stages_load_stacked_codebooks_and_indices() -> None:
    store = _store()
    frozen = ResidualCodebookFeatures(50, 3, 4, 2, frozen=True)
    frozen.load_codewords(store.codebook.detach(), store.hard_indices())
    torch.testing.assert_close(frozen.table(), store.table().detach())
    with pytest.raises(ValueError, match="stacked codebooks"):
        frozen.load_codewords(store.codebook.detach()[:8], store.hard_indices())
    with pytest.raises(ValueError, match="at least 2 stages"):
        ResidualCodebookFeatures(50, 3, 4, 1)


def test_a_model_with_two_stages_writes_a_version_2_file_that_decodes_to_it(tiny_vqad, vqad_file) -> None:
    model = tiny_vqad(3, index_bits=3, index_stages=2)
    assert all(isinstance(level.features, ResidualCodebookFeatures) for level in model.grid.levels)
    data = vqad_file(model)
    container = read_container(data)
    assert container.version == REQUIRING_VERSION and "index_stages" in container.header["requires"]
    decoded, _ = load_compressed(data)
    assert decoded.config.index_stages == 2
    for original, level in zip(model.grid.levels, decoded.grid.levels):
        assert torch.equal(level.features.hard_indices(), original.features.hard_indices())
    points = torch.rand(400, 3, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(
            decoded.field.density_at(points)[0], model.field.density_at(points)[0], atol=1e-3, rtol=1e-3
        )
    single = vqad_file(tiny_vqad(3, index_bits=3))
    assert "index_stages" not in read_container(single).header["model"]


@pytest.mark.parametrize("value", [0, 5, 2.0])
def test_bad_index_stages_are_refused(value, tiny_vqad, vqad_file) -> None:
    container = read_container(vqad_file(tiny_vqad(3, index_bits=3, index_stages=2)))
    header = {**container.header, "model": {**container.header["model"], "index_stages": value}}
    with pytest.raises(FormatError, match="index_stages"):
        load_compressed(write_container(header, container.chunks))
    if type(value) is int:
        with pytest.raises(ValueError, match="index_stages"):
            VQADModelConfig(index_stages=value)
    unrequired = {**container.header, "requires": [r for r in container.header["requires"] if r != "index_stages"]}
    with pytest.raises(FormatError, match="index_stages is set but not required"):
        load_compressed(write_container(unrequired, container.chunks))
