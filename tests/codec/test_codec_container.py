import json
import os
import struct
import zlib

import pytest

from vqad_nerfstudio.codec import (
    BadMagicError,
    ChecksumError,
    Chunk,
    FormatError,
    TruncatedError,
    UnsupportedVersionError,
    describe,
    read_container,
    read_header,
    write_container,
    write_container_file,
)

HEADER = {"method": "vqad", "config": {"levels": 3, "bits": [4, 6]}, "scene_box": [[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]]}
CHUNKS = [
    Chunk("TOPO", 0, b"topology-0"),
    Chunk("IDXE", 0, bytes(range(40))),
    Chunk("TOPO", 1, b""),
    Chunk("IDXE", 1, b"\xff" * 7),
    Chunk("MLPW", None, b"decoder weights"),
]


def header_end(data):
    return 14 + struct.unpack_from("<I", data, 6)[0]


def chunks_start(data):
    """Where the first chunk after the SIZE chunk (16 + 8 bytes) starts."""
    return header_end(data) + 24


def with_header_crc(data):
    """Recompute the header CRC after patching version bytes (CRC covers bytes 4..9 and the header)."""
    crc = zlib.crc32(data[14 : header_end(data)], zlib.crc32(data[4:10]))
    return data[:10] + struct.pack("<I", crc) + data[14:]


def test_round_trip():
    data = write_container(HEADER, CHUNKS)
    container = read_container(data)
    assert container.header == HEADER
    assert container.chunks == CHUNKS
    assert container.version == (1, 1)
    assert container.complete and container.bytes_read == len(data) == container.file_bytes


def test_preamble_layout_and_deterministic_header():
    data = write_container(HEADER, [])
    header_bytes = json.dumps(HEADER, sort_keys=True, separators=(",", ":")).encode()
    assert data[:6] == b"VQNF\x01\x01"
    assert struct.unpack_from("<I", data, 6)[0] == len(header_bytes)
    assert data[14 : 14 + len(header_bytes)] == header_bytes
    size_chunk = data[14 + len(header_bytes) :][:24]
    assert size_chunk[:12] == b"SIZE" + bytes([255, 0, 0, 0]) + (8).to_bytes(4, "little")
    assert struct.unpack_from("<Q", size_chunk, 16)[0] == len(data)
    assert data[14 + len(header_bytes) + 24 :][:4] == b"END!"
    assert len(data) == 14 + len(header_bytes) + 24 + 16
    reordered = dict(reversed(list(HEADER.items())))
    assert write_container(reordered, CHUNKS) == write_container(HEADER, CHUNKS)


def test_chunk_layout():
    data = write_container({}, [Chunk("ABCD", 3, b"xyz")])
    chunk = data[chunks_start(data) :][:19]
    assert chunk[:12] == b"ABCD" + bytes([3, 0, 0, 0]) + (3).to_bytes(4, "little")
    assert struct.unpack_from("<I", chunk, 12)[0] == zlib.crc32(b"xyz", zlib.crc32(chunk[:12]))
    assert chunk[16:] == b"xyz"


def test_describe_sizes_add_up():
    data = write_container(HEADER, CHUNKS)
    rows = describe(read_container(data))
    assert [r["tag"] for r in rows] == ["SIZE"] + [c.tag for c in CHUNKS] + ["END!"]
    assert [r["lod"] for r in rows] == [None] + [c.lod for c in CHUNKS] + [None]
    assert [r["payload_bytes"] for r in rows] == [8] + [len(c.payload) for c in CHUNKS] + [0]
    assert rows[-1]["end"] == len(data)
    assert rows[1]["end"] == chunks_start(data) + 16 + len(CHUNKS[0].payload)
    ends = [header_end(data)] + [r["end"] for r in rows]
    assert [b - a for a, b in zip(ends, ends[1:])] == [r["chunk_bytes"] for r in rows]


