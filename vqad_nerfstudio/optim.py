"""Adam for the index logits whose update can happen inside the backward pass.

With 8-bit indices every vertex holds 256 float32 logits; trained with torch's Adam the logits exist four times at
the peak (values, gradient, two moments: 4.25 GB on lego's 1.1 M vertices). :class:`InBackwardAdam` keeps the
first moment in bfloat16 (by default) and lets the store's backward pass apply the update as it computes the
gradient, one tile of rows at a time (:func:`vqad_nerfstudio.encodings.vertex_features.relaxed_logit_adam_`), so
that the full gradient is never allocated: 2.5 copies of the logits instead of 4. The second moment stays float32:
its running mean moves by 0.1% of itself per step (``beta2 = 0.999``), below bfloat16's resolution (0.4%), so in
bfloat16 it would stop decaying. Where a parameter receives an ordinary gradient instead (the CPU reference
lookups, the rate computed on its own), :meth:`InBackwardAdam.step` applies the same update from ``.grad``.

Plain torch: imported by the encodings (which look up a parameter's pending update) and by the trainer config.
"""

from __future__ import annotations

import math
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

    @property
    def step_size(self) -> float:
        """``lr`` over the first moment's bias correction."""
        return self.lr / (1.0 - self.beta1**self.step)

    @property
    def sqrt_bias2(self) -> float:
        """Square root of the second moment's bias correction."""
        return math.sqrt(1.0 - self.beta2**self.step)


def adam_update_(param: Float[Tensor, "*s"], grad: Float[Tensor, "*s"], update: AdamStep) -> None:
    """torch.optim.Adam's update of ``param`` (in place) from ``grad`` and the moments of ``update``, computed in
    float32 and stored in the moments' dtype. ``param``, ``grad`` and the moments may be matching slices."""
    grad = grad.float()
    if update.weight_decay:
        grad = grad + update.weight_decay * param
    exp_avg = update.exp_avg.float().mul_(update.beta1).add_(grad, alpha=1.0 - update.beta1)
    exp_avg_sq = update.exp_avg_sq.float().mul_(update.beta2).addcmul_(grad, grad, value=1.0 - update.beta2)
    denominator = exp_avg_sq.sqrt().div_(update.sqrt_bias2).add_(update.eps)
    param.addcdiv_(exp_avg, denominator, value=-update.step_size)
    update.exp_avg.copy_(exp_avg)
    update.exp_avg_sq.copy_(exp_avg_sq)


class InBackwardAdam(torch.optim.Optimizer):
    """Adam (torch.optim.Adam's update, without amsgrad) with its moments stored in ``exp_avg_dtype`` and
    ``exp_avg_sq_dtype``, whose update a parameter's backward pass may apply itself (:func:`pending_update`)
    instead of producing a gradient.

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
        exp_avg_sq_dtype: str = "float32",
        in_backward: bool = True,
    ) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.moment_dtypes = {"exp_avg": _float_dtype(exp_avg_dtype), "exp_avg_sq": _float_dtype(exp_avg_sq_dtype)}
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
                state[key] = torch.zeros_like(param, dtype=dtype, memory_format=torch.contiguous_format)
        state["step"] = int(state["step"]) + 1
        self._opt_called = True  # what torch's lr schedulers look for (else they warn that step() was never called)
        beta1, beta2 = group["betas"]
        return AdamStep(
            state["exp_avg"], state["exp_avg_sq"], group["lr"], beta1, beta2, group["eps"], group["weight_decay"],
            state["step"],
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
        for state in self.state.values():
            for key, dtype in self.moment_dtypes.items():
                if torch.is_tensor(state.get(key)):
                    state[key] = state[key].to(dtype)


def _float_dtype(name: str) -> torch.dtype:
    """The floating-point torch dtype called ``name``."""
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"expected a floating-point torch dtype name (e.g. bfloat16, float32), got {name!r}")
    return dtype


def pending_update(param: Tensor) -> Optional[InBackwardAdam]:
    """The :class:`InBackwardAdam` that owns ``param``, if any (and it still exists): its backward pass may then
    apply the update itself."""
    reference = getattr(param, _HANDLE, None)
    return None if reference is None else reference()


__all__ = ["AdamStep", "InBackwardAdam", "adam_update_", "pending_update"]
