import math

import numpy as np
import pytest

from vqad_nerfstudio.codec import FormatError, pack_bits, packed_size, unpack_bits


def reference_pack(values, bits):
    """Bit-by-bit statement of the documented order: value bits LSB first, byte bits LSB first."""
    stream = [(int(v) >> i) & 1 for v in values for i in range(bits)]
    stream += [0] * (-len(stream) % 8)
    return bytes(sum(bit << j for j, bit in enumerate(stream[k : k + 8])) for k in range(0, len(stream), 8))


def datasets(bits, rng):
    top = (1 << bits) - 1
    return {
        "uniform": rng.integers(0, top + 1, 1001),
        "geometric": np.minimum(rng.geometric(0.3, 1001) - 1, top),
        "all_zero": np.zeros(999, dtype=np.int64),
        "all_max": np.full(13, top),
        "single": np.array([top]),
        "empty": np.zeros(0, dtype=np.int64),
    }


@pytest.mark.parametrize("bits", range(1, 17))
def test_round_trip_and_exact_length(bits):
    rng = np.random.default_rng(bits)
    for name, values in datasets(bits, rng).items():
        packed = pack_bits(values, bits)
        assert len(packed) == math.ceil(values.size * bits / 8) == packed_size(values.size, bits), name
        out = unpack_bits(packed, bits, values.size)
        assert out.dtype == np.uint16
        np.testing.assert_array_equal(out, values, err_msg=name)


@pytest.mark.parametrize("bits", range(1, 17))
def test_bit_order_matches_specification(bits):
    values = np.random.default_rng(100 + bits).integers(0, 1 << bits, 37)
    assert pack_bits(values, bits) == reference_pack(values, bits)


def test_known_layout():
    # 3-bit values 1, 2, 3, 5, 7 -> bit stream 100 010 110 101 111 (+ padding) -> 0xd1 0x7a
    assert pack_bits(np.array([1, 2, 3, 5, 7]), 3) == bytes([0xD1, 0x7A])
    assert pack_bits(np.array([0xABC]), 12) == bytes([0xBC, 0x0A])


def test_input_dtypes_give_same_bytes():
    values = np.arange(200) % 61
    expected = pack_bits(values, 6)
    for dtype in (np.uint8, np.int16, np.uint32, np.int64, np.uint64):
        assert pack_bits(values.astype(dtype), 6) == expected
    assert pack_bits(values.reshape(10, 20), 6) == expected


def test_large_input_uses_several_blocks():
    values = np.random.default_rng(0).integers(0, 1 << 11, (1 << 20) + 12345)
    np.testing.assert_array_equal(unpack_bits(pack_bits(values, 11), 11, values.size), values)


@pytest.mark.parametrize("bits", [1, 7, 16])
def test_value_too_large_names_the_maximum(bits):
    with pytest.raises(ValueError, match=f"maximum for bits={bits} is {(1 << bits) - 1}"):
        pack_bits(np.array([0, 1 << bits]), bits)


def test_negative_and_non_integer_values_raise():
    with pytest.raises(ValueError, match="negative"):
        pack_bits(np.array([3, -1]), 4)
    with pytest.raises(ValueError, match="integer"):
        pack_bits(np.array([0.5]), 4)


@pytest.mark.parametrize("bits", [0, 17, -1, 2.0, True])
def test_bits_outside_range_raise(bits):
    with pytest.raises(ValueError, match="bits must be"):
        pack_bits(np.array([0]), bits)
    with pytest.raises(ValueError, match="bits must be"):
        unpack_bits(b"\x00", bits, 1)


def test_unpack_rejects_wrong_length_and_padding():
    packed = pack_bits(np.array([5, 6, 7]), 3)  # 9 bits -> 2 bytes
    with pytest.raises(FormatError, match="need 2 bytes, got 1"):
        unpack_bits(packed[:1], 3, 3)
    with pytest.raises(FormatError, match="need 2 bytes, got 3"):
        unpack_bits(packed + b"\x00", 3, 3)
    with pytest.raises(FormatError, match="padding"):
        unpack_bits(bytes([packed[0], packed[1] | 0x80]), 3, 3)
    with pytest.raises(ValueError, match="count"):
        unpack_bits(b"", 3, -1)
