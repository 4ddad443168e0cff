"""``vqad-hash`` and ``vqad-hash-random`` models <-> VQNF files (method payload in docs/format.md).

Chunks: ``NETS`` (every parameter except the learned encoding's codebooks and index logits, fp16,
as named arrays: nerfacto's MLPs, its proposal networks and, in random mode, the hash table) or
``NETQ`` (the same quantised to the model's ``network_bits``, each proposal grid as one row per level, the
position encoding's table in fp16), then
per level of the learned encoding its ``CBOK`` (fp16 codebook) and ``IDXE`` or ``IDXR`` (the b-bit
index entries, range-coded or bit-packed). All levels are needed to render (nerfacto concatenates
them), so a truncated file is refused rather than decoded to fewer levels.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List, Tuple

import numpy as np
import torch

from vqad_nerfstudio.codec import (
    Chunk,
    FormatError,
    check_requirements,
    encode_array,
    encode_categorical,
    pack_bits,
    unpack_bits,
)
from vqad_nerfstudio.codec.container import Source
from vqad_nerfstudio.export.payloads import (
    check_quantized_bits,
    fp16_array,
    load_fp16_array,
    load_parameters,
    load_quantized_parameters,
    parameters_chunk,
    parse_aabb,
    read_complete_container,
    require_quantized_bits,
)
from vqad_nerfstudio.export.symbols import decode_symbols
from vqad_nerfstudio.export.vqad_codec import (
    TAG_CBOK,
    TAG_IDXE,
    TAG_IDXR,
    DecodeInfo,
    EncodedModel,
    IndexCoding,
    LevelStats,
)
from vqad_nerfstudio.progress import track

if TYPE_CHECKING:
    from vqad_nerfstudio.models.learned_index_nerfacto import LearnedIndexNerfactoModel

TAG_NETS, TAG_NETQ = "NETS", "NETQ"
NETWORK_BITS_KEY = "network_bits"
"""Model key (and required feature) of a file whose networks are quantised (``NETQ``)."""
HASH_METHODS = ("vqad-hash", "vqad-hash-random")

MODEL_KEYS = (
    "index_mode",
    "log2_codebook_size",
    "index_table_size",
    "index_bits",
    "num_levels",
    "base_res",
    "max_res",
    "features_per_level",
    "hidden_dim",
    "hidden_dim_color",
    "appearance_embed_dim",
    "use_appearance_embedding",
    "background_color",
    "disable_scene_contraction",
    "num_proposal_samples_per_ray",
    "num_nerf_samples_per_ray",
    "num_proposal_iterations",
    "proposal_net_args_list",
    "use_same_proposal_network",
    "use_single_jitter",
    "near_plane",
    "far_plane",
)
"""The LearnedIndexNerfactoModelConfig fields a file stores: what shapes the model or its renders."""


def _net_parameters(model: "LearnedIndexNerfactoModel") -> Dict[str, torch.Tensor]:
    """Every parameter (each once, by its first name) except the learned encoding's codebooks and logits, and
    the training cameras' pose corrections (not part of the radiance field). Where the networks are quantised,
    each proposal network's hash table is a view of one row per level, the rows its rounding scales
    (rounded_table), and the field's own table ('random' mode: the position encoding) a flat fp16 vector."""
    from nerfstudio.field_components.encodings import HashEncoding

    encoding = model.encoding
    skip = set() if encoding.mode == "random" else {id(p) for p in (*encoding.codebooks, *encoding.index_logits)}
    skip |= {id(p) for p in model.camera_optimizer.parameters()}
    parameters = {name: p for name, p in model.named_parameters() if id(p) not in skip}
    if model.config.network_bits != 16:
        for name, module in model.named_modules():
            if isinstance(module, HashEncoding) and f"{name}.hash_table" in parameters:
                by_level = name.startswith("proposal_networks.")
                table = module.hash_table
                parameters[f"{name}.hash_table"] = table.view(module.num_levels, -1) if by_level else table.view(-1)
    return parameters


def encode_hash_model(
    model: "LearnedIndexNerfactoModel", method: str, index_coding: IndexCoding = "entropy"
) -> EncodedModel:
    """Header, chunks and per-level statistics of a trained vqad-hash or vqad-hash-random model."""
    if method not in HASH_METHODS:
        raise ValueError(f"method must be one of {', '.join(HASH_METHODS)}, got {method!r}")
    if any(getattr(module, "tcnn_encoding", None) is not None for module in model.modules()):
        raise ValueError(
            "this run's networks are tinycudann modules, whose parameter layout these files do not store (they hold "
            "PyTorch's); train with --pipeline.model.implementation torch to export it"
        )
    config, encoding = model.config, model.encoding
    header: Dict[str, Any] = {
        "method": method,
        "model": {key: getattr(config, key) for key in MODEL_KEYS},  # JSON writes tuples as arrays
        "aabb": model.scene_box.aabb.detach().cpu().to(torch.float32).tolist(),
        "levels": len(encoding.layouts),
    }
    require_quantized_bits(header, {NETWORK_BITS_KEY: config.network_bits})
    chunks = [parameters_chunk(_net_parameters(model), config.network_bits, (TAG_NETS, TAG_NETQ), None)]
    stats = []
    for level, layout in enumerate(track(encoding.layouts, "Encoding hash levels")):
        indices = encoding.hard_indices(level).cpu().numpy()
        raw = pack_bits(indices, encoding.index_bits)
        coded = encode_categorical(indices, 2**encoding.index_bits, context="auto")
        codebook = encoding.codebooks[level]
        chunks.append(Chunk(TAG_CBOK, level, encode_array(fp16_array(codebook, f"level {level} codebook"))))
        if index_coding == "entropy" and len(coded) <= len(raw):
            chunks.append(Chunk(TAG_IDXE, level, coded))
        else:
            chunks.append(Chunk(TAG_IDXR, level, raw))
        stats.append(
            LevelStats(
                lod=level,
                resolution=layout.resolution,
                cells=0,
                vertices=layout.rows,
                raw_index_bytes=len(raw),
                entropy_index_bytes=len(coded),
                float_grid_bytes=layout.rows * encoding.features_per_level * 2,
            )
        )
    return EncodedModel(header, chunks, stats)


