"""Lossless entropy coding of integer symbols with constriction's range coder.

Two payload kinds are provided (byte layouts in ``docs/format.md``):

* categorical payloads (:func:`encode_categorical`) carry their own model: the
  histogram of the coded symbols, either order 0 (``context="none"``) or
  conditioned on the previous symbol (``context="previous"``);
* table payloads (:func:`encode_with_tables`) code each value with one of a set
  of :class:`FrequencyTable` s that the caller stores elsewhere.

Every model is a table of positive integer frequencies. Both sides rescale it
to exactly ``2**24`` with :func:`rescale_frequencies` and code with
``constriction.stream.queue.RangeEncoder`` (32-bit words, 24-bit precision)
using exactly those integer weights, so encoder and decoder models are
bit-identical by construction.
"""

from __future__ import annotations

import array
import zlib
from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np

from .bitpack import pack_bits, packed_size, unpack_bits
from .errors import FormatError
from .varint import decode_svarint, decode_uvarint, decode_uvarints, encode_svarint, encode_uvarint, encode_uvarints

__all__ = [
    "PRECISION",
    "MAX_ALPHABET",
    "MAX_TABLE_SIZE",
    "ContextMode",
    "FrequencyTable",
    "rescale_frequencies",
    "quantize_pmf",
    "encode_categorical",
    "used_symbols_bytes",
    "read_used_symbols",
    "decode_categorical",
    "encode_with_tables",
    "decode_with_tables",
    "tables_to_bytes",
    "tables_from_bytes",
    "entropy_bits",
]

PRECISION = 24
MAX_ALPHABET = 1 << 16
MAX_TABLE_SIZE = 1 << 16
MAX_SYMBOLS = (1 << 32) - 1
_MAX_TOTAL = (1 << 32) - 1
_INT32_MIN, _INT32_MAX = -(1 << 31), (1 << 31) - 1

ContextMode = Literal["none", "previous", "auto"]
_MODE_NONE, _MODE_PREVIOUS, _MODE_PACKED = 0, 1, 2


# --------------------------------------------------------------------------- models


def _check_frequencies(frequencies: np.ndarray) -> np.ndarray:
    f = np.asarray(frequencies)
    if f.ndim != 1 or f.dtype.kind not in "ui" or not 1 <= f.size <= MAX_TABLE_SIZE:
        raise ValueError(
            f"frequencies must be a 1-D integer array of 1..{MAX_TABLE_SIZE} entries, "
            f"got {f.dtype} with shape {f.shape}"
        )
    if f.min() < 1:
        raise ValueError(f"frequencies must all be >= 1, got minimum {f.min()}")
    if f.max() > _MAX_TOTAL or int(f.sum(dtype=np.uint64)) > _MAX_TOTAL:
        raise ValueError("frequencies must sum to less than 2**32")
    return f


def rescale_frequencies(frequencies: np.ndarray) -> np.ndarray:
    """Rescale positive integer frequencies to weights that sum to exactly ``2**24``.

    With ``m`` entries, cumulative sums ``C_0 = 0, C_j = f_0 + ... + f_{j-1}`` and
    total ``T = C_m``: ``w_j = 1 + E_{j+1} - E_j`` where
    ``E_j = floor(C_j * (2**24 - m) / T)`` in exact integer arithmetic. Every
    weight is >= 1. Requires ``1 <= m <= 2**16``, every ``f_j >= 1`` and ``T < 2**32``.
    """
    f = _check_frequencies(frequencies).astype(np.uint64)
    free = np.uint64((1 << PRECISION) - f.size)
    cumulative = np.concatenate((np.zeros(1, dtype=np.uint64), np.cumsum(f, dtype=np.uint64)))
    edges = cumulative * free // cumulative[-1]
    return (np.diff(edges) + np.uint64(1)).astype(np.int64)


