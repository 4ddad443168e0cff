"""The nerfstudio methods of this package, whose models compressed files hold."""

from __future__ import annotations

import copy
from importlib.metadata import EntryPoint, entry_points
from typing import TYPE_CHECKING, Dict, List

from vqad_nerfstudio.codec import CodecError

if TYPE_CHECKING:
    from nerfstudio.engine.trainer import TrainerConfig

_EXPORTABLE = tuple(
    f"vqad_nerfstudio.method_configs.{module}:"
    for module in ("vqad", "vqad_float", "vqad_hash", "vqad_hash_random", "tensorf_compressed", "tensorf_compressed_l")
)
"""Entry points of the methods whose models compressed files hold."""


class UnsupportedMethodError(CodecError):
    """A file or run names a method whose models this package cannot encode or decode."""


def _entry_points() -> Dict[str, EntryPoint]:
    points = entry_points(group="nerfstudio.method_configs")
    return {point.name: point for point in points if point.value.startswith(_EXPORTABLE)}


def vqad_method_names() -> List[str]:
    """Names of the methods whose models compressed files hold (``vqad``, ``vqad-hash``, ...)."""
    return sorted(_entry_points())


def check_method(method: str) -> None:
    """Raise :class:`UnsupportedMethodError` unless ``method`` is one of :func:`vqad_method_names`."""
    points = _entry_points()
    if method not in points:
        names = ", ".join(sorted(points))
        raise UnsupportedMethodError(f"unknown method {method!r}; compressed files hold the methods: {names}")


def trainer_config(method: str) -> "TrainerConfig":
    """A fresh copy of the registered trainer configuration of one of :func:`vqad_method_names`."""
    from nerfstudio.plugins.types import MethodSpecification

    from vqad_nerfstudio.models.compressed_tensorf import CompressedTensoRFModelConfig
    from vqad_nerfstudio.models.learned_index_nerfacto import LearnedIndexNerfactoModelConfig
    from vqad_nerfstudio.models.vqad import VQADModelConfig

    check_method(method)
    spec = _entry_points()[method].load()
    if not isinstance(spec, MethodSpecification):
        raise UnsupportedMethodError(f"method {method!r} is unavailable: {spec!r}")
    if not isinstance(
        spec.config.pipeline.model, (VQADModelConfig, LearnedIndexNerfactoModelConfig, CompressedTensoRFModelConfig)
    ):
        raise UnsupportedMethodError(f"method {method!r} does not train a model compressed files hold")
    return copy.deepcopy(spec.config)
