"""Multi-resolution sparse feature grid with streaming levels of detail.

Level ``l`` is a cubic grid of ``resolution_l = base_resolution * 2**l`` cells over the unit cube.
Only *occupied* cells exist; their 8 corners are the level's vertices, each holding one feature
row of a :class:`~vqad_nerfstudio.encodings.vertex_features.FeatureStore`. The occupied cells of
level ``l`` are always children of occupied cells of level ``l - 1`` (an octree), so a coarse-to-fine
prefix of the levels is a complete model.

A point's feature is the trilinear interpolation of its cell's 8 vertex rows, summed over the
levels up to the requested level of detail. Points in unoccupied cells get no feature from that
level and are reported as outside (the field gives them zero density). With ``shell_lod`` (unbounded
scenes), levels finer than it exist only in the inner cube, the contracted scene box, and points outside it
are looked up at most at that level: the background stays coarse.

The topology (sorted linear ids of occupied cells, per level) is part of the module state and is
saved in checkpoints; the sparse lookup tables (each cell's 8 corner rows) are derived from it. A point's
cells at every level are found once (:meth:`SparseFeatureGrid.locate`) and can be passed to each lookup of
the same points. On CUDA the levels are interpolated by one fused kernel
(:mod:`vqad_nerfstudio.kernels.grid_interpolation`).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from jaxtyping import Bool, Float, Int, UInt8
from torch import Tensor, nn

from vqad_nerfstudio.encodings.vertex_features import FeatureStore, ParameterSwap, prepare_held_steps
from vqad_nerfstudio.kernels import cell_lookup, grid_interpolation
from vqad_nerfstudio.kernels.captured import CapturedWork

# Offsets of a cell's 8 corners, in (x, y, z) order; corner c has offsets of its bits (x = bit 2).
CORNER_OFFSETS = torch.tensor([[(c >> 2) & 1, (c >> 1) & 1, c & 1] for c in range(8)], dtype=torch.long)


def trilinear_weights(frac: Float[Tensor, "*b 3"]) -> Float[Tensor, "*b 8"]:
    """Trilinear weights of the 8 cell corners (in ``CORNER_OFFSETS`` order) of points at ``frac`` in their cell.

    Per axis the factors ``(1 - f, f)`` of the lower and upper corner; their outer product over x, y and z, in
    that order (corner ``c`` has offsets ``(c >> 2, c >> 1, c) & 1``). Written out rather than with ``prod``, whose
    backward pass runs a cumulative product (very slow on a GPU for millions of rows); and per axis, not per corner
    and axis, which takes the CPU a quarter of the time for the same values."""
    factors = torch.stack([1 - frac, frac], dim=-1)  # [*b, 3, 2]
    x, y, z = factors[..., 0, :, None, None], factors[..., 1, None, :, None], factors[..., 2, None, None, :]
    return (x * y * z).flatten(start_dim=-3)


def linear_ids(coords: Int[Tensor, "n 3"], size: int) -> Int[Tensor, "n"]:
    """Row-major linear ids of integer coordinates in a ``size**3`` grid."""
    return (coords[..., 0] * size + coords[..., 1]) * size + coords[..., 2]


def coords_of(ids: Int[Tensor, "n"], size: int) -> Int[Tensor, "n 3"]:
    """Inverse of :func:`linear_ids`."""
    return torch.stack([ids // (size * size), (ids // size) % size, ids % size], dim=-1)


def cell_vertex_ids(cells: Int[Tensor, "n"], resolution: int) -> Int[Tensor, "n 8"]:
    """Linear vertex ids (in the ``(resolution + 1)**3`` vertex grid) of each cell's 8 corners: the id of its lowest
    corner plus each corner's fixed offset in that grid."""
    lowest = linear_ids(coords_of(cells, resolution), resolution + 1)
    return lowest[:, None] + linear_ids(CORNER_OFFSETS.to(cells.device), resolution + 1)[None]