def _model(frequencies: np.ndarray):
    """constriction model whose quantized weights are exactly ``rescale_frequencies``.

    constriction's fast quantization gives symbol ``j`` the weight
    ``1 + floor(P_{j+1} * s) - floor(P_j * s)`` with ``P`` the cumulative inputs and
    ``s = (2**24 - m) / sum(inputs)``. Passing ``weights - 1`` makes ``s == 1`` and
    every product an exact integer, so the coder uses ``weights`` unchanged.
    """
    import constriction

    weights = rescale_frequencies(frequencies)
    return constriction.stream.model.Categorical((weights - 1).astype(np.float64), perfect=False)


def _encoder():
    import constriction

    return constriction.stream.queue.RangeEncoder()


def _decoder(data: bytes, offset: int):
    import constriction

    remaining = len(data) - offset
    if remaining % 4:
        raise FormatError(f"range coder data is {remaining} bytes, not a multiple of 4")
    words = np.frombuffer(data, dtype="<u4", offset=offset).astype(np.uint32)
    return constriction.stream.queue.RangeDecoder(words)


def _decode(decoder, frequencies: np.ndarray, amount: int) -> np.ndarray:
    """Decode ``amount`` symbols with the model of ``frequencies`` as int64 indices."""
    try:
        return decoder.decode(_model(frequencies), int(amount)).astype(np.int64)
    except (AssertionError, ValueError, RuntimeError) as exc:
        raise FormatError(f"range coder data is invalid for its model: {exc}") from None


def _words(encoder) -> bytes:
    return encoder.get_compressed().astype("<u4").tobytes()


def _expect_end(data: bytes, offset: int, what: str) -> None:
    if offset != len(data):
        raise FormatError(f"{what}: {len(data) - offset} unexpected trailing bytes")


# --------------------------------------------------------------------------- categorical


def _check_symbols(symbols: np.ndarray, alphabet_size: int) -> np.ndarray:
    if isinstance(alphabet_size, bool) or not isinstance(alphabet_size, (int, np.integer)):
        raise ValueError(f"alphabet_size must be an integer, got {alphabet_size!r}")
    if not 1 <= alphabet_size <= MAX_ALPHABET:
        raise ValueError(f"alphabet_size must be in 1..{MAX_ALPHABET}, got {alphabet_size}")
    symbols = np.asarray(symbols).ravel()
    if symbols.dtype.kind not in "ui":
        raise ValueError(f"symbols must be an integer array, got dtype {symbols.dtype}")
    if symbols.size > MAX_SYMBOLS:
        raise ValueError(f"at most {MAX_SYMBOLS} symbols per payload, got {symbols.size}")
    if symbols.size:
        lo, hi = int(symbols.min()), int(symbols.max())
        if lo < 0 or hi >= alphabet_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"symbol {bad} outside the alphabet 0..{alphabet_size - 1}")
    return symbols.astype(np.int64, copy=False)


def _deltas(sorted_values: np.ndarray, group_start: np.ndarray) -> np.ndarray:
    """Gap code of ascending values: the first of each group as is, then ``v - prev - 1``."""
    deltas = np.empty_like(sorted_values)
    deltas[0:1] = sorted_values[0:1]
    deltas[1:] = sorted_values[1:] - sorted_values[:-1] - 1
    deltas[group_start] = sorted_values[group_start]
    return deltas


