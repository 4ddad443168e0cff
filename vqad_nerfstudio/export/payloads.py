"""Payload pieces every method's codec shares: fp16 arrays, named fp16 parameters, the scene box."""

from __future__ import annotations

import math
from typing import Any, Dict

import numpy as np
import torch
from torch import Tensor

from vqad_nerfstudio.codec import (
    Container,
    FormatError,
    TruncatedError,
    decode_named_arrays,
    encode_named_arrays,
    read_container,
)
from vqad_nerfstudio.codec.container import Source

__all__ = ["fp16_array", "encode_parameters", "load_parameters", "parse_aabb", "read_complete_container"]


def fp16_array(tensor: Tensor, what: str) -> np.ndarray:
    """``tensor`` as a float16 numpy array; ``ValueError`` naming ``what`` if a value does not fit."""
    values = tensor.detach().cpu().numpy().astype(np.float16)
    if not np.isfinite(values).all():
        raise ValueError(f"{what} has values that are not finite in fp16 (|x| > 65504, inf or nan)")
    return values


def encode_parameters(parameters: Dict[str, Tensor]) -> bytes:
    """A named-arrays payload of ``parameters`` in fp16."""
    return encode_named_arrays({name: fp16_array(p, f"parameter {name}") for name, p in parameters.items()})


def load_parameters(parameters: Dict[str, Tensor], payload: bytes, tag: str) -> None:
    """Fill ``parameters`` (in place, any shape they had is replaced) from a payload of :func:`encode_parameters`.

    The payload must name exactly these parameters, each as float16 of its shape.
    """
    arrays = decode_named_arrays(payload)
    if set(arrays) != set(parameters):
        missing, extra = sorted(set(parameters) - set(arrays)), sorted(set(arrays) - set(parameters))
        raise FormatError(f"{tag}: parameters do not fit the model (missing {missing[:3]}, extra {extra[:3]})")
    for name, array in arrays.items():
        parameter = parameters[name]
        if array.dtype != np.float16 or array.shape != tuple(parameter.shape):
            raise FormatError(
                f"{tag}: {name}: expected float16 {tuple(parameter.shape)}, got {array.dtype} {array.shape}"
            )
        parameter.data = torch.from_numpy(array.astype(np.float32)).to(parameter.device)


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
