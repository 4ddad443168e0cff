"""Every kernel specialisation the interpreted kernel tests launched compiles for a CUDA GPU (sm_90), here, without
one: Triton's compiler runs on any machine, and its interpreter accepts code that the compiler refuses.

Run after the interpreted kernel tests recorded their launches (``tests/kernel_launches.py``), with the same
``VQAD_KERNEL_LAUNCHES`` and without ``TRITON_INTERPRET``::

    VQAD_KERNEL_LAUNCHES=build/kernel-launches.jsonl TRITON_INTERPRET=1 pytest tests/test_*_kernel.py
    VQAD_KERNEL_LAUNCHES=build/kernel-launches.jsonl pytest tests/test_kernel_compilation.py

Skipped where no launches were recorded."""

from __future__ import annotations

import importlib
import json
from typing import Any, Dict, List

import pytest

from vqad_nerfstudio.kernels import INTERPRETED, triton

from kernel_launches import launches_file


def _recorded() -> List[Dict[str, Any]]:
    path = launches_file()
    if path is None or not path.exists() or INTERPRETED:
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


LAUNCHES = _recorded()

pytestmark = pytest.mark.skipif(
    not LAUNCHES or triton is None, reason="no kernel launches recorded (see tests/kernel_launches.py), or no Triton"
)


@pytest.mark.parametrize(
    "launch", LAUNCHES, ids=[f"{launch['kernel']}-{number}" for number, launch in enumerate(LAUNCHES)]
)
def test_the_kernel_compiles_for_a_gpu(launch: Dict[str, Any]) -> None:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = getattr(importlib.import_module(launch["module"]), launch["kernel"])
    constexprs = {(int(index),): value for index, value in launch["constexprs"].items()}
    source = ASTSource(fn=kernel, signature=launch["signature"], constexprs=constexprs)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=launch["options"])
    assert compiled.asm["cubin"]
