"""VQAD models as VQNF files: a model's chunks from coarse to fine, and a model rebuilt from them.

The header names the method, the model settings needed to rebuild it, the scene box and the
number of levels stored. The decoder MLPs come first (``MLPS`` in fp16, or ``MLPQ`` quantised),
then each level of detail in order: its topology (``TOPO``), and either its codebook (``CBOK`` in fp16, or
``CBKQ`` quantised in files that require ``quantized_codebooks``) and codebook indices (``IDXE`` range-coded,
``IDXN`` range-coded with their grid neighbours as context in files that require ``neighbour_indices``, or ``IDXR``
bit-packed) or its float features (``FEAT``); in files that require ``float_rows``, then the vertices kept in float
(``FROW``).
Any prefix of a file that ends on a chunk boundary decodes to the complete levels it holds. The
byte layout is specified in ``docs/format.md``.

Per-vertex data are stored in the level's row order: ascending vertex ids, i.e. row-major order of
the vertex coordinates, so consecutive rows are mostly z-neighbours, which the entropy coder's
previous-symbol context uses. Morton (z-order) was measured as the alternative and codes worse: on
three demo-scene models (12 levels), the entropy of an index given the previous one is lower in
row-major order in every level, and on the one level large enough for that context to pay for its
tables (66k vertices), row-major order codes to 32,029 bytes, Morton order to 32,342 (order 0).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, List, Literal, Optional, Tuple, Union, get_args, get_origin, get_type_hints

import numpy as np
import torch
from torch import Tensor, nn

from vqad_nerfstudio.codec import (
    Chunk,
    Container,
    FormatError,
    TruncatedError,
    UnsupportedMethodError,
    check_requirements,
    decode_named_arrays,
    decode_neighbour_indices,
    encode_array,
    encode_categorical,
    encode_named_arrays,
    encode_neighbour_indices,
    pack_bits,
    read_container,
    unpack_bits,
)
from vqad_nerfstudio.codec.container import Source
from vqad_nerfstudio.encodings.sparse_grid import GridLevel, coords_of
from vqad_nerfstudio.encodings.vertex_features import CodebookFeatures, FloatFeatures
from vqad_nerfstudio.export.payloads import (
    encode_quantized_parameters,
    fp16_array,
    fp16_tensor,
    load_fp16_array,
    load_parameters,
    load_quantized_parameters,
    parameters_chunk,
    parse_aabb,
)
from vqad_nerfstudio.export.symbols import decode_symbols
from vqad_nerfstudio.export.topology import (
    decode_base_cells,
    decode_child_masks,
    encode_base_cells,
    encode_child_masks,
)
from vqad_nerfstudio.models.limits import MAX_DECODED_CELLS
from vqad_nerfstudio.progress import track
from vqad_nerfstudio.rounding import check_weight_bits

if TYPE_CHECKING:
    from vqad_nerfstudio.models.vqad import VQADModel, VQADModelConfig

__all__ = [
    "IndexCoding",
    "VQAD_METHODS",
    "LevelStats",
    "EncodedModel",
    "DecodeInfo",
    "IncompleteFileWarning",
    "MODEL_KEYS",
    "encode_model",
    "load_compressed",
]

IndexCoding = Literal["entropy", "raw"]

VQAD_METHODS = ("vqad", "vqad-float")

TAG_MLPS = "MLPS"
TAG_MLPQ = "MLPQ"
DECODER_TAGS = (TAG_MLPS, TAG_MLPQ)
"""The decoder MLPs' chunk: fp16 weights, or quantised ones."""
TAG_TOPO = "TOPO"
TAG_CBOK = "CBOK"
TAG_CBKQ = "CBKQ"
CODEBOOK_TAGS = (TAG_CBOK, TAG_CBKQ)
"""A codebook level's codebook: fp16, or quantised; one per level."""
CODEBOOK_NAME = "codebook"
"""The one matrix of a ``CBKQ`` payload: the codebook transposed, ``(k, 2^b)``, so that each feature channel is a row
with its own scale."""
TAG_IDXE = "IDXE"
TAG_IDXN = "IDXN"
TAG_IDXR = "IDXR"
INDEX_TAGS = (TAG_IDXE, TAG_IDXN, TAG_IDXR)
"""A codebook level's indices: range-coded (order 0 or previous symbol), range-coded with the grid neighbours as
context, or bit-packed; one per level."""
TAG_FEAT = "FEAT"
TAG_FROW = "FROW"
_LEVEL_TAGS = (TAG_TOPO, *CODEBOOK_TAGS, *INDEX_TAGS, TAG_FEAT, TAG_FROW)

