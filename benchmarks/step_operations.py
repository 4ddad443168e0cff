"""The operations one vqad training step launches, forward and backward, in each phase of a run: PyTorch operations
that run a kernel (ATen calls other than views and allocations) and Triton launches, with the PyTorch path,
the fused kernels, and the fused kernels with fused decoders.

    python benchmarks/step_operations.py                      # on CUDA
    TRITON_INTERPRET=1 python benchmarks/step_operations.py   # the same counts on a CPU (the kernels interpreted)

On a GPU a training step is bound by launching its work (docs/benchmarks.md, "GPU fast path"): these counts are
what the fast path shrinks, and they are the same on any machine. The model is small (five levels up to 32³) and
the rays random, since the counts depend on the phase and the levels, not on the grid's size or the batch's; the
optimisers' steps are not counted, and the gradients are set to None before the counted step as nerfstudio's
optimisers set them before each step (so that they are assigned, not added to).

    python benchmarks/step_operations.py --paths PyTorch fused   # a subset of the paths (older commits)
    python benchmarks/step_operations.py --codebook-bits 8       # codebooks rounded in each step
    python benchmarks/step_operations.py --by-operation          # by name, against the float twin's step
"""

from __future__ import annotations

import collections
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Dict, Iterator, List, Literal, Tuple

import torch
import tyro
from nerfstudio.cameras.rays import RayBundle
from nerfstudio.data.scene_box import SceneBox
from torch.utils._python_dispatch import TorchDispatchMode
from vqad_nerfstudio.method_configs.vqad import IN_BACKWARD_GROUPS

from vqad_nerfstudio.kernels import runs_on, triton
from vqad_nerfstudio.models.vqad import VQADModel, VQADModelConfig
from vqad_nerfstudio.optim import InBackwardAdam

Phase = Literal["warm-up", "straight-through", "frozen"]
PHASES: Tuple[Phase, ...] = ("warm-up", "straight-through", "frozen")
PATHS: Dict[str, Dict[str, bool]] = {
    "PyTorch": dict(fused_kernels=False),
    "fused": dict(fused_kernels=True, fused_decoders=False),
    "fused, decoders too": dict(fused_kernels=True, fused_decoders=True),
}
"""The paths compared: the model settings of each."""

_NO_LAUNCH = {
    "aten::" + name
    for name in (
        "view _unsafe_view detach alias t transpose expand reshape slice select unsqueeze squeeze as_strided permute "
        "split split_with_sizes unbind lift_fresh empty empty_strided empty_like new_empty is_same_size"
    ).split()
}
"""ATen operations that launch no kernel (views and allocations)."""

_HOST_WAITS = {
    "aten::" + name
    for name in (
        "nonzero _unique2 unique_dim unique_consecutive _local_scalar_dense masked_select is_nonzero equal"
    ).split()
}
"""ATen operations after which the host waits for the device on CUDA: their output's size, or a value, is read back
(``tensor.item()``, ``bool(tensor)``, ``torch.unique``, ``torch.nonzero``, masks). Indexing with a boolean mask
and ``repeat_interleave`` without ``output_size`` wait too and are counted apart (see :meth:`_Counter.waits`)."""


@dataclass
class Args:
    rays: int = 128
    """Rays per step."""
    index_bits: int = 4
    """Bits per learned index (the count does not depend on it)."""
    paths: Tuple[str, ...] = tuple(PATHS)
    """The paths to count (of PATHS)."""
    codebook_bits: int = 16
    """Bits per codebook value (16: fp16, no rounding; 2..8: rounded in each step)."""
    by_operation: bool = False
    """Also list each row's PyTorch operations by name, forward and backward, and the float twin's (vqad-float on
    the same path) beside them: where a phase's operations beyond the twin's come from."""


class _Counter(TorchDispatchMode):
    """Counts the ATen operations that launch work and the Triton launches inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.operations: Dict[str, int] = collections.Counter()
        self.waits: Dict[str, int] = collections.Counter()
        """The operations after which the host waits for the device, by name (a boolean mask's as ``NAME[mask]``)."""
        self.launches = 0
        self._inside_triton = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if not self._inside_triton:
            if name not in _NO_LAUNCH:
                self.operations[name] += 1
            if name in _HOST_WAITS:
                self.waits[name] += 1
            elif name in ("aten::index", "aten::index_put", "aten::index_put_") and _has_mask(args):
                self.waits[name + "[mask]"] += 1
            elif name == "aten::repeat_interleave" and (kwargs or {}).get("output_size") is None:
                self.waits[name] += 1
        return func(*args, **(kwargs or {}))


def _has_mask(args: tuple) -> bool:
    """Whether an index operation's indices (its second argument) hold a boolean mask."""
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(index, torch.Tensor) and index.dtype == torch.bool for index in indices or ())


_ACTIVE: List[_Counter] = []
"""The counters counting now, innermost last."""


@contextmanager
def _counting(counter: _Counter) -> Iterator[None]:
    """Count ATen operations and Triton launches into ``counter`` inside this block."""
    _ACTIVE.append(counter)
    try:
        with counter:
            yield
    finally:
        _ACTIVE.pop()


