"""One entry point per direction for every method a compressed file holds: the model's type (writing)
or the header's method (reading) picks the method payload."""

from __future__ import annotations

from typing import Any, Optional, Tuple

from vqad_nerfstudio.codec import read_header
from vqad_nerfstudio.codec.container import Source, load_source
from vqad_nerfstudio.export.hash_codec import HASH_METHODS, encode_hash_model, load_hash_compressed
from vqad_nerfstudio.export.methods import UnsupportedMethodError, vqad_method_names
from vqad_nerfstudio.export.planes_codec import PLANE_METHODS, encode_planes_model, load_planes_compressed
from vqad_nerfstudio.export.vqad_codec import (
    DecodeInfo,
    EncodedModel,
    IndexCoding,
    encode_model,
    load_compressed,
)

__all__ = ["encode_any", "load_any"]


def encode_any(
    model: Any,
    method: Optional[str] = None,
    index_coding: IndexCoding = "entropy",
    progress: bool = False,
    network_bits: int = 16,
) -> EncodedModel:
    """Header, chunks and level statistics of a trained model of any method of this package.

    Quantised decoder MLPs (``network_bits`` in 2..8) are available for VQAD models only; the other methods'
    files keep their networks in fp16.
    """
    from vqad_nerfstudio.models.compressed_tensorf import CompressedTensoRFModel
    from vqad_nerfstudio.models.learned_index_nerfacto import LearnedIndexNerfactoModel
    from vqad_nerfstudio.models.vqad import VQADModel

    if isinstance(model, VQADModel):
        return encode_model(model, method, index_coding, progress, network_bits)
    if network_bits != 16:
        raise UnsupportedMethodError(
            f"quantised networks are written for vqad and vqad-float models only, not {type(model).__name__}"
        )

    if isinstance(model, LearnedIndexNerfactoModel):
        default = "vqad-hash" if model.config.index_mode == "learned" else "vqad-hash-random"
        return encode_hash_model(model, method or default, index_coding)
    if isinstance(model, CompressedTensoRFModel):
        return encode_planes_model(model, method or "tensorf-compressed")
    names = ", ".join(vqad_method_names())
    raise UnsupportedMethodError(f"{type(model).__name__} cannot be written as a compressed file; runs of {names} can")


def load_any(source: Source, max_lod: Optional[int] = None) -> Tuple[Any, DecodeInfo]:
    """Rebuild the model a VQNF file holds (``max_lod`` only for methods with levels of detail)."""
    source = load_source(source)  # read the file once; the header picks the method payload
    method = read_header(source).get("method")
    if method in HASH_METHODS or method in PLANE_METHODS:
        if max_lod is not None:
            raise ValueError(f"{method} files have no levels of detail; decode them without max_lod")
        return load_hash_compressed(source) if method in HASH_METHODS else load_planes_compressed(source)
    return load_compressed(source, max_lod=max_lod)
