"""The nerfstudio methods of this package whose models compressed files hold, as installed entry points."""

from __future__ import annotations

import copy
from importlib.metadata import EntryPoint, entry_points
from typing import TYPE_CHECKING, Dict, List

from vqad_nerfstudio.codec import UnsupportedMethodError
from vqad_nerfstudio.export.formats import METHOD_FORMATS, method_format

if TYPE_CHECKING:
    from nerfstudio.engine.trainer import TrainerConfig

__all__ = ["UnsupportedMethodError", "vqad_method_names", "trainer_config"]

_PACKAGE = "vqad_nerfstudio.method_configs."


def _entry_points() -> Dict[str, EntryPoint]:
    points = entry_points(group="nerfstudio.method_configs")
    return {p.name: p for p in points if p.name in METHOD_FORMATS and p.value.startswith(_PACKAGE)}


def vqad_method_names() -> List[str]:
    """Names of the installed methods whose models compressed files hold (``vqad``, ``vqad-hash``, ...)."""
    return sorted(_entry_points())


def trainer_config(method: str) -> "TrainerConfig":
    """A fresh copy of the registered trainer configuration of one of :func:`vqad_method_names`."""
    from nerfstudio.plugins.types import MethodSpecification

    model_type = method_format(method).model_type
    point = _entry_points().get(method)
    if point is None:
        raise UnsupportedMethodError(f"method {method!r} is not installed (no nerfstudio.method_configs entry point)")
    spec = point.load()
    if not isinstance(spec, MethodSpecification):
        raise UnsupportedMethodError(f"method {method!r} is unavailable: {spec!r}")
    if not issubclass(spec.config.pipeline.model._target, model_type):
        raise UnsupportedMethodError(f"method {method!r} does not train a {model_type.__name__}")
    return copy.deepcopy(spec.config)
