"""VQAD models to compressed files and back: fidelity, prefixes, damage, determinism."""

from __future__ import annotations

import warnings
from contextlib import contextmanager

import pytest
import torch

from vqad_nerfstudio.codec import (
    BadMagicError,
    ChecksumError,
    CodecError,
    FormatError,
    TruncatedError,
    UnsupportedVersionError,
    describe,
    encode_categorical,
    read_container,
    write_container,
)
from vqad_nerfstudio.encodings.vertex_features import CodebookFeatures
from vqad_nerfstudio.export.methods import UnsupportedMethodError
from vqad_nerfstudio.export.vqad_codec import INDEX_TAGS, IncompleteFileWarning, encode_model, load_compressed


@contextmanager
def _rounded_to_fp16(model):
    """Round ``model``'s stored parameters (decoders, codebooks, float features) to fp16 while inside."""
    stored = list(model.field.density_mlp.parameters()) + list(model.field.color_mlp.parameters())
    for level in model.grid.levels:
        features = level.features
        stored.append(features.codebook if isinstance(features, CodebookFeatures) else features.features)
    originals = [parameter.data for parameter in stored]
    for parameter in stored:
        parameter.data = parameter.data.half().float()
    try:
        yield model
    finally:
        for parameter, original in zip(stored, originals):
            parameter.data = original


def _state(model):
    return {name: value.clone() for name, value in model.state_dict().items()}


def _level_ends(data: bytes):
    """File offsets at which each level of detail is complete."""
    container = read_container(data)
    rows = describe(container)
    return [max(row["end"] for row in rows if row["lod"] == lod) for lod in range(container.header["levels"])]


def test_full_file_renders_like_the_trained_model(trained, encoded):
    decoded, info = load_compressed(encoded)
    assert (info.method, info.levels_stored, info.levels_decoded, info.complete) == ("vqad", 3, 3, True)
    assert info.bytes_read == len(encoded)
    for camera, _ in trained.views():
        original, image = trained.render(trained.model, camera), trained.render(decoded, camera)
        assert trained.image_psnr(image, original) > 50
        assert float((image - original).abs().max()) < 5e-3
        with _rounded_to_fp16(trained.model):  # exactly the trained model's render with its weights as stored
            assert torch.equal(image, trained.render(trained.model, camera))


def test_decoded_topology_and_indices_are_exact(trained, encoded):
    decoded, _ = load_compressed(encoded)
    for original, level in zip(trained.model.grid.levels, decoded.grid.levels):
        assert torch.equal(level.cells, original.cells)
        assert torch.equal(level.vertex_ids, original.vertex_ids)
        assert torch.equal(level.features.hard_indices(), original.features.hard_indices())
        assert torch.equal(level.features.codebook, original.features.codebook.detach().half().float())


def test_decoded_models_hold_an_integer_index_per_vertex(encoded):
    decoded, _ = load_compressed(encoded)
    for level in decoded.grid.levels:
        store = level.features
        assert store.logits is None and store.indices.dtype == torch.int32
        assert store.indices.shape == (level.num_vertices,) and store.warmup_features.numel() == 0
    vertices = sum(decoded.grid.occupied_vertices())
    floats = sum(t.numel() for t in decoded.state_dict().values() if t.is_floating_point())
    assert floats < 2**decoded.config.index_bits * vertices / 4  # networks and codebooks only, no logits per vertex


def test_a_decoded_checkpoint_loads_renders_and_exports_as_the_file(encoded, assert_checkpoint_exports_as_the_file):
    assert_checkpoint_exports_as_the_file(encoded)


def test_loading_a_prefix_checkpoint_caps_the_lod_slider(encoded):
    with pytest.warns(IncompleteFileWarning):
        prefix, _ = load_compressed(encoded[: _level_ends(encoded)[1]])
    fresh = prefix.config.setup(scene_box=prefix.scene_box, num_train_data=1)  # as nerfstudio's tools build it
    assert fresh.lod_slider.max == 2
    fresh.load_state_dict(prefix.state_dict())
    assert (fresh.lod_slider.max, fresh.lod_slider.value) == (1, 1)


