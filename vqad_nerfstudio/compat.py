"""The few shims our models need on nerfstudio 1.1.5, each scoped to what it fixes.

1. Offline LPIPS. nerfstudio's models build torchmetrics' LPIPS in their constructor, which
   downloads AlexNet weights; offline that crashes. :func:`optional_lpips` builds it only when the
   weights are already in torch's hub cache and otherwise returns ``None`` with one warning. Our
   subclasses of nerfstudio's models run their constructors inside :func:`offline_lpips`, which
   gives them a :class:`SkippedLPIPS` in that case.

2. Loading checkpoints on torch >= 2.6. ``torch.load`` now defaults to ``weights_only=True`` and
   nerfstudio 1.1.5 calls it without arguments in ``ns-eval``, ``ns-render``, ``ns-viewer`` and
   ``ns-export``. Its checkpoints hold a few non-tensor objects (numpy scalars in scheduler and
   grad-scaler state). :func:`allow_nerfstudio_checkpoints` adds exactly those types to torch's
   allow-list of safe globals, so the safe loader keeps its guarantees for everything else. It is
   called when our model module is imported, which nerfstudio does (through the saved config)
   before it loads the checkpoint.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

# torchvision's AlexNet weights, the backbone of torchmetrics' LPIPS (net_type="alex").
_ALEXNET_WEIGHTS = "alexnet-owt-7be5be79.pth"
_warned_lpips = False


def lpips_weights_available() -> bool:
    """Whether LPIPS can be built without a download."""
    return (Path(torch.hub.get_dir()) / "checkpoints" / _ALEXNET_WEIGHTS).is_file()


def optional_lpips() -> Optional[torch.nn.Module]:
    """torchmetrics' LPIPS if its weights are cached locally, else ``None`` (warns once)."""
    if lpips_weights_available():
        from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

        return LearnedPerceptualImagePatchSimilarity(normalize=True)
    _warn_lpips_skipped()
    return None


class SkippedLPIPS(torch.nn.Module):
    """Stands in for LPIPS inside nerfstudio's models when its weights are not cached: returns NaN."""

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return torch.tensor(float("nan"))


@contextmanager
def offline_lpips() -> Iterator[None]:
    """While nerfstudio's model constructors run, LPIPS is built only from cached weights, else skipped."""
    import torchmetrics.image.lpip as lpip

    original = lpip.LearnedPerceptualImagePatchSimilarity

    def build(*args, **kwargs) -> torch.nn.Module:
        if lpips_weights_available():
            return original(*args, **kwargs)
        _warn_lpips_skipped()
        return SkippedLPIPS()

    lpip.LearnedPerceptualImagePatchSimilarity = build  # type: ignore[misc,assignment]
    try:
        yield
    finally:
        lpip.LearnedPerceptualImagePatchSimilarity = original  # type: ignore[misc]


def _warn_lpips_skipped() -> None:
    global _warned_lpips
    if not _warned_lpips:
        warnings.warn(
            f"LPIPS is skipped: its AlexNet weights ({_ALEXNET_WEIGHTS}) are not in {torch.hub.get_dir()}/checkpoints "
            "and vqad-nerfstudio never downloads at model construction. PSNR and SSIM are still reported.",
            stacklevel=2,
        )
        _warned_lpips = True


def allow_nerfstudio_checkpoints() -> None:
    """Let ``torch.load(weights_only=True)`` read nerfstudio 1.1.5 checkpoints (torch >= 2.6)."""
    add_safe_globals = getattr(torch.serialization, "add_safe_globals", None)
    if add_safe_globals is None:  # torch < 2.4 loads everything by default
        return
    try:  # numpy >= 2 moved it; checkpoints name whichever module wrote them
        from numpy._core.multiarray import scalar
    except ImportError:
        from numpy.core.multiarray import scalar
    dtypes = [type(np.dtype(name)) for name in ("float64", "float32", "int64", "int32", "bool")]
    add_safe_globals([scalar, np.dtype, *dtypes])