def test_every_chunk_boundary_prefix_is_a_coarser_model():
    data = write_container(HEADER, CHUNKS)
    for k, row in enumerate(describe(read_container(data))[:-1]):
        container = read_container(data[: row["end"]], allow_truncated=True)
        assert container.chunks == CHUNKS[:k]
        assert not container.complete and container.bytes_read == row["end"]
        assert describe(container)[-1]["end"] == row["end"]


def test_truncation_at_every_byte():
    data = write_container(HEADER, CHUNKS)
    boundaries = [r["end"] for r in describe(read_container(data))][1:]  # after the SIZE chunk
    for length in range(len(data)):
        prefix = data[:length]
        with pytest.raises(TruncatedError):
            read_container(prefix)
        if length < header_end(data):
            with pytest.raises(TruncatedError):
                read_container(prefix, allow_truncated=True)
            continue
        container = read_container(prefix, allow_truncated=True)
        complete_chunks = sum(end <= length for end in boundaries)
        assert container.chunks == CHUNKS[:complete_chunks]
        assert not container.complete
        assert container.header == HEADER
        start = chunks_start(data) if length >= chunks_start(data) else header_end(data)
        assert container.bytes_read == max([start] + [e for e in boundaries if e <= length])


def test_truncation_message_counts_chunks():
    data = write_container(HEADER, CHUNKS)
    cut = describe(read_container(data))[1]["end"] + 20
    with pytest.raises(TruncatedError, match=r"ends inside chunk 2 \(4 of 40 payload bytes\); 1 complete chunks"):
        read_container(data[:cut])
    with pytest.raises(TruncatedError, match=r"no END! chunk; 5 complete chunks read \(\d+ bytes of the \d+ its SIZE"):
        read_container(data[:-16])


def test_bad_magic():
    data = write_container(HEADER, CHUNKS)
    with pytest.raises(BadMagicError, match="not a VQNF file"):
        read_container(b"XQNF" + data[4:])
    with pytest.raises(BadMagicError):
        read_container(b"PK\x03\x04")
    with pytest.raises(TruncatedError):
        read_container(b"VQ")


def test_versions():
    data = write_container(HEADER, CHUNKS)
    with pytest.raises(UnsupportedVersionError, match="version 3.1"):
        read_container(data[:4] + b"\x03" + data[5:])
    with pytest.raises(UnsupportedVersionError, match="version 0.1"):
        read_container(data[:4] + b"\x00" + data[5:])
    newer_minor = with_header_crc(data[:5] + b"\x07" + data[6:])
    container = read_container(newer_minor)
    assert container.version == (1, 7) and container.chunks == CHUNKS


def test_corrupted_header_is_detected():
    data = write_container(HEADER, CHUNKS)
    for position in list(range(14, header_end(data))) + [5, 10]:  # header bytes, minor version, stored CRC
        corrupted = bytearray(data)
        corrupted[position] ^= 0x20
        with pytest.raises(ChecksumError, match="header: CRC32 mismatch"):
            read_container(bytes(corrupted), allow_truncated=True)


def test_corrupted_chunk_is_detected_and_named():
    data = write_container(HEADER, CHUNKS)
    rows = describe(read_container(data))
    start = rows[1]["end"]  # chunk 2 'IDXE' lod 0
    for position in [start + i for i in range(16 + 40) if not 8 <= i < 12]:  # all but the length field
        corrupted = bytearray(data)
        corrupted[position] ^= 0x01
        with pytest.raises(ChecksumError) as info:
            read_container(bytes(corrupted), allow_truncated=True)
        if position >= start + 16:
            assert "chunk 2 'IDXE' lod 0: CRC32 mismatch (stored 0x" in str(info.value)
        else:
            assert "chunk 2 " in str(info.value)


