"""Stored size of a model: the bytes of the file it exports to, level of detail by level of detail.

One implementation for every method: the model is encoded as ``ns-export vqad-compressed`` writes it (entropy-coded
indices, decoders at the model's network_bits) and the file's chunks are measured, so the size is the file's, not an
estimate. Levels without cells are not in a file and cost nothing.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

from torch import nn

from vqad_nerfstudio.codec import describe, read_container, write_container

__all__ = ["LevelSize", "SizeReport", "file_size_report", "model_size_report", "stored_kib"]

_TOPOLOGY_TAGS = ("TOPO", "MASK")
_CODEBOOK_TAGS = ("CBOK", "CBKQ")


@dataclass(frozen=True)
class LevelSize:
    """Bytes of one level of detail's chunks (chunk headers included)."""

    topology: int
    rows: int
    codebook: int

    @property
    def total(self) -> int:
        return self.topology + self.rows + self.codebook


@dataclass(frozen=True)
class SizeReport:
    """Per-level bytes of a file and the bytes every prefix of it holds."""

    levels: List[LevelSize]
    fixed: int
    """Preamble, header, size chunk, the chunks of no level of detail (decoder networks) and the end marker."""

    def cumulative_bytes(self, lod: int) -> int:
        """Bytes of the file cut to levels ``0..lod`` (with its end marker)."""
        return self.fixed + sum(level.total for level in self.levels[: lod + 1])

    @property
    def total_bytes(self) -> int:
        """The file's size."""
        return self.cumulative_bytes(len(self.levels) - 1)

    @property
    def feature_bytes(self) -> int:
        """Bytes of the feature grid alone (rows and codebooks, no topology or decoders)."""
        return sum(level.rows + level.codebook for level in self.levels)


def file_size_report(data: bytes) -> SizeReport:
    """Size report of a complete VQNF file."""
    rows = describe(read_container(data))
    lods = sorted({row["lod"] for row in rows if row["lod"] is not None})
    levels = []
    for lod in lods:
        chunks = [row for row in rows if row["lod"] == lod]
        topology = sum(row["chunk_bytes"] for row in chunks if row["tag"] in _TOPOLOGY_TAGS)
        codebook = sum(row["chunk_bytes"] for row in chunks if row["tag"] in _CODEBOOK_TAGS)
        levels.append(LevelSize(topology, sum(row["chunk_bytes"] for row in chunks) - topology - codebook, codebook))
    return SizeReport(levels, len(data) - sum(level.total for level in levels))


_CACHE: "weakref.WeakKeyDictionary[nn.Module, Tuple[Any, SizeReport]]" = weakref.WeakKeyDictionary()


def _state_key(model: nn.Module) -> Tuple[Any, ...]:
    """Changes whenever a parameter or buffer is replaced, resized or modified in place."""
    tensors = list(model.parameters()) + list(model.buffers())
    return tuple((t.data_ptr(), t._version, tuple(t.shape)) for t in tensors)


def model_size_report(model: nn.Module) -> SizeReport:
    """Size report of the file ``model`` exports to (cached until the model changes). ``ValueError`` if it cannot be
    exported yet (a VQAD model in its float warm-up or without cells)."""
    from vqad_nerfstudio.export.formats import encode_any

    key = _state_key(model)
    cached = _CACHE.get(model)
    if cached is not None and cached[0] == key:
        return cached[1]
    encoded = encode_any(model)
    report = file_size_report(write_container(encoded.header, encoded.chunks))
    _CACHE[model] = (key, report)
    return report


def stored_kib(model: nn.Module, lod: Optional[int] = None) -> float:
    """KiB of the file ``model`` exports to (cut to levels ``0..lod`` if given); NaN while it cannot be exported."""
    try:
        report = model_size_report(model)
    except ValueError:
        return math.nan
    return (report.total_bytes if lod is None else report.cumulative_bytes(lod)) / 1024
