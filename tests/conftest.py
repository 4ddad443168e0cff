"""Fixtures shared by the tests: small untrained VQAD models and the files they export to."""

from __future__ import annotations

from typing import Any, Callable

import pytest
import torch
from nerfstudio.data.scene_box import SceneBox

from vqad_nerfstudio.codec import write_container
from vqad_nerfstudio.export.vqad_codec import encode_model
from vqad_nerfstudio.kernels import INTERPRETED, triton
from vqad_nerfstudio.models.vqad import VQADModel, VQADModelConfig

from kernel_launches import launches_file, record_launches

if INTERPRETED and triton is not None and launches_file() is not None:
    record_launches(launches_file())  # for tests/test_kernel_compilation.py


@pytest.fixture
def tiny_vqad() -> Callable[..., VQADModel]:
    """``build(seed, **settings)``: a small VQAD model in eval mode (three levels, 4³ to 16³, 8-wide MLPs, a soft
    warm-up so that it exports untrained), ``settings`` overriding those, its parameters drawn after
    ``torch.manual_seed(seed)``."""

    def build(seed: int, **settings: Any) -> VQADModel:
        torch.manual_seed(seed)
        defaults = dict(
            num_levels=3, base_resolution=4, dense_resolution=16, hidden_dim=8, num_samples=32, index_warmup="soft",
            tf32=False,
        )  # fmt: skip
        config = VQADModelConfig(**{**defaults, **settings})
        model = config.setup(scene_box=SceneBox(aabb=torch.tensor([[-1.0] * 3, [1.0] * 3])), num_train_data=1)
        return model.eval()

    return build


@pytest.fixture
def vqad_file() -> Callable[[VQADModel], bytes]:
    """``write(model)``: the bytes of the file ``model`` exports to (ns-export's defaults)."""

    def write(model: VQADModel) -> bytes:
        encoded = encode_model(model)
        return write_container(encoded.header, encoded.chunks)

    return write
