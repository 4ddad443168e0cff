"""Binary search in a sorted array inside a Triton kernel, for a scalar target or a block of targets."""

from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the PyTorch paths are used
    triton = None


def search_steps(n: int) -> int:
    """Halvings of a binary search that cover ``n`` values (``n + 1`` possible answers)."""
    return max(int(n).bit_length(), 1)


if triton is not None:

    @triton.jit
    def lower_bound(sorted_values, n, target, steps):
        """The first index of ``sorted_values[:n]`` whose value is not below ``target`` (``n`` if none), for each
        element of ``target`` (int64, a scalar or a block); ``steps``: :func:`search_steps` of ``n``."""
        lo = tl.zeros_like(target)
        hi = lo + n
        for _ in range(steps):
            active = lo < hi
            middle = (lo + hi) // 2
            below = tl.load(sorted_values + middle, mask=active, other=0) < target
            lo = tl.where(active & below, middle + 1, lo)
            hi = tl.where(active & ~below, middle, hi)
        return lo