def test_corrupted_length_field_is_damage_not_truncation():
    """A flipped length bit makes a chunk shorter (its CRC fails) or run past the recorded end of the file."""
    data = write_container(HEADER, CHUNKS)
    start = describe(read_container(data))[1]["end"]
    for bit in range(32):
        corrupted = bytearray(data)
        corrupted[start + 8 + bit // 8] ^= 1 << (bit % 8)
        with pytest.raises((ChecksumError, FormatError)):
            read_container(bytes(corrupted), allow_truncated=True)


def test_a_damaged_length_in_a_truncated_file_is_still_damage():
    data = write_container(HEADER, CHUNKS)
    start = describe(read_container(data))[1]["end"]
    corrupted = bytearray(data)
    corrupted[start + 11] ^= 0x01  # 16 MiB longer
    with pytest.raises(FormatError, match=r"chunk 2 'IDXE' lod 0: its length \(16777256 bytes\) runs past"):
        read_container(bytes(corrupted[: start + 30]), allow_truncated=True)


def test_size_chunk_rules():
    data = write_container(HEADER, CHUNKS)
    position = header_end(data)
    size_chunk = data[position : position + 24]
    other = b"ZZZZ" + bytes([255, 0, 0, 0]) + bytes(4)
    other += struct.pack("<I", zlib.crc32(other))
    with pytest.raises(FormatError, match="all its .* bytes but no END!"):
        read_container(data[:-16] + other, allow_truncated=True)
    wrong = b"SIZE" + bytes([255, 0, 0, 0]) + (8).to_bytes(4, "little")
    wrong += struct.pack("<I", zlib.crc32(struct.pack("<Q", 30), zlib.crc32(wrong))) + struct.pack("<Q", 30)
    with pytest.raises(FormatError, match="records 30 bytes"):
        read_container(data[:position] + wrong + data[position + 24 :])
    with pytest.raises(FormatError, match="first chunk of a 1.1 or later file is its SIZE chunk"):
        read_container(data[:position] + data[position + 24 :], allow_truncated=True)
    with pytest.raises(FormatError, match="only valid first"):
        read_container(data[: position + 24] + size_chunk + data[position + 24 :], allow_truncated=True)


def test_a_version_1_0_file_has_no_size_chunk():
    data = bytes.fromhex(
        "56514E46 0100 0E000000 915E9584"
        "7B226D6574686F64223A2278227D"
        "41424344 03 00 0000 03000000 2DFEE38B 78797A"
        "454E4421 FF 00 0000 00000000 BA03BB73"
    )
    container = read_container(data)
    assert container.version == (1, 0) and container.file_bytes is None
    assert container.chunks == [Chunk("ABCD", 3, b"xyz")] and container.complete


def test_end_marker_rules():
    data = write_container(HEADER, CHUNKS)
    with pytest.raises(FormatError, match="1 bytes after it"):
        read_container(data + b"\x00")
    head = data[: chunks_start(data)]
    end_with_payload = b"END!" + bytes([255, 0, 0, 0]) + (1).to_bytes(4, "little")
    end_with_payload += struct.pack("<I", zlib.crc32(b"x", zlib.crc32(end_with_payload))) + b"x"
    with pytest.raises(FormatError, match="payload of 1 bytes"):
        read_container(head + end_with_payload)


def test_header_must_be_a_json_object():
    raw = b"[1,2]"
    preamble = b"VQNF" + struct.pack("<BBI", 1, 0, len(raw))
    crc = zlib.crc32(raw, zlib.crc32(preamble[4:]))
    end = b"END!" + bytes([255, 0, 0, 0]) + bytes(4)
    end += struct.pack("<I", zlib.crc32(end))
    with pytest.raises(FormatError, match="JSON object"):
        read_container(preamble + struct.pack("<I", crc) + raw + end)


def test_writer_validation():
    for tag in ("ABC", "ABCDE", "ÄBCD", "AB\nC", 1234):
        with pytest.raises(ValueError, match="4 printable ASCII"):
            Chunk(tag, None, b"")
    for lod in (-1, 255, True, 1.0):
        with pytest.raises(ValueError, match="lod"):
            Chunk("TOPO", lod, b"")
    with pytest.raises(ValueError, match="payload must be bytes"):
        Chunk("TOPO", 0, "text")
    for tag in ("END!", "SIZE"):
        with pytest.raises(ValueError, match="reserved"):
            write_container({}, [Chunk(tag, None, b"")])
    with pytest.raises(ValueError, match="chunk 1 'IDXE' has lod 0 after a chunk with lod 1"):
        write_container({}, [Chunk("IDXE", 1, b""), Chunk("IDXE", 0, b"")])
    with pytest.raises(ValueError, match="header must be a mapping"):
        write_container([("a", 1)], [])
    with pytest.raises(ValueError):
        write_container({"x": float("nan")}, [])
    # lod-free chunks may appear anywhere; equal lods may repeat
    ok = [
        Chunk("MLPW", None, b""),
        Chunk("A000", 0, b""),
        Chunk("B000", 0, b""),
        Chunk("CODE", None, b""),
        Chunk("A001", 2, b""),
    ]
    assert read_container(write_container({}, ok)).chunks == ok


def test_write_container_file(tmp_path):
    path = tmp_path / "scene.vqnf"
    size = write_container_file(path, HEADER, CHUNKS)
    assert size == path.stat().st_size
    assert path.read_bytes() == write_container(HEADER, CHUNKS)
    assert read_container(path).chunks == CHUNKS
    assert read_container(str(path)).header == HEADER
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_container_file(path, {"other": 1}, [])
    assert read_container(path).header == HEADER
    write_container_file(path, {"other": 1}, [], overwrite=True)
    assert read_container(path).header == {"other": 1}
    assert os.listdir(tmp_path) == ["scene.vqnf"]
    with pytest.raises(ValueError, match="reserved"):
        write_container_file(tmp_path / "bad.vqnf", {}, [Chunk("END!", None, b"")])
    assert os.listdir(tmp_path) == ["scene.vqnf"]


def test_specification_example_bytes():
    expected = bytes.fromhex(
        "56514E46 0101 0E000000 C9DE7753"
        "7B226D6574686F64223A2278227D"
        "53495A45 FF 00 0000 08000000 F879D49D 5700000000000000"
        "41424344 03 00 0000 03000000 2DFEE38B 78797A"
        "454E4421 FF 00 0000 00000000 BA03BB73"
    )
    assert write_container({"method": "x"}, [Chunk("ABCD", 3, b"xyz")]) == expected


def test_read_header_checks_the_preamble_but_not_the_chunks():
    data = write_container(HEADER, CHUNKS)
    assert read_header(data) == HEADER
    damaged_chunk = data[:-20] + bytes([data[-20] ^ 1]) + data[-19:]
    assert read_header(damaged_chunk) == HEADER  # chunk CRCs are read_container's job
    with pytest.raises(ChecksumError, match="header"):
        read_header(data[:20] + bytes([data[20] ^ 1]) + data[21:])
    with pytest.raises(BadMagicError):
        read_header(b"NOPE" + data[4:])


def _file_with_raw_header(raw: bytes) -> bytes:
    preamble = b"VQNF" + struct.pack("<BBI", 1, 0, len(raw))
    crc = zlib.crc32(raw, zlib.crc32(preamble[4:]))
    end = b"END!" + bytes([255, 0, 0, 0]) + bytes(4)
    return preamble + struct.pack("<I", crc) + raw + end + struct.pack("<I", zlib.crc32(end))


def test_header_size_and_nesting_are_bounded_before_parsing():
    deep = b'{"a":' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    with pytest.raises(FormatError, match="header length 400006 exceeds"):
        read_container(_file_with_raw_header(deep))
    nested = b'{"a":' + b"[" * 17 + b"]" * 17 + b', "b": "[[[[[[[[[[[[[[[[[[[[\\"[["}'
    with pytest.raises(FormatError, match="more than 16 deep"):
        read_container(_file_with_raw_header(nested))
    fine = b'{"a":' + b"[" * 15 + b"]" * 15 + b', "b": "[[[[[[[[[[[[[[[[[[[[\\"[["}'
    assert read_container(_file_with_raw_header(fine)).header["b"] == '[[[[[[[[[[[[[[[[[[[["[['
    with pytest.raises(ValueError, match="nested at most 16"):
        write_container({"a": json.loads(b"[" * 17 + b"]" * 17)}, [])