MODEL_KEYS = (
    "index_bits",
    "num_levels",
    "base_resolution",
    "feature_dim",
    "feature_store",
    "hidden_dim",
    "num_samples",
    "unbounded",
    "background_color",
)
"""The VQADModelConfig fields a file stores: everything that shapes the model or its renders."""
SHELL_LOD_KEY = "shell_lod"
"""The optional model key (and the requirement it comes with) of a file whose background is capped at a level of
detail (VQADModelConfig.shell_lod): files with it are version 2.0."""
BASE_INDEX_BITS_KEY = "base_index_bits"
"""The optional model key (and the requirement it comes with) of a file whose level 0 has its own index width
(VQADModelConfig.base_index_bits): files with it are version 2.0."""
ALPHA_THRESHOLD_KEY = "alpha_threshold"
"""The optional model key (and the requirement it comes with) of a file whose renders skip samples below an opacity
(VQADModelConfig.alpha_threshold, written when it is not 0): files with it are version 2.0; files without it render
every sample."""
FLOAT_ROWS_REQUIREMENT = "float_rows"
"""The requirement of a file whose vertices may read fp16 features instead of their codewords (VQADModelConfig.
float_vertex_fraction): every level has a FROW chunk, and the file is version 2.0."""
NEIGHBOUR_INDICES_REQUIREMENT = "neighbour_indices"
"""The requirement of a file with ``IDXN`` chunks (indices coded with their grid neighbours as context): version
2.0. Writers use ``IDXN`` for a level only where it is shorter than ``IDXE``."""
QUANTIZED_CODEBOOKS_REQUIREMENT = "quantized_codebooks"
"""The requirement of a file with ``CBKQ`` chunks (codebooks rounded to 2..8 bits per value and range-coded,
VQADModelConfig.codebook_bits): version 2.0."""
KNOWN_REQUIREMENTS = (
    SHELL_LOD_KEY,
    BASE_INDEX_BITS_KEY,
    ALPHA_THRESHOLD_KEY,
    FLOAT_ROWS_REQUIREMENT,
    NEIGHBOUR_INDICES_REQUIREMENT,
    QUANTIZED_CODEBOOKS_REQUIREMENT,
)
"""What this reader implements of a version 2.0 file's ``requires``."""
_TAG_REQUIREMENTS = {
    TAG_FROW: FLOAT_ROWS_REQUIREMENT,
    TAG_IDXN: NEIGHBOUR_INDICES_REQUIREMENT,
    TAG_CBKQ: QUANTIZED_CODEBOOKS_REQUIREMENT,
}
"""Level chunks that only files requiring a feature may hold."""
LEGACY_BITS_KEY = "bits"
"""What files written before the rename call ``index_bits`` (docs/format.md); readers accept either."""


class IncompleteFileWarning(UserWarning):
    """A truncated file was decoded: only the levels of detail it holds completely are used."""


@dataclass(frozen=True)
class LevelStats:
    """What one level of detail holds, and what its rows would take in each representation."""

    lod: int
    resolution: int
    cells: int
    vertices: int
    raw_index_bytes: Optional[int]
    """Indices bit-packed at b bits each (None for a float store)."""
    entropy_index_bytes: Optional[int]
    """Indices range-coded (None for a float store)."""
    float_grid_bytes: int
    """The coded part stored as plain floats instead, as the method's float reference does (for VQAD: an fp16
    feature vector per vertex)."""


@dataclass(frozen=True)
class EncodedModel:
    """A file's header and chunks, with per-level statistics for size reports."""

    header: Dict[str, Any]
    chunks: List[Chunk]
    levels: List[LevelStats]


@dataclass(frozen=True)
class DecodeInfo:
    """What a decoded file held."""

    method: str
    levels_stored: int
    """Levels of detail the producer wrote."""
    levels_decoded: int
    """Levels of detail in the decoded model (fewer when the file is truncated or ``max_lod`` is set)."""
    complete: bool
    """Whether the file ended with its end marker."""
    bytes_read: int
    """Bytes up to the end of the last complete chunk."""


