"""``ns-train vqad-float``: VQAD's uncompressed twin (float features on the same sparse topology)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from vqad_nerfstudio.method_configs.vqad import cpu_changes, vqad_trainer_config

from vqad_nerfstudio.plugin import load_method

if TYPE_CHECKING:
    from nerfstudio.plugins.types import MethodSpecification


def _build() -> "MethodSpecification":
    from nerfstudio.plugins.types import MethodSpecification

    from vqad_nerfstudio.models.vqad import VQADModelConfig

    return MethodSpecification(
        config=vqad_trainer_config("vqad-float", VQADModelConfig(feature_store="float")),
        description="VQAD's float twin: the same sparse grid and decoders with a float feature vector per vertex "
        "(the uncompressed reference for size ratios). Without CUDA: " + cpu_changes() + ".",
    )


vqad_float = load_method("vqad-float", _build)