DENSE_VERTEX_TABLE_MAX = 2**25
"""Vertex grids of up to this many vertices (320^3) find a level's vertices with a table over the whole grid (a flag
and a row per grid vertex, 5 bytes each: 85 MB at 256^3) instead of sorting its cells' corners: lego's 256^3 level
in 0.12 s instead of 0.54 s on a 2-core CPU (what decoding a file spends most on)."""


def vertex_rows(corners: Int[Tensor, "n 8"], grid_vertices: int) -> Tuple[Int[Tensor, "m"], Int[Tensor, "n 8"]]:
    """The sorted distinct vertex ids among ``corners`` (ids in a grid of ``grid_vertices`` vertices) and, per corner,
    its row among them (int32): ``torch.unique(corners, return_inverse=True)``, through a table over the grid where
    it is at most :data:`DENSE_VERTEX_TABLE_MAX` vertices."""
    if grid_vertices > DENSE_VERTEX_TABLE_MAX:
        ids, rows = torch.unique(corners, return_inverse=True)
        return ids, rows.to(torch.int32)
    used = torch.zeros(grid_vertices, dtype=torch.bool, device=corners.device)
    used[corners.reshape(-1)] = True
    ids = used.nonzero().squeeze(-1)
    table = torch.empty(grid_vertices, dtype=torch.int32, device=corners.device)
    table[ids] = torch.arange(ids.numel(), dtype=torch.int32, device=corners.device)
    return ids, table[corners]


def child_cells(cells: Int[Tensor, "n"], resolution: int) -> Int[Tensor, "n8"]:
    """Sorted ids, at ``2 * resolution``, of the 8 children of each cell (given at ``resolution``)."""
    children = coords_of(cells, resolution)[:, None, :] * 2 + CORNER_OFFSETS.to(cells.device)[None]
    return torch.sort(linear_ids(children.reshape(-1, 3), 2 * resolution)).values


@dataclass(frozen=True)
class RowRemap:
    """How a level's rows moved: new row i came from old row ``source_rows[i]`` (-1: new)."""

    source_rows: Tensor
    swaps: List[ParameterSwap]


def neighbourhood(cells: Int[Tensor, "n"], resolution: int) -> Int[Tensor, "n27"]:
    """Sorted unique ids of the cells and their 26 neighbours (inside the grid)."""
    offsets = torch.stack(torch.meshgrid(*[torch.arange(-1, 2)] * 3, indexing="ij"), dim=-1).reshape(-1, 3)
    around = coords_of(cells, resolution)[:, None, :] + offsets.to(cells.device)[None]
    around = around.reshape(-1, 3)
    around = around[((around >= 0) & (around < resolution)).all(dim=-1)]
    return torch.unique(linear_ids(around, resolution))


def in_unit_cube(unit_positions: Float[Tensor, "*b 3"]) -> Bool[Tensor, "*b"]:
    """Whether points lie in the closed unit cube (where the grid, and any dense grid over it, has cells)."""
    return ((unit_positions >= 0) & (unit_positions <= 1)).all(dim=-1)


def voxel_ids(unit_positions: Float[Tensor, "n 3"], resolution: int) -> Int[Tensor, "n"]:
    """Row-major linear id of the voxel of a dense ``resolution**3`` grid over the unit cube holding each point
    (points outside the cube are clamped onto its border voxels: combine with :func:`in_unit_cube`)."""
    voxel = (unit_positions * resolution).floor().long().clamp_(0, resolution - 1)
    return linear_ids(voxel, resolution)


INNER_CUBE = (0.25, 0.75)
"""Per axis, the unit-cube interval of the inner cube (in contracted space: |x|∞ <= 1, the scene box)."""


def in_inner_cube(unit_positions: Float[Tensor, "*b 3"]) -> Bool[Tensor, "*b"]:
    """Whether points lie in :data:`INNER_CUBE` (half-open per axis, as cells are)."""
    low, high = INNER_CUBE
    return ((unit_positions >= low) & (unit_positions < high)).all(dim=-1)


