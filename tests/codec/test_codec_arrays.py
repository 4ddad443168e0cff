import numpy as np
import pytest

from vqad_nerfstudio.codec import FormatError, decode_array, decode_named_arrays, encode_array, encode_named_arrays
from vqad_nerfstudio.codec.arrays import DTYPE_CODES

DTYPES = [
    "bool",
    "uint8",
    "int8",
    "uint16",
    "int16",
    "uint32",
    "int32",
    "uint64",
    "int64",
    "float16",
    "float32",
    "float64",
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(), (0,), (5,), (3, 0, 2), (2, 3, 4)])
def test_array_round_trip(dtype, shape):
    a = (np.random.default_rng(0).standard_normal(shape) * 100).astype(dtype)
    b = decode_array(encode_array(a))
    assert b.dtype == np.dtype(dtype) and b.shape == shape
    np.testing.assert_array_equal(b, a)
    b[...] = 0  # decoded arrays are writable copies


def test_every_dtype_code_is_reachable():
    assert {np.dtype(d).newbyteorder("<") for d in DTYPES} == set(DTYPE_CODES.values())


def test_known_layout_and_byte_order():
    expected = bytes([4, 1]) + (2).to_bytes(4, "little") + bytes([1, 0, 2, 1])
    assert encode_array(np.array([1, 258], dtype="<u2")) == expected
    assert encode_array(np.array([1, 258], dtype=">u2")) == expected
    one_by_one = bytes([11, 2, 1, 0, 0, 0, 1, 0, 0, 0]) + np.float32(1.5).tobytes()
    assert encode_array(np.array([[1.5]], dtype=np.float32)) == one_by_one
    a = np.arange(12, dtype=np.int32).reshape(3, 4).T  # non-contiguous input is stored in C order
    np.testing.assert_array_equal(decode_array(encode_array(a)), a)


def test_unsupported_dtypes_raise():
    for a in (np.zeros(2, dtype=np.complex64), np.array(["x"]), np.array([object()])):
        with pytest.raises(ValueError, match="unsupported dtype"):
            encode_array(a)


def test_malformed_array_records():
    good = encode_array(np.arange(6, dtype=np.int16).reshape(2, 3))
    with pytest.raises(FormatError, match="unknown dtype code 99"):
        decode_array(bytes([99]) + good[1:])
    with pytest.raises(FormatError, match="dtype/ndim"):
        decode_array(good[:1])
    with pytest.raises(FormatError, match="inside its shape"):
        decode_array(good[:5])
    with pytest.raises(FormatError, match="needs 12 bytes, 11 left"):
        decode_array(good[:-1])
    with pytest.raises(FormatError, match="1 unexpected trailing"):
        decode_array(good + b"\x00")
    with pytest.raises(FormatError, match="0 or 1"):
        decode_array(bytes([1, 1, 2, 0, 0, 0, 1, 2]))


def test_named_arrays_round_trip_in_order():
    rng = np.random.default_rng(1)
    arrays = {
        "mlp.0.weight": rng.standard_normal((16, 8)).astype(np.float16),
        "mlp.0.bias": rng.standard_normal(16).astype(np.float32),
        "größe": np.array([True, False]),
        "": np.zeros(0, dtype=np.int64),
    }
    decoded = decode_named_arrays(encode_named_arrays(arrays))
    assert list(decoded) == list(arrays)
    for name, a in arrays.items():
        assert decoded[name].dtype == a.dtype
        np.testing.assert_array_equal(decoded[name], a)
    assert decode_named_arrays(encode_named_arrays({})) == {}


def test_named_arrays_layout():
    data = encode_named_arrays({"ab": np.array([7], dtype=np.uint8)})
    assert data == (1).to_bytes(4, "little") + (2).to_bytes(2, "little") + b"ab" + bytes([2, 1, 1, 0, 0, 0, 7])


def test_malformed_named_arrays():
    one = encode_named_arrays({"ab": np.array([7], dtype=np.uint8)})
    with pytest.raises(FormatError, match="entry count"):
        decode_named_arrays(one[:3])
    with pytest.raises(FormatError, match="inside its name"):
        decode_named_arrays(one[:7])
    with pytest.raises(FormatError, match="trailing"):
        decode_named_arrays(one + b"\x00")
    twice = (2).to_bytes(4, "little") + one[4:] + one[4:]
    with pytest.raises(FormatError, match="duplicate name 'ab'"):
        decode_named_arrays(twice)
    bad_utf8 = one[:6] + b"\xff\xfe" + one[8:]
    with pytest.raises(FormatError, match="UTF-8"):
        decode_named_arrays(bad_utf8)
    with pytest.raises(ValueError, match="names must be str"):
        encode_named_arrays({3: np.zeros(1)})
