"""``tensorf-compressed`` models <-> VQNF files (method payload in docs/format.md).

Chunks: ``NETS`` (fp16: TensoRF's line factors, its appearance matrix and rendering MLP), then, at
level 0, the coded planes: ``PDEC`` (the plane decoder, fp16) or ``PDCQ`` (quantised to the model's
``decoder_bits``; the header's ``requires`` then lists ``decoder_bits``), ``MASK`` (the latent masks, range-coded
bits), ``LTAB`` (one integer frequency table per latent channel, quantised from the learned prior)
and ``LATS`` (the integer latents at the unmasked positions, range-coded with those tables). The
prior itself is not stored: the tables are all a decoder needs, and integers decode bit-exactly on
any machine. Every chunk is needed to render, so a truncated file is refused.
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
    encode_parameters,
    encode_quantized_parameters,
    load_parameters,
    load_quantized_parameters,
    parse_aabb,
    read_complete_container,
)
from vqad_nerfstudio.export.symbols import decode_symbols
from vqad_nerfstudio.export.vqad_codec import DecodeInfo, EncodedModel, LevelStats
from vqad_nerfstudio.models.limits import MAX_PLANE_RESOLUTION
from vqad_nerfstudio.progress import status
from vqad_nerfstudio.rounding import QUANTIZED_BITS

if TYPE_CHECKING:
    from vqad_nerfstudio.models.compressed_tensorf import CompressedTensoRFModel

__all__ = ["PLANE_METHODS", "encode_planes_model", "load_planes_compressed"]

PLANE_METHODS = ("tensorf-compressed", "tensorf-compressed-l")
TAG_NETS, TAG_PDEC, TAG_PDCQ, TAG_MASK, TAG_LTAB, TAG_LATS = "NETS", "PDEC", "PDCQ", "MASK", "LTAB", "LATS"
DECODER_BITS_KEY = "decoder_bits"
"""Model key (and required feature) of a file whose plane decoder is quantised (``PDCQ``)."""
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
DECODER_BITS_KEY when the decoder is quantised)."""


def _net_parameters(model: "CompressedTensoRFModel") -> Dict[str, Tensor]:
    """NETS: every field parameter except the planes (decoded from the latents) and the scene box (in the header)."""
    density, color = model.plane_encodings
    skip = {id(density.plane_coef), id(color.plane_coef), id(model.field.aabb)}
    return {f"field.{name}": p for name, p in model.field.named_parameters() if id(p) not in skip}


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
    if config.decoder_bits == 16:
        decoder = Chunk(TAG_PDEC, 0, encode_parameters(_decoder_parameters(model)))
    else:  # the grid the decoder trained on (quantize_rows), so the file renders what was trained
        header["model"][DECODER_BITS_KEY] = config.decoder_bits
        header["requires"] = [DECODER_BITS_KEY]
        decoder = Chunk(TAG_PDCQ, 0, encode_quantized_parameters(_decoder_parameters(model), config.decoder_bits))
    masks = planes.hard_masks().cpu().numpy()
    latents = planes.hard_latents().cpu().numpy()  # [planes, channels, side, side]
    coded = latents.transpose(1, 0, 2, 3)[:, masks]  # [channels, unmasked positions], plane-major
    tables = _channel_tables(model, coded)
    table_ids = np.broadcast_to(np.arange(coded.shape[0])[:, None], coded.shape)
    with status(f"Range-coding {coded.size:,} plane latents"):
        chunks = [
            Chunk(TAG_NETS, None, encode_parameters(_net_parameters(model))),
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
    decoder_tag = TAG_PDEC if config.decoder_bits == 16 else TAG_PDCQ
    parts = _chunks_by_tag(container.chunks, decoder_tag)

    from nerfstudio.data.scene_box import SceneBox

    model: "CompressedTensoRFModel" = config.setup(scene_box=SceneBox(aabb=aabb), num_train_data=1)
    model.resize_planes(resolution)
    load_parameters(_net_parameters(model), parts[TAG_NETS], TAG_NETS)
    if decoder_tag == TAG_PDEC:
        load_parameters(_decoder_parameters(model), parts[TAG_PDEC], TAG_PDEC)
    elif load_quantized_parameters(_decoder_parameters(model), parts[TAG_PDCQ], TAG_PDCQ) != config.decoder_bits:
        raise FormatError(f"{TAG_PDCQ}: its bits differ from the header's model.{DECODER_BITS_KEY}")
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

    check_requirements(header, (DECODER_BITS_KEY,))
    method, settings = header.get("method"), header.get("model")
    if (
        method not in PLANE_METHODS
        or not isinstance(settings, dict)
        or set(settings) - {DECODER_BITS_KEY} != set(MODEL_KEYS)
    ):
        raise FormatError(f"header: not a {' / '.join(PLANE_METHODS)} header (method {method!r})")
    if DECODER_BITS_KEY in settings:  # a quantised decoder (PDCQ)
        bits = settings[DECODER_BITS_KEY]
        if DECODER_BITS_KEY not in header.get("requires", []):
            raise FormatError(f"header: model.{DECODER_BITS_KEY} is set but not required")
        if type(bits) is not int or bits not in QUANTIZED_BITS:
            raise FormatError(f"header: model.{DECODER_BITS_KEY} must be an integer in 2..8, got {bits!r}")
    try:
        config = CompressedTensoRFModelConfig(**settings, camera_optimizer=CameraOptimizerConfig(mode="off"))
    except (TypeError, ValueError) as error:
        raise FormatError(f"header: invalid model settings: {error}") from None
    resolution = header.get("plane_resolution")
    if type(resolution) is not int or not 1 <= resolution <= MAX_PLANE_RESOLUTION:
        bounds = f"1..{MAX_PLANE_RESOLUTION}"
        raise FormatError(f"header: plane_resolution must be an integer in {bounds}, got {resolution!r}")
    return method, config, parse_aabb(header.get("aabb")), resolution


def _chunks_by_tag(chunks: List[Chunk], decoder_tag: str) -> Dict[str, bytes]:
    """The payloads of the five chunks a file needs (its decoder's as ``decoder_tag``, PDEC or PDCQ)."""
    tags = (TAG_NETS, decoder_tag, TAG_MASK, TAG_LTAB, TAG_LATS)
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