def test_every_level_prefix_is_a_coarser_model(trained, encoded):
    full, _ = load_compressed(encoded)
    train_psnr = []
    for lod, end in enumerate(_level_ends(encoded)):
        with pytest.warns(IncompleteFileWarning, match=f"decoded levels of detail 0..{lod} of the 3"):
            prefix, info = load_compressed(encoded[:end])
        assert (info.levels_decoded, info.complete, info.bytes_read) == (lod + 1, False, end)
        assert prefix.grid.grown_levels() == lod + 1
        assert prefix.lod_slider.max == lod
        full.lod_slider.value = lod
        camera, _ = trained.views()[0]
        assert torch.equal(trained.render(prefix, camera), trained.render(full, camera))
        train_psnr.append(trained.psnr(prefix, split="train"))
    assert train_psnr == sorted(train_psnr), f"PSNR per level of detail: {train_psnr}"


def test_cut_inside_a_chunk_decodes_the_complete_levels(encoded):
    ends = _level_ends(encoded)
    cut = (ends[1] + ends[2]) // 2  # inside level 2
    with pytest.warns(IncompleteFileWarning, match="truncated"):
        model, info = load_compressed(encoded[:cut])
    assert (info.levels_decoded, info.levels_stored, info.complete) == (2, 3, False)
    assert model.grid.levels[2].cells.numel() == 0
    with pytest.raises(TruncatedError):
        load_compressed(encoded[:cut], allow_truncated=False)


@pytest.mark.parametrize("cut", [8, 100, 400], ids=["preamble", "header", "decoders"])
def test_cut_before_a_renderable_model_is_an_error(encoded, cut):
    with pytest.raises(TruncatedError):
        load_compressed(encoded[:cut])


def test_corrupted_chunk_is_named(encoded):
    (row,) = [row for row in describe(read_container(encoded)) if row["tag"] == "CBOK" and row["lod"] == 1]
    damaged = bytearray(encoded)
    damaged[row["end"] - 1] ^= 0x40
    with pytest.raises(ChecksumError, match=f"chunk {row['index']} 'CBOK' lod 1"):
        load_compressed(bytes(damaged))


def test_wrong_magic_and_unknown_version(encoded):
    with pytest.raises(BadMagicError):
        load_compressed(b"PK\x03\x04" + encoded[4:])
    with pytest.raises(UnsupportedVersionError):
        load_compressed(encoded[:4] + bytes([3]) + encoded[5:])


def _with_header(encoded: bytes, **changes) -> bytes:
    container = read_container(encoded)
    return write_container({**container.header, **changes}, container.chunks)


def test_unknown_method_is_a_clear_error(encoded):
    with pytest.raises(UnsupportedMethodError, match="unknown method 'nerfacto'.*vqad, vqad-float") as error:
        load_compressed(_with_header(encoded, method="nerfacto"))
    assert isinstance(error.value, CodecError)


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"levels": 4}, "levels must be an integer in 1..3"),
        ({"aabb": [[1, 1, 1], [-1, -1, -1]]}, "aabb must be"),
        ({"model": {"index_bits": 4}}, "model lacks 'num_levels'"),
    ],
)
def test_malformed_header_is_a_format_error(encoded, changes, message):
    with pytest.raises(FormatError, match=message):
        load_compressed(_with_header(encoded, **changes))


def test_files_that_name_index_bits_bits_still_decode(encoded):
    header = read_container(encoded).header
    legacy = {("bits" if key == "index_bits" else key): value for key, value in header["model"].items()}
    decoded, _ = load_compressed(_with_header(encoded, model=legacy))
    again = encode_model(decoded)
    assert again.header["model"] == header["model"] and write_container(again.header, again.chunks) == encoded


