"""Categorical payloads whose symbol count and alphabet the reader already knows."""

from __future__ import annotations

import numpy as np

from vqad_nerfstudio.codec import FormatError, decode_categorical

__all__ = ["decode_symbols"]


def decode_symbols(payload: bytes, count: int, alphabet_size: int, what: str) -> np.ndarray:
    """Decode a categorical payload that must hold exactly ``count`` symbols below ``alphabet_size``."""
    symbols = decode_categorical(payload)
    if symbols.shape != (count,) or (count and int(symbols.max()) >= alphabet_size):
        raise FormatError(f"{what}: expected {count} symbols below {alphabet_size}, got {symbols.size}")
    return symbols
