"""Files of VQAD models that keep some vertices in float (float_vertex_fraction): FROW chunks and their checks."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from vqad_nerfstudio.codec import Chunk, FormatError, describe, read_container, write_container
from vqad_nerfstudio.encodings.vertex_features import CodebookFeatures
from vqad_nerfstudio.export.vqad_codec import IncompleteFileWarning, encode_model, load_compressed


def _keep_in_float(store: CodebookFeatures, share: float, seed: int) -> None:
    """Mark ``share`` of the store's rows float, with features near (not at) their codewords."""
    generator = torch.Generator().manual_seed(seed)
    rows = torch.rand(store.num_rows, generator=generator) < share
    codewords = store.codebook.detach()[store.hard_indices()]
    store.float_rows = rows
    noise = 0.05 * torch.randn(codewords.shape, generator=generator)
    store.float_features = nn.Parameter(torch.where(rows[:, None], codewords + noise, 0.0))


@pytest.fixture(scope="module")
def model_with_float_rows(trained):
    """The trained model with 10% of level 1's and 20% of level 2's vertices float (level 0: none)."""
    model = copy.deepcopy(trained.model)
    for lod, share in ((1, 0.1), (2, 0.2)):
        _keep_in_float(model.grid.levels[lod].features, share, seed=lod)
    model.eval()
    return model


@pytest.fixture(scope="module")
def encoded_float_rows(model_with_float_rows) -> bytes:
    encoded_model = encode_model(model_with_float_rows)
    return write_container(encoded_model.header, encoded_model.chunks)


def _round_stored_to_fp16(model) -> None:
    for parameter in list(model.field.density_mlp.parameters()) + list(model.field.color_mlp.parameters()):
        parameter.data = parameter.data.half().float()
    for level in model.grid.levels:
        for parameter in (level.features.codebook, level.features.float_features):
            parameter.data = parameter.data.half().float()


def test_float_rows_round_trip_exactly(trained, model_with_float_rows, encoded_float_rows):
    container = read_container(encoded_float_rows)
    assert container.version == (2, 0) and "float_rows" in container.header["requires"]
    assert [row["lod"] for row in describe(container) if row["tag"] == "FROW"] == [0, 1, 2]
    decoded, _ = load_compressed(encoded_float_rows)
    rounded = copy.deepcopy(model_with_float_rows)
    _round_stored_to_fp16(rounded)
    for original, level in zip(rounded.grid.levels, decoded.grid.levels):
        assert torch.equal(level.features.float_rows, original.features.float_rows)
        rows = torch.arange(level.num_vertices)
        with torch.no_grad():
            assert torch.equal(level.features(rows), original.features(rows))
    assert not decoded.grid.levels[0].features.has_float_rows
    camera, _ = trained.views()[0]
    rendered = trained.render(decoded, camera)
    assert torch.equal(rendered, trained.render(rounded, camera))
    assert trained.image_psnr(rendered, trained.render(trained.model, camera)) < 60  # the float rows do change it


def test_a_decoded_checkpoint_with_float_rows_exports_as_the_file(
    encoded_float_rows, assert_checkpoint_exports_as_the_file
):
    assert_checkpoint_exports_as_the_file(encoded_float_rows)


def test_float_rows_cost_their_fp16_features(model_with_float_rows, encoded_float_rows, encoded):
    kept = sum(int(level.features.float_rows.sum()) for level in model_with_float_rows.grid.levels[1:])
    extra = len(encoded_float_rows) - len(encoded)
    feature_bytes = kept * model_with_float_rows.config.feature_dim * 2
    assert feature_bytes < extra < 1.5 * feature_bytes


def test_a_cut_before_a_levels_float_rows_leaves_that_level_out(encoded_float_rows):
    rows = describe(read_container(encoded_float_rows))
    cut = next(row["end"] - row["chunk_bytes"] for row in rows if (row["tag"], row["lod"]) == ("FROW", 2))
    with pytest.warns(IncompleteFileWarning):
        _, info = load_compressed(encoded_float_rows[:cut])
    assert info.levels_decoded == 2


def test_float_rows_without_their_requirement_are_a_format_error(encoded_float_rows):
    container = read_container(encoded_float_rows)
    header = {**container.header, "requires": [r for r in container.header["requires"] if r != "float_rows"]}
    if not header["requires"]:
        del header["requires"]
    with pytest.raises(FormatError, match="FROW chunk, but the header does not require float_rows"):
        load_compressed(write_container(header, container.chunks))


def test_a_complete_file_missing_float_rows_is_a_format_error(encoded_float_rows):
    container = read_container(encoded_float_rows)
    chunks = [chunk for chunk in container.chunks if (chunk.tag, chunk.lod) != ("FROW", 1)]
    with pytest.raises(FormatError, match="lod 1 lacks its FROW"):
        load_compressed(write_container(container.header, chunks))


def test_float_rows_of_the_wrong_count_are_a_format_error(encoded_float_rows):
    container = read_container(encoded_float_rows)
    level_2 = next(chunk.payload for chunk in container.chunks if (chunk.tag, chunk.lod) == ("FROW", 2))
    chunks = [Chunk("FROW", 1, level_2) if (c.tag, c.lod) == ("FROW", 1) else c for c in container.chunks]
    with pytest.raises(FormatError, match="lod 1 FROW"):
        load_compressed(write_container(container.header, chunks))