def load_hash_compressed(source: Source) -> Tuple["LearnedIndexNerfactoModel", DecodeInfo]:
    """Rebuild a vqad-hash or vqad-hash-random model (CPU, eval mode) from a complete VQNF file."""
    container = read_complete_container(source, "every level of their encoding")
    method, config, aabb, levels = _parse_header(container.header)
    nets_tag = TAG_NETS if config.network_bits == 16 else TAG_NETQ
    nets, parts = _group_chunks(container.chunks, levels, config.index_mode, nets_tag)

    from nerfstudio.data.scene_box import SceneBox

    model: "LearnedIndexNerfactoModel" = config.setup(scene_box=SceneBox(aabb=aabb), num_train_data=1)
    if nets_tag == TAG_NETS:
        load_parameters(_net_parameters(model), nets, TAG_NETS)
    elif load_quantized_parameters(_net_parameters(model), nets, TAG_NETQ) != config.network_bits:
        raise FormatError(f"{TAG_NETQ}: its bits differ from the header's model.{NETWORK_BITS_KEY}")
    encoding = model.encoding
    for level, level_parts in enumerate(track(parts, "Decoding hash levels")):
        shape = tuple(encoding.codebooks[level].shape)
        codebook = load_fp16_array(level_parts[TAG_CBOK], shape, f"level {level} {TAG_CBOK}")
        rows, bits = encoding.layouts[level].rows, encoding.index_bits
        if TAG_IDXE in level_parts:
            indices = decode_symbols(level_parts[TAG_IDXE], rows, 2**bits, f"level {level} {TAG_IDXE}")
        else:
            indices = unpack_bits(level_parts[TAG_IDXR], bits, rows)
        encoding.load_codewords(level, codebook, torch.from_numpy(indices.astype(np.int64)))
    model.eval()
    return model, DecodeInfo(method, levels, levels, True, container.bytes_read)


def _parse_header(header: Dict[str, Any]) -> Tuple[str, Any, torch.Tensor, int]:
    from nerfstudio.cameras.camera_optimizers import CameraOptimizerConfig

    from vqad_nerfstudio.models.learned_index_nerfacto import LearnedIndexNerfactoModelConfig

    check_requirements(header, (NETWORK_BITS_KEY,))
    method = header.get("method")
    settings = header.get("model")
    if (
        method not in HASH_METHODS
        or not isinstance(settings, dict)
        or set(settings) - {NETWORK_BITS_KEY} != set(MODEL_KEYS)
    ):
        raise FormatError(f"header: not a {' / '.join(HASH_METHODS)} header (method {method!r})")
    settings = dict(settings)
    check_quantized_bits(header, settings, (NETWORK_BITS_KEY,))  # files before it, and fp16 ones, leave it out
    for key in ("num_proposal_samples_per_ray",):
        settings[key] = tuple(settings[key])
    try:
        config = LearnedIndexNerfactoModelConfig(  # the file holds PyTorch's parameter layout, tinycudann or not
            **settings, camera_optimizer=CameraOptimizerConfig(mode="off"), frozen_indices=True, implementation="torch"
        )
    except (TypeError, ValueError) as error:
        raise FormatError(f"header: invalid model settings: {error}") from None
    levels = header.get("levels")
    expected = config.num_levels if config.index_mode == "learned" else 0  # random mode: the table is in NETS
    if levels != expected:
        raise FormatError(f"header: levels must be {expected} for index_mode {config.index_mode!r}, got {levels!r}")
    return method, config, parse_aabb(header.get("aabb")), levels


def _group_chunks(chunks: List[Chunk], levels: int, mode: str, nets_tag: str) -> Tuple[bytes, List[Dict[str, bytes]]]:
    """The networks' payload (the one ``nets_tag`` chunk: NETS or NETQ) and each level's CBOK and IDXE/IDXR."""
    nets = [chunk.payload for chunk in chunks if chunk.tag == nets_tag]
    if len(nets) != 1 or any(chunk.tag in (TAG_NETS, TAG_NETQ) and chunk.tag != nets_tag for chunk in chunks):
        raise FormatError(f"expected one {nets_tag} chunk and no other networks chunk, found {len(nets)}")
    parts: List[Dict[str, bytes]] = [{} for _ in range(levels)] if mode == "learned" else []
    for chunk in chunks:
        if chunk.tag in (TAG_CBOK, TAG_IDXE, TAG_IDXR):
            if chunk.lod is None or chunk.lod >= len(parts) or chunk.tag in parts[chunk.lod]:
                raise FormatError(f"unexpected {chunk.tag!r} chunk for level {chunk.lod}")
            parts[chunk.lod][chunk.tag] = chunk.payload
    for level, level_parts in enumerate(parts):
        if TAG_CBOK not in level_parts or (TAG_IDXE in level_parts) == (TAG_IDXR in level_parts):
            raise FormatError(f"level {level} needs one {TAG_CBOK} and one {TAG_IDXE} or {TAG_IDXR} chunk")
    return nets[0], parts


__all__ = ["HASH_METHODS", "TAG_NETQ", "TAG_NETS", "encode_hash_model", "load_hash_compressed"]
