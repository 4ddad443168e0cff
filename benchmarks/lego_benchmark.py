"""Side-by-side benchmark on a Blender scene: nerfstudio's tensorf, vqad and vqad-float.

Every method trains in this one process for the same wall-clock budget (nerfstudio's Trainer,
stopped by a callback when the budget is spent), then renders the eval split at full resolution.
The last thing printed is one table. Run on one GPU:

    python benchmarks/lego_benchmark.py --data ../shared/data/blender-lego-400 --budget-s 120

tensorf builds LPIPS (a download) in its constructor; this script replaces LPIPS by a stub that
reports NaN, so the comparison runs offline. LPIPS is not part of the table.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Tuple

import torch
import tyro


@dataclass
class BenchmarkConfig:
    """Options of the benchmark."""

    data: Path
    """Blender-format scene (transforms_{train,val,test}.json)."""
    methods: Tuple[str, ...] = ("tensorf", "vqad", "vqad-float")
    """nerfstudio method names to compare; METHOD@TAG runs METHOD again under another name (for overrides)."""
    budget_s: float = 120.0
    """Wall-clock training budget per method, in seconds."""
    output_dir: Path = Path("outputs/benchmark")
    """Where runs, checkpoints and results.json go."""
    max_eval_views: int = 25
    """Eval views rendered per method (from the test split)."""
    overrides: Dict[str, str] = field(default_factory=dict)
    """Extra per-method settings as METHOD.attr.path=value (e.g. vqad.pipeline.model.bits=6)."""


class _NoLPIPS(torch.nn.Module):
    """Stand-in for torchmetrics' LPIPS so that models build offline."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__()

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return torch.tensor(float("nan"))


def _disable_lpips_download() -> None:
    import torchmetrics.image.lpip as lpip

    lpip.LearnedPerceptualImagePatchSimilarity = _NoLPIPS  # type: ignore[misc]


def _apply_override(config, path: str, value: str) -> None:
    target = config
    *parents, leaf = path.split(".")
    for name in parents:
        target = target[name] if isinstance(target, dict) else getattr(target, name)
    current = getattr(target, leaf)
    if isinstance(current, bool):
        parsed = value.lower() in ("1", "true", "yes")
    elif isinstance(current, tuple):
        parsed = tuple(type(current[0])(v) for v in value.split(",")) if current else tuple(value.split(","))
    else:
        parsed = type(current)(value)
    setattr(target, leaf, parsed)


def _trainer_config(method: str, bench: BenchmarkConfig):
    from nerfstudio.configs.method_configs import all_methods
    from nerfstudio.data.dataparsers.blender_dataparser import BlenderDataParserConfig

    config = copy.deepcopy(all_methods[method.split("@")[0]])
    config.pipeline.datamanager.dataparser = BlenderDataParserConfig()
    config.pipeline.datamanager.data = bench.data
    config.output_dir = bench.output_dir
    config.experiment_name = "bench"
    config.timestamp = method.replace("@", "-")
    config.max_num_iterations = 10**7
    config.steps_per_eval_batch = config.steps_per_eval_image = config.steps_per_eval_all_images = 10**9
    config.steps_per_save = 10**9
    config.vis = "tensorboard"
    config.machine.device_type = "cuda" if torch.cuda.is_available() else "cpu"
    for key, value in bench.overrides.items():
        name, path = key.split(".", 1)
        if name == method:
            _apply_override(config, path, value)
    return config


