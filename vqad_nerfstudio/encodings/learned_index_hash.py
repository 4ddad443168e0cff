"""Multiresolution hash grid whose table entries are reached through learned indices.

A drop-in for nerfstudio's :class:`~nerfstudio.field_components.encodings.HashEncoding`: the same
Instant-NGP level layout (``num_levels`` resolutions from ``min_res`` to ``max_res``, ``features_per_level``
features per level, trilinear interpolation, levels concatenated), two ways of finding a vertex's
feature vector in its level's table:

- ``mode="random"`` (Instant-NGP): the vertex's hash picks the table entry. The table has
  ``2**log2_codebook_size`` fp16 vectors per level and nothing else is stored. nerfstudio's
  ``HashEncoding`` does the work (tinycudann's hash grid when it is installed, torch otherwise).
- ``mode="learned"`` (VQAD's learned indices, with the bucketed probing of compact neural graphics
  primitives for fine levels): each level stores a small codebook of ``2**log2_codebook_size``
  vectors and an index table of *b*-bit entries, ``b = index_bits``. A coarse level with at most
  ``index_table_size`` vertices has one entry per vertex; a finer level hashes vertices into
  that many buckets. A vertex's candidates are the ``2**b`` consecutive codebook rows starting at a
  second hash of the vertex, and its entry says which one it uses. Entries are trained as logits
  with the straight-through estimator VQAD's grid uses
  (:func:`~vqad_nerfstudio.encodings.straight_through.interpolated_codewords`, fused with the trilinear
  interpolation and computed for all levels at once).

With ``index_bits == log2_codebook_size`` a dense level is exactly a VQAD level: every vertex holds a
free index into the whole codebook.

On CUDA tensors the learned mode's lookups run as one fused kernel
(:mod:`vqad_nerfstudio.kernels.learned_hash`) when Triton imports and the positions need no gradient; the
PyTorch path is the CPU path and the reference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Literal, Optional, Tuple, Union

import torch
from jaxtyping import Float, Int
from nerfstudio.field_components.encodings import Encoding, HashEncoding
from torch import Tensor, nn

from vqad_nerfstudio.encodings.sparse_grid import CORNER_OFFSETS, trilinear_weights
from vqad_nerfstudio.encodings.straight_through import candidate_rows, interpolated_codewords
from vqad_nerfstudio.encodings.vertex_features import check_codewords
from vqad_nerfstudio.kernels import learned_hash

IndexMode = Literal["learned", "random"]

# Instant-NGP's spatial hash primes (row hash), and a second, independent set (candidate base hash).
_ROW_PRIMES = (1, 2654435761, 805459861)
_BASE_PRIMES = (73856093, 19349663, 83492791)


def spatial_hash(
    coords: Int[Tensor, "*b 3"], primes: Tuple[int, int, int], size: Union[int, Int[Tensor, "..."]]
) -> Int[Tensor, "*b"]:
    """XOR of coordinates times primes, modulo ``size`` (Instant-NGP's hash; ``size`` broadcasts)."""
    coords = coords.long()
    mixed = (coords[..., 0] * primes[0]) ^ (coords[..., 1] * primes[1]) ^ (coords[..., 2] * primes[2])
    return torch.remainder(mixed, size)


@dataclass(frozen=True)
class LevelLayout:
    """Where one level's vertices find their index entries."""

    resolution: int
    dense: bool
    """One index entry per vertex (else: vertices hashed into buckets)."""
    rows: int
    """Index entries stored for this level."""


def level_resolutions(num_levels: int, min_res: int, max_res: int) -> List[int]:
    """Instant-NGP's geometric series of resolutions (as nerfstudio's HashEncoding computes them)."""
    growth = math.exp((math.log(max_res) - math.log(min_res)) / (num_levels - 1)) if num_levels > 1 else 1.0
    return [int(math.floor(min_res * growth**level)) for level in range(num_levels)]


def level_layouts(num_levels: int, min_res: int, max_res: int, index_table_size: int) -> List[LevelLayout]:
    """Index-table layout of every level of a learned-index encoding."""
    table = index_table_size
    return [
        LevelLayout(res, (res + 1) ** 3 <= table, min((res + 1) ** 3, table))
        for res in level_resolutions(num_levels, min_res, max_res)
    ]


def learned_stored_bits(layouts: List[LevelLayout], log2_codebook_size: int, features: int, index_bits: int) -> int:
    """Bits of a learned-index encoding in a file: fp16 codebooks plus b-bit index entries."""
    return len(layouts) * 2**log2_codebook_size * features * 16 + sum(layout.rows for layout in layouts) * index_bits


class LearnedIndexHashEncoding(Encoding):
    """Instant-NGP-style hash encoding with learned (VQAD) or random (hash) indices into per-level tables.

    Args:
        num_levels: Number of resolutions.
        min_res: Resolution of the coarsest level.
        max_res: Resolution of the finest level.
        features_per_level: Width of each level's feature vectors.
        log2_codebook_size: Feature vectors per level (the hash table of ``random`` mode).
        index_table_size: Index entries per level at most (``learned`` mode).
        index_bits: Bits per index entry; each vertex chooses among ``2**index_bits`` codebook rows.
        mode: ``learned`` indices or ``random`` (hashed) ones.
        init_scale: Feature vectors start uniform in ``[-init_scale, init_scale]``.
        implementation: ``tcnn`` uses tinycudann for ``random`` mode when it is installed.
        frozen_indices: Hold each index entry as an integer (the ``indices`` buffer, all levels concatenated)
            instead of ``2**index_bits`` trainable logits (``learned`` mode): what a decoded file holds.
        position_gradient: Make the features differentiable in the positions (for normals); without it the
            positions are detached, so the fused kernel can run in training.
    """

    def __init__(
        self,
        num_levels: int = 16,
        min_res: int = 16,
        max_res: int = 1024,
        features_per_level: int = 2,
        log2_codebook_size: int = 12,
        index_table_size: int = 2**17,
        index_bits: int = 3,
        mode: IndexMode = "learned",
        init_scale: float = 0.001,
        implementation: Literal["tcnn", "torch"] = "tcnn",
        frozen_indices: bool = False,
        position_gradient: bool = True,
    ) -> None:
        super().__init__(in_dim=3)
        if mode not in ("learned", "random"):
            raise ValueError(f"mode must be 'learned' or 'random', got {mode!r}")
        if num_levels < 1 or min_res < 1 or max_res < min_res:
            raise ValueError(f"need num_levels >= 1, 1 <= min_res <= max_res; got {num_levels}, {min_res}, {max_res}")
        if not 1 <= index_bits <= log2_codebook_size:
            raise ValueError(f"index_bits must be in 1..log2_codebook_size ({log2_codebook_size}), got {index_bits}")
        self.num_levels = num_levels
        self.features_per_level = features_per_level
        self.log2_codebook_size = log2_codebook_size
        self.index_bits = index_bits
        self.mode: IndexMode = mode
        self.resolutions = level_resolutions(num_levels, min_res, max_res)
        self.temperature = 1.0
        """Softmax temperature of the straight-through backward pass (training-schedule state)."""
        self.fused = True
        """Look up with the fused kernel on CUDA tensors when Triton imports (else the PyTorch path)."""
        self.position_gradient = position_gradient
        """Whether the features are differentiable in the positions. nerfacto marks every sample position as
        requiring a gradient (for normals); without normals nothing reads it, yet it kept training off the fused
        kernel (which has no position gradient) and made the random grid's backward compute it."""

        if mode == "random":
            self.hash_grid = HashEncoding(
                num_levels=num_levels,
                min_res=min_res,
                max_res=max_res,
                log2_hashmap_size=log2_codebook_size,
                features_per_level=features_per_level,
                hash_init_scale=init_scale,
                implementation=implementation,
            )
            self.layouts: List[LevelLayout] = []
            return
        self.layouts = level_layouts(num_levels, min_res, max_res, index_table_size)
        codebook_size = 2**log2_codebook_size
        self.codebooks = nn.ParameterList(
            [nn.Parameter((torch.rand(codebook_size, features_per_level) * 2 - 1) * init_scale) for _ in self.layouts]
        )
        self.frozen_indices = frozen_indices
        self.indices: Optional[Tensor]
        if frozen_indices:
            self.index_logits = nn.ParameterList()
            self.register_buffer("indices", torch.zeros(sum(layout.rows for layout in self.layouts), dtype=torch.int32))
        else:
            self.index_logits = nn.ParameterList(
                [nn.Parameter(torch.randn(layout.rows, 2**index_bits) * 0.01) for layout in self.layouts]
            )
            self.register_buffer("indices", None)
        first_entry = 0
        geometry = []
        for layout in self.layouts:
            geometry.append((layout.resolution + 1, layout.rows, layout.dense, first_entry))
            first_entry += layout.rows
        self.level_geometry: Tensor
        """Per level: vertices per side, index entries, dense (0/1), first entry in the concatenated tables."""
        self.register_buffer("level_geometry", torch.tensor(geometry, dtype=torch.long), persistent=False)

    def get_out_dim(self) -> int:
        return self.num_levels * self.features_per_level

    # ------------------------------------------------------------------------------------ lookup
    def hard_indices(self, level: int) -> Int[Tensor, "rows"]:
        """Each index entry's choice, in ``[0, 2**index_bits)``: what a compressed file stores."""
        if self.frozen_indices:
            return self.indices.narrow(0, self._first_entry(level), self.layouts[level].rows).long()
        return self.index_logits[level].detach().argmax(dim=-1)

    def _first_entry(self, level: int) -> int:
        return sum(layout.rows for layout in self.layouts[:level])

    @torch.no_grad()
    def load_codewords(self, level: int, codebook: Float[Tensor, "c k"], indices: Int[Tensor, "rows"]) -> None:
        """Make ``codebook`` level ``level``'s codebook and ``indices`` its index entries: what decoding a file does,
        into frozen indices."""
        rows, like = self.layouts[level].rows, self.codebooks[level]
        check_codewords(codebook, indices, like, rows, 2**self.index_bits, self.frozen_indices, f"level {level}")
        like.copy_(codebook)
        self.indices.narrow(0, self._first_entry(level), rows).copy_(indices)

    def entries_and_bases(
        self, vertices: Int[Tensor, "*b levels 8 3"]
    ) -> Tuple[Int[Tensor, "*b levels 8"], Int[Tensor, "*b levels 8"]]:
        """Where the vertices of every level look up: their index entries (rows of all levels' index logits
        concatenated) and their first candidates (rows of all levels' codebooks concatenated; see
        :func:`~vqad_nerfstudio.encodings.straight_through.candidate_rows`)."""
        side, rows, dense, entry_offset = self.level_geometry.unbind(dim=-1)
        side, rows, entry_offset = side[:, None], rows[:, None], entry_offset[:, None]
        dense_entry = (vertices[..., 0] * side + vertices[..., 1]) * side + vertices[..., 2]
        entries = torch.where(dense[:, None].bool(), dense_entry, spatial_hash(vertices, _ROW_PRIMES, rows))
        codebook_size = 2**self.log2_codebook_size
        starts = torch.arange(self.num_levels, device=vertices.device)[:, None] * codebook_size
        if self.index_bits == self.log2_codebook_size:  # a free index into the whole codebook
            return entries + entry_offset, starts.expand_as(entries)
        return entries + entry_offset, starts + spatial_hash(vertices, _BASE_PRIMES, codebook_size)

    def forward(self, in_tensor: Float[Tensor, "*bs 3"]) -> Float[Tensor, "*bs out"]:
        if not self.position_gradient:
            in_tensor = in_tensor.detach()
        if self.mode == "random":
            return self.hash_grid(in_tensor)
        batch_shape = in_tensor.shape[:-1]
        if self._fusable(in_tensor):
            return self._fused_forward(in_tensor.reshape(-1, 3)).reshape(*batch_shape, self.get_out_dim())
        points = in_tensor.reshape(-1, 1, 3)
        resolution = self.level_geometry[:, 0].to(points.dtype) - 1  # [levels]
        scaled = points * resolution[:, None]  # [n, levels, 3]
        corner = torch.minimum(torch.floor(scaled).clamp(min=0), resolution[:, None] - 1)
        vertices = corner.long()[:, :, None, :] + CORNER_OFFSETS.to(points.device)  # [n, levels, 8, 3]
        entries, bases = self.entries_and_bases(vertices)
        weights = trilinear_weights(scaled - corner)
        codebook_size = 2**self.log2_codebook_size
        if self.frozen_indices:
            rows = candidate_rows(bases, self.indices[entries].long(), codebook_size)
            features = (torch.cat(list(self.codebooks))[rows] * weights[..., None]).sum(dim=-2)
            return features.reshape(*batch_shape, self.get_out_dim())
        features = interpolated_codewords(
            torch.cat(list(self.index_logits)),
            torch.cat(list(self.codebooks)),
            entries,
            bases,
            weights,
            codebook_size,
            self.temperature,
            use_kernel=self.fused,
        )  # [n, levels, features]
        return features.reshape(*batch_shape, self.get_out_dim())

    def _fusable(self, in_tensor: Float[Tensor, "*bs 3"]) -> bool:
        """Whether :meth:`forward` can use the fused kernel: float32 tables and positions on its device, and no
        gradient for the positions (the PyTorch path gives them one, through the trilinear weights)."""
        return (
            self.fused
            and not (in_tensor.requires_grad and torch.is_grad_enabled())
            and self.codebooks[0].dtype == torch.float32
            and learned_hash.available(in_tensor.reshape(-1, 3), self.get_out_dim())
        )

    def _fused_forward(self, points: Float[Tensor, "n 3"]) -> Float[Tensor, "n out"]:
        """:meth:`forward`'s features by the fused kernel; the entries' choices and the straight-through softmax stay
        in PyTorch."""
        codebooks = torch.cat(list(self.codebooks))
        size, full_index = 2**self.log2_codebook_size, self.index_bits == self.log2_codebook_size
        logits: Optional[Tensor] = None
        if self.frozen_indices:
            choices = self.indices
        else:
            logits = torch.cat(list(self.index_logits))
            choices = logits.detach().argmax(dim=-1)
        return learned_hash.fused_lookup(
            codebooks, logits, choices, points, self.level_geometry, size, full_index, self.temperature
        )

    # ------------------------------------------------------------------------------------ size
    def stored_bits(self) -> int:
        """Bits a compressed file needs for this encoding: fp16 tables, plus b-bit entries (learned)."""
        if self.mode == "random":
            return sum(p.numel() for p in self.hash_grid.parameters()) * 16
        return learned_stored_bits(self.layouts, self.log2_codebook_size, self.features_per_level, self.index_bits)


def learned_matching_random(
    random_log2_table: int,
    num_levels: int = 16,
    min_res: int = 16,
    max_res: int = 1024,
    features_per_level: int = 2,
    index_bits: int = 3,
    codebook_share: float = 0.25,
) -> Tuple[int, int]:
    """``(log2_codebook_size, index_table_size)`` of the largest learned encoding not larger than the random
    one with ``2**random_log2_table`` entries per level, whose codebooks take about ``codebook_share`` of it."""
    budget = num_levels * 2**random_log2_table * features_per_level * 16
    log2_codebook = max(index_bits, random_log2_table + round(math.log2(codebook_share)))

    def bits(table: int) -> int:
        layouts = level_layouts(num_levels, min_res, max_res, table)
        return learned_stored_bits(layouts, log2_codebook, features_per_level, index_bits)

    if bits(1) > budget:
        raise ValueError(f"no learned encoding fits in {budget // 8} bytes")
    low, high = 1, 2**31
    while low < high:  # largest table size within the budget
        middle = (low + high + 1) // 2
        low, high = (middle, high) if bits(middle) <= budget else (low, middle - 1)
    return log2_codebook, low


__all__ = [
    "IndexMode",
    "LearnedIndexHashEncoding",
    "LevelLayout",
    "learned_matching_random",
    "learned_stored_bits",
    "level_layouts",
    "level_resolutions",
    "spatial_hash",
]
