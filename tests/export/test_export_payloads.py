"""Network weights as payloads: fp16, and 8 bits per weight (per-row scales, range-coded)."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch

from vqad_nerfstudio.codec import FormatError
from vqad_nerfstudio.export.payloads import (
    encode_8bit_parameters,
    encode_parameters,
    load_8bit_parameters,
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


def test_8bit_weights_are_within_half_a_step_of_each_row_and_vectors_are_fp16():
    parameters = _network()
    loaded = _empty_like(parameters)
    load_8bit_parameters(loaded, encode_8bit_parameters(parameters), "NET8")
    for name, original in parameters.items():
        restored = loaded[name].detach()
        if original.dim() == 1:
            assert torch.equal(restored, original.detach().half().float()), name
            continue
        step = original.detach().abs().amax(dim=1, keepdim=True) / 127
        assert ((restored - original).abs() <= step * 0.51 + 1e-7).all(), name
    assert torch.equal(loaded["2.weight"][1], torch.zeros(64))


def test_8bit_payload_is_well_under_the_fp16_payload():
    parameters = _network()
    assert len(encode_8bit_parameters(parameters)) < 0.6 * len(encode_parameters(parameters))  # scales, names: 5%


def test_8bit_payload_is_deterministic():
    assert encode_8bit_parameters(_network()) == encode_8bit_parameters(_network())


def test_8bit_payload_for_another_network_is_refused():
    payload = encode_8bit_parameters(_network())
    other = dict(torch.nn.Sequential(torch.nn.Linear(31, 32)).named_parameters())
    with pytest.raises(FormatError, match="do not fit"):
        load_8bit_parameters(_empty_like(other), payload, "NET8")
    wrong_shape = {**_empty_like(_network()), "0.weight": torch.nn.Parameter(torch.zeros(64, 30))}
    with pytest.raises(FormatError, match="0.weight"):
        load_8bit_parameters(wrong_shape, payload, "NET8")


@pytest.mark.parametrize("cut", [0, 3, 20])
def test_truncated_8bit_payload_is_a_format_error(cut):
    payload = encode_8bit_parameters(_network())
    with pytest.raises(FormatError):
        load_8bit_parameters(_empty_like(_network()), payload[:cut], "NET8")


def test_8bit_payload_with_symbols_left_over_is_a_format_error():
    parameters = _network()
    payload = encode_8bit_parameters(parameters)
    (length,) = struct.unpack_from("<I", payload)
    from vqad_nerfstudio.codec import encode_categorical

    extra = np.full(sum(p.numel() for p in parameters.values() if p.dim() == 2) + 5, 127)
    with pytest.raises(FormatError, match="left over"):
        load_8bit_parameters(_empty_like(parameters), payload[: 4 + length] + encode_categorical(extra, 255), "NET8")
