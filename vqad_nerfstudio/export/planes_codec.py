"""``tensorf-compressed`` models <-> VQNF files (method payload in docs/format.md).

Chunks: ``NETS`` (fp16: TensoRF's line factors, its appearance matrix and rendering MLP) or ``NETQ`` (the same,
quantised to the model's ``field_bits``, each line factor a row; the header's ``requires`` then lists
``field_bits``), then, at level 0, the coded planes: ``PDEC`` (the plane decoder, fp16) or ``PDCQ`` (quantised to
the model's ``decoder_bits``; the header's ``requires`` then lists ``decoder_bits``), ``MASK`` (the latent masks,
range-coded bits), ``LTAB`` (one integer frequency table per latent channel, quantised from the learned prior) and
``LATS`` (the integer latents at the unmasked positions, range-coded with those tables). The prior itself is not
stored: the tables are all a decoder needs, and integers decode bit-exactly on any machine. Every chunk is needed
to render, so a truncated file is refused.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List, Tuple

import numpy as np
import torch
from torch import Tensor

from vqad_nerfstudio.codec import (
    Chunk,
    FormatError,
    FrequencyTable,
    check_requirements,
    decode_with_tables,
    encode_categorical,
    encode_with_tables,
    quantize_pmf,
    tables_from_bytes,
    tables_to_bytes,
)
from vqad_nerfstudio.codec.container import Source
from vqad_nerfstudio.export.payloads import (
    check_quantized_bits,
    load_parameters,
    load_quantized_parameters,
    parameters_chunk,
    parse_aabb,
    read_complete_container,
    require_quantized_bits,
)
from vqad_nerfstudio.export.symbols import decode_symbols
from vqad_nerfstudio.export.vqad_codec import DecodeInfo, EncodedModel, LevelStats
from vqad_nerfstudio.models.limits import MAX_PLANE_RESOLUTION
from vqad_nerfstudio.progress import status

if TYPE_CHECKING:
    from vqad_nerfstudio.models.compressed_tensorf import CompressedTensoRFModel

__all__ = ["PLANE_METHODS", "encode_planes_model", "load_planes_compressed"]

PLANE_METHODS = ("tensorf-compressed", "tensorf-compressed-l")
TAG_NETS, TAG_NETQ = "NETS", "NETQ"
TAG_PDEC, TAG_PDCQ, TAG_MASK, TAG_LTAB, TAG_LATS = "PDEC", "PDCQ", "MASK", "LTAB", "LATS"
DECODER_BITS_KEY = "decoder_bits"
"""Model key (and required feature) of a file whose plane decoder is quantised (``PDCQ``)."""
FIELD_BITS_KEY = "field_bits"
"""Model key (and required feature) of a file whose line factors and rendering networks are quantised (``NETQ``)."""
QUANTISED_KEYS = {DECODER_BITS_KEY: (TAG_PDEC, TAG_PDCQ), FIELD_BITS_KEY: (TAG_NETS, TAG_NETQ)}
"""Each optional bits key of the header, with the chunk that holds its parameters in fp16 and quantised."""
TABLE_PRECISION_BITS = 16
"""Each channel's probabilities are quantised to integer frequencies summing to 2**16."""

MODEL_KEYS = (
    "num_den_components",
    "num_color_components",
    "appearance_dim",
    "latent_channels",
    "decoder_channels",
    "num_samples",
    "num_uniform_samples",
    "background_color",
)
"""The CompressedTensoRFModelConfig fields a file stores: what shapes the model or its renders (and
the keys of QUANTISED_KEYS whose parameters are quantised)."""


def _net_parameters(model: "CompressedTensoRFModel") -> Dict[str, Tensor]:
    """NETS: every field parameter except the planes (decoded from the latents) and the scene box (in the header);
    quantised (NETQ, the model's field_bits below 16), each line factor as a matrix of one row per line (a view: it
    rounds as it trained)."""
    density, color = model.plane_encodings
    skip = {id(density.plane_coef), id(color.plane_coef), id(model.field.aabb)}
    parameters = {f"field.{name}": p for name, p in model.field.named_parameters() if id(p) not in skip}
    if model.config.field_bits != 16:
        for name, encoding in (("density_encoding", density), ("color_encoding", color)):
            parameters[f"field.{name}.line_coef"] = encoding.line_rows()
    return parameters


