"""Level 0 with its own index width (base_index_bits): the model, its files (version 2.0) and bad input."""

from __future__ import annotations

import pytest
import torch

from vqad_nerfstudio.codec import FORMAT_VERSION, REQUIRING_VERSION, FormatError, read_container, write_container
from vqad_nerfstudio.export.vqad_codec import load_compressed
from vqad_nerfstudio.models.vqad import VQADModelConfig


@pytest.fixture
def model_with(tiny_vqad):
    """``build(base_index_bits)``: a small model with 5-bit indices (:func:`tiny_vqad`)."""
    return lambda base_index_bits: tiny_vqad(4, index_bits=5, base_index_bits=base_index_bits)


def test_level_0_takes_its_own_width_and_the_others_index_bits(model_with) -> None:
    model = model_with(2)
    assert [level.features.codebook.shape[0] for level in model.grid.levels] == [4, 32, 32]
    assert [level.features.index_bits for level in model.grid.levels] == [2, 5, 5]
    assert [level.features.codebook.shape[0] for level in model_with(None).grid.levels] == [32, 32, 32]


def test_a_file_with_a_narrower_level_0_is_version_2_and_decodes_to_the_same_model(model_with, vqad_file) -> None:
    model = model_with(2)
    data = vqad_file(model)
    container = read_container(data)
    assert container.version == REQUIRING_VERSION and container.header["requires"] == ["base_index_bits"]
    assert container.header["model"]["base_index_bits"] == 2
    decoded, _ = load_compressed(data)
    assert decoded.config.level_index_bits(0) == 2 and decoded.config.index_bits == 5
    points = torch.rand(400, 3, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(
            decoded.field.density_at(points)[0], model.field.density_at(points)[0], atol=1e-3, rtol=1e-3
        )
    for original, level in zip(model.grid.levels, decoded.grid.levels):
        assert torch.equal(level.features.hard_indices(), original.features.hard_indices())
    assert len(vqad_file(model_with(None))) > len(data)  # 28 fewer codewords of 16 features in fp16
    same = vqad_file(model_with(5))  # base_index_bits equal to index_bits: nothing to require
    assert (
        read_container(same).version == FORMAT_VERSION and "base_index_bits" not in read_container(same).header["model"]
    )


@pytest.mark.parametrize("value", [0, 17, 2.0, True])
def test_bad_base_index_bits_are_refused(value, model_with, vqad_file) -> None:
    container = read_container(vqad_file(model_with(2)))
    header = {**container.header, "model": {**container.header["model"], "base_index_bits": value}}
    with pytest.raises(FormatError, match="base_index_bits"):
        load_compressed(write_container(header, container.chunks))
    if type(value) is int:
        with pytest.raises(ValueError, match="base_index_bits"):
            VQADModelConfig(base_index_bits=value)


def test_a_width_the_header_does_not_require_is_refused(model_with, vqad_file) -> None:
    container = read_container(vqad_file(model_with(2)))
    header = {key: value for key, value in container.header.items() if key != "requires"}
    with pytest.raises(FormatError, match="base_index_bits is set but not required"):
        load_compressed(write_container(header, container.chunks))
