"""Payload pieces every method's codec shares: fp16 arrays, named fp16 or quantised parameters, the scene box."""

from __future__ import annotations

import math
import struct
from typing import Any, Dict, Iterable, Mapping, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from vqad_nerfstudio.codec import (
    Chunk,
    Container,
    FormatError,
    TruncatedError,
    decode_array,
    decode_named_arrays,
    encode_categorical,
    encode_named_arrays,
    read_container,
)
from vqad_nerfstudio.codec.container import Source
from vqad_nerfstudio.export.symbols import decode_symbols
from vqad_nerfstudio.rounding import QUANTIZED_BITS, quantize_rows, quantized_top

__all__ = [
    "fp16_array",
    "load_fp16_array",
    "fp16_tensor",
    "encode_parameters",
    "load_parameters",
    "encode_quantized_parameters",
    "load_quantized_parameters",
    "parameters_chunk",
    "require_quantized_bits",
    "check_quantized_bits",
    "parse_aabb",
    "read_complete_container",
]


def fp16_array(tensor: Tensor, what: str) -> np.ndarray:
    """``tensor`` as a float16 numpy array; ``ValueError`` naming ``what`` if a value does not fit."""
    values = tensor.detach().cpu().numpy().astype(np.float16)
    if not np.isfinite(values).all():
        raise ValueError(f"{what} has values that are not finite in fp16 (|x| > 65504, inf or nan)")
    return values


def load_fp16_array(payload: bytes, shape: tuple, what: str) -> Tensor:
    """The float32 tensor of an array record that must hold float16 values of ``shape``; ``FormatError``
    naming ``what`` otherwise."""
    return fp16_tensor(decode_array(payload), shape, what)


def fp16_tensor(array: np.ndarray, shape: tuple, what: str) -> Tensor:
    """The float32 tensor of a decoded array that must hold float16 values of ``shape``; ``FormatError`` naming
    ``what`` otherwise."""
    return torch.from_numpy(_checked(array, np.float16, shape, what).astype(np.float32))


def encode_parameters(parameters: Dict[str, Tensor]) -> bytes:
    """A named-arrays payload of ``parameters`` in fp16."""
    return encode_named_arrays({name: fp16_array(p, f"parameter {name}") for name, p in parameters.items()})


def load_parameters(parameters: Dict[str, Tensor], payload: bytes, tag: str) -> None:
    """Fill ``parameters`` (in place) from a payload of :func:`encode_parameters`.

    The payload must name exactly these parameters, each as float16 of its shape.
    """
    arrays = decode_named_arrays(payload)
    _check_names(parameters, list(arrays), tag)
    for name, array in arrays.items():
        parameter = parameters[name]
        array = _checked(array, np.float16, tuple(parameter.shape), f"{tag}: {name}")
        _fill(parameter, array.astype(np.float32))


def encode_quantized_parameters(parameters: Dict[str, Tensor], bits: int) -> bytes:
    """A quantised parameters payload: each matrix quantised per output row (symmetric, one fp16 scale per row)
    to ``bits``-bit integers, all of them range-coded as one symbol stream; vectors (biases) in fp16.

    Layout (``docs/format.md``): u8 bits, u32 length of a named-arrays record, the record, a categorical payload.
    """
    top = quantized_top(bits)
    record: Dict[str, np.ndarray] = {}
    symbols = [np.zeros(0, dtype=np.int64)]
    for name, parameter in parameters.items():
        if parameter.dim() < 2:
            record[name] = fp16_array(parameter, f"parameter {name}")
            continue
        levels, scale = quantize_rows(parameter, bits)  # the rounding QuantizedLinear trains with
        record[f"{name}@scale"] = fp16_array(scale, f"parameter {name} scales")
        record[f"{name}@shape"] = np.array(parameter.shape, dtype=np.uint32)
        symbols.append(levels.cpu().numpy().reshape(-1) + top)
    packed = encode_named_arrays(record)
    coded = encode_categorical(np.concatenate(symbols), 2 * top + 1)
    return struct.pack("<BI", bits, len(packed)) + packed + coded


