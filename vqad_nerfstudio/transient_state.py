"""Per-step state on modules without ``nn.Module.__setattr__``'s cost."""

from __future__ import annotations

from typing import Any, ClassVar, FrozenSet


class TransientState:
    """Mixin (before ``nn.Module`` in the bases) for a module whose ``TRANSIENT`` attributes, per-step caches and
    schedule values that are never parameters, buffers or submodules, are set as plain attributes.
    ``nn.Module.__setattr__`` checks every assignment against the module's parameters, buffers and submodules, two
    of its checks Python-level ``isinstance`` calls on the value's class: about 150 assignments in a vqad training
    step, against 56 in its float twin's. Reading them is unchanged (they live in the instance's ``__dict__``, as
    ``nn.Module`` would put them)."""

    TRANSIENT: ClassVar[FrozenSet[str]] = frozenset()
    """Names set as plain attributes."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self.TRANSIENT:
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)
