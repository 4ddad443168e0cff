"""``ns-train vqad``: VQAD with 8-bit learned indices (4 on the CPU), 5 levels of detail (16^3 .. 256^3), k = 16."""

from __future__ import annotations

from typing import TYPE_CHECKING

from vqad_nerfstudio.plugin import load_method

if TYPE_CHECKING:
    from nerfstudio.engine.trainer import TrainerConfig
    from nerfstudio.models.base_model import ModelConfig
    from nerfstudio.plugins.types import MethodSpecification

    from vqad_nerfstudio.models.vqad import VQADModelConfig


GPU_STEPS = 20000
"""Training steps on CUDA: about 5 minutes of vqad-float (or of vqad with 4-bit indices) on lego on one H200
(docs/benchmarks.md)."""
VQAD_GPU_STEPS = 14000
"""vqad's training steps on CUDA: about 5 minutes on lego on one H200 with GPU_INDEX_BITS-bit indices (the 5-minute
benchmark took 14544 steps of 20.9 ms, docs/benchmarks.md)."""
GPU_DECAY_STEPS = 10000
"""Steps over which the learning rates decay on CUDA; the rest of the run trains at the final rates."""
GPU_INDEX_BITS = 8
"""vqad's index width on CUDA: with the rate term, 33.04 dB in a 0.389 MB file on lego in 5 minutes on one H200
(4 bits reached 31.47 dB in 0.542 MB at an earlier commit; docs/benchmarks.md)."""
CPU_INDEX_BITS = 4
"""vqad's index width on the CPU: 2**b logits per vertex, and 8 bits train the quick start about 4x slower there."""
GPU_INDEX_WARMUP_STEPS = 3000
"""vqad's float warm-up on CUDA, which the levels grown by the first pruning share (warmup_grown_levels): on lego
in 85 s on one H200, 32.29 dB in 0.514 MB against 31.23 dB in 0.424 MB with neither (1000 steps, grown levels
straight-through from random logits; docs/benchmarks.md). Longer is not better: at 60 s, 1800 of about 2500 steps
scored 0.30 dB below 1200. The CPU quick start keeps both off: its grown levels would warm up for 100 steps only,
and scored 0.6 dB lower with them."""

GPU_INDEX_FREEZE_STEP = 12000
"""vqad's index_freeze_step on CUDA: the last 2000 of VQAD_GPU_STEPS train on the stored assignment, after the learning
rates have decayed (GPU_DECAY_STEPS). On lego in 60 s on one H200 freezing for the last fifth of the run changed
PSNR by -0.01 to +0.07 dB and left a 12.6 MB checkpoint instead of 2.9 GB (8-bit) or 11.3 GB (10-bit indices:
also x1.5 faster steps and 4 GB less memory once frozen; docs/benchmarks.md). The CPU quick start keeps it off:
frozen for its last seventh it scored 0.13 dB lower."""

GPU_BASE_INDEX_BITS = 4
"""vqad's level-0 index width on CUDA (base_index_bits): 16 codewords instead of 256 in the coarsest stream prefix.
With NETWORK_BITS-bit decoders that prefix is 9.5 KiB on lego instead of 21.3 KiB, at 31.98 dB against 31.79 dB
for the whole file in one call at 60 s on an H100 (docs/benchmarks.md); the CPU's indices are 4-bit already."""
NETWORK_BITS = 7
"""vqad's network_bits: the decoder MLPs train rounded to 7 bits per weight (after the float warm-up) and are stored
so, 8.4 kB instead of 17.4 kB in fp16; part of every stream prefix (docs/benchmarks.md)."""

CODEBOOK_BITS = 6
"""vqad's codebook_bits: each level's codebook trains rounded to 6 bits per value and is stored so, about a third of
its fp16 bytes (8.2 kB per level at 8-bit indices). On the CPU quick start over four seeds, 26.78 dB in 36.8 kB
against fp16 codebooks' 26.73 dB in 37.9 kB; rounding an 8-bit run's fp16 codebooks to 6 bits after training cost
0.006 dB and 26% of its file (docs/benchmarks.md)."""


IN_BACKWARD_GROUPS = ("grid_logits",)
"""Parameter groups whose Adam update is applied in the backward pass, with a bfloat16 first moment (the logits of
learned indices: their gradient is never stored, 1.5 copies of the logits less at the peak)."""


