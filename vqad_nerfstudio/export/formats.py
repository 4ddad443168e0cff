"""The registry of this package's methods and their compressed files: per method, how its models are encoded and
decoded, whether its files stream levels of detail, and what the float reference of its size reports stores.

Everything that depends on a model's method (``ns-export``, ``decode``, size reports, decoded runs, the benchmark)
asks this registry; :func:`encode_any` and :func:`load_any` are its two entry points.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple, Type

from nerfstudio.models.base_model import Model, ModelConfig

from vqad_nerfstudio.codec import UnsupportedMethodError, read_header
from vqad_nerfstudio.codec.container import Source, load_source
from vqad_nerfstudio.export.hash_codec import encode_hash_model, load_hash_compressed
from vqad_nerfstudio.export.planes_codec import TAG_PDCQ, TAG_PDEC, encode_planes_model, load_planes_compressed
from vqad_nerfstudio.export.vqad_codec import (
    DECODER_TAGS,
    DecodeInfo,
    EncodedModel,
    IndexCoding,
    encode_model,
    load_compressed,
)
from vqad_nerfstudio.models.compressed_tensorf import CompressedTensoRFModel
from vqad_nerfstudio.models.learned_index_nerfacto import LearnedIndexNerfactoModel
from vqad_nerfstudio.models.vqad import VQADModel

__all__ = ["MethodFormat", "METHOD_FORMATS", "method_format", "model_method", "encode_any", "load_any"]

Encoder = Callable[[Any, str, IndexCoding, Optional[int], Optional[int]], EncodedModel]
"""(model, method, index coding, network bits, codebook bits; None for the model's own) -> the file's header, chunks
and level statistics."""
Decoder = Callable[[Source, Optional[int]], Tuple[Any, DecodeInfo]]
"""(file, finest level of detail to keep or None) -> the model (CPU, eval mode) and what the file held."""


@dataclass(frozen=True)
class MethodFormat:
    """How the models of one method become a compressed file, and back."""

    model_type: Type[Model]
    """The model class the method trains."""
    default_for: Callable[[ModelConfig], bool]
    """Whether a model of this config is written as this method when no method is named."""
    encode: Encoder
    """Writes a model of ``model_type`` (see :data:`Encoder`)."""
    decode: Decoder
    """Rebuilds the model a file of this method holds (see :data:`Decoder`)."""
    levels_of_detail: bool
    """Whether a prefix of a file decodes to a coarser model (``max_lod`` and per-level reports)."""
    quantised_parameters: bool
    """Whether files can store the decoder networks and codebooks quantised (``network_bits``, ``codebook_bits`` other
    than 16)."""
    float_reference: str
    """What the float reference of a size report stores in place of the coded part (per-level
    ``float_grid_bytes``)."""
    decoder_tags: Tuple[str, ...]
    """The chunks that hold only decoder networks (what size reports count as decoders); empty where the networks
    share a chunk with other parameters (vqad-hash's NETS also holds the random hash table)."""


_VQAD = dict(
    model_type=VQADModel,
    encode=encode_model,
    decode=lambda source, max_lod: load_compressed(source, max_lod=max_lod),
    levels_of_detail=True,
    quantised_parameters=True,
    float_reference="an fp16 feature vector per vertex, same topology",
    decoder_tags=DECODER_TAGS,
)
_HASH = dict(
    model_type=LearnedIndexNerfactoModel,
    encode=lambda model, method, index_coding, _network_bits, _codebook_bits: encode_hash_model(
        model, method, index_coding
    ),
    decode=lambda source, _max_lod: load_hash_compressed(source),
    levels_of_detail=False,
    quantised_parameters=False,
    float_reference="an fp16 feature vector per index entry",
    decoder_tags=(),
)
_PLANES = dict(
    model_type=CompressedTensoRFModel,
    encode=lambda model, method, _index_coding, _network_bits, _codebook_bits: encode_planes_model(model, method),
    decode=lambda source, _max_lod: load_planes_compressed(source),
    levels_of_detail=False,
    quantised_parameters=False,
    float_reference="the uncompressed planes, fp32 as tensorf stores them",
    decoder_tags=(TAG_PDEC, TAG_PDCQ),  # the plane decoder; NETS also holds tensorf's line factors
)

METHOD_FORMATS: Dict[str, MethodFormat] = {
    "vqad": MethodFormat(default_for=lambda config: config.feature_store == "codebook", **_VQAD),
    "vqad-float": MethodFormat(default_for=lambda config: config.feature_store == "float", **_VQAD),
    "vqad-hash": MethodFormat(default_for=lambda config: config.index_mode == "learned", **_HASH),
    "vqad-hash-random": MethodFormat(default_for=lambda config: config.index_mode == "random", **_HASH),
    "tensorf-compressed": MethodFormat(default_for=lambda config: True, **_PLANES),
    "tensorf-compressed-l": MethodFormat(default_for=lambda config: False, **_PLANES),
}
"""Every method whose models compressed files hold, by nerfstudio method name."""


def method_format(method: str) -> MethodFormat:
    """The format of ``method``; :class:`UnsupportedMethodError` (naming the methods there are) if it has none."""
    if method not in METHOD_FORMATS:
        names = ", ".join(sorted(METHOD_FORMATS))
        raise UnsupportedMethodError(f"unknown method {method!r}; compressed files hold the methods: {names}")
    return METHOD_FORMATS[method]


def model_method(model: Any) -> str:
    """The method a model is written as when none is named; :class:`UnsupportedMethodError` for foreign models."""
    for method, entry in METHOD_FORMATS.items():
        if isinstance(model, entry.model_type) and entry.default_for(model.config):
            return method
    names = ", ".join(sorted(METHOD_FORMATS))
    raise UnsupportedMethodError(f"{type(model).__name__} cannot be written as a compressed file; runs of {names} can")


def encode_any(
    model: Any,
    method: Optional[str] = None,
    index_coding: IndexCoding = "entropy",
    network_bits: Optional[int] = None,
    codebook_bits: Optional[int] = None,
) -> EncodedModel:
    """Header, chunks and level statistics of a trained model of any method of this package, written as ``method``
    (default: :func:`model_method`). Quantised decoder networks and codebooks (``network_bits``, ``codebook_bits`` in
    2..8) only where the method's format has them; None: the bits the model trained them at (vqad, vqad-float), fp16
    otherwise."""
    method = method or model_method(model)
    entry = method_format(method)
    if not isinstance(model, entry.model_type):
        raise UnsupportedMethodError(f"{type(model).__name__} is not a {method} model")
    quantised = network_bits not in (None, 16) or codebook_bits not in (None, 16)
    if quantised and not entry.quantised_parameters:
        names = ", ".join(name for name, other in METHOD_FORMATS.items() if other.quantised_parameters)
        raise UnsupportedMethodError(
            f"quantised networks and codebooks are written for {names} models only, not {method}"
        )
    return entry.encode(model, method, index_coding, network_bits, codebook_bits)


def load_any(source: Source, max_lod: Optional[int] = None) -> Tuple[Any, DecodeInfo]:
    """Rebuild the model a VQNF file holds (``max_lod`` only for methods with levels of detail)."""
    source = load_source(source)  # read the file once; the header picks the method
    method = read_header(source).get("method")
    entry = method_format(method if isinstance(method, str) else repr(method))
    if max_lod is not None and not entry.levels_of_detail:
        raise ValueError(f"{method} files have no levels of detail; decode them without max_lod")
    return entry.decode(source, max_lod)
