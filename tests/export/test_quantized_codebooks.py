"""Codebooks trained on the grid a file stores them on: lookups read them rounded per feature channel, gradients
pass straight through, and a decoded file renders exactly what was trained."""

from __future__ import annotations

import copy

import pytest
import torch

from vqad_nerfstudio.codec import Chunk, FormatError, describe, read_container, write_container
from vqad_nerfstudio.encodings.vertex_features import CodebookFeatures, prepare_held_steps
from vqad_nerfstudio.export.vqad_codec import encode_model, load_compressed
from vqad_nerfstudio.rounding import rounded_rows


def _store(bits, seed: int = 0) -> CodebookFeatures:
    torch.manual_seed(seed)
    store = CodebookFeatures(40, 4, 6, logit_init_std=1.0, codebook_init_std=0.5, codebook_bits=bits)
    with torch.no_grad():
        store.codebook[:, 2] *= 100.0  # channels of very different ranges: one scale each
    return store


def test_lookups_read_the_codebook_rounded_per_feature_channel() -> None:
    store = _store(5).eval()
    rounded = rounded_rows(store.codebook.t(), 5).t()
    assert not torch.equal(rounded, store.codebook)
    for channel in range(6):  # 5 bits: at most 31 values per channel, whatever the other channels' range
        assert torch.unique(rounded[:, channel]).numel() <= 31
    assert store.lookup_codebook().is_contiguous()  # as the kernels read it
    expected = rounded[store.logits.argmax(dim=-1)]
    assert torch.equal(store.table(), expected)
    assert torch.equal(store(torch.tensor([3, 0, 39])), expected[[3, 0, 39]])


@pytest.mark.parametrize("relaxed", [False, True], ids=["straight-through", "soft"])
def test_gradients_pass_straight_through_to_the_float_codebook(relaxed: bool) -> None:
    """The rounded store's gradients are those of a float store holding the rounded codebook: the logits see the
    rounded codewords, the codebook gets their gradient unchanged."""
    quantized, reference = _store(4), _store(None)
    with torch.no_grad():
        reference.codebook.copy_(rounded_rows(quantized.codebook.t(), 4).t())
    weights = torch.randn(40, 6)
    for store in (quantized, reference):
        store.train()
        store.temperature, store.relaxed = 0.5, relaxed
        (store.table() * weights).sum().backward()
    assert quantized.codebook.grad is not None and float(quantized.codebook.grad.abs().sum()) > 0
    torch.testing.assert_close(quantized.codebook.grad, reference.codebook.grad, rtol=0, atol=0)
    torch.testing.assert_close(quantized.logits.grad, reference.logits.grad, rtol=0, atol=0)


def test_a_step_rounds_each_codebook_once_and_follows_the_optimiser() -> None:
    store = _store(6).train()
    optimizer = torch.optim.Adam(store.parameters(), lr=0.1, fused=True)  # in place, without a version bump
    for _ in range(2):
        store.hold_indices(True)
        with torch.no_grad():
            first = store.lookup_codebook()
            assert store.lookup_codebook() is first  # rounded once, then reused by the step's passes
        assert torch.equal(store.lookup_codebook(), first)
        (store.table() * torch.randn(40, 6)).sum().backward()
        store.hold_indices(False)
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():
            assert torch.equal(store.lookup_codebook(), rounded_rows(store.codebook.t(), 6).t())


def test_the_levels_of_a_step_round_together_as_each_alone() -> None:
    stores = [_store(6, seed) for seed in range(3)] + [_store(5, 3), _store(None, 4), _store(6, 5)]
    for store in stores[:-1]:
        store.hold_indices(True)
    prepare_held_steps(stores)
    with torch.no_grad():
        for store in stores[:4]:
            held = store.lookup_codebook()
            assert store.lookup_codebook() is held
            assert torch.equal(held, rounded_rows(store.codebook.t(), store.codebook_bits).t())
        assert stores[4].lookup_codebook() is stores[4].codebook  # no bits: as it is
        assert stores[5].lookup_codebook() is not stores[5].lookup_codebook()  # not held: rounded at each lookup


@pytest.mark.parametrize("bits", [1, 9, 16])
def test_codebook_bits_outside_2_to_8_are_refused(bits: int) -> None:
    with pytest.raises(ValueError, match="codebook_bits"):
        CodebookFeatures(4, 2, 3, codebook_bits=bits)


def test_a_model_config_refuses_codebook_bits_that_files_cannot_store() -> None:
    from vqad_nerfstudio.models.vqad import VQADModelConfig

    with pytest.raises(ValueError, match="codebook_bits must be 16"):
        VQADModelConfig(codebook_bits=9)


def test_a_model_trains_with_its_codebook_bits() -> None:
    from nerfstudio.data.scene_box import SceneBox

    from vqad_nerfstudio.models.vqad import VQADModelConfig

    config = VQADModelConfig(num_levels=2, base_resolution=4, dense_resolution=8, codebook_bits=6)
    model = config.setup(scene_box=SceneBox(aabb=torch.tensor([[-1.0] * 3, [1.0] * 3])), num_train_data=1)
    assert [level.features.codebook_bits for level in model.grid.levels] == [6, 6]


