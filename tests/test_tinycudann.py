"""Where tinycudann is installed (a CUDA machine): nothing of ours requires it, and the hash methods' files keep
PyTorch's parameter layout. Skipped elsewhere."""

from __future__ import annotations

import pytest
import torch
from nerfstudio.data.scene_box import SceneBox
from vqad_nerfstudio.method_configs.vqad_hash import hash_model_config

from vqad_nerfstudio.codec import write_container
from vqad_nerfstudio.export.formats import encode_any, load_any

tcnn = pytest.importorskip("tinycudann", reason="tinycudann is not installed")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="tinycudann needs a CUDA device")


def _model(implementation: str):
    config = hash_model_config("random", 12)
    config.num_levels, config.max_res, config.implementation = 4, 64, implementation
    scene_box = SceneBox(aabb=torch.tensor([[-1.0] * 3, [1.0] * 3]))
    return config.setup(scene_box=scene_box, num_train_data=1).to("cuda").eval()


def test_tinycudann_runs_are_refused_at_export_with_what_to_do() -> None:
    model = _model("tcnn")
    assert any(getattr(module, "tcnn_encoding", None) is not None for module in model.modules())
    with pytest.raises(ValueError, match="implementation torch"):
        encode_any(model)


def test_pytorch_runs_export_and_decode_to_pytorch_modules_beside_tinycudann() -> None:
    model = _model("torch")
    assert all(getattr(module, "tcnn_encoding", None) is None for module in model.modules())
    encoded = encode_any(model.cpu())
    decoded, _ = load_any(write_container(encoded.header, encoded.chunks))
    assert decoded.config.implementation == "torch"
    assert all(getattr(module, "tcnn_encoding", None) is None for module in decoded.modules())
    points = torch.rand(300, 3)
    with torch.no_grad():
        torch.testing.assert_close(decoded.encoding(points), model.encoding(points), rtol=0, atol=1e-3)


def test_hash_methods_train_through_tinycudann_when_asked() -> None:
    """implementation='tcnn' (nerfstudio's switch) runs the random-index grid in tinycudann: finite features whose
    gradient reaches tinycudann's parameters."""
    encoding = _model("tcnn").train().encoding
    assert encoding.hash_grid.tcnn_encoding is not None
    features = encoding(torch.rand(4096, 3, device="cuda"))
    assert features.shape[0] == 4096 and torch.isfinite(features).all()
    features.float().square().sum().backward()
    grads = [p.grad for p in encoding.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
