"""Adam for the index logits whose update can happen inside the backward pass.

With 8-bit indices every vertex holds 256 float32 logits; trained with torch's Adam the logits exist four times at
the peak (values, gradient, two moments: 4.25 GB on lego's 1.1 M vertices). :class:`InBackwardAdam` keeps the
first moment in bfloat16 (by default) and lets the store's backward pass apply the update as it computes the
gradient, one tile of rows at a time (:func:`vqad_nerfstudio.encodings.straight_through.relaxed_logit_adam_`), so
that the full gradient is never allocated: 2.5 copies of the logits instead of 4. Where a parameter receives an
ordinary gradient instead (the CPU reference lookups, the rate computed on its own), :meth:`InBackwardAdam.step`
applies the same update from ``.grad``.

A 16-bit parameter (logits held in float16) and a 16-bit second moment are written with stochastic rounding
(:func:`stochastically_rounded`): each value goes to one of its two neighbours with the probabilities that make it
exact on average. Rounded to nearest, an update below half a unit in the last place is lost every time: the second
moment moves by 0.1% of itself per step (``beta2 = 0.999``), below bfloat16's resolution (0.4%), and would stop
decaying; a float16 logit of 4 moves in steps of 1/256. The first moment moves by 10% a step and rounds to nearest.

Plain torch: imported by the encodings (which look up a parameter's pending update) and by the trainer config.
"""

from __future__ import annotations

import math
import random
import weakref
from dataclasses import dataclass
from typing import Iterable, Optional, Tuple

import torch
from jaxtyping import Float
from torch import Tensor, nn

_HANDLE = "_in_backward_adam"
"""Attribute of a parameter that points (weakly) at the :class:`InBackwardAdam` that owns it."""


@dataclass
class AdamStep:
    """One Adam update of one parameter: its moments (updated in place) and the step's scalars."""

    exp_avg: Tensor
    exp_avg_sq: Tensor
    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    step: int
    """The update's number, from 1 (for the bias corrections)."""
    seed: int = 0
    """Seed of the stochastic rounding of a 16-bit parameter and second moment (see :func:`stochastically_rounded`)."""

    @property
    def step_size(self) -> float:
        """``lr`` over the first moment's bias correction."""
        return self.lr / (1.0 - self.beta1**self.step)

    @property
    def sqrt_bias2(self) -> float:
        """Square root of the second moment's bias correction."""
        return math.sqrt(1.0 - self.beta2**self.step)


DROPPED_BITS = {torch.float32: 0, torch.bfloat16: 16, torch.float16: 13}
"""The low bits of a float32 a store of each dtype drops (float16: in its normal range, magnitudes from 2**-14)."""


def dropped_bits(dtype: torch.dtype) -> int:
    """:data:`DROPPED_BITS` of ``dtype``; ``ValueError`` for dtypes optimiser state is not kept in."""
    if dtype not in DROPPED_BITS:
        raise ValueError(f"optimiser state is float32, bfloat16 or float16, got {dtype}")
    return DROPPED_BITS[dtype]


def saturation(dtype: torch.dtype) -> float:
    """The magnitude at which a stochastically rounded store of ``dtype`` saturates: float16's largest finite value;
    0 (none) for float32 and bfloat16, which keep float32's range."""
    return torch.finfo(dtype).max if dtype == torch.float16 else 0.0


def widened(tensor: Tensor) -> Tensor:
    """``tensor`` in float32 if it is a 16-bit float, else itself (float32 and float64 computations stay as they
    are)."""
    return tensor.float() if tensor.is_floating_point() and tensor.element_size() < 4 else tensor


def stochastically_rounded(
    values: Float[Tensor, "*s"], dtype: torch.dtype, generator: Optional[torch.Generator] = None
) -> Float[Tensor, "*s"]:
    """float32 ``values`` in ``dtype`` (float32: as they are), each rounded up or down to a neighbour in ``dtype``
    with the probabilities that make the result exact on average: a uniform random integer below ``2**d`` added to
    the float32's bits, whose ``d`` low bits (:data:`DROPPED_BITS`) are then cleared. float16 saturates at its
    largest finite value. The kernels round the same way with their own random numbers."""
    dropped = dropped_bits(dtype)
    if not dropped:
        return values
    largest = saturation(dtype)
    if largest:
        values = values.clamp(-largest, largest)
    noise = torch.randint(0, 1 << dropped, values.shape, generator=generator, dtype=torch.int32, device=values.device)
    bits = (values.float().contiguous().view(torch.int32) + noise).bitwise_and_(-(1 << dropped))
    return bits.view(torch.float32).to(dtype)


def adam_update_(param: Float[Tensor, "*s"], grad: Float[Tensor, "*s"], update: AdamStep) -> None:
    """torch.optim.Adam's update of ``param`` (in place) from ``grad`` and the moments of ``update``, computed in
    float32 and stored in the moments' and the parameter's dtype (a 16-bit parameter and second moment stochastically
    rounded, seeded by ``update.seed``; the first moment to nearest). ``param``, ``grad`` and the moments may be
    matching slices."""
    grad = grad.float()
    value = widened(param)  # param itself when float32 or wider: updated in place
    if update.weight_decay:
        grad = grad + update.weight_decay * value
    exp_avg = update.exp_avg.float().mul_(update.beta1).add_(grad, alpha=1.0 - update.beta1)
    exp_avg_sq = update.exp_avg_sq.float().mul_(update.beta2).addcmul_(grad, grad, value=1.0 - update.beta2)
    denominator = exp_avg_sq.sqrt().div_(update.sqrt_bias2).add_(update.eps)
    value.addcdiv_(exp_avg, denominator, value=-update.step_size)
    update.exp_avg.copy_(exp_avg)
    generator = None  # only for 16-bit targets (float32 ones were updated in place)
    for target, new in ((param, value), (update.exp_avg_sq, exp_avg_sq)):
        if new is not target:
            if generator is None:
                generator = torch.Generator(param.device).manual_seed(update.seed)
            target.copy_(stochastically_rounded(new, target.dtype, generator))


