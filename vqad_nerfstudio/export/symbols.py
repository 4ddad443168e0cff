"""Categorical payloads whose symbol count and alphabet the reader already knows."""

from __future__ import annotations

import numpy as np

from vqad_nerfstudio.codec import FormatError, decode_categorical

__all__ = ["decode_symbols"]


def decode_symbols(payload: bytes, count: int, alphabet_size: int, what: str) -> np.ndarray:
    """Decode a categorical payload that must hold exactly ``count`` symbols below ``alphabet_size``; the count
    is checked before anything is decoded."""
    try:
        symbols = decode_categorical(payload, count)
    except FormatError as error:
        raise FormatError(f"{what}: {error}") from None
    if count and int(symbols.max()) >= alphabet_size:
        raise FormatError(f"{what}: symbol {int(symbols.max())} outside the alphabet 0..{alphabet_size - 1}")
    return symbols
