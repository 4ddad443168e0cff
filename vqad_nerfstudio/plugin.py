"""Guarded registration of our methods with nerfstudio.

nerfstudio imports every ``nerfstudio.method_configs`` entry point when any ``ns-*`` command starts;
one that raises breaks them all, with a traceback that does not say whose fault it is. Our entry
points build their specification through :func:`load_method`: on failure it prints one line naming
vqad-nerfstudio and the cause, and hands nerfstudio a placeholder that it skips, so every other
method keeps working.
"""

from __future__ import annotations

import sys
import traceback
from typing import Callable, Union

from nerfstudio.plugins.types import MethodSpecification


class UnavailableMethod:
    """Placeholder for a method whose code failed to import (nerfstudio skips it with a warning)."""

    def __init__(self, name: str, error: BaseException) -> None:
        self.name = name
        self.error = error

    def __repr__(self) -> str:
        return f"vqad-nerfstudio method '{self.name}' (unavailable: {type(self.error).__name__}: {self.error})"


def load_method(name: str, build: Callable[[], MethodSpecification]) -> Union[MethodSpecification, UnavailableMethod]:
    """``build()``, or an :class:`UnavailableMethod` after a one-line error that names our package."""
    try:
        return build()
    except Exception as error:  # noqa: BLE001 - any import failure must not break other methods
        print(
            f"vqad-nerfstudio: method '{name}' is unavailable ({type(error).__name__}: {error}). "
            f"Other nerfstudio methods are unaffected. Set VQAD_DEBUG=1 for the traceback.",
            file=sys.stderr,
        )
        if "VQAD_DEBUG" in __import__("os").environ:
            traceback.print_exc()
        return UnavailableMethod(name, error)