class InBackwardAdam(torch.optim.Optimizer):
    """Adam (torch.optim.Adam's update, without amsgrad) with its moments stored in ``exp_avg_dtype`` and
    ``exp_avg_sq_dtype`` ("param": float32 for a float32 parameter, bfloat16 for a 16-bit one), whose update a
    parameter's backward pass may apply itself (:func:`pending_update`) instead of producing a gradient.

    Parameters updated in the backward pass get no ``.grad``, so nerfstudio skips this optimiser's :meth:`step`
    for them; its learning-rate scheduler still sets ``lr``, which the next backward pass reads. Gradient clipping
    and gradient accumulation do not see such updates: configure neither for its group.
    """

    def __init__(
        self,
        params: Iterable[nn.Parameter],
        lr: float = 1e-3,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        exp_avg_dtype: str = "bfloat16",
        exp_avg_sq_dtype: str = "param",
        in_backward: bool = True,
    ) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.moment_dtypes = {"exp_avg": _moment_dtype(exp_avg_dtype), "exp_avg_sq": _moment_dtype(exp_avg_sq_dtype)}
        """Each moment's dtype, None where it follows its parameter's (:func:`_moment_dtype_for`)."""
        self._seeds = random.Random(torch.initial_seed())
        """Each update's rounding seed (Python's generator: no tensor operation per update)."""
        self.in_backward = in_backward
        """Whether backward passes may apply the update (False: every update comes from ``.grad`` in :meth:`step`)."""
        for group in self.param_groups:
            for param in group["params"]:
                self.adopt(param)

    def adopt(self, param: nn.Parameter) -> None:
        """Let ``param``'s backward pass find this optimiser if it updates in the backward pass (call it for a
        parameter swapped into a group)."""
        if self.in_backward:
            setattr(param, _HANDLE, weakref.ref(self))

    def begin_update(self, param: nn.Parameter) -> AdamStep:
        """Count one update of ``param`` and return its moments (created at zero) and scalars."""
        group = next((g for g in self.param_groups if any(p is param for p in g["params"])), None)
        if group is None:
            raise KeyError("the parameter is not in this optimiser's groups")
        state = self.state[param]
        if not state:
            state["step"] = 0
            for key, dtype in self.moment_dtypes.items():
                state[key] = torch.zeros_like(
                    param, dtype=_moment_dtype_for(param, dtype), memory_format=torch.contiguous_format
                )
        state["step"] = int(state["step"]) + 1
        self._opt_called = True  # what torch's lr schedulers look for (else they warn that step() was never called)
        beta1, beta2 = group["betas"]
        return AdamStep(
            state["exp_avg"], state["exp_avg_sq"], group["lr"], beta1, beta2, group["eps"], group["weight_decay"],
            state["step"], self._seeds.getrandbits(31),
        )  # fmt: skip

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        """Update every parameter that has a gradient (those updated in the backward pass have none)."""
        loss = None if closure is None else closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    adam_update_(param, param.grad, self.begin_update(param))
        return loss

    def load_state_dict(self, state_dict) -> None:
        """torch's loading (which casts the moments to the parameters' dtype), then the moments back to their
        dtypes."""
        super().load_state_dict(state_dict)
        for param, state in self.state.items():
            for key, dtype in self.moment_dtypes.items():
                if torch.is_tensor(state.get(key)):
                    state[key] = state[key].to(_moment_dtype_for(param, dtype))


def _moment_dtype(name: str) -> Optional[torch.dtype]:
    """The dtype a moment is stored in called ``name`` (float32, bfloat16 or float16), or None for "param"."""
    if name == "param":
        return None
    dtype = getattr(torch, name, None)
    if dtype not in DROPPED_BITS:
        raise ValueError(f"a moment's dtype is float32, bfloat16, float16 or param, got {name!r}")
    return dtype


def _moment_dtype_for(param: Tensor, dtype: Optional[torch.dtype]) -> torch.dtype:
    """``dtype``, or where it follows the parameter (None): float32 for a float32 parameter, bfloat16 (float32's
    range: a squared gradient underflows float16) for a 16-bit one."""
    if dtype is not None:
        return dtype
    return torch.float32 if param.dtype == torch.float32 else torch.bfloat16


def pending_update(param: Tensor) -> Optional[InBackwardAdam]:
    """The :class:`InBackwardAdam` that owns ``param``, if any (and it still exists): its backward pass may then
    apply the update itself."""
    reference = getattr(param, _HANDLE, None)
    return None if reference is None else reference()


__all__ = [
    "DROPPED_BITS",
    "AdamStep",
    "InBackwardAdam",
    "adam_update_",
    "dropped_bits",
    "pending_update",
    "saturation",
    "stochastically_rounded",
    "widened",
]
