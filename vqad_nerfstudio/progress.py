"""Progress of long work as nerfstudio shows it: rich progress bars on nerfstudio's console, shown only when that
console is a terminal (quiet in tests, logs and pipes)."""

from __future__ import annotations

from contextlib import nullcontext
from typing import ContextManager, Iterable, Optional, TypeVar

from nerfstudio.utils.rich_utils import CONSOLE
from rich.progress import track as rich_track

__all__ = ["track", "status"]

T = TypeVar("T")


def track(sequence: Iterable[T], description: str, total: Optional[float] = None) -> Iterable[T]:
    """``sequence``, with a progress bar of ``description`` while it is consumed (removed when done)."""
    return rich_track(
        sequence,
        description=description,
        total=total,
        console=CONSOLE,
        transient=True,
        disable=not CONSOLE.is_terminal,
    )


def status(description: str) -> ContextManager:
    """A spinner with ``description`` while the block runs, for work without steps to count."""
    return CONSOLE.status(description, spinner="circle") if CONSOLE.is_terminal else nullcontext()
