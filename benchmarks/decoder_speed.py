"""Wall time of vqad's decoder MLPs with PyTorch's linear layers and with the fused Triton kernels
(``--pipeline.model.fused-decoders``), in one process on one GPU.

    python benchmarks/decoder_speed.py --samples 400000

Rows: the density MLP and the colour MLP, each forward only (as a render or the training step's density pass
without gradients runs them) and forward + backward (the graded pass), with TF32 products as training uses them.
Each row is the mean over ``--repeats`` calls, timed from the first launch to the GPU's completion, so that
launching the operations counts as it does in a training step. Inputs are random; the largest difference between
the two paths' outputs is printed with the table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Tuple

import torch
import tyro
from nerfstudio.data.scene_box import SceneBox

from vqad_nerfstudio.kernels import fused_mlp
from vqad_nerfstudio.models.vqad import VQADModelConfig

from gpu_timing import seconds_per_call


@dataclass
class Args:
    samples: int = 400_000
    """Rows per call (a lego training step at 32768 rays evaluates about 400 k samples)."""
    repeats: int = 200
    """Calls per row."""


def main(args: Args) -> None:
    if not torch.cuda.is_available() or fused_mlp.triton is None:
        raise SystemExit("this benchmark needs CUDA and Triton")
    torch.manual_seed(0)
    torch.set_float32_matmul_precision("high")
    config = VQADModelConfig(num_levels=2, base_resolution=4, dense_resolution=8)
    field = config.setup(scene_box=SceneBox(aabb=torch.tensor([[-1.0] * 3, [1.0] * 3])), num_train_data=1).field
    field = field.cuda()
    features = torch.randn(args.samples, field.grid.feature_dim, device="cuda", requires_grad=True)
    geo = torch.randn(args.samples, field.geo_feat_dim, device="cuda", requires_grad=True)
    harmonics = torch.randn(args.samples, field.direction_encoding.get_out_dim(), device="cuda")

    def density(fused: bool) -> Tuple[torch.Tensor, torch.Tensor]:
        if fused:
            raw, geo_out = fused_mlp.mlp_forward(field.density_mlp, features, split=1)
            return raw, geo_out
        hidden = field.density_mlp(features)
        return hidden[:, :1], hidden[:, 1:]

    def colour(fused: bool) -> torch.Tensor:
        if fused:
            return fused_mlp.mlp_forward(field.color_mlp, geo, harmonics)[0]
        return field.color_mlp(torch.cat([geo, harmonics], dim=-1))

    def graded_density(fused: bool) -> None:
        raw, geo_out = density(fused)
        (raw.sum() + geo_out.sum()).backward()

    def graded_colour(fused: bool) -> None:
        colour(fused).sum().backward()

    rows: List[Tuple[str, float, float]] = []
    cases = {
        "density MLP, forward": lambda fused: torch.no_grad()(density)(fused),
        "density MLP, forward + backward": graded_density,
        "colour MLP, forward": lambda fused: torch.no_grad()(colour)(fused),
        "colour MLP, forward + backward": graded_colour,
    }
    for name, case in cases.items():
        rows.append(
            (
                name,
                seconds_per_call(lambda: case(False), args.repeats),
                seconds_per_call(lambda: case(True), args.repeats),
            )
        )
    with torch.no_grad():
        difference = max(
            float((torch.cat(density(True), -1) - torch.cat(density(False), -1)).abs().max()),
            float((colour(True) - colour(False)).abs().max()),
        )
    print(f"\nDevice: {torch.cuda.get_device_name()}; {args.samples} rows, mean of {args.repeats} calls, TF32")
    print("| decoder | PyTorch, ms | fused kernels, ms | ratio |")
    print("|---|---|---|---|")
    for name, reference, fused in rows:
        print(f"| {name} | {reference * 1e3:.3f} | {fused * 1e3:.3f} | x{reference / fused:.2f} |")
    print(f"\nlargest output difference between the paths: {difference:.2e}")


if __name__ == "__main__":
    main(tyro.cli(Args))
