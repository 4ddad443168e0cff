import numpy as np
import pytest

from vqad_nerfstudio.codec import (
    FormatError,
    decode_svarint,
    decode_uvarint,
    decode_uvarints,
    encode_svarint,
    encode_uvarint,
    encode_uvarints,
)

EDGES = [0, 1, 127, 128, 300, 16383, 16384, 2**32 - 1, 2**63, 2**64 - 1]


def test_known_encodings():
    assert encode_uvarint(0) == b"\x00"
    assert encode_uvarint(127) == b"\x7f"
    assert encode_uvarint(128) == b"\x80\x01"
    assert encode_uvarint(300) == b"\xac\x02"
    assert encode_uvarint(2**64 - 1) == b"\xff" * 9 + b"\x01"


@pytest.mark.parametrize("value", EDGES)
def test_scalar_round_trip(value):
    data = b"\x55" + encode_uvarint(value) + b"\x66"
    assert decode_uvarint(data, 1) == (value, len(data) - 1)


def test_vectorised_matches_scalar():
    rng = np.random.default_rng(0)
    magnitudes = (rng.random(5000) * 2.0 ** rng.integers(0, 64, 5000)).astype(np.uint64)
    values = np.concatenate([np.array(EDGES, dtype=np.uint64), magnitudes])
    expected = b"".join(encode_uvarint(int(v)) for v in values)
    assert encode_uvarints(values) == expected
    decoded, end = decode_uvarints(b"\x01\x02" + expected + b"\x80", 2, values.size)
    np.testing.assert_array_equal(decoded, values)
    assert end == 2 + len(expected)


def test_vectorised_signed_input_and_empty():
    assert encode_uvarints(np.array([1, 200], dtype=np.int16)) == b"\x01\xc8\x01"
    assert encode_uvarints(np.zeros(0, dtype=np.int64)) == b""
    values, end = decode_uvarints(b"\x07", 1, 0)
    assert values.size == 0 and end == 1
    with pytest.raises(ValueError, match=">= 0"):
        encode_uvarints(np.array([3, -1]))
    with pytest.raises(ValueError, match="0, 2\\*\\*64"):
        encode_uvarint(-1)


@pytest.mark.parametrize("value", [0, -1, 1, -2, 2, 1000, -1000, 2**63 - 1, -(2**63)])
def test_zigzag(value):
    encoded = encode_svarint(value)
    assert decode_uvarint(encoded, 0)[0] == (2 * value if value >= 0 else -2 * value - 1)
    assert decode_svarint(encoded, 0) == (value, len(encoded))


def test_malformed_varints_raise():
    with pytest.raises(FormatError, match="past the end"):
        decode_uvarint(b"\x80\x80", 0)
    with pytest.raises(FormatError, match="past the end"):
        decode_uvarints(b"\x01\x80", 0, 2)
    with pytest.raises(FormatError, match="past the end"):
        decode_uvarints(b"\x01", 1, 1)
    with pytest.raises(FormatError, match="longer than 10"):
        decode_uvarint(b"\x80" * 10 + b"\x00", 0)
    with pytest.raises(FormatError, match="longer than 10"):
        decode_uvarints(b"\x80" * 10 + b"\x00", 0, 1)
    with pytest.raises(FormatError, match="64 bits"):
        decode_uvarint(b"\xff" * 9 + b"\x02", 0)
    with pytest.raises(FormatError, match="64 bits"):
        decode_uvarints(b"\xff" * 9 + b"\x02", 0, 1)