# ------------------------------------------------------------------------------------------- shared
def _decoder_parameters(model: "VQADModel") -> Dict[str, Tensor]:
    """The decoder MLPs' parameters, named as in the MLPS and MLPQ chunks."""
    decoders = nn.ModuleDict({"density_mlp": model.field.density_mlp, "color_mlp": model.field.color_mlp})
    return dict(decoders.named_parameters())


def _check_method(method: str) -> None:
    if method not in VQAD_METHODS:
        names = ", ".join(VQAD_METHODS)
        raise UnsupportedMethodError(f"unknown method {method!r}; VQAD files hold the methods {names}")


# ----------------------------------------------------------------------------------------- encoding
def encode_model(
    model: "VQADModel",
    method: Optional[str] = None,
    index_coding: IndexCoding = "entropy",
    network_bits: Optional[int] = None,
    codebook_bits: Optional[int] = None,
) -> EncodedModel:
    """Header, chunks and per-level statistics of a trained model.

    ``method`` is the nerfstudio method name stored in the header (default: ``vqad`` for a codebook
    store, ``vqad-float`` for a float store). ``index_coding="entropy"`` writes IDXE chunks (or
    IDXR where bit packing is strictly shorter, e.g. for a tiny level); ``"raw"`` writes IDXR
    chunks only. Both sizes are measured either way. ``network_bits`` in 2..8 stores the decoder MLPs'
    matrices quantised to that many bits per weight (``MLPQ``) instead of fp16 (``MLPS``); default: the model's
    ``network_bits`` (what it trained with). ``codebook_bits`` in 2..8 stores every level's codebook rounded to that
    many bits per value (``CBKQ``), 16 in fp16 (``CBOK``); default: each level's own (what it trained with).
    """
    if index_coding not in get_args(IndexCoding):
        raise ValueError(f"index_coding must be 'entropy' or 'raw', got {index_coding!r}")
    from vqad_nerfstudio.models.vqad import VQADModel

    if not isinstance(model, VQADModel):
        raise UnsupportedMethodError(f"{type(model).__name__} is not a VQAD model (vqad, vqad-float)")
    config = model.config
    network_bits = config.network_bits if network_bits is None else network_bits
    check_weight_bits("network_bits", network_bits)
    if codebook_bits is not None:
        check_weight_bits("codebook_bits", codebook_bits)
        if codebook_bits != 16 and config.feature_store != "codebook":
            raise ValueError("codebook_bits: a float-feature model (vqad-float) has no codebooks")
    method = method or ("vqad" if config.feature_store == "codebook" else "vqad-float")
    _check_method(method)
    grid = model.grid
    levels = grid.grown_levels()
    if levels == 0:
        raise ValueError("the model's grid has no occupied cells; there is nothing to export")
    aabb = model.scene_box.aabb.detach().cpu().to(torch.float32)
    header = {
        "method": method,
        "model": {key: getattr(config, key) for key in MODEL_KEYS} | {"unbounded": bool(config.unbounded)},
        "aabb": aabb.tolist(),
        "levels": levels,
    }
    requires = []
    if config.background_lod is not None:  # a reader must cap the background's level of detail: version 2.0
        header["model"][SHELL_LOD_KEY] = config.background_lod
        requires.append(SHELL_LOD_KEY)
    if config.level_index_bits(0) != config.index_bits:  # level 0's indices and codebook have their own width
        header["model"][BASE_INDEX_BITS_KEY] = config.level_index_bits(0)
        requires.append(BASE_INDEX_BITS_KEY)
    if config.skipped_alpha > 0:  # a reader must skip the same samples to render what was trained
        header["model"][ALPHA_THRESHOLD_KEY] = config.skipped_alpha
        requires.append(ALPHA_THRESHOLD_KEY)
    float_rows = any(getattr(level.features, "has_float_rows", False) for level in grid.levels[:levels])
    if float_rows:  # a reader must replace those vertices' codewords
        requires.append(FLOAT_ROWS_REQUIREMENT)
    chunks = [parameters_chunk(_decoder_parameters(model), network_bits, DECODER_TAGS, None)]
    stats = []
    for lod in track(range(levels), "Encoding levels of detail"):
        level_chunks, level_stats = _encode_level(grid.levels, lod, index_coding, float_rows, codebook_bits)
        chunks += level_chunks
        stats.append(level_stats)
    if any(chunk.tag == TAG_IDXN for chunk in chunks):  # a reader must know the neighbour-context code
        requires.append(NEIGHBOUR_INDICES_REQUIREMENT)
    if any(chunk.tag == TAG_CBKQ for chunk in chunks):
        requires.append(QUANTIZED_CODEBOOKS_REQUIREMENT)
    if requires:
        header["requires"] = requires
    return EncodedModel(header, chunks, stats)


