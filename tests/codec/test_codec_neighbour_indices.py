"""Indices coded with their grid neighbours as context: exact round trips, what the context buys, damage."""

import numpy as np
import pytest

from vqad_nerfstudio.codec import FormatError, decode_neighbour_indices, encode_categorical, encode_neighbour_indices
from vqad_nerfstudio.codec.neighbour_indices import _candidates


def _grid(size: int) -> np.ndarray:
    """Every vertex of a size^3 grid, in row-major order (a level's row order)."""
    return np.stack(np.meshgrid(*[np.arange(size)] * 3, indexing="ij"), axis=-1).reshape(-1, 3)


def _blocks(coords: np.ndarray, alphabet_size: int, block: int = 4) -> np.ndarray:
    """An index constant over blocks of vertices, like the indices of a smooth field."""
    cells = coords // block
    return (cells[:, 0] * 7 + cells[:, 1] * 3 + cells[:, 2] * 5) % alphabet_size


def _round_trip(indices: np.ndarray, alphabet_size: int, coords: np.ndarray) -> bytes:
    data = encode_neighbour_indices(indices, alphabet_size, coords)
    decoded = decode_neighbour_indices(data, alphabet_size, coords)
    assert decoded.dtype == np.int64 and np.array_equal(decoded, indices)
    return data


@pytest.mark.parametrize("alphabet_size", [1, 2, 16, 256, 1024])
def test_random_indices_round_trip(alphabet_size):
    rng = np.random.default_rng(alphabet_size)
    coords = _grid(12)
    _round_trip(rng.integers(0, alphabet_size, len(coords)), alphabet_size, coords)


def test_a_sparse_shuffled_level_round_trips():
    # the rows of a pruned level, in any order: the codec finds neighbours by coordinates, not by row
    rng = np.random.default_rng(0)
    coords = rng.permutation(_grid(16))[:1500]
    _round_trip(_blocks(coords, 64), 64, coords)


@pytest.mark.parametrize("count", [0, 1, 2])
def test_tiny_levels_round_trip(count):
    _round_trip(np.arange(count) % 2, 2, _grid(2)[:count])


def test_neighbours_make_smooth_indices_cheap():
    # blocks of equal indices: most vertices repeat a neighbour's index, which order 0 cannot see
    coords = _grid(24)
    indices = _blocks(coords, 256)
    neighbour_coded = _round_trip(indices, 256, coords)
    assert len(neighbour_coded) < 0.25 * len(encode_categorical(indices, 256, context="none"))


def test_encoding_is_deterministic():
    coords = _grid(10)
    indices = _blocks(coords, 32, block=3)
    assert encode_neighbour_indices(indices, 32, coords) == encode_neighbour_indices(indices.copy(), 32, coords.copy())


def test_candidates_are_distinct_most_frequent_first_ties_in_slot_order():
    values = np.array([[3, 5, 5, -1, 3, 7], [-1, -1, -1, -1, -1, -1], [9, 9, 9, 9, 9, 9]])
    candidates, number, keys = _candidates(values, 2)
    assert candidates.tolist() == [[3, 5, 7, -1, -1, -1], [-1] * 6, [9, -1, -1, -1, -1, -1]]
    assert number.tolist() == [3, 0, 1]
    pass_stride = 7**6  # class = pass and candidate counts (2, 2, 1), as base-7 digits
    assert keys.tolist() == [2 * pass_stride + 2 + 2 * 7 + 1 * 49, 2 * pass_stride, 2 * pass_stride + 6]


@pytest.mark.parametrize(
    "indices, alphabet_size, coords, message",
    [
        (np.array([0, 1]), 2, np.array([[0, 0, 0], [0, 0, 0]]), "distinct"),
        (np.array([0, 2]), 2, _grid(2)[:2], r"lie in \[0, 2\)"),
        (np.array([0, 1]), 2, _grid(2)[:3], r"\(2, 3\)"),
        (np.array([0.0, 1.0]), 2, _grid(2)[:2], "integer"),
        (np.array([0, 1]), 2, -_grid(2)[:2] - 1, "non-negative"),
    ],
)
def test_bad_input_is_refused(indices, alphabet_size, coords, message):
    with pytest.raises(ValueError, match=message):
        encode_neighbour_indices(indices, alphabet_size, coords)


@pytest.fixture(scope="module")
def payload():
    coords = _grid(8)
    return coords, encode_neighbour_indices(_blocks(coords, 16, block=2), 16, coords)


def test_a_payload_for_other_vertices_or_alphabet_is_refused(payload):
    coords, data = payload
    with pytest.raises(FormatError, match="expected"):
        decode_neighbour_indices(data, 16, coords[:-1])
    with pytest.raises(FormatError, match="expected"):
        decode_neighbour_indices(data, 32, coords)


def test_truncated_or_damaged_payloads_are_format_errors(payload):
    coords, data = payload
    for cut in (0, 3, len(data) // 2, len(data) - 4):
        with pytest.raises(FormatError):
            decode_neighbour_indices(data[:cut], 16, coords)
    # the same payload for vertices whose neighbourhoods differ (the corner (7, 7, 7), predicted from three
    # neighbours, moved away from them): its histograms no longer describe them
    moved = coords.copy()
    moved[-1] = (9, 9, 9)
    with pytest.raises(FormatError, match="histograms"):
        decode_neighbour_indices(data, 16, moved)


def test_neighbours_found_by_search_code_as_those_found_in_the_table(monkeypatch, payload):
    """Grids too large for a table of every grid point find neighbours by binary search: same payload, same checks."""
    from vqad_nerfstudio.codec import neighbour_indices

    coords, coded = payload
    shuffled = np.random.default_rng(0).permutation(coords.shape[0])  # rows in any order
    indices = _blocks(coords, 16, block=2)
    in_table = encode_neighbour_indices(indices[shuffled], 16, coords[shuffled])
    monkeypatch.setattr(neighbour_indices, "_DENSE_KEYS_MAX", 0)
    assert encode_neighbour_indices(indices, 16, coords) == coded
    assert encode_neighbour_indices(indices[shuffled], 16, coords[shuffled]) == in_table
    assert np.array_equal(decode_neighbour_indices(coded, 16, coords), indices)
    with pytest.raises(ValueError, match="distinct"):
        encode_neighbour_indices(np.array([0, 1]), 2, np.array([[0, 0, 0], [0, 0, 0]]))
