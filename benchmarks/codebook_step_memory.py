"""Peak memory of training steps of an 8-bit codebook store: the straight-through codewords of every row and the
index rate term, forward and backward, and with ``--optimizer`` the optimiser's update (what a vqad step adds per
level on top of the field).

    python benchmarks/codebook_step_memory.py --rows 1000000 [--no-fuse-rate]
    python benchmarks/codebook_step_memory.py --rows 1000000 --optimizer adam
    python benchmarks/codebook_step_memory.py --rows 1000000 --optimizer in-backward

Without an optimiser it reports the step's peak above the parameters and their gradients; with one, the peak of
two whole steps (parameters, gradients, moments, temporaries) above what was allocated before the store existed.
On CUDA it reads the device's peak allocation, on the CPU the growth of the process's peak resident memory (run
it in a fresh process).
"""

from __future__ import annotations

import resource
from dataclasses import dataclass
from typing import Literal

import torch
import tyro

from vqad_nerfstudio.encodings.vertex_features import CodebookFeatures
from vqad_nerfstudio.optim import InBackwardAdam


@dataclass
class Args:
    rows: int = 1_000_000
    """Vertices of the store (lego's five levels hold about 1.1 million)."""
    index_bits: int = 8
    """Bits per index: 2**index_bits logits per row."""
    fuse_rate: bool = True
    """Compute the rate in the table's pass (vqad's training does when the rate weight is > 0)."""
    optimizer: Literal["none", "adam", "in-backward"] = "none"
    """Also update the logits: torch's Adam, or vqad's InBackwardAdam (the update in the backward pass, bfloat16
    first moment); measures two whole steps."""


def _allocated(cuda: bool) -> int:
    """Bytes in use now (CUDA) or at the process's peak so far (CPU)."""
    return torch.cuda.memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main(args: Args) -> None:
    cuda = torch.cuda.is_available()
    torch.manual_seed(0)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = _allocated(cuda)
    store = CodebookFeatures(args.rows, args.index_bits, feature_dim=16, fuse_rate=args.fuse_rate)
    store = store.to("cuda" if cuda else "cpu")
    if args.optimizer == "none":
        store.logits.grad = torch.zeros_like(store.logits)  # the gradient buffer exists after a first step
        start = _allocated(cuda)
    optimizer = {"none": None, "adam": torch.optim.Adam, "in-backward": InBackwardAdam}[args.optimizer]
    optimizer = optimizer([store.logits], lr=0.05, eps=1e-15) if optimizer else None
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(1 if optimizer is None else 2):
        if optimizer is not None:
            optimizer.zero_grad()
        (store.table().square().sum() + 1e-4 * store.index_rate_bits()).backward()
        if optimizer is not None:
            optimizer.step()
    if cuda:
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() if cuda else _allocated(cuda)
    logits = store.logits.numel() * store.logits.element_size()
    device = torch.cuda.get_device_name() if cuda else "cpu"
    what = "the step's peak above parameters and gradients" if optimizer is None else f"peak with {args.optimizer}"
    print(
        f"{device}: {args.rows} rows of {2**args.index_bits} logits ({logits / 2**20:.0f} MiB); {what}: "
        f"{(peak - start) / 2**20:.0f} MiB, {(peak - start) / logits:.2f}x the logits"
    )


if __name__ == "__main__":
    main(tyro.cli(Args))