def _decoder_parameters(model: "CompressedTensoRFModel") -> Dict[str, Tensor]:
    return dict(model.latent_planes.decoder.named_parameters())


def _channel_tables(model: "CompressedTensoRFModel", coded: np.ndarray) -> List[FrequencyTable]:
    """Per latent channel, the prior's probabilities over the range of that channel's coded values."""
    channels = coded.shape[0]
    if coded.shape[1] == 0:
        return [FrequencyTable(0, np.ones(1, dtype=np.uint32)) for _ in range(channels)]
    low, high = torch.from_numpy(coded.min(1)), torch.from_numpy(coded.max(1))
    pmfs = model.latent_planes.prior.integer_pmfs(low, high)
    return [FrequencyTable(int(lo), quantize_pmf(pmf, TABLE_PRECISION_BITS)) for lo, pmf in zip(low.tolist(), pmfs)]


def encode_planes_model(model: "CompressedTensoRFModel", method: str) -> EncodedModel:
    """Header, chunks and statistics of a trained tensorf-compressed model (stage 2 must have started)."""
    if method not in PLANE_METHODS:
        raise ValueError(f"method must be one of {', '.join(PLANE_METHODS)}, got {method!r}")
    if not bool(model.compressing):
        raise ValueError("the run has not reached its compression stage (stage 2); its planes are not coded yet")
    config, planes = model.config, model.latent_planes
    header: Dict[str, Any] = {
        "method": method,
        "model": {key: getattr(config, key) for key in MODEL_KEYS},
        "aabb": model.scene_box.aabb.detach().cpu().to(torch.float32).tolist(),
        "plane_resolution": planes.plane_resolution,
    }
    require_quantized_bits(header, {key: getattr(config, key) for key in QUANTISED_KEYS})
    nets = parameters_chunk(_net_parameters(model), config.field_bits, QUANTISED_KEYS[FIELD_BITS_KEY], None)
    decoder = parameters_chunk(_decoder_parameters(model), config.decoder_bits, QUANTISED_KEYS[DECODER_BITS_KEY], 0)
    masks = planes.hard_masks().cpu().numpy()
    latents = planes.hard_latents().cpu().numpy()  # [planes, channels, side, side]
    coded = latents.transpose(1, 0, 2, 3)[:, masks]  # [channels, unmasked positions], plane-major
    tables = _channel_tables(model, coded)
    table_ids = np.broadcast_to(np.arange(coded.shape[0])[:, None], coded.shape)
    with status(f"Range-coding {coded.size:,} plane latents"):
        chunks = [
            nets,
            decoder,
            Chunk(TAG_MASK, 0, encode_categorical(masks.reshape(-1).astype(np.uint8), 2, context="auto")),
            Chunk(TAG_LTAB, 0, tables_to_bytes(tables)),
            Chunk(TAG_LATS, 0, encode_with_tables(coded, table_ids, tables)),
        ]
    components = config.num_den_components + config.num_color_components
    stats = LevelStats(
        lod=0,
        resolution=planes.plane_resolution,
        cells=0,
        vertices=int(masks.sum()),
        raw_index_bytes=None,
        entropy_index_bytes=None,
        float_grid_bytes=3 * components * planes.plane_resolution**2 * 4,  # fp32, as tensorf stores them
    )
    return EncodedModel(header, chunks, [stats])