def _train(method: str, bench: BenchmarkConfig):
    from nerfstudio.engine.callbacks import TrainingCallback, TrainingCallbackLocation

    config = _trainer_config(method, bench)
    trainer = config.setup(local_rank=0, world_size=1)
    trainer.setup()
    start = time.perf_counter()

    def stop_when_spent(step: int) -> None:
        if time.perf_counter() - start >= bench.budget_s:
            trainer.stop_training = True

    trainer.callbacks.append(TrainingCallback([TrainingCallbackLocation.AFTER_TRAIN_ITERATION], stop_when_spent))
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    trainer.train()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else float("nan")
    steps = trainer.step + 1
    checkpoint = max(trainer.checkpoint_dir.glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    return trainer, steps, seconds, peak, checkpoint


@torch.no_grad()
def _evaluate(pipeline, max_views: int) -> Tuple[float, float, float]:
    """Mean PSNR, mean SSIM and rays per second over the first eval views."""
    from nerfstudio.utils import colors
    from torchmetrics.functional import structural_similarity_index_measure

    pipeline.eval()
    dataset = pipeline.datamanager.eval_dataset
    cameras = dataset.cameras.to(pipeline.device)
    psnrs, ssims, rays, seconds = [], [], 0, 0.0
    for index in range(min(max_views, len(dataset))):
        camera = cameras[index : index + 1]
        image = dataset.get_image_float32(index).to(pipeline.device)
        if image.shape[-1] == 4:
            image = image[..., :3] * image[..., 3:] + colors.WHITE.to(image.device) * (1 - image[..., 3:])
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        rgb = pipeline.model.get_outputs_for_camera(camera)["rgb"].clamp(0, 1)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds += time.perf_counter() - t
        rays += rgb.shape[0] * rgb.shape[1]
        mse = torch.mean((rgb - image) ** 2)
        psnrs.append(float(-10 * torch.log10(mse)))
        ssims.append(
            float(structural_similarity_index_measure(rgb.permute(2, 0, 1)[None], image.permute(2, 0, 1)[None]))
        )
    return sum(psnrs) / len(psnrs), sum(ssims) / len(ssims), rays / seconds


def _stored_bytes(pipeline) -> Dict[str, float]:
    model = pipeline.model
    if hasattr(model, "grid"):
        from vqad_nerfstudio.models.size_accounting import model_size_report

        report = model_size_report(model)
        return {
            "stored_bytes": report.total_bytes,
            "feature_grid_bytes": report.feature_bytes,
            "vertices": sum(model.grid.occupied_vertices()),
        }
    params = sum(p.numel() for p in model.parameters())
    return {"stored_bytes": 4 * params, "feature_grid_bytes": float("nan"), "vertices": float("nan")}


def main(bench: BenchmarkConfig) -> None:
    _disable_lpips_download()
    import vqad_nerfstudio.models.vqad  # noqa: F401  (checkpoint-loading shim, model registration)

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    results: List[Dict[str, float]] = []
    for method in bench.methods:
        trainer, steps, seconds, peak, checkpoint = _train(method, bench)
        psnr, ssim, rays_per_s = _evaluate(trainer.pipeline, bench.max_eval_views)
        row = {
            "method": method,
            "psnr": psnr,
            "ssim": ssim,
            "steps": steps,
            "ms_per_step": 1000 * seconds / steps,
            "eval_rays_per_s": rays_per_s,
            "peak_mem_mib": peak,
            "checkpoint_bytes": checkpoint.stat().st_size,
            **_stored_bytes(trainer.pipeline),
        }
        results.append(row)
        print(json.dumps(row), flush=True)
        del trainer
        torch.cuda.empty_cache() if torch.cuda.is_available() else None

    bench.output_dir.mkdir(parents=True, exist_ok=True)
    (bench.output_dir / "results.json").write_text(
        json.dumps({"device": device, "budget_s": bench.budget_s, "results": results}, indent=2)
    )
    print(
        f"\nDevice: {device}; training budget {bench.budget_s:.0f} s per method; "
        f"eval on {bench.max_eval_views} views of {bench.data}"
    )
    print(_table(results))


def _fmt_bytes(value: float) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value / 1e6:.3f} MB" if value >= 1e5 else f"{value / 1e3:.1f} kB"


def _table(results: List[Dict[str, float]]) -> str:
    header = (
        "| method | PSNR | SSIM | steps | ms/step | eval rays/s | peak MiB | stored | feature grid | checkpoint |\n"
        "|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [header]
    for r in results:
        lines.append(
            f"| {r['method']} | {r['psnr']:.2f} | {r['ssim']:.3f} | {r['steps']} | {r['ms_per_step']:.1f} | "
            f"{r['eval_rays_per_s'] / 1e3:.0f}k | {r['peak_mem_mib']:.0f} | {_fmt_bytes(r['stored_bytes'])} | "
            f"{_fmt_bytes(r['feature_grid_bytes'])} | {_fmt_bytes(r['checkpoint_bytes'])} |"
        )
    by_name = {r["method"]: r for r in results}
    if "vqad" in by_name and "vqad-float" in by_name:
        v, f = by_name["vqad"], by_name["vqad-float"]
        lines.append(
            f"\nvqad vs vqad-float: feature grid {f['feature_grid_bytes'] / v['feature_grid_bytes']:.1f}x smaller, "
            f"PSNR {v['psnr'] - f['psnr']:+.2f} dB, time/step x{v['ms_per_step'] / f['ms_per_step']:.2f}, "
            f"peak memory x{v['peak_mem_mib'] / f['peak_mem_mib']:.2f}"
        )
    if "vqad" in by_name and "tensorf" in by_name:
        v, t = by_name["vqad"], by_name["tensorf"]
        lines.append(
            f"vqad vs tensorf: PSNR {v['psnr'] - t['psnr']:+.2f} dB, "
            f"stored {t['stored_bytes'] / v['stored_bytes']:.0f}x smaller, "
            f"checkpoint {t['checkpoint_bytes'] / v['checkpoint_bytes']:.1f}x smaller"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main(tyro.cli(BenchmarkConfig))