def test_bad_model_settings_are_a_format_error(encoded):
    header = read_container(encoded).header
    for key, value in (("index_bits", "4"), ("feature_store", "hash"), ("num_levels", 0)):
        with pytest.raises(FormatError, match=key):
            load_compressed(_with_header(encoded, model={**header["model"], key: value}))


def test_complete_file_missing_a_chunk_is_a_format_error(encoded):
    container = read_container(encoded)
    chunks = [chunk for chunk in container.chunks if (chunk.tag, chunk.lod) != ("CBOK", 2)]
    with pytest.raises(FormatError, match="lod 2 lacks its CBOK"):
        load_compressed(write_container(container.header, chunks))


def test_entropy_coded_indices_are_no_larger_than_packed(trained, encoded):
    raw = encode_model(trained.model, index_coding="raw")
    raw_file = write_container(raw.header, raw.chunks)
    tags = {row["tag"] for row in describe(read_container(raw_file))}
    assert tags == {"SIZE", "MLPS", "TOPO", "CBOK", "IDXR", "END!"}
    stored = {row["lod"]: row for row in describe(read_container(encoded)) if row["tag"] in INDEX_TAGS}
    for level in raw.levels:
        assert stored[level.lod]["payload_bytes"] <= level.raw_index_bytes
        if stored[level.lod]["tag"] != "IDXR":
            assert stored[level.lod]["payload_bytes"] == level.entropy_index_bytes
    assert len(encoded) <= len(raw_file)
    coded_state, raw_state = _state(load_compressed(encoded)[0]), _state(load_compressed(raw_file)[0])
    assert coded_state.keys() == raw_state.keys()
    assert all(torch.equal(coded_state[name], raw_state[name]) for name in coded_state)


def test_encoding_is_deterministic_and_decoding_repeatable(trained, encoded):
    again = encode_model(trained.model)
    assert write_container(again.header, again.chunks) == encoded
    first, second = _state(load_compressed(encoded)[0]), _state(load_compressed(encoded)[0])
    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_max_lod_keeps_coarse_levels_of_a_complete_file(encoded):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a complete file: no truncation warning
        model, info = load_compressed(encoded, max_lod=0)
    assert (info.levels_decoded, info.complete) == (1, True)
    assert [level.cells.numel() > 0 for level in model.grid.levels] == [True, False, False]


def test_float_store_round_trip(trained):
    """vqad-float: FEAT chunks with fp16 features; a model with a pruned topology, no training needed."""
    from vqad_nerfstudio.models.vqad import VQADModelConfig

    torch.manual_seed(1)
    config = VQADModelConfig(
        feature_store="float", num_levels=2, base_resolution=8, dense_resolution=16, num_samples=32
    )
    model = config.setup(scene_box=trained.model.scene_box, num_train_data=1)
    model.grid.prune(lambda cells, resolution: torch.rand(cells.shape) < 0.6)
    model.eval()
    encoded_model = encode_model(model)
    assert encoded_model.header["method"] == "vqad-float"
    assert [chunk.tag for chunk in encoded_model.chunks] == ["MLPS", "TOPO", "FEAT", "TOPO", "FEAT"]
    decoded, info = load_compressed(write_container(encoded_model.header, encoded_model.chunks))
    assert info.method == "vqad-float"
    for original, level in zip(model.grid.levels, decoded.grid.levels):
        assert torch.equal(level.cells, original.cells)
        assert torch.equal(level.features.features, original.features.features.detach().half().float())
    camera, _ = trained.views()[0]
    with _rounded_to_fp16(model):
        assert torch.equal(trained.render(decoded, camera), trained.render(model, camera))


def test_level_statistics(trained):
    stats = encode_model(trained.model).levels
    k = trained.model.config.feature_dim
    for level, grid_level in zip(stats, trained.model.grid.levels):
        assert (level.cells, level.vertices) == (grid_level.cells.numel(), grid_level.num_vertices)
        assert level.raw_index_bytes == (level.vertices * 4 + 7) // 8
        assert level.float_grid_bytes == level.vertices * k * 2


