"""nerfacc 0.5.2 for the benchmark's instant-ngp anchor on CUDA 13, without touching the user's install.

nerfacc compiles its CUDA extension on first use, and its ``csrc/scan.cu`` calls ``cub::Equality``, which
CCCL 3 (CUDA 13) removed (nerfacc issue #306). :func:`use_patched_nerfacc` copies the installed nerfacc package
into a folder, replaces that call with an equivalent key-equality functor, and puts the copy first on this
process's ``sys.path``; nerfacc then builds the copy's extension (a few minutes the first time; it needs nvcc and
ninja). The installed package is only read.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
import time
from pathlib import Path

SCAN_SOURCE = Path("cuda") / "csrc" / "scan.cu"
"""The file of the nerfacc package that calls ``cub::Equality``."""
REMOVED_CALL = "cub::Equality()"
FUNCTOR = """
struct EqualKeys
{
    template <typename T>
    __host__ __device__ __forceinline__ bool operator()(const T &a, const T &b) const { return a == b; }
};
"""
"""What ``cub::Equality`` was: the key comparison of CUB's scans by key."""
ANCHOR = "namespace device {\n"
"""Where the functor goes in ``scan.cu`` (before the scans that use it)."""


def patch_scan_source(source: str) -> str:
    """``scan.cu``'s text with ``cub::Equality()`` replaced by :data:`FUNCTOR`; ``ValueError`` if the text is not
    the one this patch was written for."""
    if source.count(REMOVED_CALL) != 2 or source.count(ANCHOR) != 1:
        raise ValueError(
            f"unexpected nerfacc {SCAN_SOURCE}: expected two {REMOVED_CALL} calls after '{ANCHOR.strip()}'"
        )
    return source.replace(ANCHOR, ANCHOR + FUNCTOR, 1).replace(REMOVED_CALL, "EqualKeys()")


def patched_copy(destination: Path) -> Path:
    """Copy the installed nerfacc to ``destination / "nerfacc"`` (replacing an earlier copy) and patch it; returns
    ``destination``, the folder to put on ``sys.path``."""
    spec = importlib.util.find_spec("nerfacc")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("nerfacc is not installed (nerfstudio's instant-ngp needs it)")
    package = destination / "nerfacc"
    if package.exists():
        shutil.rmtree(package)
    shutil.copytree(Path(spec.origin).parent, package, ignore=shutil.ignore_patterns("__pycache__"))
    scan = package / SCAN_SOURCE
    scan.write_text(patch_scan_source(scan.read_text()))
    return destination


def use_patched_nerfacc(destination: Path) -> None:
    """Make this process import the patched copy of nerfacc (see the module's docstring). Must run before anything
    imports nerfacc (nerfstudio's method configs do)."""
    if "nerfacc" in sys.modules:
        raise RuntimeError("nerfacc is already imported: patch it before importing nerfstudio's methods")
    sys.path.insert(0, str(patched_copy(destination)))


def build_extension() -> float:
    """Compile (or load an earlier build of) the imported nerfacc's CUDA extension now, so that a timed run does not
    pay it; returns the seconds it took. ``RuntimeError`` when nerfacc finds no CUDA toolkit (it would then run
    without its extension)."""
    start = time.perf_counter()
    from nerfacc.cuda._backend import _C

    if _C is None:
        raise RuntimeError("nerfacc found no CUDA toolkit (nvcc on PATH, or CUDA_HOME): it cannot build its extension")
    return time.perf_counter() - start
