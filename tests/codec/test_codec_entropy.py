import math

import numpy as np
import pytest

from vqad_nerfstudio.codec import (
    FormatError,
    FrequencyTable,
    decode_categorical,
    decode_with_tables,
    encode_categorical,
    encode_with_tables,
    entropy_bits,
    pack_bits,
    packed_size,
    quantize_pmf,
    rescale_frequencies,
    tables_from_bytes,
    tables_to_bytes,
)

CONTEXTS = ["none", "previous", "auto"]


def geometric(rng, n, p, alphabet_size):
    return np.minimum(rng.geometric(p, n) - 1, alphabet_size - 1)


def sticky_chain(rng, n, alphabet_size, stay=0.9):
    """Markov chain that mostly repeats the previous symbol: order-0 entropy high, conditional low."""
    jumps = rng.random(n) > stay
    fresh = rng.integers(0, alphabet_size, n)
    index = np.maximum.accumulate(np.where(jumps, np.arange(n), 0))
    return fresh[index]


# ---------------------------------------------------------------- categorical


@pytest.mark.parametrize("bits", range(1, 17))
@pytest.mark.parametrize("context", CONTEXTS)
def test_categorical_round_trip(bits, context):
    rng = np.random.default_rng(bits)
    alphabet_size = 1 << bits
    cases = {
        "uniform": rng.integers(0, alphabet_size, 3000),
        "skewed": geometric(rng, 3000, 0.3, alphabet_size),
        "one_symbol": np.full(500, alphabet_size - 1),
        "chain": sticky_chain(rng, 3000, alphabet_size),
    }
    for name, symbols in cases.items():
        payload = encode_categorical(symbols, alphabet_size, context)
        decoded = decode_categorical(payload)
        assert decoded.dtype == np.uint16, name
        np.testing.assert_array_equal(decoded, symbols, err_msg=f"{name}/{context}")


@pytest.mark.parametrize("context", CONTEXTS)
def test_degenerate_inputs(context):
    for symbols in (np.zeros(0, dtype=np.int64), np.array([7]), np.array([0, 9])):
        decoded = decode_categorical(encode_categorical(symbols, 10, context))
        np.testing.assert_array_equal(decoded, symbols)
    # a single distinct symbol costs no coded words, whatever the count and alphabet
    one = encode_categorical(np.full(100_000, 54321), 65536, context)
    assert len(one) <= 20
    np.testing.assert_array_equal(decode_categorical(one), np.full(100_000, 54321))


def test_skewed_data_codes_close_to_entropy():
    symbols = geometric(np.random.default_rng(0), 200_000, 0.5, 16)
    payload = encode_categorical(symbols, 16)
    raw_bytes = packed_size(symbols.size, 4)
    ideal_bytes = entropy_bits(symbols, 16) / 8
    assert len(payload) < 0.6 * raw_bytes
    assert len(payload) < 1.01 * ideal_bytes
    np.testing.assert_array_equal(decode_categorical(payload), symbols)


def test_large_alphabet_with_few_used_symbols_has_small_model():
    rng = np.random.default_rng(1)
    used = np.array([3, 1000, 40000, 65535])
    symbols = used[rng.choice(4, 50_000, p=[0.7, 0.1, 0.1, 0.1])]
    payload = encode_categorical(symbols, 65536)
    assert len(payload) < entropy_bits(symbols, 65536) / 8 + 40
    np.testing.assert_array_equal(decode_categorical(payload), symbols)


@pytest.mark.parametrize("bits", range(1, 17))
def test_uniform_data_does_not_blow_up(bits):
    rng = np.random.default_rng(bits)
    symbols = rng.integers(0, 1 << bits, 5000)
    for context in CONTEXTS:
        assert len(encode_categorical(symbols, 1 << bits, context)) <= packed_size(symbols.size, bits) + 8


def test_previous_context_exploits_correlation():
    symbols = sticky_chain(np.random.default_rng(2), 100_000, 256, stay=0.95)
    plain = encode_categorical(symbols, 256, "none")
    conditioned = encode_categorical(symbols, 256, "previous")
    auto = encode_categorical(symbols, 256, "auto")
    assert len(conditioned) < 0.5 * len(plain)
    assert auto == conditioned
    np.testing.assert_array_equal(decode_categorical(conditioned), symbols)


def test_auto_picks_the_shorter_payload():
    rng = np.random.default_rng(3)
    for symbols in (geometric(rng, 20_000, 0.4, 64), sticky_chain(rng, 20_000, 64)):
        sizes = [len(encode_categorical(symbols, 64, c)) for c in ("none", "previous")]
        assert len(encode_categorical(symbols, 64, "auto")) == min(sizes)


def test_encoding_is_deterministic_and_dtype_independent():
    symbols = geometric(np.random.default_rng(4), 10_000, 0.2, 100)
    for context in CONTEXTS:
        first = encode_categorical(symbols, 100, context)
        assert encode_categorical(symbols.copy(), 100, context) == first
        assert encode_categorical(symbols.astype(np.uint8), 100, context) == first
        assert encode_categorical(symbols.reshape(100, 100), 100, context) == first


