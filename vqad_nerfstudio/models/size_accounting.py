"""Honest stored-size accounting of a sparse-grid model, level by level (without entropy coding).

Counts what a compressed file must hold to rebuild the model:
- topology: level 0 as one bit per cell; level l > 0 as 8 child-occupancy bits per occupied parent;
- indices: ``m_l * b`` bits, bit-packed (codebook store), or features ``m_l * k`` fp16 (float store);
- codebooks: ``2**b * k`` fp16 per level;
- decoders: every MLP parameter in fp16.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List

from torch import nn

from vqad_nerfstudio.encodings.sparse_grid import SparseFeatureGrid
from vqad_nerfstudio.encodings.vertex_features import CodebookFeatures


def _bytes(bits: int) -> int:
    return (bits + 7) // 8


@dataclass(frozen=True)
class LevelSize:
    """Bytes of one level of detail."""

    topology: int
    rows: int
    codebook: int

    @property
    def total(self) -> int:
        return self.topology + self.rows + self.codebook


@dataclass(frozen=True)
class SizeReport:
    """Per-level and decoder bytes of a model."""

    levels: List[LevelSize]
    decoders: int

    def cumulative_bytes(self, lod: int) -> int:
        """Bytes needed to render levels ``0..lod`` (decoders included)."""
        return self.decoders + sum(level.total for level in self.levels[: lod + 1])

    @property
    def total_bytes(self) -> int:
        return self.cumulative_bytes(len(self.levels) - 1)

    @property
    def feature_bytes(self) -> int:
        """Bytes of the feature grid alone (rows and codebooks, no topology or decoders)."""
        return sum(level.rows + level.codebook for level in self.levels)


def grid_size_report(grid: SparseFeatureGrid, decoders: nn.Module) -> SizeReport:
    """Size of ``grid`` and of the fp16 parameters of ``decoders``."""
    levels = []
    for index, level in enumerate(grid.levels):
        if index == 0:
            topology_bits = level.resolution**3
        else:
            topology_bits = 8 * grid.levels[index - 1].cells.numel()
        store = level.features
        if isinstance(store, CodebookFeatures):
            rows, codebook = _bytes(store.num_rows * store.bits), 2 * store.codebook.numel()
        else:
            rows, codebook = _bytes(store.stored_bits()), 0
        levels.append(LevelSize(_bytes(topology_bits), rows, codebook))
    decoder_bytes = 2 * sum(p.numel() for p in decoders.parameters())
    return SizeReport(levels, decoder_bytes)


def model_size_report(model: nn.Module) -> SizeReport:
    """Size report of a model with ``grid`` and ``field`` (whose MLPs are the decoders)."""
    field = model.field  # type: ignore[attr-defined]
    decoders = nn.ModuleList([field.density_mlp, field.color_mlp])
    return grid_size_report(model.grid, decoders)  # type: ignore[attr-defined]