def load_quantized_parameters(parameters: Dict[str, Tensor], payload: bytes, tag: str) -> int:
    """Fill ``parameters`` (in place) from a payload of :func:`encode_quantized_parameters`; return its bits.

    Every matrix's shape is checked against its parameter before the symbol stream is decoded, whose length must
    then be their total element count.
    """
    if len(payload) < 5 or struct.unpack_from("<I", payload, 1)[0] > len(payload) - 5:
        raise FormatError(f"{tag}: quantised parameters payload ends inside its record")
    bits, length = struct.unpack_from("<BI", payload)
    if bits not in QUANTIZED_BITS:
        raise FormatError(f"{tag}: quantised parameters take 2..8 bits, the payload says {bits}")
    top = 2 ** (bits - 1) - 1
    record = decode_named_arrays(payload[5 : 5 + length])
    vectors = [name for name in record if "@" not in name]
    matrices = [name.removesuffix("@scale") for name in record if name.endswith("@scale")]  # in stream order
    if set(record) != {*vectors, *(f"{name}@{part}" for name in matrices for part in ("scale", "shape"))}:
        raise FormatError(f"{tag}: each quantised matrix needs exactly its @scale and @shape arrays")
    _check_names(parameters, vectors + matrices, tag)
    for name in matrices:
        shape = tuple(int(d) for d in _checked(record[f"{name}@shape"], np.uint32, (parameters[name].dim(),), tag))
        if shape != tuple(parameters[name].shape):
            raise FormatError(f"{tag}: {name}: expected shape {tuple(parameters[name].shape)}, got {shape}")
    counts = [parameters[name].numel() for name in matrices]
    symbols = decode_symbols(payload[5 + length :], sum(counts), 2 * top + 1, f"{tag}: {bits}-bit weights")
    for name in vectors:
        parameter = parameters[name]
        values = _checked(record[name], np.float16, tuple(parameter.shape), f"{tag}: {name}")
        _fill(parameter, values.astype(np.float32))
    starts = np.cumsum([0] + counts)
    for name, start, count in zip(matrices, starts, counts):
        parameter = parameters[name]
        scale = _checked(record[f"{name}@scale"], np.float16, (parameter.shape[0],), f"{tag}: {name}@scale")
        levels = symbols[start : start + count].astype(np.int64).reshape(parameter.shape[0], -1) - top
        _fill(parameter, (levels * scale.astype(np.float32)[:, None]).reshape(parameter.shape).astype(np.float32))
    return bits


def parameters_chunk(parameters: Dict[str, Tensor], bits: int, tags: Tuple[str, str], lod: Optional[int]) -> Chunk:
    """The chunk of ``parameters``: fp16 named arrays (``tags[0]``) at ``bits`` 16, else a quantised parameters payload
    (``tags[1]``) at ``bits`` 2..8, the rounding the layers train with, so that the file renders what was trained."""
    if bits == 16:
        return Chunk(tags[0], lod, encode_parameters(parameters))
    return Chunk(tags[1], lod, encode_quantized_parameters(parameters, bits))


def require_quantized_bits(header: Dict[str, Any], bits_by_key: Mapping[str, int]) -> None:
    """Record in ``header`` (in place) each model key of ``bits_by_key`` whose parameters are quantised (bits
    below 16): the key and its bits under ``model``, and the key in ``requires``. fp16 ones are left out."""
    for key, bits in bits_by_key.items():
        if bits != 16:
            header["model"][key] = bits
            header.setdefault("requires", []).append(key)


def check_quantized_bits(header: Mapping[str, Any], settings: Mapping[str, Any], keys: Iterable[str]) -> None:
    """``FormatError`` unless each of ``keys`` that the header's model ``settings`` set is listed in ``requires``
    and holds an integer in 2..8 (what :func:`require_quantized_bits` writes)."""
    for key in settings.keys() & set(keys):
        bits = settings[key]
        if key not in header.get("requires", []):
            raise FormatError(f"header: model.{key} is set but not required")
        if type(bits) is not int or bits not in QUANTIZED_BITS:
            raise FormatError(f"header: model.{key} must be an integer in 2..8, got {bits!r}")


@torch.no_grad()
def _fill(parameter: Tensor, values: np.ndarray) -> None:
    """Copy ``values`` (of the parameter's shape) into ``parameter``."""
    parameter.copy_(torch.from_numpy(values))


def _check_names(parameters: Dict[str, Tensor], names: list, tag: str) -> None:
    if set(names) != set(parameters) or len(names) != len(parameters):
        missing, extra = sorted(set(parameters) - set(names)), sorted(set(names) - set(parameters))
        raise FormatError(f"{tag}: parameters do not fit the model (missing {missing[:3]}, extra {extra[:3]})")


def _checked(array: np.ndarray, dtype: Any, shape: tuple, what: str) -> np.ndarray:
    """``array`` if it has ``dtype`` and ``shape`` and (floats) only finite values, as writers store them."""
    if array.dtype != dtype or array.shape != shape:
        raise FormatError(f"{what}: expected {np.dtype(dtype)} {shape}, got {array.dtype} {array.shape}")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise FormatError(f"{what}: holds values that are not finite (inf or nan)")
    return array


def parse_aabb(aabb: Any) -> Tensor:
    """A header's scene box ``[[x0, y0, z0], [x1, y1, z1]]`` as a tensor; ``FormatError`` if malformed."""
    rows = aabb if isinstance(aabb, list) and len(aabb) == 2 else []
    numbers = [x for row in rows if isinstance(row, list) and len(row) == 3 for x in row]
    valid = len(numbers) == 6 and all(type(x) in (int, float) and math.isfinite(x) for x in numbers)
    if not valid or not all(lo < hi for lo, hi in zip(numbers[:3], numbers[3:])):
        raise FormatError(f"header: aabb must be [[x0, y0, z0], [x1, y1, z1]] with x0 < x1 etc., got {aabb!r}")
    return torch.tensor(rows, dtype=torch.float32)


def read_complete_container(source: Source, needs: str) -> Container:
    """The container of a file whose method has no levels of detail; ``TruncatedError`` (saying the method
    ``needs`` ...) if the file is cut short."""
    container = read_container(source, allow_truncated=True)
    if not container.complete:
        raise TruncatedError(
            f"file truncated after {container.bytes_read} bytes; {container.header.get('method')} models need "
            f"{needs} (they have no coarser levels of detail)"
        )
    return container