def test_categorical_input_validation():
    with pytest.raises(ValueError, match="outside the alphabet 0..9"):
        encode_categorical(np.array([1, 10]), 10)
    with pytest.raises(ValueError, match="symbol -1"):
        encode_categorical(np.array([-1, 3]), 10)
    for size in (0, 65537, 2.0):
        with pytest.raises(ValueError, match="alphabet_size"):
            encode_categorical(np.array([0]), size)
    with pytest.raises(ValueError, match="integer"):
        encode_categorical(np.array([0.0]), 4)
    with pytest.raises(ValueError, match="context"):
        encode_categorical(np.array([0]), 4, "next")


def test_malformed_categorical_payloads_raise_format_error():
    symbols = geometric(np.random.default_rng(5), 1000, 0.3, 32)
    good = encode_categorical(symbols, 32)
    with pytest.raises(FormatError, match="empty"):
        decode_categorical(b"")
    with pytest.raises(FormatError, match="mode 9"):
        decode_categorical(b"\x09" + good[1:])
    with pytest.raises(FormatError):
        decode_categorical(good[:6])  # cut inside the model
    with pytest.raises(FormatError, match="multiple of 4"):
        decode_categorical(good[:-1])
    single = encode_categorical(np.full(10, 3), 8)
    with pytest.raises(FormatError, match="trailing"):
        decode_categorical(single + b"\x00")


def test_entropy_bits():
    assert entropy_bits(np.array([0, 0, 1, 1]), 2) == pytest.approx(4.0)
    assert entropy_bits(np.arange(8), 8) == pytest.approx(24.0)
    assert entropy_bits(np.full(10, 3), 4) == 0.0
    assert entropy_bits(np.zeros(0, dtype=np.int64), 4) == 0.0
    assert entropy_bits(np.array([0, 0, 0, 1]), 2) == pytest.approx(4 * (0.75 * math.log2(4 / 3) + 0.25 * 2))


# ---------------------------------------------------------------- models and tables


def test_rescale_frequencies_is_exact_and_positive():
    # hand-computed example from docs/format.md
    np.testing.assert_array_equal(rescale_frequencies(np.array([1, 3])), [4194304, 12582912])
    rng = np.random.default_rng(6)
    for size in (2, 17, 65536):
        counts = rng.integers(1, 60_000, size)
        counts[0] = 1
        weights = rescale_frequencies(counts)
        assert weights.sum() == 1 << 24 and weights.min() >= 1


def test_coder_uses_the_integer_weights_exactly():
    # weights [1, 2**24 - 1]: value 0 has probability 2**-24 and costs exactly 24 bits
    table = FrequencyTable(0, np.array([1, (1 << 24) - 1]))
    np.testing.assert_array_equal(rescale_frequencies(table.frequencies), [1, (1 << 24) - 1])
    payload = encode_with_tables(np.zeros(1000, dtype=np.int64), np.zeros(1000, dtype=np.int64), [table])
    coded_bits = 8 * (len(payload) - 2 - 4)  # minus varint count and table checksum
    assert 24_000 <= coded_bits <= 24_000 + 64


@pytest.mark.parametrize("precision", [8, 12, 16, 24])
def test_quantize_pmf(precision):
    rng = np.random.default_rng(precision)
    pmf = rng.random(200) ** 4
    pmf[[3, 50, 51]] = 0.0
    pmf[7] = 1e-12
    freqs = quantize_pmf(pmf, precision)
    assert freqs.dtype == np.uint32
    assert freqs.min() >= 1
    assert int(freqs.sum()) == 1 << precision
    free = (1 << precision) - pmf.size
    assert np.abs(freqs.astype(np.float64) - 1 - pmf / pmf.sum() * free).max() <= 1.0


def test_quantize_pmf_validation():
    with pytest.raises(ValueError, match="at most 256"):
        quantize_pmf(np.ones(257), 8)
    with pytest.raises(ValueError, match="non-negative"):
        quantize_pmf(np.array([0.5, -0.1]))
    with pytest.raises(ValueError, match="positive sum"):
        quantize_pmf(np.zeros(4))
    with pytest.raises(ValueError, match="precision_bits"):
        quantize_pmf(np.ones(4), 25)


def laplace_pmf(scale, support):
    x = np.arange(-support, support + 1)
    return np.exp(-np.abs(x) / scale)


