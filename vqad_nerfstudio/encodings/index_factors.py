"""Learned indices as two factors: a ``2**b``-way index learned as two independent ``2**(b/2)``-way choices.

With one factor (VQAD's index) each vertex holds ``2**b`` logits: 256 at 8 bits, 1024 at 10, all read and written
with Adam's two moments every training step (about 3 kB a vertex at 8 bits). With two factors it holds
``2 * 2**(b/2)`` (32 at 8 bits, 64 at 10): codeword ``i * S + j`` (``S = 2**(b/2)``) has the soft weight
``p1[i] * p2[j]``, the product of the factors' softmaxes, and the hard index is the pair of their argmaxes, which
is also the argmax of that product. The codebook, the hard indices, the file and everything downstream of them are
those of a one-factor index; only how the index is learned changes.

The functions take ``[rows, 2 * S]`` logits (the first factor's ``S``, then the second's) and never form the
``[rows, S * S]`` soft index, except :func:`joint` for small inputs.
"""

from __future__ import annotations

from typing import Optional

import torch
from jaxtyping import Float, Int
from torch import Tensor

from vqad_nerfstudio.optim import widened

INDEX_FACTORS = (1, 2)
"""The supported numbers of factors of a learned index."""


def check_factors(index_bits: int, factors: int, what: str = "index_bits") -> None:
    """``ValueError`` unless ``factors`` is supported and divides ``index_bits`` (named ``what``)."""
    if factors not in INDEX_FACTORS:
        raise ValueError(f"index_factors must be one of {INDEX_FACTORS}, got {factors!r}")
    if index_bits % factors:
        raise ValueError(f"{what} must be a multiple of index_factors ({factors}) to split an index, got {index_bits}")


def logit_width(index_bits: int, factors: int) -> int:
    """Logits per row of a ``index_bits``-bit index in ``factors`` factors."""
    check_factors(index_bits, factors)
    return factors * 2 ** (index_bits // factors)


def factor_softmax(logits: Float[Tensor, "m w"], temperature: float) -> Float[Tensor, "m 2 s"]:
    """Each factor's ``softmax(logits / temperature)``, in float32."""
    return torch.softmax(widened(logits).view(logits.shape[0], 2, logits.shape[1] // 2) / temperature, dim=-1)


def hard_indices(logits: Float[Tensor, "m w"]) -> Int[Tensor, "m"]:
    """Each row's index ``i * S + j``, ``i`` and ``j`` the argmaxes of the two factors."""
    choices = logits.view(logits.shape[0], 2, logits.shape[1] // 2).argmax(dim=-1)
    return choices[:, 0] * (logits.shape[1] // 2) + choices[:, 1]


def joint(soft: Float[Tensor, "m 2 s"]) -> Float[Tensor, "m c"]:
    """The soft index over all ``S * S`` codewords (the outer product of the factors), for small inputs."""
    return (soft[:, 0, :, None] * soft[:, 1, None, :]).flatten(1)


def share_sums(soft: Float[Tensor, "m 2 s"]) -> Float[Tensor, "c"]:
    """The column sums of :func:`joint` (summed over the rows), without forming it."""
    return (soft[:, 0].t() @ soft[:, 1]).flatten()


def soft_grad(
    soft: Float[Tensor, "m 2 s"],
    grad_rows: Optional[Float[Tensor, "m k"]] = None,
    codebook: Optional[Float[Tensor, "c k"]] = None,
    grad_share: Optional[Float[Tensor, "c"]] = None,
) -> Float[Tensor, "m 2 s"]:
    """The gradient in each factor's softmax, given the gradient in the soft index as ``grad_rows @ codebook.T``
    plus ``grad_share`` (one value per codeword, for every row), either absent: factor 1's entry ``i`` is
    ``sum_j p2[j] * g[i * S + j]``, factor 2's entry ``j`` is ``sum_i p1[i] * g[i * S + j]``."""
    rows, size = soft.shape[0], soft.shape[2]
    first, second = soft[:, 0], soft[:, 1]
    grad = soft.new_zeros(rows, 2, size)
    if grad_rows is not None:
        grid = codebook.to(soft.dtype).view(size, size, -1)  # [i, j, k]
        width = grid.shape[2]
        # sum over the other factor's choices first: [rows, S * k] instead of the [rows, S * S] soft gradient
        over_j = (second @ grid.transpose(0, 1).reshape(size, size * width)).view(rows, size, width)
        over_i = (first @ grid.reshape(size, size * width)).view(rows, size, width)
        grad[:, 0] = (over_j * grad_rows.to(soft.dtype)[:, None, :]).sum(dim=-1)
        grad[:, 1] = (over_i * grad_rows.to(soft.dtype)[:, None, :]).sum(dim=-1)
    if grad_share is not None:
        shares = grad_share.to(soft.dtype).view(size, size)
        grad[:, 0] += second @ shares.t()
        grad[:, 1] += first @ shares
    return grad


def logit_grad(
    logits: Float[Tensor, "m w"],
    temperature: float,
    grad_rows: Optional[Float[Tensor, "m k"]] = None,
    codebook: Optional[Float[Tensor, "c k"]] = None,
    grad_share: Optional[Float[Tensor, "c"]] = None,
) -> Float[Tensor, "m w"]:
    """The logits' gradient (in float32 for 16-bit logits) through each factor's softmax, given :func:`soft_grad`'s
    terms."""
    soft = factor_softmax(logits, temperature)
    grad = soft_grad(soft, grad_rows, codebook, grad_share)
    grad = soft * (grad - (soft * grad).sum(dim=-1, keepdim=True)) / temperature
    return grad.flatten(1)


def soft_codewords(
    logits: Float[Tensor, "m w"], codebook: Float[Tensor, "c k"], temperature: float
) -> Float[Tensor, "m k"]:
    """Relaxed codewords ``joint(soft) @ codebook``, differentiable, without forming the joint."""
    soft = factor_softmax(logits, temperature)
    rows, size = soft.shape[0], soft.shape[2]
    grid = codebook.view(size, size * codebook.shape[1])  # [i, (j, k)]
    over_i = (soft[:, 0] @ grid.to(soft.dtype)).view(rows, size, codebook.shape[1])
    return (over_i * soft[:, 1, :, None]).sum(dim=1).to(codebook.dtype)


def logits_of_joint(joint_logits: Float[Tensor, "m c"]) -> Float[Tensor, "m w"]:
    """Two factors' logits from logits over all codewords: each factor's max over the other's choices, so that the
    factors' argmaxes pick the joint argmax (how the k-means assignment becomes factored logits)."""
    rows, codewords = joint_logits.shape
    size = round(codewords**0.5)
    if size * size != codewords:
        raise ValueError(f"{codewords} codewords are not the square of a factor's choices")
    grid = joint_logits.view(rows, size, size)
    return torch.cat([grid.amax(dim=2), grid.amax(dim=1)], dim=1)


__all__ = [
    "INDEX_FACTORS",
    "check_factors",
    "logit_width",
    "factor_softmax",
    "hard_indices",
    "joint",
    "share_sums",
    "soft_grad",
    "logit_grad",
    "soft_codewords",
    "logits_of_joint",
]
