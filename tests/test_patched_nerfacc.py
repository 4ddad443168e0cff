"""benchmarks/patched_nerfacc.py: nerfacc's CUDA 13 fix applies to a copy, and the copy is what gets imported."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import patched_nerfacc  # noqa: E402


def test_the_copy_calls_a_key_equality_functor_instead_of_cub_equality(tmp_path):
    installed = Path(importlib.util.find_spec("nerfacc").origin).parent / patched_nerfacc.SCAN_SOURCE
    before = installed.read_text()
    folder = patched_nerfacc.patched_copy(tmp_path)
    patched = (folder / "nerfacc" / patched_nerfacc.SCAN_SOURCE).read_text()
    assert "cub::Equality" not in patched and patched.count("EqualKeys()") == 2
    assert patched.index("struct EqualKeys") < patched.index("EqualKeys()")  # defined before use
    assert installed.read_text() == before  # the user's install is only read
    assert patched_nerfacc.patched_copy(tmp_path) == tmp_path  # a second copy replaces the first


def test_an_unexpected_source_is_refused():
    with pytest.raises(ValueError, match="unexpected nerfacc"):
        patched_nerfacc.patch_scan_source("namespace device {\nint x;\n")


def test_the_process_imports_the_patched_copy(tmp_path):
    script = (
        f"import sys; sys.path.insert(0, {str(BENCHMARKS)!r}); import patched_nerfacc, pathlib; "
        f"patched_nerfacc.use_patched_nerfacc(pathlib.Path({str(tmp_path)!r})); import nerfacc; print(nerfacc.__file__)"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1].startswith(str(tmp_path))