def test_table_coding_round_trip_and_efficiency():
    rng = np.random.default_rng(7)
    scales = [0.5, 2.0, 8.0]
    support = 40
    tables = [FrequencyTable(-support, quantize_pmf(laplace_pmf(s, support))) for s in scales]
    tables.append(FrequencyTable(5, np.array([9])))  # one-value table: nothing to code
    table_ids = rng.integers(0, len(tables), (64, 500))
    values = np.empty(table_ids.shape, dtype=np.int64)
    for t, s in enumerate(scales):
        mask = table_ids == t
        values[mask] = np.clip(np.round(rng.laplace(0, s, mask.sum())), -support, support)
    values[table_ids == 3] = 5
    payload = encode_with_tables(values, table_ids, tables)
    decoded = decode_with_tables(payload, table_ids, tables)
    assert decoded.dtype == np.int32 and decoded.shape == values.shape
    np.testing.assert_array_equal(decoded, values)
    # within 1% (+ a few words) of the ideal code length under the tables
    ideal = 0.0
    for t, table in enumerate(tables):
        p = table.frequencies / table.frequencies.sum()
        ideal -= np.log2(p[values[table_ids == t] - table.offset]).sum()
    assert len(payload) <= 1.01 * ideal / 8 + 16
    assert encode_with_tables(values, table_ids, tables) == payload


def test_table_coding_errors():
    tables = [FrequencyTable(-2, np.array([1, 2, 3, 2, 1])), FrequencyTable(0, np.array([5, 1]))]
    ids = np.array([0, 0, 1, 1])
    with pytest.raises(ValueError, match="value 3 at flat index 1 outside the support -2..2 of table 0"):
        encode_with_tables(np.array([0, 3, 0, 1]), ids, tables)
    with pytest.raises(ValueError, match="table id 2"):
        encode_with_tables(np.array([0, 0, 0, 0]), np.array([0, 2, 1, 1]), tables)
    with pytest.raises(ValueError, match="shaped like"):
        encode_with_tables(np.array([0, 0]), ids, tables)
    payload = encode_with_tables(np.array([-2, 2, 1, 0]), ids, tables)
    other = [tables[0], FrequencyTable(0, np.array([4, 1]))]
    with pytest.raises(FormatError, match="table checksum"):
        decode_with_tables(payload, ids, other)
    with pytest.raises(FormatError, match="codes 4 values but 3"):
        decode_with_tables(payload, ids[:3], tables)


def test_frequency_table_serialisation():
    tables = [FrequencyTable(-7, np.array([1, 300, 70000])), FrequencyTable(2**31 - 1, np.array([4]))]
    for table in tables:
        assert FrequencyTable.from_bytes(table.to_bytes()) == table
    assert tables_from_bytes(tables_to_bytes(tables)) == tables
    assert tables[0].to_bytes() == b"\x0d\x03\x01\xac\x02\xf0\xa2\x04"
    with pytest.raises(FormatError, match="trailing"):
        FrequencyTable.from_bytes(tables[0].to_bytes() + b"\x00")
    with pytest.raises(FormatError, match=">= 1"):
        FrequencyTable.from_bytes(b"\x00\x02\x01\x00")
    with pytest.raises(ValueError, match=">= 1"):
        FrequencyTable(0, np.array([1, 0]))
    with pytest.raises(ValueError, match="exceeds int32"):
        FrequencyTable(2**31 - 1, np.array([1, 1]))


def test_corrupted_payloads_raise_only_format_errors():
    rng = np.random.default_rng(8)
    payloads = [
        encode_categorical(geometric(rng, 300, 0.3, 32), 32, "none"),
        encode_categorical(sticky_chain(rng, 300, 64), 64, "previous"),
        encode_categorical(rng.integers(0, 300, 40), 65536, "previous"),
    ]
    for trial in range(3000):
        corrupted = bytearray(payloads[trial % len(payloads)])
        if trial % 2:
            corrupted[rng.integers(len(corrupted))] ^= 1 << rng.integers(8)
        else:
            corrupted = corrupted[: rng.integers(len(corrupted))]
        try:
            decoded = decode_categorical(bytes(corrupted))
        except FormatError:
            continue
        assert decoded.dtype == np.uint16


def test_categorical_layout_matches_specification():
    symbols = np.array([0] * 50 + [3] * 30 + [7] * 20)
    head = bytes([100, 0x80, 0x02, 3, 0, 2, 3])  # n = 100, A = 256, k = 3, used 0, 3, 7 gap-coded
    order0 = encode_categorical(symbols, 256, "none")
    assert order0[:11] == bytes([0]) + head + bytes([50, 30, 20])
    assert (len(order0) - 11) % 4 == 0
    previous = encode_categorical(symbols, 256, "previous")
    model = bytes([0, 2, 2, 1, 0, 0, 1, 0, 2, 49, 1, 29, 1, 19])  # first, m_c, successor gaps, counts
    assert previous[:22] == bytes([1]) + head + model
    assert (len(previous) - 22) % 4 == 0
    packed = encode_categorical(np.array([5, 0, 7]), 8, "none")  # too short to be worth a model
    assert packed == bytes([2, 3, 8]) + pack_bits(np.array([5, 0, 7]), 3)


def test_rescale_frequencies_validation():
    for bad in (np.array([1, 0]), np.zeros(0, dtype=np.int64), np.array([0.5, 0.5]), np.array([2**31, 2**31])):
        with pytest.raises(ValueError, match="frequencies"):
            rescale_frequencies(bad)
    np.testing.assert_array_equal(rescale_frequencies(np.array([5])), [1 << 24])