def _count_triton_launches() -> None:
    """Count each Triton launch in the active counter (and leave the interpreter's own tensor calls uncounted)."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    for cls in (JITFunction, InterpretedFunction):
        run = cls.run

        def counted(self, *args, _run=run, **kwargs):
            counter = _ACTIVE[-1] if _ACTIVE else None
            if counter is not None:
                counter.launches += 1
                counter._inside_triton += 1
            try:
                return _run(self, *args, **kwargs)
            finally:
                if counter is not None:
                    counter._inside_triton -= 1

        cls.run = counted


def _model(path: Dict[str, bool], phase: Phase, args: Args, device: str) -> VQADModel:
    torch.manual_seed(0)
    config = VQADModelConfig(
        index_bits=args.index_bits, codebook_bits=args.codebook_bits, base_resolution=2, dense_resolution=8,
        index_warmup_steps=100, warmup_grown_levels=True, tf32=False, **path,
    )  # fmt: skip
    model = config.setup(scene_box=SceneBox(aabb=torch.tensor([[-1.5] * 3, [1.5] * 3])), num_train_data=1)
    model = model.to(device).train()
    if phase != "warm-up":
        generator = torch.Generator(device=device).manual_seed(1)
        model.grid.prune(lambda cells, _: torch.rand(cells.shape[0], generator=generator, device=device) < 0.3)
        model._set_index_relaxation(200, 100)
        model._quantize_float_warmup()
        if phase == "frozen":
            model._freeze_indices()
    model.round_decoder_weights()
    return model


def _rays(model: VQADModel, count: int, device: str) -> RayBundle:
    generator = torch.Generator().manual_seed(2)
    origins = torch.nn.functional.normalize(torch.randn(count, 3, generator=generator), dim=-1) * 4
    directions = torch.nn.functional.normalize(-origins + 0.5 * torch.randn(count, 3, generator=generator), dim=-1)
    bundle = RayBundle(
        origins=origins.to(device),
        directions=directions.to(device),
        pixel_area=torch.ones(count, 1, device=device),
        camera_indices=torch.zeros(count, 1, dtype=torch.long, device=device),
    )
    return model.collider(bundle)


def _step_counts(model: VQADModel, bundle: RayBundle) -> Tuple[_Counter, _Counter]:
    """The operations of one step's forward pass (outputs and losses) and of its backward pass, whose logits are
    updated by an in-backward Adam as `ns-train vqad` updates them (in the first step too: the counted step takes
    the indices it forecast)."""
    batch = {"image": torch.rand(len(bundle), 3, device=bundle.origins.device)}
    logits = [p for group in IN_BACKWARD_GROUPS for p in model.get_param_groups().get(group, []) if p.numel()]
    optimizer = InBackwardAdam(logits, lr=1e-3) if logits else None  # noqa: F841 (alive for the counted step)

    def loss() -> torch.Tensor:
        outputs = model.get_outputs(bundle)
        return sum(model.get_loss_dict(outputs, batch).values())

    loss().backward()  # a first step: caches, compilation
    model.train()  # as nerfstudio's trainer does before each step (until `86a8d4e` this dropped the forecast)
    model.zero_grad(set_to_none=True)  # as nerfstudio's optimisers do before each step: gradients assigned, not added
    forward, backward = _Counter(), _Counter()
    with _counting(forward):
        value = loss()
    with _counting(backward):
        value.backward()
    return forward, backward


def main(args: Args) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if triton is None or not runs_on(torch.empty(0, device=device)):
        raise SystemExit("the fused path needs Triton with CUDA, or TRITON_INTERPRET=1 on a CPU")
    _count_triton_launches()
    rows = []
    twins = {}
    for name in args.paths if args.by_operation else ():
        twin = _model(dict(PATHS[name], feature_store="float"), "warm-up", args, device)
        twins[name] = _step_counts(twin, _rays(twin, args.rays, device))
    for phase in PHASES:
        for name in args.paths:
            model = _model(PATHS[name], phase, args, device)
            forward, backward = _step_counts(model, _rays(model, args.rays, device))
            rows.append((phase, name, forward, backward))
    bits = f"{args.index_bits}-bit indices, {args.codebook_bits}-bit codebooks"
    print(f"\nOperations of one vqad training step ({device}, {args.rays} rays, {bits})")
    print("| phase | path | forward: PyTorch ops + Triton launches | backward | step | host waits |")
    print("|---|---|---|---|---|---|")
    for phase, name, forward, backward in rows:
        sides = [sum(c.operations.values()) + c.launches for c in (forward, backward)]
        if forward.launches or backward.launches:
            name += f" ({forward.launches} + {backward.launches} Triton)"
        waits = forward.waits + backward.waits
        listed = ", ".join(f"{op.removeprefix('aten::')} {count}" for op, count in sorted(waits.items()))
        print(f"| {phase} | {name} | {sides[0]} | {sides[1]} | **{sum(sides)}** | {sum(waits.values())}: {listed} |")
    for name, (forward, backward) in twins.items():
        sides = [sum(c.operations.values()) + c.launches for c in (forward, backward)]
        print(f"| (vqad-float) | {name} ({forward.launches} + {backward.launches} Triton) | {sides[0]} | {sides[1]} "
              f"| **{sum(sides)}** | |")  # fmt: skip
    for phase, name, forward, backward in rows if twins else ():
        print(f"\n{phase}, {name}: operations beyond (+) or short of (-) vqad-float's, forward / backward")
        for side, ours, twin in (("forward", forward, twins[name][0]), ("backward", backward, twins[name][1])):
            names = set(ours.operations) | set(twin.operations)
            changes = {op: ours.operations[op] - twin.operations[op] for op in names}
            changes["Triton launches"] = ours.launches - twin.launches
            listed = ", ".join(f"{op.removeprefix('aten::')} {n:+d}" for op, n in sorted(changes.items()) if n)
            print(f"- {side}: {listed or 'none'}")


if __name__ == "__main__":
    main(tyro.cli(Args))
