"""``ns-train vqad``: VQAD with 4-bit learned indices, 5 levels of detail (16^3 .. 256^3), k = 16."""

from __future__ import annotations

from typing import TYPE_CHECKING

from vqad_nerfstudio.plugin import load_method

if TYPE_CHECKING:
    from nerfstudio.engine.trainer import TrainerConfig
    from nerfstudio.models.base_model import ModelConfig
    from nerfstudio.plugins.types import MethodSpecification


def vqad_trainer_config(method_name: str, model: "ModelConfig") -> "TrainerConfig":
    """Trainer for sparse-grid methods: nerfstudio-format data, Adam, exponential decay.

    Runs on CUDA when present (8192 rays per step), else on the CPU (1024 rays and at most 192 samples per ray).
    """
    import torch
    from nerfstudio.configs.base_config import MachineConfig, ViewerConfig
    from nerfstudio.data.datamanagers.base_datamanager import VanillaDataManagerConfig
    from nerfstudio.data.dataparsers.nerfstudio_dataparser import NerfstudioDataParserConfig
    from nerfstudio.engine.optimizers import AdamOptimizerConfig
    from nerfstudio.engine.schedulers import ExponentialDecaySchedulerConfig
    from nerfstudio.engine.trainer import TrainerConfig

    from vqad_nerfstudio.pipeline import CheckedPipelineConfig

    def adam(lr: float, final: float) -> dict:
        return {
            "optimizer": AdamOptimizerConfig(lr=lr, eps=1e-15),
            "scheduler": ExponentialDecaySchedulerConfig(lr_final=final, max_steps=3000),
        }

    cuda = torch.cuda.is_available()
    rays = 8192 if cuda else 1024  # a CPU trains the demo scene in minutes with fewer rays and samples
    if not cuda:
        model.num_samples = min(model.num_samples, 192)
    return TrainerConfig(
        method_name=method_name,
        steps_per_eval_batch=500,
        steps_per_eval_image=500,
        steps_per_save=1000,
        max_num_iterations=3000,
        mixed_precision=False,
        machine=MachineConfig(device_type="cuda" if cuda else "cpu"),
        pipeline=CheckedPipelineConfig(
            datamanager=VanillaDataManagerConfig(
                dataparser=NerfstudioDataParserConfig(),
                train_num_rays_per_batch=rays,
                eval_num_rays_per_batch=rays,
            ),
            model=model,
        ),
        optimizers={
            "fields": adam(1e-2, 1e-3),
            "grid_logits": adam(5e-2, 5e-3),
            "grid_features": adam(1e-2, 1e-3),
            "codebooks": adam(1e-2, 1e-3),
            "camera_opt": adam(1e-3, 1e-4),
        },
        viewer=ViewerConfig(num_rays_per_chunk=1 << 15),
        vis="viewer",
    )


def _build() -> "MethodSpecification":
    from nerfstudio.plugins.types import MethodSpecification

    from vqad_nerfstudio.models.vqad import VQADModelConfig

    return MethodSpecification(
        config=vqad_trainer_config("vqad", VQADModelConfig(eval_num_rays_per_chunk=1 << 14)),
        description="VQAD: sparse multi-resolution grid of learned b-bit indices into per-level codebooks "
        "(Variable Bitrate Neural Fields); streamable levels of detail.",
    )


vqad = load_method("vqad", _build)
