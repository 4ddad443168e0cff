"""The nerfstudio trainer settings every method of this package shares."""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict, Mapping, Optional, Tuple

if TYPE_CHECKING:
    from nerfstudio.engine.trainer import TrainerConfig
    from nerfstudio.models.base_model import ModelConfig

STEPS = 3000
"""Training steps of every method (the learning rates decay over them)."""


def base_trainer_config(
    method_name: str,
    model: "ModelConfig",
    rays_per_batch: int,
    learning_rates: Dict[str, Tuple[float, float]],
    steps: int = STEPS,
    decay_steps: Optional[Mapping[str, int]] = None,
) -> "TrainerConfig":
    """nerfstudio-format data (any parser through its subcommand), the checked pipeline, ``steps`` steps,
    Adam per parameter group decaying exponentially from its first to its last learning rate over
    ``decay_steps[group]`` steps (default: ``steps``), on CUDA when present, else on the CPU."""
    import torch
    from nerfstudio.configs.base_config import MachineConfig, ViewerConfig
    from nerfstudio.data.datamanagers.base_datamanager import VanillaDataManagerConfig
    from nerfstudio.data.dataparsers.nerfstudio_dataparser import NerfstudioDataParserConfig
    from nerfstudio.engine.optimizers import AdamOptimizerConfig
    from nerfstudio.engine.schedulers import ExponentialDecaySchedulerConfig
    from nerfstudio.engine.trainer import TrainerConfig

    from vqad_nerfstudio.pipeline import CheckedPipelineConfig

    optimizers = {
        group: {
            "optimizer": AdamOptimizerConfig(lr=first, eps=1e-15),
            "scheduler": ExponentialDecaySchedulerConfig(
                lr_final=last, max_steps=(decay_steps or {}).get(group, steps)
            ),
        }
        for group, (first, last) in learning_rates.items()
    }
    return TrainerConfig(
        method_name=method_name,
        steps_per_eval_batch=500,
        steps_per_eval_image=500,
        steps_per_save=1000,
        max_num_iterations=steps,
        mixed_precision=False,
        machine=MachineConfig(device_type="cuda" if torch.cuda.is_available() else "cpu"),
        pipeline=CheckedPipelineConfig(
            datamanager=VanillaDataManagerConfig(
                dataparser=NerfstudioDataParserConfig(),
                train_num_rays_per_batch=rays_per_batch,
                eval_num_rays_per_batch=rays_per_batch,
            ),
            model=model,
        ),
        optimizers=optimizers,
        viewer=ViewerConfig(num_rays_per_chunk=1 << 15),
        vis="viewer",
    )
