"""Peak memory of one training step of an 8-bit codebook store: the straight-through codewords of every row and
the index rate term, forward and backward (what a vqad step adds per level on top of the field).

    python benchmarks/codebook_step_memory.py --rows 1000000 [--no-fuse-rate]

On CUDA it reports the device's peak allocation above the parameters and their gradients, on the CPU the growth
of the process's peak resident memory (run it in a fresh process).
"""

from __future__ import annotations

import resource
from dataclasses import dataclass

import torch
import tyro

from vqad_nerfstudio.encodings.vertex_features import CodebookFeatures


@dataclass
class Args:
    rows: int = 1_000_000
    """Vertices of the store (lego's five levels hold about 1.1 million)."""
    index_bits: int = 8
    """Bits per index: 2**index_bits logits per row."""
    fuse_rate: bool = True
    """Compute the rate in the table's pass (vqad's training does when the rate weight is > 0)."""


def main(args: Args) -> None:
    cuda = torch.cuda.is_available()
    torch.manual_seed(0)
    store = CodebookFeatures(args.rows, args.index_bits, feature_dim=16, fuse_rate=args.fuse_rate)
    store = store.to("cuda" if cuda else "cpu")
    store.logits.grad = torch.zeros_like(store.logits)  # the gradient buffer exists after a first step
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    (store.table().square().sum() + 1e-4 * store.index_rate_bits()).backward()
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    logits = store.logits.numel() * store.logits.element_size()
    device = torch.cuda.get_device_name() if cuda else "cpu"
    print(
        f"{device}: {args.rows} rows of {2**args.index_bits} logits ({logits / 2**20:.0f} MiB); the step's peak "
        f"above parameters and gradients: {(peak - before) / 2**20:.0f} MiB, {(peak - before) / logits:.2f}x the logits"
    )


if __name__ == "__main__":
    main(tyro.cli(Args))
