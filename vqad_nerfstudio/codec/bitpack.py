"""Fixed-width bit packing of small unsigned integers.

Bit order: value ``i`` occupies stream bits ``[i*bits, (i+1)*bits)``, least
significant bit first, and stream bit ``j`` is bit ``j % 8`` (LSB = bit 0) of
byte ``j // 8``. The last byte is padded with zero bits, so ``count`` values take
exactly ``ceil(count * bits / 8)`` bytes.
"""

from __future__ import annotations

import numpy as np

from .errors import FormatError

__all__ = ["pack_bits", "unpack_bits", "packed_size"]

MAX_BITS = 16
_BLOCK = 1 << 20  # values per vectorised block; a multiple of 8 keeps blocks byte aligned


def _check_bits(bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an integer in 1..{MAX_BITS}, got {bits!r}")
    return int(bits)


def packed_size(count: int, bits: int) -> int:
    """Number of bytes that ``count`` values of ``bits`` bits pack into."""
    return (count * _check_bits(bits) + 7) // 8


def pack_bits(values: np.ndarray, bits: int) -> bytes:
    """Pack non-negative integers ``< 2**bits`` into a little-endian bit stream."""
    bits = _check_bits(bits)
    values = np.asarray(values).ravel()
    if values.dtype.kind not in "uib":
        raise ValueError(f"pack_bits needs an integer array, got dtype {values.dtype}")
    if values.size == 0:
        return b""
    lo, hi = int(values.min()), int(values.max())
    if lo < 0:
        raise ValueError(f"pack_bits got negative value {lo}")
    if hi >= 1 << bits:
        raise ValueError(f"pack_bits got value {hi}, but the maximum for bits={bits} is {(1 << bits) - 1}")
    as_bytes = values.astype("<u2").view(np.uint8).reshape(-1, 2)
    out = bytearray()
    for start in range(0, values.size, _BLOCK):
        bit_matrix = np.unpackbits(as_bytes[start : start + _BLOCK], axis=1, bitorder="little")
        out += np.packbits(bit_matrix[:, :bits].ravel(), bitorder="little").tobytes()
    return bytes(out)


def unpack_bits(data: bytes, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`; returns ``count`` values as ``uint16``.

    ``data`` must be exactly ``ceil(count * bits / 8)`` bytes with zero padding bits.
    """
    bits = _check_bits(bits)
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    expected = packed_size(count, bits)
    if len(data) != expected:
        raise FormatError(f"{count} values of {bits} bits need {expected} bytes, got {len(data)}")
    raw = np.frombuffer(data, dtype=np.uint8)
    tail_bits = count * bits % 8
    if tail_bits and raw[-1] >> tail_bits:
        raise FormatError(f"padding bits of the last byte are not zero (byte 0x{int(raw[-1]):02x})")
    out = np.empty(count, dtype=np.uint16)
    for start in range(0, count, _BLOCK):
        n = min(_BLOCK, count - start)
        first_byte = start * bits // 8
        chunk = raw[first_byte : first_byte + packed_size(n, bits)]
        bit_matrix = np.zeros((n, 16), dtype=np.uint8)
        bit_matrix[:, :bits] = np.unpackbits(chunk, bitorder="little")[: n * bits].reshape(n, bits)
        out[start : start + n] = np.packbits(bit_matrix, axis=1, bitorder="little").view("<u2").ravel()
    return out
