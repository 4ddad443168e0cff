"""nerfacto with a learned-index hash encoding (or its random-index twin) as the field's position encoding.

Everything but the density network's grid is nerfstudio's nerfacto: proposal sampling, the colour
network, losses, the viewer. The model builds offline (LPIPS only from cached weights) and its
checkpoints load on torch >= 2.6.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Dict, Literal, Optional, Tuple, Type

from nerfstudio.models.nerfacto import NerfactoModel, NerfactoModelConfig
from torch import Tensor

from vqad_nerfstudio.compat import SkippedLPIPS, allow_nerfstudio_checkpoints, offline_lpips
from vqad_nerfstudio.encodings.learned_index_hash import IndexMode, LearnedIndexHashEncoding
from vqad_nerfstudio.encodings.torch_hash_grid import sparse_backward_hash_grids
from vqad_nerfstudio.fields.hash_base import replace_base_encoding
from vqad_nerfstudio.fields.quantized_linear import quantizable_layers
from vqad_nerfstudio.models.limits import (
    MAX_HASH_LEVELS,
    MAX_HASH_RESOLUTION,
    MAX_HIDDEN_DIM,
    MAX_LOG2_TABLE,
    MAX_NUM_SAMPLES,
    check_int,
    check_real,
)
from vqad_nerfstudio.rounding import check_weight_bits

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
    frozen_indices: bool = False
    """Hold each index entry as an integer instead of 2**b trainable logits ('learned' mode): what decoding a file
    builds (memory in proportion to the file). Such indices render and export, but do not train."""
    index_temperature: float = 1.0
    """Softmax temperature of the straight-through backward pass of the indices."""
    hash_grid_backward: Literal["nerfstudio", "sparse"] = "sparse"
    """Backward pass of nerfstudio's torch hash grids (the proposal networks', and the field's in 'random' mode) when
    tinycudann is absent: 'sparse' gives nerfstudio's gradients through a scatter-add that skips zero-gradient
    lookups on a GPU (samples outside the scene box all read one vertex, and nerfstudio's ``index_put_`` serialises
    them); 'nerfstudio' keeps nerfstudio's own."""
    disable_scene_contraction: Optional[bool] = None  # type: ignore[assignment]
    """nerfacto's switch: True keeps to the scene box (an object scene); False contracts the space beyond it (a
    capture of the real world, whose photos show a background). None: decided from the training images when a run
    starts, as vqad's unbounded is (data/scene_bounds.py), and recorded in the run's config.yml; a model built
    without that decision keeps to the box."""
    SCENE_BOUNDS_FLAGS: ClassVar[Tuple[str, str]] = (
        "--pipeline.model.disable-scene-contraction True",
        "--pipeline.model.disable-scene-contraction False",
    )
    """The flags that keep a run to the scene box and that fit a background (what the decision's message names)."""
    network_bits: int = 16
    """Bits per value of the networks a file stores (the field's MLPs, the proposal networks' MLPs and hash grids;
    not the position encoding, whose codebooks or 'random' table stay fp16): 16, fp16 as trained; 2..8, every
    weight matrix rounded per output row and every proposal grid per level, range-coded, and trained on that grid
    from the first step (straight-through gradients), so that the decoded file renders what was trained.
    ``ns-train vqad-hash`` and ``vqad-hash-random`` set 8 (method_configs/vqad_hash.py)."""

    @property
    def unbounded(self) -> Optional[bool]:
        """Whether space beyond the scene box is contracted (``not disable_scene_contraction``; None until
        decided): the name the scene-bounds decision reads and sets."""
        return None if self.disable_scene_contraction is None else not self.disable_scene_contraction

    @unbounded.setter
    def unbounded(self, value: bool) -> None:
        self.disable_scene_contraction = not value

    def __post_init__(self) -> None:
        check_int("log2_codebook_size", self.log2_codebook_size, 1, MAX_LOG2_TABLE)
        check_int("index_bits", self.index_bits, 1, min(16, self.log2_codebook_size))
        check_int("index_table_size", self.index_table_size, 1, 1 << MAX_LOG2_TABLE)
        check_real("index_temperature", self.index_temperature, 0, open_low=True)
        check_weight_bits("network_bits", self.network_bits)
        if self.network_bits != 16 and (self.implementation != "torch" or self.hash_grid_backward != "sparse"):
            raise ValueError(
                "network_bits below 16 rounds PyTorch's networks and hash grids: it needs implementation 'torch' and "
                "hash_grid_backward 'sparse' (network_bits 16 trains any of them in float)"
            )
        check_int("num_levels", self.num_levels, 1, MAX_HASH_LEVELS)
        check_int("max_res", self.max_res, 1, MAX_HASH_RESOLUTION)
        check_int("base_res", self.base_res, 1, self.max_res)
        check_int("features_per_level", self.features_per_level, 1, 8)
        check_int("hidden_dim", self.hidden_dim, 1, MAX_HIDDEN_DIM)
        check_int("hidden_dim_color", self.hidden_dim_color, 1, MAX_HIDDEN_DIM)
        check_int("appearance_embed_dim", self.appearance_embed_dim, 0, MAX_HIDDEN_DIM)
        check_int("num_nerf_samples_per_ray", self.num_nerf_samples_per_ray, 1, MAX_NUM_SAMPLES)
        check_int("num_proposal_iterations", self.num_proposal_iterations, 1, 8)
        if len(self.num_proposal_samples_per_ray) != self.num_proposal_iterations:
            raise ValueError("num_proposal_samples_per_ray needs one count per proposal iteration")
        for samples in self.num_proposal_samples_per_ray:
            check_int("each of num_proposal_samples_per_ray", samples, 1, MAX_NUM_SAMPLES)
        networks = 1 if self.use_same_proposal_network else self.num_proposal_iterations
        if len(self.proposal_net_args_list) < networks:
            raise ValueError(f"proposal_net_args_list needs {networks} entries, got {len(self.proposal_net_args_list)}")
        for args in self.proposal_net_args_list:
            if not isinstance(args, dict):
                raise ValueError(f"each of proposal_net_args_list must be a dict, got {args!r}")
            check_int("a proposal network's hidden_dim", args.get("hidden_dim"), 1, MAX_HIDDEN_DIM)
            check_int("a proposal network's log2_hashmap_size", args.get("log2_hashmap_size"), 1, MAX_LOG2_TABLE)
            check_int("a proposal network's num_levels", args.get("num_levels"), 1, MAX_HASH_LEVELS)
            check_int("a proposal network's max_res", args.get("max_res"), 1, MAX_HASH_RESOLUTION)


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
        frozen_indices=config.frozen_indices,
        position_gradient=config.predict_normals,  # normals are the only reader of the positions' gradient
    )
    encoding.temperature = config.index_temperature
    return encoding


class LearnedIndexNerfactoModel(NerfactoModel):
    """nerfacto with a :class:`LearnedIndexHashEncoding` in its field."""

    config: LearnedIndexNerfactoModelConfig

    def populate_modules(self) -> None:
        if self.config.disable_scene_contraction is None:  # built without the run's decision: the scene box
            self.config.disable_scene_contraction = True
        with offline_lpips():
            super().populate_modules()
        cfg = self.config
        replace_base_encoding(self.field, encoding_of(cfg), 2, cfg.hidden_dim, cfg.implementation)
        bits = None if cfg.network_bits == 16 else cfg.network_bits
        if cfg.hash_grid_backward == "sparse":
            sparse_backward_hash_grids(self.field)  # in 'random' mode the position encoding: kept in fp16
            sparse_backward_hash_grids(self.proposal_networks, table_bits=bits)
        if bits is not None:
            for layer in quantizable_layers(self.field) + quantizable_layers(self.proposal_networks):
                layer.bits = bits

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
