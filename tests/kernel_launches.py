"""The kernel specialisations a test run launches, recorded under Triton's interpreter so that they can be compiled
for a GPU on a machine without one (``tests/test_kernel_compilation.py``).

The interpreter runs a kernel's Python as Python: code that Triton's compiler refuses (a variable whose type changes
inside a loop, say) passes the interpreted tests and fails on the first GPU. Triton's compiler itself runs on any
machine, so CI compiles every specialisation the interpreted tests launched for a CUDA target as well.

With ``VQAD_KERNEL_LAUNCHES=FILE`` set and ``TRITON_INTERPRET=1``, the tests' conftest records each launch's kernel,
argument types, constexpr values and compile options as one JSON line in FILE (deduplicated)."""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path
from typing import Any, Dict, Optional

import torch

LAUNCHES_VARIABLE = "VQAD_KERNEL_LAUNCHES"
"""The environment variable naming the file of recorded launches."""

_POINTER_TYPES = {
    torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float64: "*fp64",
    torch.int64: "*i64", torch.int32: "*i32", torch.int16: "*i16", torch.int8: "*i8", torch.uint8: "*u8",
    torch.bool: "*i1",
}  # fmt: skip


def launches_file() -> Optional[Path]:
    """The file of recorded launches, if ``VQAD_KERNEL_LAUNCHES`` names one."""
    path = os.environ.get(LAUNCHES_VARIABLE)
    return Path(path) if path else None


def _is_constexpr(parameter: inspect.Parameter) -> bool:
    return "constexpr" in str(parameter.annotation)  # "tl.constexpr" under postponed annotations, else the class


def _argument_type(value: Any) -> str:
    """Triton's type of a runtime argument (as its JIT would see it, less the specialisations on values)."""
    if isinstance(value, torch.Tensor):
        if value.dtype not in _POINTER_TYPES:
            raise TypeError(f"no pointer type recorded for {value.dtype}")
        return _POINTER_TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type recorded for {type(value).__name__}")


def describe_launch(fn, args: tuple, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """A launch of the kernel ``fn`` (its Python function) as JSON: module, name, each argument's type or constexpr
    value, and the launch's compile options (``num_warps``, ...)."""
    parameters = list(inspect.signature(fn).parameters.values())
    names = [parameter.name for parameter in parameters]
    bound = dict(zip(names, args))
    bound.update((name, value) for name, value in kwargs.items() if name in names)
    options = {name: value for name, value in kwargs.items() if name not in names}
    signature, constexprs = {}, {}
    for index, parameter in enumerate(parameters):
        value = bound.get(parameter.name, parameter.default)
        if _is_constexpr(parameter) or value is None:
            signature[parameter.name] = "constexpr"
            constexprs[index] = value
        else:
            signature[parameter.name] = _argument_type(value)
    return {"module": fn.__module__, "kernel": fn.__name__, "signature": signature, "constexprs": constexprs,
            "options": options}  # fmt: skip


def record_launches(path: Path) -> None:
    """Write every interpreted kernel launch of this process to ``path`` (emptied first; one JSON line per
    specialisation)."""
    from triton.runtime.interpreter import InterpretedFunction

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("")
    seen = set()
    run = InterpretedFunction.run

    def recorded(self, *args, grid, warmup, **kwargs):
        line = json.dumps(describe_launch(self.fn, args, kwargs))  # signature in parameter order
        if line not in seen:
            seen.add(line)
            with path.open("a") as file:
                file.write(line + "\n")
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = recorded