def _undeltas(deltas: np.ndarray, group_sizes: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_deltas` for consecutive groups of the given sizes."""
    running = np.cumsum(deltas.astype(np.int64) + 1)
    before = np.concatenate(([0], running))[np.cumsum(group_sizes) - group_sizes]
    return running - np.repeat(before, group_sizes) - 1


def encode_categorical(symbols: np.ndarray, alphabet_size: int, context: ContextMode = "none") -> bytes:
    """Entropy code integer symbols in ``[0, alphabet_size)`` into a self-describing payload.

    ``context="none"`` codes with the order-0 histogram; ``"previous"`` conditions
    each symbol on the one before it (the first symbol is stored as is);
    ``"auto"`` produces both and keeps the shorter (``"none"`` on ties). If plain
    fixed-width bit packing would be shorter still (near-uniform data, or few
    symbols from a large alphabet), the symbols are stored packed instead, so a
    payload never exceeds the packed size plus a few header bytes. The mode is
    stored, so :func:`decode_categorical` needs only the bytes.
    """
    if context not in ("none", "previous", "auto"):
        raise ValueError(f"context must be 'none', 'previous' or 'auto', got {context!r}")
    symbols = _check_symbols(symbols, alphabet_size)
    counts = np.bincount(symbols, minlength=alphabet_size)
    used = np.flatnonzero(counts)
    rank_of = np.zeros(alphabet_size, dtype=np.int64)
    rank_of[used] = np.arange(used.size)
    ranks = rank_of[symbols]
    if context == "none" or (context == "auto" and symbols.size < 2):
        coded = _encode_order0(ranks, alphabet_size, used, counts[used])
    elif context == "previous":
        coded = _encode_previous(ranks, alphabet_size, used)
    else:
        plain = _encode_order0(ranks, alphabet_size, used, counts[used])
        conditioned = _encode_previous(ranks, alphabet_size, used)
        coded = conditioned if len(conditioned) < len(plain) else plain
    bits = _packed_bits(alphabet_size)
    head = bytes([_MODE_PACKED]) + encode_uvarint(symbols.size) + encode_uvarint(alphabet_size)
    if len(head) + packed_size(symbols.size, bits) < len(coded):
        return head + pack_bits(symbols, bits)
    return coded


def _packed_bits(alphabet_size: int) -> int:
    """Bits per symbol of the packed mode: enough for ``alphabet_size - 1``, at least 1."""
    return max(1, (alphabet_size - 1).bit_length())


def used_symbols_bytes(used: np.ndarray) -> bytes:
    """The used-symbols field of a payload: their number, then the ascending symbols gap-coded
    (docs/format.md)."""
    if used.size == 0:
        return encode_uvarint(0)
    return encode_uvarint(used.size) + encode_uvarints(_deltas(used, np.zeros(1, dtype=np.int64)))


def read_used_symbols(data: bytes, offset: int, alphabet_size: int, what: str) -> tuple[np.ndarray, int]:
    """Inverse of :func:`used_symbols_bytes` for symbols below ``alphabet_size``: the used symbols (empty if none)
    and the offset after them; ``FormatError`` naming ``what`` where they do not fit the alphabet."""
    k, offset = decode_uvarint(data, offset)
    if k > alphabet_size:
        raise FormatError(f"{what}: {k} used symbols for alphabet size {alphabet_size}")
    if k == 0:
        return np.zeros(0, dtype=np.int64), offset
    deltas, offset = decode_uvarints(data, offset, k)
    used = _undeltas(deltas, np.array([k]))
    if deltas.max() >= alphabet_size or used[-1] >= alphabet_size:
        raise FormatError(f"{what}: used symbols exceed the alphabet 0..{alphabet_size - 1}")
    return used, offset


def _preamble(mode: int, n: int, alphabet_size: int, used: np.ndarray) -> bytes:
    head = bytes([mode]) + encode_uvarint(n) + encode_uvarint(alphabet_size)
    return head if n == 0 else head + used_symbols_bytes(used)


def _encode_order0(ranks: np.ndarray, alphabet_size: int, used: np.ndarray, counts: np.ndarray) -> bytes:
    head = _preamble(_MODE_NONE, ranks.size, alphabet_size, used)
    if ranks.size == 0:
        return head
    words = b""
    if used.size > 1:
        encoder = _encoder()
        encoder.encode(ranks.astype(np.int32), _model(counts))
        words = _words(encoder)
    return head + encode_uvarints(counts) + words


def _encode_previous(ranks: np.ndarray, alphabet_size: int, used: np.ndarray) -> bytes:
    head = _preamble(_MODE_PREVIOUS, ranks.size, alphabet_size, used)
    if ranks.size == 0:
        return head
    k = used.size
    ctx, nxt = ranks[:-1], ranks[1:]
    pairs, pair_index, pair_counts = _index_pairs(ctx * k + nxt, k * k)
    pair_ctx, pair_succ = pairs // k, pairs % k
    per_ctx = np.bincount(pair_ctx, minlength=k)
    first_pair = np.cumsum(per_ctx) - per_ctx
    local = pair_index - first_pair[ctx]
    order = np.argsort(ctx.astype(np.uint16), kind="stable")  # ranks < 2**16: radix sort
    ctx_lengths = np.bincount(ctx, minlength=k)
    ctx_starts = np.cumsum(ctx_lengths) - ctx_lengths
    encoder = _encoder()
    for c in np.flatnonzero(per_ctx > 1):
        span = slice(first_pair[c], first_pair[c] + per_ctx[c])
        segment = local[order[ctx_starts[c] : ctx_starts[c] + ctx_lengths[c]]]
        encoder.encode(segment.astype(np.int32), _model(pair_counts[span]))
    model = (
        encode_uvarint(int(ranks[0]))
        + encode_uvarints(per_ctx)
        + encode_uvarints(_deltas(pair_succ, first_pair[per_ctx > 0]))
        + encode_uvarints(pair_counts)
    )
    return head + model + _words(encoder)


def _index_pairs(keys: np.ndarray, num_keys: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sorted distinct keys, the index of each key among them, and their counts."""
    if num_keys <= 1 << 24:
        hist = np.bincount(keys, minlength=num_keys)
        distinct = np.flatnonzero(hist)
        index_of = np.zeros(num_keys, dtype=np.int64)
        index_of[distinct] = np.arange(distinct.size)
        return distinct, index_of[keys], hist[distinct]
    distinct, index, counts = np.unique(keys, return_inverse=True, return_counts=True)
    return distinct, index.ravel(), counts


def decode_categorical(data: bytes, count: int | None = None) -> np.ndarray:
    """Decode a payload of :func:`encode_categorical`; returns a 1-D ``uint16`` array.

    ``count``, when given, is the number of symbols the caller needs: a payload that claims another
    number is rejected before anything is decoded (its symbol count then costs no memory or time).
    """
    data = bytes(data)
    if not data:
        raise FormatError("categorical payload is empty")
    mode = data[0]
    if mode not in (_MODE_NONE, _MODE_PREVIOUS, _MODE_PACKED):
        raise FormatError(f"categorical payload: unknown context mode {mode}")
    n, offset = decode_uvarint(data, 1)
    alphabet_size, offset = decode_uvarint(data, offset)
    if not 1 <= alphabet_size <= MAX_ALPHABET:
        raise FormatError(f"categorical payload: alphabet size {alphabet_size} outside 1..{MAX_ALPHABET}")
    if n > MAX_SYMBOLS:
        raise FormatError(f"categorical payload: symbol count {n} exceeds {MAX_SYMBOLS}")
    if count is not None and n != count:
        raise FormatError(f"categorical payload: {n} symbols where {count} are expected")
    if mode == _MODE_PACKED:
        symbols = unpack_bits(data[offset:], _packed_bits(alphabet_size), n)
        if n and symbols.max() >= alphabet_size:
            raise FormatError(
                f"categorical payload: packed symbol {symbols.max()} outside the alphabet 0..{alphabet_size - 1}"
            )
        return symbols
    if n == 0:
        _expect_end(data, offset, "empty categorical payload")
        return np.zeros(0, dtype=np.uint16)
    used, offset = read_used_symbols(data, offset, alphabet_size, "categorical payload")
    k = used.size
    if k == 0:
        raise FormatError(f"categorical payload: no used symbols for {n} symbols")
    if mode == _MODE_NONE:
        ranks = _decode_order0(data, offset, n, k)
    else:
        ranks = _decode_previous(data, offset, n, k)
    return used[ranks].astype(np.uint16)


def _decode_order0(data: bytes, offset: int, n: int, k: int) -> np.ndarray:
    counts, offset = decode_uvarints(data, offset, k)
    if counts.min() == 0 or int(counts.sum()) != n:
        raise FormatError(f"categorical payload: symbol counts (sum {int(counts.sum())}) do not describe {n} symbols")
    if k == 1:
        _expect_end(data, offset, "single-symbol categorical payload")
        return np.zeros(n, dtype=np.int64)
    return _decode(_decoder(data, offset), counts, n)


def _decode_previous(data: bytes, offset: int, n: int, k: int) -> np.ndarray:
    first, offset = decode_uvarint(data, offset)
    per_ctx, offset = decode_uvarints(data, offset, k)
    if first >= k or per_ctx.max() > k:
        raise FormatError("categorical payload: context model refers to symbols that are not used")
    per_ctx = per_ctx.astype(np.int64)
    num_pairs = int(per_ctx.sum())
    deltas, offset = decode_uvarints(data, offset, num_pairs)
    pair_counts, offset = decode_uvarints(data, offset, num_pairs)
    if num_pairs and (deltas.max() >= k or pair_counts.min() == 0 or pair_counts.max() >= n):
        raise FormatError("categorical payload: malformed context model")
    pair_succ = _undeltas(deltas, per_ctx[per_ctx > 0])
    if num_pairs and pair_succ.max() >= k:
        raise FormatError("categorical payload: malformed context model")
    if int(pair_counts.sum()) != n - 1:
        total = int(pair_counts.sum())
        raise FormatError(f"categorical payload: context counts (sum {total}) do not describe {n} symbols")
    first_pair = np.cumsum(per_ctx) - per_ctx
    cumulative = np.concatenate(([0], np.cumsum(pair_counts.astype(np.int64))))
    ctx_starts = cumulative[first_pair]
    ctx_ends = cumulative[first_pair + per_ctx]
    successors = np.empty(n - 1, dtype=np.int64)
    decoder = _decoder(data, offset) if (per_ctx > 1).any() else None
    if decoder is None:
        _expect_end(data, offset, "categorical payload without coded symbols")
    for c in np.flatnonzero(per_ctx):
        span = slice(first_pair[c], first_pair[c] + per_ctx[c])
        length = ctx_ends[c] - ctx_starts[c]
        if per_ctx[c] == 1:
            local = np.zeros(length, dtype=np.int64)
        else:
            local = _decode(decoder, pair_counts[span], length)
        successors[ctx_starts[c] : ctx_ends[c]] = pair_succ[span][local]
    return _follow(first, successors, ctx_starts, ctx_ends, n)


def _follow(first: int, successors: np.ndarray, starts: np.ndarray, ends: np.ndarray, n: int) -> np.ndarray:
    """Rebuild the sequence: the successor of each visit to ``c`` is the next unread entry of ``c``."""
    table = array.array("q", successors.astype(np.int64).tobytes())
    cursor = starts.tolist()
    sequence = array.array("q", bytes(8 * n))
    sequence[0] = current = first
    try:
        for i in range(1, n):
            position = cursor[current]
            cursor[current] = position + 1
            current = sequence[i] = table[position]
    except IndexError:
        raise FormatError("categorical payload: context streams are inconsistent") from None
    if cursor != ends.tolist():
        raise FormatError("categorical payload: context streams are inconsistent")
    return np.frombuffer(sequence, dtype=np.int64)


def entropy_bits(symbols: np.ndarray, alphabet_size: int) -> float:
    """Ideal order-0 code length of ``symbols`` in bits: ``-sum_s c_s * log2(c_s / n)``."""
    symbols = _check_symbols(symbols, alphabet_size)
    counts = np.bincount(symbols, minlength=alphabet_size)
    counts = counts[counts > 0].astype(np.float64)
    return float((counts * np.log2(symbols.size / counts)).sum())


# --------------------------------------------------------------------------- tables


@dataclass(frozen=True, eq=False)
class FrequencyTable:
    """Integer frequencies of the values ``offset .. offset + len(frequencies) - 1``.

    Every frequency must be >= 1 (so every value of the support can be coded);
    the total must be < 2**32. Only the ratios matter: the coder rescales with
    :func:`rescale_frequencies`.
    """

    offset: int
    frequencies: np.ndarray

    def __post_init__(self) -> None:
        if isinstance(self.offset, bool) or not isinstance(self.offset, (int, np.integer)):
            raise ValueError(f"table offset must be an integer, got {self.offset!r}")
        freqs = _check_frequencies(self.frequencies)
        if self.offset < _INT32_MIN or self.offset + freqs.size - 1 > _INT32_MAX:
            raise ValueError(f"table support {self.offset}..{self.offset + freqs.size - 1} exceeds int32")
        freqs = freqs.astype(np.uint32)
        freqs.flags.writeable = False
        object.__setattr__(self, "offset", int(self.offset))
        object.__setattr__(self, "frequencies", freqs)

    @property
    def size(self) -> int:
        """Number of values in the support."""
        return int(self.frequencies.size)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, FrequencyTable):
            return NotImplemented
        return self.offset == other.offset and np.array_equal(self.frequencies, other.frequencies)

    def to_bytes(self) -> bytes:
        """Serialise: zigzag varint offset, varint size, one varint per frequency."""
        return encode_svarint(self.offset) + encode_uvarint(self.size) + encode_uvarints(self.frequencies)

    @classmethod
    def from_bytes(cls, data: bytes) -> FrequencyTable:
        """Parse the output of :meth:`to_bytes` (exactly, no trailing bytes)."""
        data = bytes(data)
        table, offset = cls._read(data, 0)
        _expect_end(data, offset, "frequency table")
        return table

    @classmethod
    def _read(cls, data: bytes, offset: int) -> tuple[FrequencyTable, int]:
        start = offset
        table_offset, offset = decode_svarint(data, offset)
        size, offset = decode_uvarint(data, offset)
        if not 1 <= size <= MAX_TABLE_SIZE:
            raise FormatError(f"frequency table at byte {start}: size {size} outside 1..{MAX_TABLE_SIZE}")
        freqs, offset = decode_uvarints(data, offset, size)
        try:
            return cls(table_offset, freqs), offset
        except ValueError as exc:
            raise FormatError(f"frequency table at byte {start}: {exc}") from None


def tables_to_bytes(tables: Sequence[FrequencyTable]) -> bytes:
    """Serialise a list of tables: varint count, then each :meth:`FrequencyTable.to_bytes`."""
    return encode_uvarint(len(tables)) + b"".join(t.to_bytes() for t in tables)


def tables_from_bytes(data: bytes) -> list[FrequencyTable]:
    """Inverse of :func:`tables_to_bytes`."""
    data = bytes(data)
    count, offset = decode_uvarint(data, 0)
    tables = []
    for _ in range(count):
        table, offset = FrequencyTable._read(data, offset)
        tables.append(table)
    _expect_end(data, offset, "frequency table list")
    return tables


def quantize_pmf(pmf: np.ndarray, precision_bits: int = 16) -> np.ndarray:
    """Quantize a probability vector to ``uint32`` frequencies >= 1 summing to ``2**precision_bits``.

    Each entry gets 1 plus its share of the remaining ``2**precision_bits - len(pmf)``
    by cumulative rounding down. Deterministic for a given float64 input.
    """
    pmf = np.asarray(pmf, dtype=np.float64).ravel()
    if not 1 <= precision_bits <= PRECISION:
        raise ValueError(f"precision_bits must be in 1..{PRECISION}, got {precision_bits}")
    if not 1 <= pmf.size <= min(MAX_TABLE_SIZE, 1 << precision_bits):
        raise ValueError(f"pmf has {pmf.size} entries; at most {min(MAX_TABLE_SIZE, 1 << precision_bits)} fit")
    if not np.isfinite(pmf).all() or pmf.min() < 0 or pmf.sum() <= 0:
        raise ValueError("pmf must be finite, non-negative and have a positive sum")
    free = (1 << precision_bits) - pmf.size
    edges = np.minimum(np.floor(np.cumsum(pmf / pmf.sum()) * free), free).astype(np.int64)
    edges[-1] = free
    return (np.diff(edges, prepend=0) + 1).astype(np.uint32)


def _check_table_inputs(
    table_ids: np.ndarray, tables: Sequence[FrequencyTable]
) -> tuple[np.ndarray, list[FrequencyTable]]:
    tables = list(tables)
    if not tables or not all(isinstance(t, FrequencyTable) for t in tables):
        raise ValueError("tables must be a non-empty sequence of FrequencyTable")
    ids = np.asarray(table_ids)
    if ids.dtype.kind not in "ui":
        raise ValueError(f"table_ids must be an integer array, got dtype {ids.dtype}")
    if ids.size and (ids.min() < 0 or ids.max() >= len(tables)):
        bad = int(ids.min()) if ids.min() < 0 else int(ids.max())
        raise ValueError(f"table id {bad} outside 0..{len(tables) - 1}")
    return ids.astype(np.int64), tables


def _tables_checksum(tables: Sequence[FrequencyTable]) -> bytes:
    return zlib.crc32(tables_to_bytes(tables)).to_bytes(4, "little")


def _groups(flat_ids: np.ndarray, num_tables: int):
    """Yield ``(table index, positions)`` per used table, positions in ascending order."""
    order = np.argsort(flat_ids, kind="stable")
    counts = np.bincount(flat_ids, minlength=num_tables)
    starts = np.cumsum(counts) - counts
    for t in np.flatnonzero(counts):
        yield int(t), order[starts[t] : starts[t] + counts[t]]


def encode_with_tables(values: np.ndarray, table_ids: np.ndarray, tables: Sequence[FrequencyTable]) -> bytes:
    """Code ``values[i]`` with ``tables[table_ids[i]]``; the tables are not stored.

    Values outside their table's support raise ``ValueError`` (clamp beforehand).
    """
    ids, tables = _check_table_inputs(table_ids, tables)
    values = np.asarray(values)
    if values.dtype.kind not in "ui" or values.shape != ids.shape:
        raise ValueError(
            f"values must be an integer array shaped like table_ids {ids.shape}, got {values.dtype} {values.shape}"
        )
    if values.size > MAX_SYMBOLS:
        raise ValueError(f"at most {MAX_SYMBOLS} values per payload, got {values.size}")
    flat_ids, flat_values = ids.ravel(), values.ravel().astype(np.int64)
    offsets = np.array([t.offset for t in tables], dtype=np.int64)
    sizes = np.array([t.size for t in tables], dtype=np.int64)
    local = flat_values - offsets[flat_ids]
    outside = (local < 0) | (local >= sizes[flat_ids])
    if outside.any():
        i = int(np.argmax(outside))
        t = tables[flat_ids[i]]
        raise ValueError(
            f"value {flat_values[i]} at flat index {i} outside the support "
            f"{t.offset}..{t.offset + t.size - 1} of table {flat_ids[i]}"
        )
    encoder = _encoder()
    for t, positions in _groups(flat_ids, len(tables)):
        if tables[t].size > 1:
            encoder.encode(local[positions].astype(np.int32), _model(tables[t].frequencies))
    return encode_uvarint(values.size) + _tables_checksum(tables) + _words(encoder)


def decode_with_tables(data: bytes, table_ids: np.ndarray, tables: Sequence[FrequencyTable]) -> np.ndarray:
    """Decode a payload of :func:`encode_with_tables`; returns ``int32`` shaped like ``table_ids``."""
    ids, tables = _check_table_inputs(table_ids, tables)
    data = bytes(data)
    n, offset = decode_uvarint(data, 0)
    if n != ids.size:
        raise FormatError(f"table payload codes {n} values but {ids.size} table ids were given")
    stored, offset = data[offset : offset + 4], offset + 4
    if len(stored) < 4:
        raise FormatError("table payload ends inside its table checksum")
    if stored != _tables_checksum(tables):
        raise FormatError("the given tables differ from those the payload was encoded with (table checksum mismatch)")
    flat_ids = ids.ravel()
    out = np.empty(n, dtype=np.int64)
    decoder = _decoder(data, offset)
    for t, positions in _groups(flat_ids, len(tables)):
        table = tables[t]
        if table.size == 1:
            out[positions] = table.offset
        else:
            out[positions] = _decode(decoder, table.frequencies, positions.size) + table.offset
    return out.astype(np.int32).reshape(ids.shape)