def _encode_level(
    levels: nn.ModuleList, lod: int, index_coding: IndexCoding, float_rows: bool, codebook_bits: Optional[int]
) -> Tuple[List[Chunk], LevelStats]:
    """A level's chunks and statistics; ``float_rows``: the file holds float rows, so every level gets FROW;
    ``codebook_bits``: see :func:`encode_model`."""
    level: GridLevel = levels[lod]
    if lod == 0:
        topology = encode_base_cells(level.cells, level.resolution)
    else:
        topology = encode_child_masks(level.cells, level.resolution, levels[lod - 1].cells)
    chunks = [Chunk(TAG_TOPO, lod, topology)]
    store = level.features
    raw_bytes = entropy_bytes = None
    if isinstance(store, CodebookFeatures):
        if store.in_float_warmup:
            raise ValueError(
                f"level {lod} is still in its float warm-up (before step index_warmup_steps), so it has no "
                "trained indices yet: export a checkpoint from after the warm-up"
            )
        indices = store.hard_indices().cpu().numpy()
        raw = pack_bits(indices, store.index_bits)
        coords = _vertex_coords(level)
        candidates = [
            Chunk(TAG_IDXE, lod, encode_categorical(indices, 2**store.index_bits, context="auto")),
            Chunk(TAG_IDXN, lod, encode_neighbour_indices(indices, 2**store.index_bits, coords)),
        ]
        coded = min(candidates, key=lambda chunk: len(chunk.payload))  # IDXE where they tie
        raw_bytes, entropy_bytes = len(raw), len(coded.payload)
        chunks.append(_codebook_chunk(store, lod, store.codebook_bits if codebook_bits is None else codebook_bits))
        chunks.append(coded if index_coding == "entropy" and entropy_bytes <= raw_bytes else Chunk(TAG_IDXR, lod, raw))
        if float_rows:
            chunks.append(Chunk(TAG_FROW, lod, _encode_float_rows(store, f"level {lod} float rows")))
    elif isinstance(store, FloatFeatures):
        chunks.append(Chunk(TAG_FEAT, lod, encode_array(fp16_array(store.features, f"level {lod} features"))))
    else:
        raise TypeError(f"level {lod}: cannot encode a {type(store).__name__}")
    stats = LevelStats(
        lod=lod,
        resolution=level.resolution,
        cells=int(level.cells.numel()),
        vertices=level.num_vertices,
        raw_index_bytes=raw_bytes,
        entropy_index_bytes=entropy_bytes,
        float_grid_bytes=level.num_vertices * store.feature_dim * 2,
    )
    return chunks, stats


def _codebook_chunk(store: CodebookFeatures, lod: int, bits: Optional[int]) -> Chunk:
    """``CBKQ`` at ``bits`` 2..8 (the rounding the store trains with at its own bits, so decoded = trained), else
    ``CBOK``."""
    if bits is None or bits == 16:
        return Chunk(TAG_CBOK, lod, encode_array(fp16_array(store.codebook, f"level {lod} codebook")))
    return Chunk(TAG_CBKQ, lod, encode_quantized_parameters({CODEBOOK_NAME: store.codebook.detach().t()}, bits))


def _vertex_coords(level: GridLevel) -> np.ndarray:
    """``[m, 3]``: the level's vertex coordinates ``(x, y, z)`` in row order, the context of ``IDXN``."""
    return coords_of(level.vertex_ids, level.resolution + 1).cpu().numpy()


