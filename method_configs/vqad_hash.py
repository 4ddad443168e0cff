"""``ns-train vqad-hash``: nerfacto whose hash grid is reached through learned 3-bit indices (1 MiB encoding)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from vqad_nerfstudio.plugin import load_method

if TYPE_CHECKING:
    from nerfstudio.engine.trainer import TrainerConfig
    from nerfstudio.plugins.types import MethodSpecification

    from vqad_nerfstudio.models.learned_index_nerfacto import LearnedIndexNerfactoModelConfig

NETWORK_BITS = 8
"""Bits per value of the stored networks (network_bits): on the 2-core CPU demo scene (500 steps, commit
`3a777ab`) 23.60 dB in a 184.8 KiB file against 23.00 dB in 370.3 KiB with fp16 networks (docs/benchmarks.md)."""
RANDOM_LOG2_TABLE = 14
"""The random-index twin's table: 2**14 fp16 vectors of 2 features per level, 16 levels (1 MiB)."""


def hash_model_config(index_mode: str, random_log2_table: int = RANDOM_LOG2_TABLE) -> "LearnedIndexNerfactoModelConfig":
    """nerfacto settings for object scenes, with the encoding sized to ``random_log2_table``.

    The learned encoding is the largest (b = 3) that stores no more bytes than the random one.
    """
    import torch
    from nerfstudio.cameras.camera_optimizers import CameraOptimizerConfig

    from vqad_nerfstudio.encodings.learned_index_hash import learned_matching_random
    from vqad_nerfstudio.models.learned_index_nerfacto import LearnedIndexNerfactoModelConfig

    config = LearnedIndexNerfactoModelConfig(
        index_mode=index_mode,  # type: ignore[arg-type]
        # on the CPU, PyTorch's hash grids hold every sample's corners at once: 1 << 15 rays took over 12 GB
        eval_num_rays_per_chunk=1 << 15 if torch.cuda.is_available() else 1 << 12,
        background_color="white",
        use_appearance_embedding=False,
        # files hold PyTorch's parameter layout: a run through tinycudann's modules (--pipeline.model.implementation
        # tcnn, where it is installed) trains faster but cannot be exported yet
        implementation="torch",
        network_bits=NETWORK_BITS,
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

    from vqad_nerfstudio.training import base_trainer_config

    learning_rates = {"proposal_networks": (1e-2, 1e-3), "fields": (1e-2, 1e-3), "camera_opt": (1e-3, 1e-4)}
    return base_trainer_config(method_name, model, 4096 if torch.cuda.is_available() else 1024, learning_rates)


def _build() -> "MethodSpecification":
    from nerfstudio.plugins.types import MethodSpecification

    return MethodSpecification(
        config=hash_trainer_config("vqad-hash", hash_model_config("learned")),
        description="nerfacto with a learned-index hash encoding: b-bit learned indices into small per-level "
        "codebooks (VQAD's indices, compact-NGP bucketed probing on fine levels).",
    )


vqad_hash = load_method("vqad-hash", _build)
