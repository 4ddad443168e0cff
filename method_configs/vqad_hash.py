"""``ns-train vqad-hash``: nerfacto whose hash grid is reached through learned 3-bit indices (1 MiB encoding)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from vqad_nerfstudio.plugin import load_method

if TYPE_CHECKING:
    from nerfstudio.engine.trainer import TrainerConfig
    from nerfstudio.plugins.types import MethodSpecification

    from vqad_nerfstudio.models.learned_index_nerfacto import LearnedIndexNerfactoModelConfig

RANDOM_LOG2_TABLE = 14
"""The random-index twin's table: 2**14 fp16 vectors of 2 features per level, 16 levels (1 MiB)."""


def hash_model_config(index_mode: str, random_log2_table: int = RANDOM_LOG2_TABLE) -> "LearnedIndexNerfactoModelConfig":
    """nerfacto settings for object scenes, with the encoding sized to ``random_log2_table``.

    The learned encoding is the largest (b = 3) that stores no more bytes than the random one.
    """
    from nerfstudio.cameras.camera_optimizers import CameraOptimizerConfig

    from vqad_nerfstudio.encodings.learned_index_hash import learned_matching_random
    from vqad_nerfstudio.models.learned_index_nerfacto import LearnedIndexNerfactoModelConfig

    config = LearnedIndexNerfactoModelConfig(
        index_mode=index_mode,  # type: ignore[arg-type]
        eval_num_rays_per_chunk=1 << 15,
        background_color="white",
        disable_scene_contraction=True,  # object scenes inside the scene box; real captures: pass False
        use_appearance_embedding=False,
        camera_optimizer=CameraOptimizerConfig(mode="off"),
        proposal_net_args_list=[
            {"hidden_dim": 16, "log2_hashmap_size": 13, "num_levels": 5, "max_res": 128, "use_linear": False},
            {"hidden_dim": 16, "log2_hashmap_size": 13, "num_levels": 5, "max_res": 256, "use_linear": False},
        ],
    )
    if index_mode == "random":
        config.log2_codebook_size = random_log2_table
    else:
        config.log2_codebook_size, config.index_table_size = learned_matching_random(
            random_log2_table,
            config.num_levels,
            config.base_res,
            config.max_res,
            config.features_per_level,
            config.index_bits,
        )
    return config


def hash_trainer_config(method_name: str, model: "LearnedIndexNerfactoModelConfig") -> "TrainerConfig":
    """Trainer for the hash-encoding methods: nerfstudio-format data, nerfacto's optimisers, 3000 steps.

    Runs on CUDA when present (4096 rays per step), else on the CPU (1024 rays per step).
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
    rays = 4096 if cuda else 1024
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
            "proposal_networks": adam(1e-2, 1e-3),
            "fields": adam(1e-2, 1e-3),
            "camera_opt": adam(1e-3, 1e-4),
        },
        viewer=ViewerConfig(num_rays_per_chunk=1 << 15),
        vis="viewer",
    )


def _build() -> "MethodSpecification":
    from nerfstudio.plugins.types import MethodSpecification

    return MethodSpecification(
        config=hash_trainer_config("vqad-hash", hash_model_config("learned")),
        description="nerfacto with a learned-index hash encoding: b-bit learned indices into small per-level "
        "codebooks (VQAD's indices, compact-NGP bucketed probing on fine levels).",
    )


vqad_hash = load_method("vqad-hash", _build)