def _encode_float_rows(store: CodebookFeatures, what: str) -> bytes:
    """FROW payload: which rows are float (a range-coded 0/1 flag per row) and their fp16 features in row order."""
    if store.has_float_rows:
        kept, features = store.float_rows.cpu(), store.float_features.detach().cpu()[store.float_rows.cpu()]
    else:
        kept, features = torch.zeros(store.num_rows, dtype=torch.bool), torch.zeros(0, store.feature_dim)
    flags = encode_categorical(kept.numpy().astype(np.uint8), 2, context="auto")
    return encode_named_arrays({"rows": np.frombuffer(flags, np.uint8), "features": fp16_array(features, what)})


def _decode_float_rows(payload: bytes, rows: int, feature_dim: int, what: str) -> Tuple[Tensor, Tensor]:
    """Inverse of :func:`_encode_float_rows` for a level of ``rows`` rows: the flags and the kept rows' features."""
    arrays = decode_named_arrays(payload)
    if list(arrays) != ["rows", "features"] or arrays["rows"].dtype != np.uint8:
        raise FormatError(f"{what}: expected the arrays rows (uint8) and features, got {list(arrays)}")
    flags = decode_symbols(arrays["rows"].tobytes(), rows, 2, what).astype(bool)
    shape = (int(flags.sum()), feature_dim)
    return torch.from_numpy(flags), fp16_tensor(arrays["features"], shape, what)


# ----------------------------------------------------------------------------------------- decoding
def load_compressed(
    source: Source, allow_truncated: bool = True, max_lod: Optional[int] = None
) -> Tuple["VQADModel", DecodeInfo]:
    """Rebuild a model (on the CPU, in eval mode) from a VQNF file's path or bytes.

    A truncated file decodes to the levels of detail it holds completely (with an
    :class:`IncompleteFileWarning`) unless ``allow_truncated`` is False; ``max_lod`` keeps at most
    levels ``0..max_lod``. Levels not decoded are left without cells. Raises the codec's errors
    (all :class:`~vqad_nerfstudio.codec.CodecError`) for damaged or foreign files, and
    :class:`~vqad_nerfstudio.export.methods.UnsupportedMethodError` for a method it does not know.
    """
    if max_lod is not None and max_lod < 0:
        raise ValueError(f"max_lod must be >= 0, got {max_lod}")
    container = read_container(source, allow_truncated=allow_truncated)
    method, config, aabb, levels = _parse_header(container.header)
    requires = container.header.get("requires", [])
    decoders, parts = _group_chunks(container, levels)
    complete_levels = _count_complete_levels(container, parts, config.feature_store, requires)
    if decoders is None or complete_levels == 0:
        missing = "the decoder weights (MLPS or MLPQ)" if decoders is None else "level of detail 0"
        raise TruncatedError(f"file truncated after {container.bytes_read} bytes, before {missing} is complete")
    decoded = complete_levels if max_lod is None else min(complete_levels, max_lod + 1)

    from nerfstudio.data.scene_box import SceneBox

    model: "VQADModel" = config.setup(scene_box=SceneBox(aabb=aabb), num_train_data=1)
    _load_decoders(model, decoders)
    cells_left = MAX_DECODED_CELLS
    for lod, level in enumerate(track(model.grid.levels, "Decoding levels of detail")):
        if lod < decoded:
            cells_left -= _decode_level(model, lod, parts[lod], cells_left)
        else:
            level.set_cells(torch.empty(0, dtype=torch.long), in_place=True)
    model.cap_lod_slider()
    model.eval()
    if not container.complete:
        warnings.warn(
            f"compressed file truncated after {container.bytes_read} bytes: decoded levels of detail "
            f"0..{decoded - 1} of the {levels} it stores",
            IncompleteFileWarning,
            stacklevel=2,
        )
    return model, DecodeInfo(method, levels, decoded, container.complete, container.bytes_read)


