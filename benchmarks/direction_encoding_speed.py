"""Wall time of vqad's colour evaluation and of its direction encoding alone, with nerfstudio's spherical harmonics
(PyTorch) and with the Triton kernel, in one process on one GPU.

    python benchmarks/direction_encoding_speed.py --samples 400000

Each row is the mean over ``--repeats`` calls, timed from the first launch to the GPU's completion (so the time
to launch the operations counts, as it does in a training step). The colour MLP's inputs are random.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import tyro
from nerfstudio.data.scene_box import SceneBox

from vqad_nerfstudio.kernels import spherical_harmonics
from vqad_nerfstudio.models.vqad import VQADModelConfig

from gpu_timing import seconds_per_call


@dataclass
class Args:
    samples: int = 400_000
    """Directions per call (a lego training step at 32768 rays evaluates about 400 k samples' colours)."""
    repeats: int = 200
    """Calls per row."""


def main(args: Args) -> None:
    if not torch.cuda.is_available() or spherical_harmonics.triton is None:
        raise SystemExit("this benchmark needs CUDA and Triton")
    torch.manual_seed(0)
    config = VQADModelConfig(num_levels=2, base_resolution=4, dense_resolution=8)
    field = config.setup(scene_box=SceneBox(aabb=torch.tensor([[-1.0] * 3, [1.0] * 3])), num_train_data=1).field
    field = field.cuda()
    directions = torch.nn.functional.normalize(torch.randn(args.samples, 3, device="cuda"), dim=-1)
    geo = torch.randn(args.samples, field.geo_feat_dim, device="cuda", requires_grad=True)
    levels = field.direction_encoding.levels

    def colour_step() -> None:
        field.rgb_at(geo, directions).sum().backward()

    rows = []
    for name, fused in (("nerfstudio's encoding", False), ("Triton kernel", True)):
        field.grid.fused = fused
        encode = (
            (lambda: spherical_harmonics.spherical_harmonics(directions, levels))
            if fused
            else (lambda: field.direction_encoding(directions))
        )
        rows.append((name, seconds_per_call(encode, args.repeats), seconds_per_call(colour_step, args.repeats)))
    print(f"\nDevice: {torch.cuda.get_device_name()}; {args.samples} directions, mean of {args.repeats} calls")
    print("| direction encoding | encoding alone, ms | colour forward + backward, ms |")
    print("|---|---|---|")
    for name, encoding, colour in rows:
        print(f"| {name} | {encoding * 1e3:.3f} | {colour * 1e3:.3f} |")
    (_, slow_encoding, slow_colour), (_, fast_encoding, fast_colour) = rows
    ratios = f"encoding x{slow_encoding / fast_encoding:.1f}, colour x{slow_colour / fast_colour:.2f}"
    print(f"\nkernel vs nerfstudio: {ratios}")


if __name__ == "__main__":
    main(tyro.cli(Args))