def sorted_positions(sorted_ids: Int[Tensor, "m"], ids: Int[Tensor, "n"]) -> Int[Tensor, "n"]:
    """Position of each of ``ids`` in the sorted, unique ``sorted_ids``, or -1 where it is absent."""
    if sorted_ids.numel() == 0:
        return torch.full_like(ids, -1)
    position = torch.searchsorted(sorted_ids, ids).clamp_max(sorted_ids.numel() - 1)
    return torch.where(sorted_ids[position] == ids, position, torch.full_like(position, -1))


class GridLevel(nn.Module):
    """One level of detail: occupied cells, their vertices and the vertices' feature rows.

    Lookups are sparse: a point's cell is found by binary search in the sorted occupied cells
    (:meth:`SparseFeatureGrid.locate`), and each occupied cell lists the feature rows of its 8 corners, so memory
    grows with the occupied cells, not with the level's resolution."""

    cells: Tensor
    vertex_ids: Tensor
    corner_rows: Tensor

    def __init__(self, resolution: int, features: FeatureStore, cells: Optional[Tensor] = None) -> None:
        super().__init__()
        self.resolution = resolution
        self.features = features
        if cells is None:
            cells = torch.arange(resolution**3)
        self.register_buffer("cells", torch.empty(0, dtype=torch.long))
        self.register_buffer("vertex_ids", torch.empty(0, dtype=torch.long), persistent=False)
        self.register_buffer("corner_rows", torch.empty(0, 8, dtype=torch.int32), persistent=False)
        self.topology_version = 0
        """Counts the changes of :attr:`cells` (tables derived from the topology are cached against it)."""
        self.set_cells(cells)

    @property
    def num_vertices(self) -> int:
        return int(self.vertex_ids.shape[0])

    def set_cells(self, cells: Int[Tensor, "n"], in_place: bool = False) -> RowRemap:
        """Make ``cells`` (sorted, unique) the occupied cells; keep surviving vertices' feature rows.

        Returns, for each new vertex row, the old row it came from (-1 for a new vertex) and the
        replaced parameters, so that optimisers can follow (see :meth:`FeatureStore.remap`).
        """
        device = self.cells.device
        cells = cells.to(device=device, dtype=torch.long)
        if cells.numel() and (int(cells.min()) < 0 or int(cells.max()) >= self.resolution**3):
            raise ValueError(f"cell ids out of range for resolution {self.resolution}")
        corners = cell_vertex_ids(cells, self.resolution)
        new_vertex_ids, corner_rows = vertex_rows(corners, (self.resolution + 1) ** 3)
        source_rows = sorted_positions(self.vertex_ids, new_vertex_ids)
        swaps: List[ParameterSwap] = []
        if self.features.num_rows != new_vertex_ids.numel() or self.vertex_ids.numel():
            swaps = self.features.remap(source_rows, in_place=in_place)
        self.cells = cells
        self.topology_version += 1
        self.vertex_ids = new_vertex_ids
        self.corner_rows = corner_rows
        return RowRemap(source_rows, swaps)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # type: ignore[override]
        cells = state_dict.get(prefix + "cells")
        if cells is not None and not torch.equal(cells.to(self.cells.device), self.cells):
            self.vertex_ids = torch.empty(0, dtype=torch.long, device=self.cells.device)  # rows load from the state
            self.set_cells(cells, in_place=True)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, unit_positions: Float[Tensor, "n 3"], cell_index: Int[Tensor, "n"]) -> Float[Tensor, "n k"]:
        """Interpolated features of points in the cells ``cell_index`` (rows of :attr:`cells`; -1: unoccupied, zero)."""
        if self.cells.numel() == 0:
            return unit_positions.new_zeros(unit_positions.shape[0], self.features.feature_dim)
        scaled = unit_positions * self.resolution
        frac = scaled - scaled.floor().clamp(0, self.resolution - 1)
        weights = trilinear_weights(frac) * (cell_index >= 0)[:, None].to(frac.dtype)
        rows = self.corner_rows[cell_index.clamp_min(0)].long()  # [n, 8]; any row where unoccupied (weight 0)
        corner_features = self.features(rows.reshape(-1)).reshape(rows.shape[0], 8, -1)
        return (corner_features * weights[..., None]).sum(dim=1)


