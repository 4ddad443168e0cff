"""Decoders trained on the grid the file stores them on: the rounding rule, straight-through gradients, and a
decoded file that renders exactly what was trained."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from vqad_nerfstudio.fields.quantized_linear import QuantizedConvTranspose2d, QuantizedLinear, quantizable_layers
from vqad_nerfstudio.rounding import (
    dequantize_rows,
    quantize_rows,
    rounded_columns,
    rounded_rows,
    straight_through,
    straight_through_group,
)


def _weight(seed: int = 0, shape=(7, 5)) -> torch.Tensor:
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.3
    weight[2] = 0.0  # an all-zero row
    return weight


@pytest.mark.parametrize("bits", [2, 6, 8])
def test_rows_round_by_the_documented_rule(bits: int) -> None:
    """docs/format.md: scale = fp16(fp32(max |row| / q)), v = clamp(round(w / scale), -q, q) in float64."""
    weight = _weight()
    top = 2 ** (bits - 1) - 1
    rows = weight.numpy()
    scale = (np.abs(rows).max(axis=1) / np.float32(top)).astype(np.float32).astype(np.float16)
    scale = np.maximum(scale, np.finfo(np.float16).smallest_subnormal)
    expected = np.clip(np.rint(rows.astype(np.float64) / scale.astype(np.float64)[:, None]), -top, top)
    levels, got_scale = quantize_rows(weight, bits)
    assert got_scale.dtype == torch.float16 and np.array_equal(got_scale.numpy(), scale)
    assert np.array_equal(levels.numpy(), expected.astype(np.int64))
    assert bool((levels[2] == 0).all())
    rounded = dequantize_rows(levels, got_scale, weight.shape)
    assert bool(((rounded - weight).abs() <= got_scale.float()[:, None] / 2 + 1e-7).all())


def test_rounding_twice_changes_nothing() -> None:
    """A decoded weight rounds to itself: a decoded model trained further, or exported again, keeps its weights."""
    weight = _weight(1)
    once = dequantize_rows(*quantize_rows(weight, 6), weight.shape)
    assert torch.equal(dequantize_rows(*quantize_rows(once, 6), weight.shape), once)


@pytest.mark.parametrize("bits", [3, 8])
def test_rounded_rows_and_columns_follow_the_rule(bits: int) -> None:
    """What training reads is what a file decodes to: rows (decoder weights) and columns (codebook channels), a
    batch of matrices at once."""
    weight = _weight(2, (5, 3, 4))
    assert torch.equal(rounded_rows(weight, bits), dequantize_rows(*quantize_rows(weight, bits), weight.shape))
    matrices = torch.stack([_weight(3), _weight(4) * 50])
    columns = rounded_columns(matrices, bits)
    for matrix, rounded in zip(matrices, columns):
        assert torch.equal(rounded, rounded_rows(matrix.t(), bits).t())
    assert columns.is_contiguous()


def test_bit_widths_outside_2_to_8_are_refused() -> None:
    with pytest.raises(ValueError, match="2..8"):
        quantize_rows(_weight(), 9)


def test_a_quantized_linear_is_a_linear_until_given_bits() -> None:
    linear = nn.Linear(5, 7)
    quantized = QuantizedLinear.like(linear)
    assert quantized.weight is linear.weight and set(quantized.state_dict()) == set(linear.state_dict())
    x = torch.randn(11, 5)
    assert torch.equal(quantized(x), linear(x))
    quantized.bits = 4
    rounded = dequantize_rows(*quantize_rows(linear.weight, 4), linear.weight.shape)
    assert torch.equal(quantized(x), F.linear(x, rounded, linear.bias))
    assert not torch.equal(quantized(x), linear(x))


def test_gradients_pass_straight_through_the_rounding() -> None:
    quantized = QuantizedLinear.like(nn.Linear(5, 7))
    quantized.bits = 3
    x = torch.randn(11, 5)
    quantized(x).square().sum().backward()
    rounded = dequantize_rows(*quantize_rows(quantized.weight, 3), quantized.weight.shape).requires_grad_()
    F.linear(x, rounded, quantized.bias.detach()).square().sum().backward()
    torch.testing.assert_close(quantized.weight.grad, rounded.grad)


def test_a_straight_through_group_is_one_node_with_each_parameters_gradient() -> None:
    """Rounded tensors forward, each gradient unchanged to its own parameter, all through one autograd node; a
    rounded tensor no pass reads leaves its parameter without a gradient."""
    weights = [torch.randn(4, 3, requires_grad=True), torch.randn(2, 5, requires_grad=True), torch.randn(6, 1)]
    rounded = [rounded_rows(weight, 4) for weight in weights]
    linked = straight_through_group(weights, rounded)
    assert all(torch.equal(a, b) for a, b in zip(linked, rounded))
    assert len({id(tensor.grad_fn) for tensor in linked}) == 1
    assert straight_through(weights[0], linked[0]) is linked[0]  # linked already: no second node
    x = torch.randn(3)
    (linked[0] @ x).square().sum().backward()
    expected = rounded[0].clone().requires_grad_()
    (expected @ x).square().sum().backward()
    assert torch.equal(weights[0].grad, expected.grad)
    assert weights[1].grad is None and weights[2].grad is None
    with torch.no_grad():
        assert all(a is b for a, b in zip(straight_through_group(weights, rounded), rounded))
    with pytest.raises(ValueError, match="3 parameters but 2 rounded"):
        straight_through_group(weights, rounded[:2])


@pytest.mark.parametrize("implementation", ["for-loop", "foreach", "fused"])
def test_the_rounding_follows_optimiser_steps(implementation: str) -> None:
    """Optimisers update weights in place (the fused one without bumping their version): the rounding is redone at
    every pass, or once per held span."""
    quantized = QuantizedLinear.like(nn.Linear(5, 7))
    quantized.bits = 6
    flags = {"for-loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}[implementation]
    optimizer = torch.optim.Adam(quantized.parameters(), lr=0.05, **flags)
    x = torch.randn(11, 5)
    for _ in range(3):
        optimizer.zero_grad()
        quantized.hold_rounding(True)
        quantized(x).sum().backward()
        quantized.hold_rounding(False)
        optimizer.step()
        with torch.no_grad():
            expected = dequantize_rows(*quantize_rows(quantized.weight, 6), quantized.weight.shape)
            assert torch.equal(quantized.rounded_weight(), expected)
            quantized.hold_rounding(True)
            assert torch.equal(quantized.rounded_weight(), expected)
            quantized.hold_rounding(False)


def test_quantizable_layers_replace_every_linear_in_place() -> None:
    mlp = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 2)]))
    keys = set(mlp.state_dict())
    layers = quantizable_layers(mlp)
    assert len(layers) == 3 and all(isinstance(layer, QuantizedLinear) for layer in layers)
    assert set(mlp.state_dict()) == keys
    assert quantizable_layers(mlp) == layers  # idempotent


def test_a_vqad_model_with_quantized_decoders_decodes_to_what_it_renders(trained) -> None:
    import copy

    from vqad_nerfstudio.codec import write_container
    from vqad_nerfstudio.export.vqad_codec import encode_model, load_compressed

    model = copy.deepcopy(trained.model)
    model.config.network_bits = 6
    model.round_decoder_weights()
    assert all(layer.bits == 6 for layer in model.field.decoder_layers)
    encoded = encode_model(model)  # the model's own bits by default
    assert any(chunk.tag == "MLPQ" for chunk in encoded.chunks)
    decoded, _ = load_compressed(write_container(encoded.header, encoded.chunks))
    for mine, theirs in zip(model.field.decoder_layers, decoded.field.decoder_layers):
        assert torch.equal(mine.rounded_weight(), theirs.weight)
    assert decoded.config.network_bits == 6  # a decoded model keeps the bits: it exports to the same file
    again = encode_model(decoded)
    assert write_container(again.header, again.chunks) == write_container(encoded.header, encoded.chunks)
    fp16_decoders, _ = load_compressed(write_container(*_header_and_chunks(encode_model(model, network_bits=16))))
    camera, _ = trained.views()[0]
    rendered = trained.render(model, camera)
    # what remains are the fp16 codebooks and biases, as in any file (about 90 dB apart here)
    assert trained.image_psnr(trained.render(decoded, camera), rendered) > 60
    # stored at 16 bits instead, the decoders are the float weights, not the rounded ones the model renders with
    rounded = torch.cat([layer.rounded_weight().flatten() for layer in model.field.decoder_layers])
    stored = torch.cat([layer.weight.flatten() for layer in fp16_decoders.field.decoder_layers])
    assert float((stored - rounded).abs().max()) > 1e-4  # up to half a 6-bit step (about 1e-3 here)


def _header_and_chunks(encoded_model):
    return encoded_model.header, encoded_model.chunks


def test_decoders_stay_float_during_the_float_warm_up() -> None:
    from nerfstudio.data.scene_box import SceneBox

    from vqad_nerfstudio.models.vqad import VQADModelConfig

    config = VQADModelConfig(num_levels=2, base_resolution=4, dense_resolution=8, network_bits=5)
    model = config.setup(scene_box=SceneBox(aabb=torch.tensor([[-1.0] * 3, [1.0] * 3])), num_train_data=1)
    assert all(layer.bits is None for layer in model.field.decoder_layers)
    model._quantize_float_warmup()
    model.round_decoder_weights()
    assert all(layer.bits == 5 for layer in model.field.decoder_layers)


def test_transposed_convolutions_quantize_per_input_channel() -> None:
    torch.manual_seed(0)
    decoder = nn.Sequential(nn.ConvTranspose2d(4, 3, 3, stride=2, padding=1, output_padding=1), nn.SELU())
    original = nn.ConvTranspose2d(4, 3, 3, stride=2, padding=1, output_padding=1)
    original.load_state_dict(decoder[0].state_dict())
    (layer,) = quantizable_layers(decoder)
    assert isinstance(layer, QuantizedConvTranspose2d) and decoder[0] is layer
    x = torch.randn(2, 4, 5, 5)
    torch.testing.assert_close(layer(x), original(x), rtol=0, atol=0)  # no bits: the float layer
    layer.bits = 4
    rounded = dequantize_rows(*quantize_rows(original.weight, 4), original.weight.shape)
    assert torch.unique(rounded[0]).numel() <= 15  # one scale per input channel, 4 bits: -7..7
    expected = nn.functional.conv_transpose2d(x, rounded, original.bias, 2, 1, 1)
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)