def _parse_header(header: Dict[str, Any]) -> Tuple[str, "VQADModelConfig", Tensor, int]:
    """Method, model config (other settings at their defaults, no dense initial levels, frozen indices), scene box,
    level count."""
    from vqad_nerfstudio.models.vqad import VQADModelConfig

    check_requirements(header, KNOWN_REQUIREMENTS)
    missing = [key for key in ("method", "model", "aabb", "levels") if key not in header]
    if missing:
        raise FormatError(f"header lacks {', '.join(missing)}")
    method = header["method"]
    if not isinstance(method, str):
        raise FormatError(f"header: method must be a string, got {method!r}")
    _check_method(method)
    stored = header["model"]
    if not isinstance(stored, dict):
        raise FormatError(f"header: model must be an object, got {stored!r}")
    hints = get_type_hints(VQADModelConfig)
    if LEGACY_BITS_KEY in stored and "index_bits" not in stored:  # files written before the rename
        stored = {("index_bits" if key == LEGACY_BITS_KEY else key): value for key, value in stored.items()}
    settings = {}
    for key in MODEL_KEYS:
        if key not in stored:
            raise FormatError(f"header: model lacks {key!r}")
        value, hint = stored[key], hints[key]
        if get_origin(hint) is Union:  # Optional[X]: a file holds an X (unbounded: decided before any file exists)
            hint = next(arg for arg in get_args(hint) if arg is not type(None))
        valid = value in get_args(hint) if get_origin(hint) is Literal else type(value) is hint
        if not valid:
            raise FormatError(f"header: model.{key} = {value!r} is not a valid {hint}")
        settings[key] = value
    for key, kind in ((SHELL_LOD_KEY, int), (BASE_INDEX_BITS_KEY, int), (ALPHA_THRESHOLD_KEY, float)):
        if key in stored:
            if key not in header.get("requires", []):
                raise FormatError(f"header: model.{key} is set but not required")
            if type(stored[key]) is not kind:
                raise FormatError(f"header: model.{key} = {stored[key]!r} is not a valid {kind.__name__}")
            settings[key] = stored[key]
    # What a file without the key was written with (not today's defaults): every level everywhere, every sample.
    settings.setdefault(SHELL_LOD_KEY, -1)
    settings.setdefault(ALPHA_THRESHOLD_KEY, 0.0)
    try:
        # Decoded levels get their cells from the file (dense initial levels would only cost time), and hold their
        # indices as integers.
        config = VQADModelConfig(**settings, dense_resolution=0, frozen_indices=True)
    except ValueError as error:
        raise FormatError(f"header: invalid model settings: {error}") from None
    aabb = parse_aabb(header["aabb"])
    levels = header["levels"]
    if type(levels) is not int or not 1 <= levels <= config.num_levels:
        raise FormatError(f"header: levels must be an integer in 1..{config.num_levels}, got {levels!r}")
    return method, config, aabb, levels


def _group_chunks(container: Container, levels: int) -> Tuple[Optional[Chunk], List[Dict[str, bytes]]]:
    """The decoders' chunk (MLPS or MLPQ) and, per level, its payloads by tag. Unknown tags are skipped."""
    decoders = None
    parts: List[Dict[str, bytes]] = [{} for _ in range(levels)]
    for index, chunk in enumerate(container.chunks):
        if chunk.lod is None:
            if chunk.tag in DECODER_TAGS:
                if decoders is not None:
                    raise FormatError(f"chunk {index}: a second decoder chunk ({decoders.tag}, then {chunk.tag})")
                decoders = chunk
        elif chunk.tag in _LEVEL_TAGS:
            if chunk.lod >= levels:
                stored = f"levels 0..{levels - 1}"
                raise FormatError(f"chunk {index} {chunk.tag!r} has lod {chunk.lod}; the header stores {stored}")
            if chunk.tag in parts[chunk.lod]:
                raise FormatError(f"chunk {index}: a second {chunk.tag!r} chunk for lod {chunk.lod}")
            parts[chunk.lod][chunk.tag] = chunk.payload
    return decoders, parts


def _count_complete_levels(
    container: Container, parts: List[Dict[str, bytes]], feature_store: str, requires: List[str]
) -> int:
    """Leading levels that have all their chunks; in a complete file, every level must. A chunk that needs a
    requirement (:data:`_TAG_REQUIREMENTS`) only where ``requires`` lists it; with ``float_rows``, every level of a
    codebook model has a FROW chunk."""
    needed = (TAG_TOPO,) if feature_store == "codebook" else (TAG_TOPO, TAG_FEAT)
    if FLOAT_ROWS_REQUIREMENT in requires:
        if feature_store != "codebook":
            raise FormatError(f"a float-feature model has no float rows ({FLOAT_ROWS_REQUIREMENT})")
        needed += (TAG_FROW,)
    for lod, level_parts in enumerate(parts):
        for tag, requirement in _TAG_REQUIREMENTS.items():
            if tag in level_parts and requirement not in requires:
                raise FormatError(f"lod {lod} has a {tag} chunk, but the header does not require {requirement}")
        missing = [tag for tag in needed if tag not in level_parts]
        for kind, tags in (("codebook", CODEBOOK_TAGS), ("index", INDEX_TAGS)):
            present = [tag for tag in tags if tag in level_parts]
            if feature_store == "codebook":
                if len(present) > 1:
                    raise FormatError(f"lod {lod} has more than one {kind} chunk ({', '.join(present)})")
                if not present:
                    missing.append(" or ".join(tags))
            elif present:
                raise FormatError(f"lod {lod}: a float-feature model has no {present[0]} chunks")
        if missing:
            if container.complete:
                raise FormatError(f"lod {lod} lacks its {', '.join(missing)} chunk(s)")
            return lod
    return len(parts)


