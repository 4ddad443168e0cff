"""``ns-train vqad-hash-random``: vqad-hash's twin with random (hashed) indices, Instant-NGP's choice, same bytes."""

from __future__ import annotations

from typing import TYPE_CHECKING

from vqad_nerfstudio.method_configs.vqad_hash import hash_model_config, hash_trainer_config

from vqad_nerfstudio.plugin import load_method

if TYPE_CHECKING:
    from nerfstudio.plugins.types import MethodSpecification


def _build() -> "MethodSpecification":
    from nerfstudio.plugins.types import MethodSpecification

    return MethodSpecification(
        config=hash_trainer_config("vqad-hash-random", hash_model_config("random")),
        description="nerfacto with a plain hash grid (random indices, Instant-NGP) of the same stored size as "
        "vqad-hash's learned-index encoding: the reference of the learned-vs-random comparison.",
    )


vqad_hash_random = load_method("vqad-hash-random", _build)