StoreFactory = Callable[[int, int], FeatureStore]
"""Builds a feature store from (level index, number of rows)."""

CellFilter = Callable[[Int[Tensor, "n"], int], Bool[Tensor, "n"]]
"""Decides, for cells given by linear id at a resolution, which ones to keep."""


class SparseFeatureGrid(nn.Module):
    """Levels of detail ``0..L-1`` at resolutions ``base_resolution * 2**l``, features summed over levels."""

    def __init__(
        self,
        base_resolution: int,
        num_levels: int,
        store_factory: StoreFactory,
        dense_resolution: int,
        shell_lod: Optional[int] = None,
    ) -> None:
        """Levels up to ``dense_resolution`` start dense; finer levels start empty until :meth:`prune` grows them.

        ``shell_lod``: levels finer than it hold cells only in the inner cube :data:`INNER_CUBE` (in contracted
        space, the scene box), and points outside it are looked up at most at that level (:meth:`lod_at`); None:
        every level everywhere."""
        super().__init__()
        if num_levels < 1:
            raise ValueError(f"the grid needs at least one level of detail, got num_levels={num_levels}")
        if base_resolution < 1:
            raise ValueError(f"base_resolution must be >= 1, got {base_resolution}")
        if shell_lod is not None and not 0 <= shell_lod < num_levels:
            raise ValueError(f"shell_lod must be a level of detail in 0..{num_levels - 1}, got {shell_lod}")
        self.shell_lod = shell_lod
        self.resolutions: List[int] = [base_resolution * 2**level for level in range(num_levels)]
        levels = []
        for level, resolution in enumerate(self.resolutions):
            cells = torch.arange(resolution**3) if resolution <= dense_resolution else torch.empty(0, dtype=torch.long)
            cells = cells[self._allowed(cells, level)]
            corners = cell_vertex_ids(cells, resolution)
            num_vertices = vertex_rows(corners, (resolution + 1) ** 3)[0].numel() if cells.numel() else 0
            levels.append(GridLevel(resolution, store_factory(level, num_vertices), cells))
        self.levels = nn.ModuleList(levels)
        self.register_buffer("pruned_flag", torch.zeros((), dtype=torch.bool))
        self._pruned = False  # pruned_flag on the host: reading a CUDA buffer every step would wait for the GPU
        self.register_load_state_dict_post_hook(lambda module, _: setattr(module, "_pruned", bool(module.pruned_flag)))
        self.register_buffer("level_resolutions", torch.tensor(self.resolutions), persistent=False)
        grid_cells = torch.tensor([0] + [resolution**3 for resolution in self.resolutions[:-1]])
        self.register_buffer("level_key_offsets", torch.cumsum(grid_cells, dim=0), persistent=False)
        """Added to a level's linear cell ids, these make the levels' sorted cells, concatenated, sorted keys."""
        self.fused = True
        """Interpolate with the fused GPU kernel on CUDA tensors when Triton imports (else the PyTorch path)."""
        self._topology_cache: Dict[str, Tuple[Tuple, Tensor]] = {}
        self.preparation_graph = CapturedWork()
        """Prepares a step's held codebooks, indices and tables in one CUDA graph replay on the GPU
        (:meth:`indices_once`; two graphs: a training step's and a render's)."""

    @property
    def pruned(self) -> bool:
        """Whether :meth:`prune` has run (the topology then reflects the scene, not the initial box)."""
        return self._pruned

    @property
    def num_levels(self) -> int:
        return len(self.levels)

    @property
    def feature_dim(self) -> int:
        return self.levels[0].features.feature_dim

    def grown_levels(self) -> int:
        """Number of leading levels that hold cells (the finest usable level of detail + 1)."""
        count = 0
        for level in self.levels:
            if level.cells.numel() == 0:
                break
            count += 1
        return count

    def _find(self, unit_positions: Float[Tensor, "*b 3"], levels: Int[Tensor, "*b"]) -> Int[Tensor, "*b"]:
        """Row of each point's cell at ``levels`` (broadcast against the points) among the levels' cells concatenated
        coarse to fine, as int32 (-1: unoccupied, or outside the unit cube).

        One binary search for all: each level's linear cell ids are offset by the sizes of the coarser levels'
        grids (:attr:`level_key_offsets`), which makes the concatenated cells one sorted list."""
        grown = self.grown_levels()
        if grown == 0:
            raise RuntimeError("the sparse grid has no occupied cells at its coarsest level")
        resolutions = self.level_resolutions[levels]
        scaled = unit_positions * resolutions[..., None].to(unit_positions.dtype)
        coords = torch.minimum(scaled.floor().long().clamp_min_(0), resolutions[..., None] - 1)
        found = sorted_positions(self._cell_keys(), linear_ids(coords, resolutions) + self.level_key_offsets[levels])
        return torch.where(in_unit_cube(unit_positions), found, -1).to(torch.int32)

    def _cell_keys(self) -> Int[Tensor, "m"]:
        """The grown levels' sorted cells, each level's offset by :attr:`level_key_offsets`, concatenated: one sorted
        list (cached until the topology changes)."""
        levels = self.levels[: self.grown_levels()]
        offsets = self.level_key_offsets
        return self._topology_cached(
            "cell_keys", lambda: torch.cat([level.cells + offset for level, offset in zip(levels, offsets)])
        )

    def locate(self, unit_positions: Float[Tensor, "n 3"], num_levels: Optional[int] = None) -> Int[Tensor, "n l"]:
        """Each point's occupied cell at levels ``0..num_levels-1`` (default and at most: the grown levels), as an
        int32 row of the levels' cells concatenated coarse to fine (-1: unoccupied, or outside the unit cube)."""
        grown = self.grown_levels()
        count = grown if num_levels is None else min(num_levels, grown)
        if self.fused and count > 0 and cell_lookup.available(unit_positions):
            return cell_lookup.locate(unit_positions, self._cell_keys(), self.resolutions[0], count)
        levels = torch.arange(max(count, 1), device=unit_positions.device)[None, :]
        return self._find(unit_positions[:, None, :], levels)[:, :count]

    @staticmethod
    def occupied(located: Int[Tensor, "*b l"], lod: Int[Tensor, "*b"]) -> Bool[Tensor, "*b"]:
        """Whether each point's cell at its level of detail is occupied, given its cells from :meth:`locate`
        (``lod`` may be an expanded view)."""
        return located.gather(-1, lod[..., None]).squeeze(-1) >= 0

    def forward(
        self,
        unit_positions: Float[Tensor, "n 3"],
        lod: Optional[Int[Tensor, "n"]] = None,
        located: Optional[Int[Tensor, "n l"]] = None,
    ) -> Tuple[Float[Tensor, "n k"], Bool[Tensor, "n"]]:
        """Features summed over levels ``<= lod`` (per point; default: the finest located level) and occupancy.

        ``located``: the points' cells from :meth:`locate` (found here if not given); ``lod`` is clamped to its
        levels. A point is inside when its cell is occupied at its finest used level.
        """
        if located is None:
            located = self.locate(unit_positions)
        max_level = located.shape[1] - 1
        if lod is None:
            lod = torch.full(unit_positions.shape[:1], max_level, dtype=torch.long, device=unit_positions.device)
        lod = self.lod_at(unit_positions, lod).clamp(0, max_level)
        inside = self.occupied(located, lod)
        if self.fused and grid_interpolation.available(unit_positions, self.feature_dim, max_level + 1):
            return self._fused_forward(unit_positions, lod, located), inside
        features = torch.zeros(unit_positions.shape[0], self.feature_dim, device=unit_positions.device)
        cells_before = 0
        for index in range(int(lod.max()) + 1 if lod.numel() else 0):
            level, cell = self.levels[index], located[:, index]
            level_features = level(unit_positions, torch.where(cell >= 0, cell - cells_before, cell))
            features = features + level_features * (lod >= index)[:, None].to(level_features.dtype)
            cells_before += level.cells.numel()
        return features, inside

    def _fused_forward(
        self, unit_positions: Float[Tensor, "n 3"], lod: Int[Tensor, "n"], located: Int[Tensor, "n l"]
    ) -> Float[Tensor, "n k"]:
        """:meth:`forward`'s features by one fused kernel over the located levels (their tables concatenated)."""
        levels = self.levels[: located.shape[1]]
        corner_rows = self._topology_cached(f"corner_rows{len(levels)}", lambda: self._concatenated_corner_rows(levels))
        tables = torch.cat([level.features.table() for level in levels])
        return grid_interpolation.fused_interpolation(
            tables, unit_positions, lod, located, corner_rows, self.resolutions[0]
        )

    @staticmethod
    def _concatenated_corner_rows(levels: Sequence[GridLevel]) -> Int[Tensor, "c 8"]:
        """The levels' corner rows, each level's offset by the rows of the levels before it (rows of the levels'
        feature tables concatenated)."""
        corner_rows, rows_before = [], 0
        for level in levels:
            corner_rows.append(level.corner_rows + rows_before)
            rows_before += level.features.num_rows
        return torch.cat(corner_rows)

    def _topology_cached(self, name: str, build: Callable[[], Tensor]) -> Tensor:
        """``build()``, kept until the topology, the levels' row counts or the device change (tables derived from the
        topology, built once instead of at every lookup)."""
        key = (
            self.levels[0].cells.device,
            *(level.topology_version for level in self.levels),
            *(level.features.num_rows for level in self.levels),
        )
        cached = self._topology_cache.get(name)
        if cached is None or cached[0] != key:
            cached = self._topology_cache[name] = (key, build())
        return cached[1]

    @contextmanager
    def indices_once(self) -> Iterator[None]:
        """Within this block each level derives its hard indices (and rate) from its logits once, however many
        lookups read them (:meth:`FeatureStore.hold_indices`): the parameters must not change inside it. What can be
        derived up front is, by one replay of :attr:`preparation_graph` on the GPU
        (:func:`~vqad_nerfstudio.encodings.vertex_features.prepare_held_steps`)."""
        held = [level.features for level in self.levels]
        for store in held:
            store.hold_indices(True)
        prepare_held_steps(held, self.preparation_graph)
        try:
            yield
        finally:
            for store in held:
                store.hold_indices(False)

    def index_bits_per_row(self, stores: Sequence[FeatureStore]) -> Float[Tensor, ""]:
        """The summed :meth:`~vqad_nerfstudio.encodings.vertex_features.CodebookFeatures.index_rate_bits` of
        ``stores`` (this grid's, with learned indices and rows) over their rows, as a rate term weighs it."""
        return torch.stack([store.index_rate_bits() for store in stores]).sum() / sum(s.num_rows for s in stores)

    def occupancy_bits(self) -> UInt8[Tensor, "v"]:
        """Per voxel of the finest level (row-major linear ids), bit ``l`` set where level ``l`` holds the voxel's
        cell: one read answers :meth:`inside` at any level of detail. Derived from the topology and cached until it
        changes (the finest level's resolution cubed bytes, 16 MiB at 256)."""
        return self._topology_cached("occupancy_bits", self._build_occupancy_bits)

    def _build_occupancy_bits(self) -> UInt8[Tensor, "v"]:
        finest = self.resolutions[-1]
        bits = torch.zeros(finest, finest, finest, dtype=torch.uint8, device=self.levels[0].cells.device)
        for index, level in enumerate(self.levels):
            if level.cells.numel() == 0:
                continue
            resolution, repeat = level.resolution, finest // level.resolution
            occupied = torch.zeros(resolution**3, dtype=torch.uint8, device=bits.device)
            occupied[level.cells] = 1 << index
            occupied = occupied.reshape(resolution, 1, resolution, 1, resolution, 1)
            bits |= occupied.expand(-1, repeat, -1, repeat, -1, repeat).reshape(finest, finest, finest)
        return bits.reshape(-1)

    def inside(self, unit_positions: Float[Tensor, "n 3"], lod: Union[int, Int[Tensor, "n"]]) -> Bool[Tensor, "n"]:
        """Occupancy of each point at its own level of detail (or at ``lod`` for all, clamped to the grown levels),
        as :meth:`forward` reports it: one read of :meth:`occupancy_bits` per point (no feature lookups).

        The finest voxel holding a point lies in the point's cell at every coarser level: the resolutions differ by
        powers of two, so ``floor(p * R * 2**k) >> k == floor(p * R)`` exactly in floating point."""
        grown = self.grown_levels()
        if grown == 0:
            raise RuntimeError("the sparse grid has no occupied cells at its coarsest level")
        bits = self.occupancy_bits()[voxel_ids(unit_positions, self.resolutions[-1])].long()
        lod = self.lod_at(unit_positions, torch.as_tensor(lod, device=unit_positions.device)).clamp(0, grown - 1)
        return in_unit_cube(unit_positions) & ((bits >> lod) & 1).bool()

    def _allowed(self, cells: Int[Tensor, "n"], level: int) -> Bool[Tensor, "n"]:
        """Which ``cells`` (linear ids at ``level``) the level may hold: all, or above ``shell_lod`` those whose centre
        lies in the inner cube."""
        if self.shell_lod is None or level <= self.shell_lod:
            return torch.ones_like(cells, dtype=torch.bool)
        resolution = self.resolutions[level]
        return in_inner_cube((coords_of(cells, resolution).float() + 0.5) / resolution)

    def lod_at(self, unit_positions: Float[Tensor, "n 3"], lod: Int[Tensor, "*n"]) -> Int[Tensor, "n"]:
        """Each point's level of detail under ``shell_lod``: ``lod`` inside the inner cube, at most ``shell_lod``
        outside it."""
        if self.shell_lod is None:
            return lod
        return torch.where(in_inner_cube(unit_positions), lod, torch.clamp(lod, max=self.shell_lod))

    def prune(self, keep: CellFilter) -> List[RowRemap]:
        """Keep the cells ``keep`` accepts and their neighbours, level by level from coarse to fine.

        Levels that hold no cells yet are grown: their candidates are the children of the parent
        level's kept cells. Returns the row remaps of the levels that changed, for the optimisers. Where ``keep``
        accepts no cell of the coarsest level (a field with no density yet), the grid stays as it is: an empty grid
        would render nothing and could not train back.
        """
        changed = []
        parent: Optional[Tensor] = None
        for index, level in enumerate(self.levels):
            if level.cells.numel():
                candidates = level.cells
            elif parent is not None:
                candidates = child_cells(parent, level.resolution // 2)
            else:
                break
            kept = candidates[keep(candidates, level.resolution)]
            if parent is None and kept.numel() == 0:
                return changed
            new_cells = candidates[torch.isin(candidates, neighbourhood(kept, level.resolution))]
            if parent is not None:  # keep the octree nested
                parents_of_new = linear_ids(coords_of(new_cells, level.resolution) // 2, level.resolution // 2)
                new_cells = new_cells[torch.isin(parents_of_new, parent)]
            new_cells = new_cells[self._allowed(new_cells, index)]
            if not torch.equal(new_cells, level.cells):
                changed.append(level.set_cells(new_cells))
            parent = new_cells
        self.pruned_flag.fill_(True)
        self._pruned = True
        return changed

    def occupied_vertices(self) -> Sequence[int]:
        """Number of vertices (rows carrying an index) per level."""
        return [level.num_vertices for level in self.levels]