def _load_decoders(model: "VQADModel", chunk: Chunk) -> None:
    """The decoder weights; a model decoded from quantised ones keeps their bits (``network_bits``), so that it
    renders with them and exports them again unchanged."""
    if chunk.tag == TAG_MLPQ:
        model.config.network_bits = load_quantized_parameters(_decoder_parameters(model), chunk.payload, chunk.tag)
        model.round_decoder_weights()
    else:
        load_parameters(_decoder_parameters(model), chunk.payload, chunk.tag)


def _decode_codebook(store: CodebookFeatures, lod: int, parts: Dict[str, bytes]) -> Tensor:
    """Level ``lod``'s codebook; from ``CBKQ``, the store then rounds it to the chunk's bits (which leaves the
    decoded values as they are), as it trained."""
    shape = tuple(store.codebook.shape)
    if TAG_CBOK in parts:
        store.codebook_bits = None
        return load_fp16_array(parts[TAG_CBOK], shape, f"lod {lod} {TAG_CBOK}")
    channels = torch.empty(shape[::-1])
    store.codebook_bits = load_quantized_parameters({CODEBOOK_NAME: channels}, parts[TAG_CBKQ], f"lod {lod} {TAG_CBKQ}")
    return channels.t()


def _decode_level(model: "VQADModel", lod: int, parts: Dict[str, bytes], max_cells: int) -> int:
    """Decode level ``lod`` into ``model``, refusing more than ``max_cells`` cells; return the cells it counts
    against :data:`MAX_DECODED_CELLS` (level 0: its whole grid)."""
    grid = model.grid
    level: GridLevel = grid.levels[lod]
    try:
        if lod == 0:
            cells = decode_base_cells(parts[TAG_TOPO], level.resolution, max_cells)
        else:
            cells = decode_child_masks(parts[TAG_TOPO], level.resolution, grid.levels[lod - 1].cells, max_cells)
    except FormatError as error:
        raise FormatError(f"lod {lod} {TAG_TOPO}: {error}") from None
    level.set_cells(cells, in_place=True)
    store = level.features
    if isinstance(store, CodebookFeatures):
        codebook = _decode_codebook(store, lod, parts)
        model.config.codebook_bits = store.codebook_bits or 16  # what a checkpoint of the decoded model rebuilds
        if TAG_IDXE in parts:
            coded = decode_symbols(parts[TAG_IDXE], level.num_vertices, 2**store.index_bits, f"lod {lod} {TAG_IDXE}")
        elif TAG_IDXN in parts:
            coords = _vertex_coords(level)
            try:
                coded = decode_neighbour_indices(parts[TAG_IDXN], 2**store.index_bits, coords)
            except FormatError as error:
                raise FormatError(f"lod {lod} {TAG_IDXN}: {error}") from None
        else:
            coded = unpack_bits(parts[TAG_IDXR], store.index_bits, level.num_vertices)
        float_rows = float_features = None
        if TAG_FROW in parts:
            what = f"lod {lod} {TAG_FROW}"
            float_rows, float_features = _decode_float_rows(
                parts[TAG_FROW], level.num_vertices, store.feature_dim, what
            )
        store.load_codewords(codebook, torch.from_numpy(coded.astype(np.int64)), float_rows, float_features)
    else:
        shape = (level.num_vertices, store.feature_dim)
        store.load_features(load_fp16_array(parts[TAG_FEAT], shape, f"lod {lod} {TAG_FEAT}"))
    return level.resolution**3 if lod == 0 else int(cells.numel())