def test_quantised_decoders_shrink_the_networks_and_render_nearly_alike(trained, encoded):
    full, _ = load_compressed(encoded)
    sizes = {row["tag"]: row["payload_bytes"] for row in describe(read_container(encoded))}
    assert "MLPS" in sizes and "MLPQ" not in sizes
    previous = sizes["MLPS"]
    for bits in (8, 6):
        small = write_container(*_header_and_chunks(encode_model(trained.model, network_bits=bits)))
        quantised = {row["tag"]: row["payload_bytes"] for row in describe(read_container(small))}
        assert "MLPQ" in quantised and "MLPS" not in quantised
        assert quantised["MLPQ"] < (0.6 if bits == 8 else 1.0) * previous
        assert len(encoded) - len(small) == sizes["MLPS"] - quantised["MLPQ"]  # nothing else changes
        previous = quantised["MLPQ"]
        decoded, _ = load_compressed(small)
        for camera, _ in trained.views():  # renders 60-75 dB apart here; the quality cost is measured in the README
            assert trained.image_psnr(trained.render(decoded, camera), trained.render(full, camera)) > 40


def _header_and_chunks(encoded_model):
    return encoded_model.header, encoded_model.chunks


@pytest.mark.parametrize("bits", [1, 9, 32])
def test_network_bits_other_than_16_or_2_to_8_are_rejected(trained, bits):
    with pytest.raises(ValueError, match="network_bits"):
        encode_model(trained.model, network_bits=bits)


def test_a_model_still_in_its_float_warm_up_is_not_exported():
    from nerfstudio.data.scene_box import SceneBox

    from vqad_nerfstudio.models.vqad import VQADModelConfig

    config = VQADModelConfig(num_levels=2, base_resolution=4, dense_resolution=8, index_warmup="float")
    model = config.setup(scene_box=SceneBox(aabb=torch.tensor([[-1.0] * 3, [1.0] * 3])), num_train_data=1)
    with pytest.raises(ValueError, match="level 0 is still in its float warm-up"):
        encode_model(model, "vqad")


def _with_smooth_finest_indices(encoded: bytes):
    """The decoded model, its finest level's indices replaced by blocks of equal indices (a smooth field's)."""
    from vqad_nerfstudio.encodings.sparse_grid import coords_of

    model, _ = load_compressed(encoded)
    level = model.grid.levels[-1]
    blocks = coords_of(level.vertex_ids, level.resolution + 1) // 4
    level.features.indices = ((blocks * torch.tensor([7, 3, 5])).sum(dim=-1) % 2**level.features.index_bits).int()
    return model


def test_levels_whose_neighbours_predict_their_indices_are_coded_with_them(encoded):
    model = _with_smooth_finest_indices(encoded)
    again = encode_model(model)
    data = write_container(again.header, again.chunks)
    tags = {row["lod"]: row["tag"] for row in describe(read_container(data)) if row["tag"] in INDEX_TAGS}
    finest = len(model.grid.levels) - 1
    assert tags[finest] == "IDXN" and again.header["requires"] == ["neighbour_indices"]
    indices = model.grid.levels[-1].features.indices.numpy()
    order_0_or_previous = encode_categorical(indices, 2**model.config.index_bits, context="auto")
    assert again.levels[finest].entropy_index_bytes < 0.75 * len(order_0_or_previous)
    decoded, _ = load_compressed(data)
    for original, level in zip(model.grid.levels, decoded.grid.levels):
        assert torch.equal(original.features.indices, level.features.indices)


def test_an_idxn_chunk_without_its_requirement_is_refused(encoded):
    model = _with_smooth_finest_indices(encoded)
    again = encode_model(model)
    header = {key: value for key, value in again.header.items() if key != "requires"}
    with pytest.raises(FormatError, match="does not require neighbour_indices"):
        load_compressed(write_container(header, again.chunks))
