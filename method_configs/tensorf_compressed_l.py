"""``ns-train tensorf-compressed-l``: tensorf-compressed with the paper's low-compression preset ECTensoRF-L."""

from __future__ import annotations

from typing import TYPE_CHECKING

from vqad_nerfstudio.method_configs.tensorf_compressed import compressed_tensorf_trainer_config

from vqad_nerfstudio.plugin import load_method

if TYPE_CHECKING:
    from nerfstudio.plugins.types import MethodSpecification


def _build() -> "MethodSpecification":
    from nerfstudio.plugins.types import MethodSpecification

    return MethodSpecification(
        config=compressed_tensorf_trainer_config("tensorf-compressed-l", 384, 192),
        description="tensorf-compressed with the paper's low-compression preset ECTensoRF-L (384/192 channels).",
    )


tensorf_compressed_l = load_method("tensorf-compressed-l", _build)
