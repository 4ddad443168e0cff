"""The fused decoder-MLP kernels against nerfstudio's PyTorch MLP: outputs, input and parameter gradients, split
outputs, quantised weights, empty batches, what they refuse, and a vqad model's render and gradients with them.

The kernel tests run where CUDA and Triton are present, or on the CPU under Triton's interpreter
(``TRITON_INTERPRET=1``); the others run everywhere."""

from __future__ import annotations

from typing import List, Optional, Sequence

import pytest
import torch
from nerfstudio.field_components.mlp import MLP
from torch import nn

from vqad_nerfstudio.fields.quantized_linear import quantizable_layers
from vqad_nerfstudio.kernels import fused_mlp

from kernel_device import DEVICE, KERNELS_RUN, needs_kernel


@pytest.fixture(autouse=True)
def _ieee_products():
    """Exact float32 products on both paths (TF32 would make the reference and the kernel differ by ~1e-3)."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(previous)


def _mlp(in_dim: int, layers: int, out_dim: int, sigmoid: bool, width: int = 64, seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    mlp = MLP(in_dim=in_dim, num_layers=layers, layer_width=width, out_dim=out_dim, activation=nn.ReLU(),
              out_activation=nn.Sigmoid() if sigmoid else None, implementation="torch")  # fmt: skip
    with torch.no_grad():  # biases that matter (nn.Linear's are small) and some hidden units that are off
        for layer in mlp.layers:
            layer.bias.uniform_(-0.5, 0.5)
    return mlp.to(DEVICE)


def _inputs(widths: Sequence[int], rows: int, seed: int = 1) -> List[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, w, generator=generator).to(DEVICE).requires_grad_() for w in widths]


def _check(mlp: MLP, inputs: List[torch.Tensor], split: Optional[int], used: Sequence[bool] = (True, True)) -> None:
    """Outputs and the gradients of inputs and parameters (of a random weighting of the outputs used) match."""
    fused = fused_mlp.mlp_forward(mlp, *inputs, split=split)
    full = mlp(torch.cat(inputs, dim=-1))
    reference = (full[:, :split], full[:, split:]) if split is not None else (full,)
    assert len(fused) == len(reference)
    for got, expected in zip(fused, reference):
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    generator = torch.Generator().manual_seed(7)
    weights = [torch.randn(r.shape, generator=generator).to(DEVICE) for r in reference]

    def gradients(outputs):
        loss = sum((o * w).sum() for o, w, use in zip(outputs, weights, used) if use)
        return torch.autograd.grad(loss, inputs + list(mlp.parameters()))

    for got, expected in zip(gradients(fused), gradients(reference)):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@needs_kernel
@pytest.mark.parametrize(
    "widths, layers, out_dim, sigmoid, split",
    [
        ((16,), 2, 16, False, 1),  # vqad's density MLP: density and geometry features
        ((15, 16), 3, 3, True, None),  # vqad's colour MLP: geometry features beside the directions' harmonics
        ((20,), 1, 5, False, None),
        ((7, 3), 2, 33, True, 30),  # widths that are not powers of two
    ],
)
def test_outputs_and_gradients_match_pytorch(widths, layers, out_dim, sigmoid, split):
    # 300 rows: several blocks, more than the backward's programs, the last one partial
    _check(_mlp(sum(widths), layers, out_dim, sigmoid), _inputs(widths, 300), split)


@needs_kernel
@pytest.mark.parametrize("used", [(True, False), (False, True)])
def test_an_unused_output_part_has_no_gradient(used):
    _check(_mlp(16, 2, 16, False), _inputs((16,), 130), split=1, used=used)


@needs_kernel
def test_quantised_weights_are_used_and_their_gradient_goes_straight_through():
    mlp = _mlp(31, 3, 3, True)
    for layer in quantizable_layers(mlp):
        layer.bits = 4
    _check(mlp, _inputs((15, 16), 100), split=None)


@needs_kernel
def test_an_empty_batch():
    mlp = _mlp(16, 2, 16, False)
    x = torch.zeros(0, 16, device=DEVICE, requires_grad=True)
    density, geo = fused_mlp.mlp_forward(mlp, x, split=1)
    assert density.shape == (0, 1) and geo.shape == (0, 15)
    (density.sum() + geo.sum()).backward()
    assert x.grad.shape == (0, 16)
    assert all(p.grad is not None and not p.grad.any() for p in mlp.parameters())


@needs_kernel
def test_inputs_that_need_no_gradient():
    mlp = _mlp(31, 3, 3, True)
    geo, harmonics = _inputs((15, 16), 70)
    harmonics = harmonics.detach()
    (rgb,) = fused_mlp.mlp_forward(mlp, geo, harmonics)
    rgb.sum().backward()
    reference = torch.autograd.grad(mlp(torch.cat([geo, harmonics], -1)).sum(), geo)[0]
    torch.testing.assert_close(geo.grad, reference, rtol=1e-4, atol=1e-5)


def test_what_the_kernels_refuse():
    mlp = _mlp(16, 2, 16, False)
    x = torch.randn(10, 16, device=DEVICE)
    refusals = {
        "float64 inputs": (mlp, [x.double()]),
        "inputs of other widths": (mlp, [x[:, :8]]),
        "inputs of other lengths": (_mlp(31, 3, 3, True), [x[:, :15], x[:5]]),
        "a layer too wide": (_mlp(16, 2, 16, False, width=256), [x]),
        "a tanh": (MLP(in_dim=16, num_layers=2, layer_width=16, out_dim=4, activation=nn.Tanh()).to(DEVICE), [x]),
        "skip connections": (
            MLP(in_dim=16, num_layers=3, layer_width=16, out_dim=4, skip_connections=(1,)).to(DEVICE),
            [x],
        ),
    }
    for what, (network, inputs) in refusals.items():
        assert not fused_mlp.available(network, *inputs), what
        with pytest.raises(ValueError, match="cannot run this MLP"):
            fused_mlp.mlp_forward(network, *inputs)
    if KERNELS_RUN:
        with pytest.raises(ValueError, match="split must be in 1..15"):
            fused_mlp.mlp_forward(mlp, x, split=16)


@needs_kernel
@pytest.mark.parametrize("training", [True, False])
def test_a_models_render_and_gradients_are_the_same_with_fused_decoders(training):
    from nerfstudio.cameras.rays import RayBundle
    from nerfstudio.data.scene_box import SceneBox

    from vqad_nerfstudio.models.vqad import VQADModelConfig

    torch.manual_seed(0)
    config = VQADModelConfig(num_levels=2, base_resolution=4, dense_resolution=8, num_samples=48, tf32=False,
                             index_warmup_steps=0, coarse_lod_fraction=0.0, fused_decoders=True)  # fmt: skip
    model = config.setup(scene_box=SceneBox(aabb=torch.tensor([[-1.0] * 3, [1.0] * 3])), num_train_data=1)
    model = model.to(DEVICE).train(training)
    with torch.no_grad():  # a dense field, so that rays end early
        model.field.density_mlp.layers[-1].bias[0] = 4.0
    generator = torch.Generator().manual_seed(1)
    origins = torch.randn(64, 3, generator=generator)
    origins = 3 * origins / origins.norm(dim=-1, keepdim=True)
    directions = -origins / origins.norm(dim=-1, keepdim=True)
    bundle = model.collider(
        RayBundle(
            origins=origins.to(DEVICE),
            directions=directions.to(DEVICE),
            pixel_area=torch.ones(64, 1, device=DEVICE),
            camera_indices=torch.zeros(64, 1, dtype=torch.long, device=DEVICE),
        )
    )
    assert model.field.fused_decoders

    def render(fused: bool):
        model.field.fused_decoders = fused
        model.zero_grad()
        torch.manual_seed(2)  # the sampler's jitter
        with torch.set_grad_enabled(training):
            outputs = model.get_outputs(bundle)
            if training:
                outputs["rgb"].sum().backward()
        return outputs, [p.grad for p in model.field.parameters()]

    fused, fused_grads = render(True)
    reference, reference_grads = render(False)
    assert float(reference["samples_per_ray"].mean()) < 48
    for key in ("rgb", "accumulation", "depth", "samples_per_ray"):
        torch.testing.assert_close(fused[key], reference[key], rtol=1e-4, atol=1e-5)
    assert [g is None for g in fused_grads] == [g is None for g in reference_grads]
    assert any(g is not None for g in reference_grads) == training
    for a, b in zip(fused_grads, reference_grads):
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
