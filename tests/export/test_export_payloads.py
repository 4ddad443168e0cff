"""Network weights as payloads: fp16, and quantised to 2..8 bits per weight (per-row scales, range-coded)."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch

from vqad_nerfstudio.codec import FormatError, encode_categorical
from vqad_nerfstudio.export.payloads import (
    encode_parameters,
    encode_quantized_parameters,
    load_quantized_parameters,
)


def _network(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(31, 64), torch.nn.ReLU(), torch.nn.Linear(64, 3))
    with torch.no_grad():
        net[0].weight.normal_(0, 0.2)  # trained weights are bell-shaped; some rows matter more than others
        net[0].weight[:8] *= 10
        net[2].weight[1].zero_()  # an all-zero row
    return dict(net.named_parameters())


def _empty_like(parameters: dict) -> dict:
    return {name: torch.nn.Parameter(torch.full_like(p, float("nan"))) for name, p in parameters.items()}


@pytest.mark.parametrize("bits", [8, 6, 4, 2])
def test_quantised_weights_are_within_half_a_step_of_each_row_and_vectors_are_fp16(bits):
    parameters = _network()
    loaded = _empty_like(parameters)
    load_quantized_parameters(loaded, encode_quantized_parameters(parameters, bits), "NETQ")
    for name, original in parameters.items():
        restored = loaded[name].detach()
        if original.dim() == 1:
            assert torch.equal(restored, original.detach().half().float()), name
            continue
        step = original.detach().abs().amax(dim=1, keepdim=True) / (2 ** (bits - 1) - 1)
        assert ((restored - original).abs() <= step * 0.51 + 1e-7).all(), name
        assert restored.unique().numel() <= 2**bits * restored.shape[0]  # at most 2**bits - 1 levels per row
    assert torch.equal(loaded["2.weight"][1], torch.zeros(64))


def test_fewer_bits_give_fewer_bytes():
    sizes = [len(encode_quantized_parameters(_network(), bits)) for bits in (8, 6, 4)]
    assert sizes[0] < 0.6 * len(encode_parameters(_network()))  # 8 bits: scales and names cost the rest
    assert sizes[0] > sizes[1] > sizes[2]


def test_quantised_payload_is_deterministic():
    assert encode_quantized_parameters(_network(), 6) == encode_quantized_parameters(_network(), 6)


@pytest.mark.parametrize("bits", [1, 9, 16])
def test_unsupported_bit_widths_are_rejected(bits):
    with pytest.raises(ValueError, match="2..8 bits"):
        encode_quantized_parameters(_network(), bits)
    payload = bytearray(encode_quantized_parameters(_network(), 8))
    payload[0] = bits
    with pytest.raises(FormatError, match="2..8 bits"):
        load_quantized_parameters(_empty_like(_network()), bytes(payload), "NETQ")


def test_quantised_payload_for_another_network_is_refused():
    payload = encode_quantized_parameters(_network(), 8)
    other = dict(torch.nn.Sequential(torch.nn.Linear(31, 32)).named_parameters())
    with pytest.raises(FormatError, match="do not fit"):
        load_quantized_parameters(_empty_like(other), payload, "NETQ")
    wrong_shape = {**_empty_like(_network()), "0.weight": torch.nn.Parameter(torch.zeros(64, 30))}
    with pytest.raises(FormatError, match="0.weight"):
        load_quantized_parameters(wrong_shape, payload, "NETQ")


@pytest.mark.parametrize("cut", [0, 4, 20])
def test_truncated_quantised_payload_is_a_format_error(cut):
    payload = encode_quantized_parameters(_network(), 8)
    with pytest.raises(FormatError):
        load_quantized_parameters(_empty_like(_network()), payload[:cut], "NETQ")


def test_quantised_payload_with_symbols_left_over_is_a_format_error():
    parameters = _network()
    payload = encode_quantized_parameters(parameters, 8)
    (length,) = struct.unpack_from("<I", payload, 1)
    extra = np.full(sum(p.numel() for p in parameters.values() if p.dim() == 2) + 5, 127)
    longer = payload[: 5 + length] + encode_categorical(extra, 255)
    with pytest.raises(FormatError, match=r"\d+ symbols where \d+ are expected"):
        load_quantized_parameters(_empty_like(parameters), longer, "NETQ")


def test_symbols_beyond_the_bit_width_are_a_format_error():
    parameters = _network()
    payload = bytearray(encode_quantized_parameters(parameters, 8))
    payload[0] = 4  # now claims 4-bit weights (symbols 0..14) over an 8-bit stream
    with pytest.raises(FormatError, match=r"outside the alphabet 0\.\.14"):
        load_quantized_parameters(_empty_like(parameters), bytes(payload), "NETQ")
