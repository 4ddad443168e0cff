"""Damaged and crafted files: every size read from a file is checked before it costs memory, every value with the
rules of the command line, and damage is told from truncation."""

from __future__ import annotations

import struct
import time

import numpy as np
import pytest

from vqad_nerfstudio.codec import (
    Chunk,
    FormatError,
    decode_categorical,
    describe,
    encode_array,
    encode_uvarints,
    read_container,
    write_container,
)
from vqad_nerfstudio.export.vqad_codec import load_compressed


def _replace(encoded: bytes, header_changes: dict | None = None, **chunks: bytes) -> bytes:
    """``encoded`` with model settings changed and chunks (``TAG_lod=payload``) replaced."""
    container = read_container(encoded)
    header = dict(container.header)
    header["model"] = {**header["model"], **(header_changes or {})}
    replaced = [Chunk(c.tag, c.lod, chunks.get(f"{c.tag}_{c.lod}", c.payload)) for c in container.chunks]
    return write_container(header, replaced)


def _single_symbol_payload(count: int, alphabet_size: int, symbol: int = 0) -> bytes:
    """A categorical payload (order 0) of ``count`` copies of ``symbol``: a handful of bytes for any count."""
    return bytes([0]) + encode_uvarints(np.array([count, alphabet_size, 1, symbol, count], dtype=np.uint64))


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"num_levels": 40}, "num_levels"),
        ({"num_levels": 7, "base_resolution": 64}, "finest level's resolution"),
        ({"hidden_dim": 300000}, "hidden_dim"),
        ({"hidden_dim": 0}, "hidden_dim"),
        ({"num_samples": 0}, "num_samples"),
        ({"num_samples": -5}, "num_samples"),
        ({"feature_dim": 100000}, "feature_dim"),
    ],
)
def test_header_settings_follow_the_config_rules(encoded, changes, message):
    with pytest.raises(FormatError, match=message):
        load_compressed(_replace(encoded, changes))


@pytest.mark.parametrize("count", [1 << 26, 1 << 31])
def test_a_symbol_count_is_checked_before_decoding(encoded, count):
    start = time.perf_counter()
    with pytest.raises(FormatError, match=f"{count} symbols where 512 are expected"):
        load_compressed(_replace(encoded, TOPO_0=_single_symbol_payload(count, 2)))
    assert time.perf_counter() - start < 5


def test_a_topology_that_claims_too_many_cells_is_refused_before_allocation(encoded, monkeypatch):
    from vqad_nerfstudio.export import vqad_codec

    # level 0 counts its whole grid (8^3 cells here), from the header's resolution, before its occupancy is decoded
    monkeypatch.setattr(vqad_codec, "MAX_DECODED_CELLS", 511)
    with pytest.raises(FormatError, match=r"lod 0 TOPO: level 0's 8\^3 grid has more cells than the 511 a decoded"):
        load_compressed(encoded)
    # every child of every parent occupied, a few bytes of payload: counted from the masks, before cells are built
    monkeypatch.undo()
    parents = len(load_compressed(encoded)[0].grid.levels[0].cells)
    full = _single_symbol_payload(parents, 256, symbol=255)
    monkeypatch.setattr(vqad_codec, "MAX_DECODED_CELLS", 512 + 8 * parents - 1)
    with pytest.raises(FormatError, match=f"lod 1 TOPO: {8 * parents:,} cells, more than the {8 * parents - 1:,}"):
        load_compressed(_replace(encoded, TOPO_1=full))


def test_decode_categorical_checks_the_count_first():
    with pytest.raises(FormatError, match="where 10 are expected"):
        decode_categorical(_single_symbol_payload(1 << 30, 2), count=10)
    assert decode_categorical(_single_symbol_payload(10, 2), count=10).tolist() == [0] * 10


def test_codebooks_that_are_not_finite_are_rejected(encoded):
    codebook = np.full((16, 16), np.nan, dtype=np.float16)
    with pytest.raises(FormatError, match="CBOK.*not finite"):
        load_compressed(_replace(encoded, CBOK_0=encode_array(codebook)))


def test_a_damaged_chunk_length_is_an_error_not_a_truncation(encoded):
    rows = describe(read_container(encoded))
    topo = next(row for row in rows if (row["tag"], row["lod"]) == ("TOPO", 1))
    length_field = topo["end"] - topo["chunk_bytes"] + 8
    damaged = bytearray(encoded)
    damaged[length_field + 3] ^= 0x10
    with pytest.raises(FormatError, match="runs past the file's end"):
        load_compressed(bytes(damaged))
    with pytest.raises(FormatError, match="runs past the file's end"):
        load_compressed(bytes(damaged[: topo["end"]]))


def test_a_damaged_length_of_quantised_weights_is_checked_before_decoding(trained):
    from vqad_nerfstudio.export.vqad_codec import encode_model

    encoded = encode_model(trained.model, network_bits=6)
    container = write_container(encoded.header, encoded.chunks)
    mlpq = next(chunk for chunk in read_container(container).chunks if chunk.tag == "MLPQ")
    (record_length,) = struct.unpack_from("<I", mlpq.payload, 1)
    symbols = mlpq.payload[5 + record_length :]
    n = decode_categorical(symbols).size
    crafted = mlpq.payload[: 5 + record_length] + _single_symbol_payload(n + 1, 63)
    chunks = [Chunk(c.tag, c.lod, crafted if c.tag == "MLPQ" else c.payload) for c in encoded.chunks]
    with pytest.raises(FormatError, match=f"MLPQ: 6-bit weights: .*{n + 1} symbols where {n} are expected"):
        load_compressed(write_container(encoded.header, chunks))