def vqad_trainer_config(method_name: str, model: "ModelConfig", gpu_steps: int = GPU_STEPS) -> "TrainerConfig":
    """Trainer for sparse-grid methods: nerfstudio-format data, Adam, exponential decay.

    Runs on CUDA when present (``gpu_steps`` steps of 32768 rays, learning rates decaying over GPU_DECAY_STEPS,
    65536 rays per eval chunk: about 5 minutes of lego on one H200), else on the CPU (STEPS steps of 1024 rays,
    16384 per eval chunk, at most 192 samples per ray): see :func:`cpu_changes`.
    """
    import torch

    from vqad_nerfstudio.training import base_trainer_config

    cuda = torch.cuda.is_available()
    model.eval_num_rays_per_chunk = 1 << 16 if cuda else 1 << 14
    if not cuda:  # a CPU trains the demo scene in minutes with fewer rays and samples
        model.num_samples = min(model.num_samples, 192)
    learning_rates = {
        "fields": (1e-2, 1e-3),
        "grid_logits": (5e-2, 5e-3),
        "grid_features": (1e-2, 1e-3),
        "codebooks": (1e-2, 1e-3),
        "camera_opt": (1e-3, 1e-4),
    }
    if not cuda:
        changes = cpu_changes(gpu_steps, index_bits=model.feature_store == "codebook")
        note = f"{method_name} runs on the CPU with its CPU defaults: {changes}."
        return base_trainer_config(
            method_name, model, 1024, learning_rates, device_note=note, in_backward_groups=IN_BACKWARD_GROUPS
        )
    decay = {group: GPU_DECAY_STEPS for group in learning_rates}
    return base_trainer_config(
        method_name, model, 1 << 15, learning_rates, gpu_steps, decay, in_backward_groups=IN_BACKWARD_GROUPS
    )


def cpu_changes(gpu_steps: int = GPU_STEPS, index_bits: bool = False) -> str:
    """What the sparse-grid methods' defaults change on a machine without CUDA (shown in ``ns-train --help``), for a
    method of ``gpu_steps`` steps on CUDA; ``index_bits``: the method has learned indices (vqad)."""
    from vqad_nerfstudio.training import STEPS

    bits = (
        f", {CPU_INDEX_BITS}-bit indices (GPU: {GPU_INDEX_BITS}), a float warm-up of index_warmup_steps without the "
        f"grown levels (GPU: {GPU_INDEX_WARMUP_STEPS} steps with them), indices trained to the end (GPU: frozen from "
        f"step {GPU_INDEX_FREEZE_STEP})"
        if index_bits
        else ""
    )
    return (
        f"{STEPS} steps of 1024 rays (GPU: {gpu_steps} of 32768, learning rates decaying over the first "
        f"{GPU_DECAY_STEPS}), at most 192 samples per ray, eval chunks of 16384 rays{bits}"
    )


def vqad_model_config() -> "VQADModelConfig":
    """vqad's model: on CUDA GPU_INDEX_BITS-bit indices, a GPU_INDEX_WARMUP_STEPS-step float warm-up that the
    grown levels share, indices frozen from GPU_INDEX_FREEZE_STEP and a GPU_BASE_INDEX_BITS-bit level 0; on the CPU
    CPU_INDEX_BITS-bit ones and the config's warm-up without the grown levels, never frozen; NETWORK_BITS-bit decoders
    and CODEBOOK_BITS-bit codebooks on both."""
    import torch

    from vqad_nerfstudio.models.vqad import VQADModelConfig

    if torch.cuda.is_available():
        return VQADModelConfig(
            index_bits=GPU_INDEX_BITS,
            index_warmup_steps=GPU_INDEX_WARMUP_STEPS,
            warmup_grown_levels=True,
            index_freeze_step=GPU_INDEX_FREEZE_STEP,
            base_index_bits=GPU_BASE_INDEX_BITS,
            network_bits=NETWORK_BITS,
            codebook_bits=CODEBOOK_BITS,
        )
    return VQADModelConfig(index_bits=CPU_INDEX_BITS, network_bits=NETWORK_BITS, codebook_bits=CODEBOOK_BITS)


def _build() -> "MethodSpecification":
    from nerfstudio.plugins.types import MethodSpecification

    return MethodSpecification(
        config=vqad_trainer_config("vqad", vqad_model_config(), VQAD_GPU_STEPS),
        description="VQAD: sparse multi-resolution grid of learned b-bit indices into per-level codebooks "
        "(Variable Bitrate Neural Fields); streamable levels of detail. Without CUDA: "
        + cpu_changes(VQAD_GPU_STEPS, index_bits=True)
        + ".",
    )


vqad = load_method("vqad", _build)
