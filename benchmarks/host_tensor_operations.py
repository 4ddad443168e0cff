"""The operations on host (CPU) tensors inside GPU training steps, counted by name with the first place each is
called from: what a step should not have. A large one makes a copy to the device and wakes torch's CPU thread
pool, which then spins on every core (docs/benchmarks.md, "Which threads"); small ones cost launches and CPU scalar
reads.

    python benchmarks/host_tensor_operations.py --data <lego> --method vqad-float
    python benchmarks/host_tensor_operations.py --data <lego> --method vqad --first-step 300 --steps 10

The method trains as the lego benchmark sets it up (its ``--overrides`` too), untimed, up to the counted steps.
Operations on tensors of at least ``--large`` elements are marked large.
"""

from __future__ import annotations

import collections
import os
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Tuple

import torch
import tyro
from torch.utils._python_dispatch import TorchDispatchMode

import lego_benchmark


@dataclass
class Args:
    data: Path
    """The scene (as for the lego benchmark)."""
    method: str = "vqad-float"
    """The method to train (nerfstudio's name, or METHOD@TAG with --overrides)."""
    first_step: int = 300
    """The first counted step (after the float warm-up's first steps and the first pruning by default)."""
    steps: int = 10
    """Steps counted."""
    large: int = 32768
    """Elements from which a host tensor is large (torch's CPU operations split work across threads from here)."""
    overrides: Dict[str, str] = field(default_factory=dict)
    """As the lego benchmark's ``--overrides``."""
    output_dir: Path = Path("outputs/host-tensor-operations")
    """Where the run's checkpoints and logs go."""


class HostTensorOperations(TorchDispatchMode):
    """Counts the operations with a host tensor among their tensor arguments, by (name, large), and keeps where
    each was first called from."""

    def __init__(self, large: int) -> None:
        super().__init__()
        self.large = large
        self.counts: Dict[Tuple[str, bool], int] = collections.Counter()
        self.first_caller: Dict[Tuple[str, bool], str] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        tensors = [
            value for value in _flat(list(args) + list((kwargs or {}).values())) if isinstance(value, torch.Tensor)
        ]
        on_host = [tensor.numel() for tensor in tensors if tensor.device.type == "cpu"]
        if on_host:
            key = (func._schema.name, max(on_host) >= self.large)
            self.counts[key] += 1
            self.first_caller.setdefault(key, _caller())
        return func(*args, **(kwargs or {}))


def _flat(values: List) -> List:
    """``values`` with lists and tuples among them unpacked (one level: index lists, tensor lists)."""
    return [item for value in values for item in (value if isinstance(value, (list, tuple)) else [value])]


def _caller(depth: int = 4) -> str:
    """The innermost ``depth`` frames outside torch's dispatch machinery, innermost first."""
    frames = [
        frame
        for frame in traceback.extract_stack()[:-2]
        if "torch/utils" not in frame.filename and "torch/_" not in frame.filename
    ]
    return " <- ".join(f"{os.path.basename(f.filename)}:{f.lineno} {f.name}" for f in frames[-depth:][::-1])


def main(args: Args) -> None:
    if not torch.cuda.is_available():
        raise SystemExit("this needs CUDA: on the CPU every tensor is a host tensor")
    import nerfstudio.utils.external  # noqa: F401  (before the trainer: see lego_benchmark.main)

    bench = lego_benchmark.BenchmarkConfig(data=args.data, output_dir=args.output_dir, overrides=args.overrides)
    steps = range(args.first_step, args.first_step + args.steps)
    config = lego_benchmark._trainer_config(args.method, bench)
    config.max_num_iterations = steps.stop
    trainer = lego_benchmark._set_up_trainer(config)
    counter = HostTensorOperations(args.large)
    stop_counting = lambda: counter.__exit__(None, None, None)  # noqa: E731
    trainer.callbacks += lego_benchmark.around_steps(steps, counter.__enter__, stop_counting)
    trainer.train()
    print(f"\n{args.method}: operations on host tensors in steps {steps[0]}..{steps[-1]}")
    print("| operation | large | calls | first called from |")
    print("|---|---|---|---|")
    for (name, large), count in counter.counts.most_common():
        print(f"| {name} | {'yes' if large else ''} | {count} | {counter.first_caller[(name, large)]} |")


if __name__ == "__main__":
    main(tyro.cli(Args))
