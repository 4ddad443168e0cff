"""Bounds of model settings, shared by the model configs (checked in ``__post_init__``) and the file decoders
(which build those configs from a header, so a file is held to the same rules as the command line).

The upper bounds keep what a setting can make a model allocate sane: a VQNF file's header cannot ask for more
than a model of these sizes (``docs/format.md`` lists them).
"""

from __future__ import annotations

import math
from typing import Optional

__all__ = [
    "MAX_NUM_LEVELS",
    "MAX_RESOLUTION",
    "MAX_FEATURE_DIM",
    "MAX_HIDDEN_DIM",
    "MAX_NUM_SAMPLES",
    "MAX_HASH_LEVELS",
    "MAX_LOG2_TABLE",
    "MAX_HASH_RESOLUTION",
    "MAX_PLANE_RESOLUTION",
    "MAX_COMPONENTS",
    "MAX_DECODED_CELLS",
    "check_int",
    "check_real",
]

MAX_NUM_LEVELS = 8
"""Levels of detail of a VQAD model."""
MAX_RESOLUTION = 2048
"""Cells per side of a VQAD model's finest level (``base_resolution * 2**(num_levels - 1)``)."""
MAX_FEATURE_DIM = 256
"""Width of a feature vector (a codebook row or a float row)."""
MAX_HIDDEN_DIM = 1024
"""Width of a decoder MLP."""
MAX_NUM_SAMPLES = 4096
"""Samples per ray."""
MAX_HASH_LEVELS = 24
"""Levels of a hash-grid encoding."""
MAX_LOG2_TABLE = 22
"""log2 of the rows of a hash grid's table or codebook per level."""
MAX_HASH_RESOLUTION = 1 << 16
"""Finest resolution of a hash-grid encoding."""
MAX_PLANE_RESOLUTION = 2048
"""Side of a tensorf feature plane."""
MAX_COMPONENTS = 128
"""Density or colour components of a tensorf encoding."""
MAX_DECODED_CELLS = 1 << 27
"""Cells a decoded VQAD file may hold over all its levels, level 0 counted as its whole ``R_0**3`` grid (its occupancy
bitmap): a few bytes of entropy-coded topology can claim a full level, so the reader checks the count before
allocating (a level's vertices are at most 8 per cell)."""


def check_int(name: str, value: object, low: int, high: Optional[int] = None) -> None:
    """``ValueError`` unless ``value`` is an integer (not a bool) in ``low..high`` (no upper bound if None)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in {low}..{high}"
        raise ValueError(f"{name} must be an integer {bounds}, got {value!r}")


def check_real(
    name: str, value: object, low: float, high: float = math.inf, open_low: bool = False, open_high: bool = False
) -> None:
    """``ValueError`` unless ``value`` is a finite number from ``low`` to ``high`` (excluded where open)."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    above_low = number and (low < value if open_low else low <= value)  # type: ignore[operator]
    below_high = number and (value < high if open_high else value <= high)  # type: ignore[operator]
    if not (above_low and below_high):
        upper = "" if high == math.inf else f" and {'<' if open_high else '<='} {high}"
        raise ValueError(f"{name} must be a finite number {'>' if open_low else '>='} {low}{upper}, got {value!r}")