def load_planes_compressed(source: Source) -> Tuple["CompressedTensoRFModel", DecodeInfo]:
    """Rebuild a tensorf-compressed model (CPU, eval mode) from a complete VQNF file."""
    container = read_complete_container(source, "all of their chunks")
    method, config, aabb, resolution = _parse_header(container.header)
    tags = {key: fp16 if getattr(config, key) == 16 else quantised for key, (fp16, quantised) in QUANTISED_KEYS.items()}
    parts = _chunks_by_tag(container.chunks, tags[FIELD_BITS_KEY], tags[DECODER_BITS_KEY])

    from nerfstudio.data.scene_box import SceneBox

    model: "CompressedTensoRFModel" = config.setup(scene_box=SceneBox(aabb=aabb), num_train_data=1)
    model.resize_planes(resolution)
    for key, parameters in (
        (FIELD_BITS_KEY, _net_parameters(model)),
        (DECODER_BITS_KEY, _decoder_parameters(model)),
    ):
        tag = tags[key]
        if getattr(config, key) == 16:
            load_parameters(parameters, parts[tag], tag)
        elif load_quantized_parameters(parameters, parts[tag], tag) != getattr(config, key):
            raise FormatError(f"{tag}: its bits differ from the header's model.{key}")
    shape = tuple(model.latent_planes.mask_logits.shape)
    masks = decode_symbols(parts[TAG_MASK], int(np.prod(shape)), 2, TAG_MASK).reshape(shape).astype(bool)
    channels = config.latent_channels
    try:
        tables = tables_from_bytes(parts[TAG_LTAB])
    except ValueError as error:
        raise FormatError(f"{TAG_LTAB}: {error}") from None
    if len(tables) != channels:
        raise FormatError(f"{TAG_LTAB}: expected {channels} tables (one per latent channel), got {len(tables)}")
    table_ids = np.broadcast_to(np.arange(channels)[:, None], (channels, int(masks.sum())))
    with status(f"Decoding {table_ids.size:,} plane latents"):
        coded = decode_with_tables(parts[TAG_LATS], table_ids, tables)
    latents = np.zeros((channels, *shape), dtype=np.int64)
    latents[:, masks] = coded
    model.load_coded_planes(torch.from_numpy(latents.transpose(1, 0, 2, 3).copy()), torch.from_numpy(masks))
    model.eval()
    return model, DecodeInfo(method, 1, 1, True, container.bytes_read)


def _parse_header(header: Dict[str, Any]) -> Tuple[str, Any, Tensor, int]:
    from nerfstudio.cameras.camera_optimizers import CameraOptimizerConfig

    from vqad_nerfstudio.models.compressed_tensorf import CompressedTensoRFModelConfig

    check_requirements(header, tuple(QUANTISED_KEYS))
    method, settings = header.get("method"), header.get("model")
    if (
        method not in PLANE_METHODS
        or not isinstance(settings, dict)
        or set(settings) - set(QUANTISED_KEYS) != set(MODEL_KEYS)
    ):
        raise FormatError(f"header: not a {' / '.join(PLANE_METHODS)} header (method {method!r})")
    check_quantized_bits(header, settings, QUANTISED_KEYS)  # quantised parameters (PDCQ, NETQ)
    try:
        config = CompressedTensoRFModelConfig(**settings, camera_optimizer=CameraOptimizerConfig(mode="off"))
    except (TypeError, ValueError) as error:
        raise FormatError(f"header: invalid model settings: {error}") from None
    resolution = header.get("plane_resolution")
    if type(resolution) is not int or not 1 <= resolution <= MAX_PLANE_RESOLUTION:
        bounds = f"1..{MAX_PLANE_RESOLUTION}"
        raise FormatError(f"header: plane_resolution must be an integer in {bounds}, got {resolution!r}")
    return method, config, parse_aabb(header.get("aabb")), resolution


def _chunks_by_tag(chunks: List[Chunk], nets_tag: str, decoder_tag: str) -> Dict[str, bytes]:
    """The payloads of the five chunks a file needs (its field's as ``nets_tag``, NETS or NETQ, and its decoder's as
    ``decoder_tag``, PDEC or PDCQ)."""
    tags = (nets_tag, decoder_tag, TAG_MASK, TAG_LTAB, TAG_LATS)
    parts: Dict[str, bytes] = {}
    for chunk in chunks:
        if chunk.tag in tags:
            if chunk.tag in parts:
                raise FormatError(f"more than one {chunk.tag!r} chunk")
            parts[chunk.tag] = chunk.payload
    missing = [tag for tag in tags if tag not in parts]
    if missing:
        raise FormatError(f"tensorf-compressed file lacks its {', '.join(missing)} chunk(s)")
    return parts
