"""Morton (z-order) ordering of integer 3D coordinates.

Per-vertex data (indices, features) are stored in Morton order of the vertex coordinates: the
curve visits space in nested 2x2x2 blocks, so consecutive entries are spatial neighbours far
more often than in row-major order, which the previous-symbol context of the entropy coder uses.
"""

from __future__ import annotations

import numpy as np

__all__ = ["morton_codes", "morton_order"]

MAX_AXIS_BITS = 21
"""Bits per axis that fit a 63-bit code."""


def morton_codes(coords: np.ndarray) -> np.ndarray:
    """Interleaved-bit codes of non-negative ``[n, 3]`` integer coordinates (x is the most significant axis).

    Bit ``i`` of x, y and z goes to code bits ``3i + 2``, ``3i + 1`` and ``3i``.
    """
    coords = np.asarray(coords, dtype=np.int64)
    if coords.ndim != 2 or coords.shape[1] != 3:
        raise ValueError(f"coords must have shape [n, 3], got {coords.shape}")
    if coords.size and (coords.min() < 0 or coords.max() >= 1 << MAX_AXIS_BITS):
        raise ValueError(f"coords must lie in [0, 2**{MAX_AXIS_BITS})")
    width = int(coords.max()).bit_length() if coords.size else 0
    codes = np.zeros(coords.shape[0], dtype=np.int64)
    for bit in range(width):
        for axis in range(3):
            codes |= ((coords[:, axis] >> bit) & 1) << (3 * bit + 2 - axis)
    return codes


def morton_order(coords: np.ndarray) -> np.ndarray:
    """Permutation that sorts ``coords`` along the Morton curve (``coords[order]`` is in z-order)."""
    return np.argsort(morton_codes(coords), kind="stable")