def _with_codebook_bits(model, bits: int):
    model = copy.deepcopy(model)
    model.config.codebook_bits = bits
    for level in model.grid.levels:
        level.features.codebook_bits = bits
    return model


@pytest.fixture(scope="module")
def quantized_file(trained):
    model = _with_codebook_bits(trained.model, 8)
    encoded = encode_model(model)
    return model, write_container(encoded.header, encoded.chunks)


def test_a_model_with_quantized_codebooks_decodes_to_what_it_renders(
    trained, encoded, quantized_file, assert_checkpoint_exports_as_the_file
) -> None:
    model, data = quantized_file
    container = read_container(data)
    assert "quantized_codebooks" in container.header["requires"] and container.version == (2, 0)
    decoded, _ = load_compressed(data)
    assert decoded.config.codebook_bits == 8
    with torch.no_grad():
        for mine, theirs in zip(model.grid.levels, decoded.grid.levels):
            assert theirs.features.codebook_bits == 8
            assert torch.equal(mine.features.eval().table(), theirs.features.table())
    camera, _ = trained.views()[0]
    # what remains are the fp16 decoders, as in any file (about 90 dB apart here)
    assert trained.image_psnr(trained.render(decoded, camera), trained.render(model, camera)) > 60
    assert_checkpoint_exports_as_the_file(data)
    codebook_bytes = {
        tag: sum(row["payload_bytes"] for row in describe(read_container(file)) if row["tag"] == tag)
        for tag, file in (("CBOK", encoded), ("CBKQ", data))
    }
    assert 0 < codebook_bytes["CBKQ"] < 0.75 * codebook_bytes["CBOK"]


def test_a_codebook_chunk_needs_its_requirement_and_comes_once(encoded, quantized_file) -> None:
    _, data = quantized_file
    container = read_container(data)
    header = {key: value for key, value in container.header.items() if key != "requires"}
    with pytest.raises(FormatError, match="does not require quantized_codebooks"):
        load_compressed(write_container(header, container.chunks))
    fp16_codebook = next(chunk for chunk in read_container(encoded).chunks if chunk.tag == "CBOK" and chunk.lod == 1)
    both = list(container.chunks)
    after = next(i for i, chunk in enumerate(both) if chunk.tag == "CBKQ" and chunk.lod == 1)
    both.insert(after + 1, Chunk(fp16_codebook.tag, fp16_codebook.lod, fp16_codebook.payload))
    with pytest.raises(FormatError, match="more than one codebook chunk"):
        load_compressed(write_container(container.header, both))


def test_a_run_trained_with_fp16_codebooks_exports_them_rounded_when_asked(trained, encoded) -> None:
    data = write_container(*_header_and_chunks(encode_model(trained.model, codebook_bits=6)))
    tags = {row["tag"] for row in describe(read_container(data))}
    assert "CBKQ" in tags and "CBOK" not in tags and len(data) < len(encoded)
    decoded, _ = load_compressed(data)
    with torch.no_grad():
        for mine, theirs in zip(trained.model.grid.levels, decoded.grid.levels):
            codebook = mine.features.codebook.detach()
            assert torch.equal(theirs.features.codebook, rounded_rows(codebook.t(), 6).t())
    for camera, _ in trained.views():  # the decoded file renders what the rounding leaves (60-70 dB apart here)
        assert trained.image_psnr(trained.render(decoded, camera), trained.render(trained.model, camera)) > 40
    fp16 = write_container(*_header_and_chunks(encode_model(_with_codebook_bits(trained.model, 8), codebook_bits=16)))
    assert fp16 == encoded  # and a run trained with rounded codebooks can still store its float ones (CBOK)


def _header_and_chunks(encoded_model):
    return encoded_model.header, encoded_model.chunks


@pytest.mark.parametrize("bits", [1, 9, 32])
def test_codebook_bits_other_than_16_or_2_to_8_are_not_written(trained, bits: int) -> None:
    with pytest.raises(ValueError, match="codebook_bits"):
        encode_model(trained.model, codebook_bits=bits)


def test_models_without_codebooks_refuse_codebook_bits(trained) -> None:
    from vqad_nerfstudio.export.formats import encode_any
    from vqad_nerfstudio.export.methods import UnsupportedMethodError
    from vqad_nerfstudio.models.learned_index_nerfacto import LearnedIndexNerfactoModel

    float_twin = copy.deepcopy(trained.model)
    float_twin.config.feature_store = "float"
    with pytest.raises(ValueError, match="has no codebooks"):
        encode_model(float_twin, codebook_bits=6)
    hash_model = LearnedIndexNerfactoModel.__new__(LearnedIndexNerfactoModel)
    with pytest.raises(UnsupportedMethodError, match="quantised networks and codebooks are written for vqad"):
        encode_any(hash_model, "vqad-hash", codebook_bits=6)
