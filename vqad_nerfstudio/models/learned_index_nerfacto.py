"""nerfacto with a learned-index hash encoding (or its random-index twin) as the field's position encoding.

Everything but the density network's grid is nerfstudio's nerfacto: proposal sampling, the colour
network, losses, the viewer. The model builds offline (LPIPS only from cached weights) and its
checkpoints load on torch >= 2.6.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Literal, Tuple, Type

from nerfstudio.models.nerfacto import NerfactoModel, NerfactoModelConfig
from torch import Tensor

from vqad_nerfstudio.compat import SkippedLPIPS, allow_nerfstudio_checkpoints, offline_lpips
from vqad_nerfstudio.encodings.learned_index_hash import IndexMode, LearnedIndexHashEncoding
from vqad_nerfstudio.encodings.torch_hash_grid import sparse_backward_hash_grids
from vqad_nerfstudio.fields.hash_base import replace_base_encoding

allow_nerfstudio_checkpoints()


@dataclass
class LearnedIndexNerfactoModelConfig(NerfactoModelConfig):
    """nerfacto whose field reads its features through learned (VQAD) or random (Instant-NGP) indices."""

    _target: Type = field(default_factory=lambda: LearnedIndexNerfactoModel)
    index_mode: IndexMode = "learned"
    """'learned': b-bit learned indices into small per-level codebooks; 'random': plain hashing (Instant-NGP)."""
    log2_codebook_size: int = 12
    """log2 of the feature vectors per level (the hash table size in 'random' mode)."""
    index_table_size: int = 2**17
    """Index entries per level at most ('learned' mode); coarser levels with fewer vertices get one per vertex."""
    index_bits: int = 3
    """b: bits per index entry; each vertex chooses among 2**b codebook rows ('learned' mode)."""
    index_temperature: float = 1.0
    """Softmax temperature of the straight-through backward pass of the indices."""
    hash_grid_backward: Literal["nerfstudio", "sparse"] = "sparse"
    """Backward pass of nerfstudio's torch hash grids (the proposal networks', and the field's in 'random' mode) when
    tinycudann is absent: 'sparse' gives nerfstudio's gradients through a scatter-add that skips zero-gradient
    lookups on a GPU (samples outside the scene box all read one vertex, and nerfstudio's ``index_put_`` serialises
    them); 'nerfstudio' keeps nerfstudio's own."""

    def __post_init__(self) -> None:
        if not 1 <= self.index_bits <= self.log2_codebook_size:
            raise ValueError(
                f"index_bits must be in 1..log2_codebook_size ({self.log2_codebook_size}), got {self.index_bits}"
            )


def encoding_of(config: LearnedIndexNerfactoModelConfig) -> LearnedIndexHashEncoding:
    """The position encoding that ``config`` describes."""
    encoding = LearnedIndexHashEncoding(
        num_levels=config.num_levels,
        min_res=config.base_res,
        max_res=config.max_res,
        features_per_level=config.features_per_level,
        log2_codebook_size=config.log2_codebook_size,
        index_table_size=config.index_table_size,
        index_bits=config.index_bits,
        mode=config.index_mode,
        implementation=config.implementation,
    )
    encoding.temperature = config.index_temperature
    return encoding


class LearnedIndexNerfactoModel(NerfactoModel):
    """nerfacto with a :class:`LearnedIndexHashEncoding` in its field."""

    config: LearnedIndexNerfactoModelConfig

    def populate_modules(self) -> None:
        with offline_lpips():
            super().populate_modules()
        cfg = self.config
        replace_base_encoding(self.field, encoding_of(cfg), 2, cfg.hidden_dim, cfg.implementation)
        if cfg.hash_grid_backward == "sparse":
            sparse_backward_hash_grids(self)

    @property
    def encoding(self) -> LearnedIndexHashEncoding:
        """The field's position encoding (held by the field only, so the state dict names it once)."""
        return self.field.mlp_base[0]

    def encoding_bytes(self) -> float:
        """Bytes of the field's position encoding in a file (fp16 tables, b-bit indices)."""
        return self.encoding.stored_bits() / 8

    def get_image_metrics_and_images(
        self, outputs: Dict[str, Tensor], batch: Dict[str, Tensor]
    ) -> Tuple[Dict[str, float], Dict[str, Tensor]]:
        metrics, images = super().get_image_metrics_and_images(outputs, batch)
        if isinstance(self.lpips, SkippedLPIPS):
            metrics.pop("lpips", None)
        metrics["encoding_kib"] = self.encoding_bytes() / 1024
        return metrics, images


__all__ = ["LearnedIndexNerfactoModel", "LearnedIndexNerfactoModelConfig", "encoding_of"]
