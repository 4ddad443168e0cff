"""``ns-train tensorf-compressed``: nerfstudio's tensorf, then its feature planes compressed (Pham & Mandt 2024).

The paper's preset ECTensoRF-H (192 latent / 96 decoder channels); ``tensorf-compressed-l`` is ECTensoRF-L.
Compress an existing tensorf run instead of training
stage 1 with ``--pipeline.model.tensorf-checkpoint RUN/config.yml``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vqad_nerfstudio.plugin import load_method

if TYPE_CHECKING:
    from nerfstudio.engine.trainer import TrainerConfig
    from nerfstudio.plugins.types import MethodSpecification


DECODER_BITS = 8
"""The plane decoder's bits per weight (decoder_bits): on lego in one call (tensorf for 60 s, 1500 compression steps,
one NVIDIA H200) 26.83 dB in a 0.392 MB file against 26.58 dB in 0.654 MB with the fp16 decoder (docs/benchmarks.md,
"Rate–distortion on lego")."""
FIELD_BITS = 8
"""The bits per value of the line factors, appearance matrix and rendering MLP (field_bits): on lego in one call
(tensorf for 60 s, 2000 compression steps at lambda 0.002 with an 8-bit decoder, one NVIDIA H200) 26.48 dB in
0.334 MB against 26.64 dB in 0.402 MB in fp16 (6 bits: 26.54 dB in 0.318 MB); on the CPU demo scene 27.44 dB in
384.7 kB against 27.24 dB in 451.3 kB (docs/benchmarks.md)."""


def compressed_tensorf_trainer_config(method_name: str, latent_channels: int, decoder_channels: int) -> "TrainerConfig":
    """tensorf's settings and learning rates for stage 1; the paper's learning rates for stage 2
    (latents 0.02, networks 0.001, decaying tenfold over the compression steps); everything but the latents
    trained and stored on DECODER_BITS and FIELD_BITS bits."""
    import torch
    from nerfstudio.cameras.camera_optimizers import CameraOptimizerConfig

    from vqad_nerfstudio.models.compressed_tensorf import CompressedTensoRFModelConfig
    from vqad_nerfstudio.training import base_trainer_config

    model = CompressedTensoRFModelConfig(
        regularization="tv",
        camera_optimizer=CameraOptimizerConfig(mode="off"),
        latent_channels=latent_channels,
        decoder_channels=decoder_channels,
        decoder_bits=DECODER_BITS,
        field_bits=FIELD_BITS,
        eval_num_rays_per_chunk=1 << 15,
    )
    stage1, stage2 = model.compression_start_step, model.compression_steps
    learning_rates = {
        "fields": (1e-3, 1e-4),
        "encodings": (0.02, 0.002),
        "camera_opt": (1e-4, 1e-5),
        "latents": (0.02, 0.002),
        "plane_coder": (1e-3, 1e-4),
    }
    decay = {"fields": stage1 + stage2, "encodings": stage1, "latents": stage2, "plane_coder": stage2}
    rays = 4096 if torch.cuda.is_available() else 1024
    return base_trainer_config(method_name, model, rays, learning_rates, stage1 + stage2, decay)


def _build() -> "MethodSpecification":
    from nerfstudio.plugins.types import MethodSpecification

    return MethodSpecification(
        config=compressed_tensorf_trainer_config("tensorf-compressed", 192, 96),
        description="tensorf, then its feature planes coded as entropy-coded masked latents with a tiny decoder "
        "(Neural NeRF Compression, ECTensoRF-H: 192/96 channels).",
    )


tensorf_compressed = load_method("tensorf-compressed", _build)
