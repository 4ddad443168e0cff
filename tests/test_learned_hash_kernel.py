"""The fused learned-index hash lookup against the PyTorch reference path (outputs and gradients).

These run on CUDA where Triton is present, and on the CPU in Triton's interpreter when ``TRITON_INTERPRET=1`` is set
before Triton is imported (``TRITON_INTERPRET=1 pytest tests/test_learned_hash_kernel.py``); otherwise they skip."""

from __future__ import annotations

from typing import Dict, Tuple

import pytest
import torch
from torch import Tensor

from vqad_nerfstudio.encodings.learned_index_hash import LearnedIndexHashEncoding

from kernel_device import DEVICE, needs_kernel

pytestmark = needs_kernel

SMALL = dict(num_levels=3, min_res=4, max_res=16, index_table_size=200, init_scale=1.0)
"""Level 0 (resolution 4, 125 vertices) is dense; levels 1 and 2 hash their vertices into 200 buckets."""


def _encoding(**kwargs) -> LearnedIndexHashEncoding:
    torch.manual_seed(0)
    encoding = LearnedIndexHashEncoding(**{**SMALL, **kwargs}).to(DEVICE)
    encoding.temperature = 0.7
    if encoding.frozen_indices:
        encoding.indices.random_(0, 2**encoding.index_bits)
    with torch.no_grad():
        for logits in encoding.index_logits:
            logits.normal_()
    return encoding


def _points(count: int, generator: torch.Generator) -> Tensor:
    """Random points, points on the cell boundaries of every level, on the cube's faces and corners, and a few just
    outside it (the trilinear weights then extrapolate from the outermost cell)."""
    random = torch.rand(count, 3, generator=generator)
    grid_steps = torch.randint(0, 17, (64, 3), generator=generator).float() / 16  # boundaries at resolutions 4, 8, 16
    faces = torch.rand(48, 3, generator=generator)
    faces[torch.arange(48), torch.arange(48) % 3] = (torch.arange(48) % 2).float()
    corners = torch.tensor([[(c >> 2) & 1, (c >> 1) & 1, c & 1] for c in range(8)]).float()
    outside = torch.rand(16, 3, generator=generator) * 1.1 - 0.05
    return torch.cat([random, grid_steps, faces, corners, outside]).to(DEVICE)


def _forward_backward(
    encoding: LearnedIndexHashEncoding, fused: bool, points: Tensor, grad_out: Tensor
) -> Tuple[Tensor, Dict[str, Tensor]]:
    encoding.fused = fused
    encoding.zero_grad(set_to_none=True)
    features = encoding(points)
    (features * grad_out).sum().backward()
    return features.detach(), {name: p.grad.clone() for name, p in encoding.named_parameters() if p.grad is not None}


def _compare(encoding: LearnedIndexHashEncoding, points: Tensor, grad_out: Tensor) -> None:
    assert encoding._fusable(points)
    reference = _forward_backward(encoding, False, points, grad_out)
    fused = _forward_backward(encoding, True, points, grad_out)
    torch.testing.assert_close(fused[0], reference[0], rtol=1e-5, atol=1e-5)
    assert fused[1].keys() == reference[1].keys() and fused[1]
    for name in reference[1]:
        torch.testing.assert_close(fused[1][name], reference[1][name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(log2_codebook_size=6, index_bits=3, features_per_level=2),  # hashed candidate windows
        dict(log2_codebook_size=3, index_bits=3, features_per_level=2),  # free indices into the whole codebook
        dict(log2_codebook_size=5, index_bits=1, features_per_level=3),  # a width that is not a power of two
        dict(log2_codebook_size=6, index_bits=3, features_per_level=2, num_levels=1, min_res=4, max_res=4),
        dict(log2_codebook_size=6, index_bits=2, features_per_level=4, num_levels=4, min_res=2, max_res=40),
    ],
)
def test_fused_lookup_matches_reference(kwargs) -> None:
    generator = torch.Generator().manual_seed(1)
    encoding = _encoding(**kwargs)
    assert any(layout.dense for layout in encoding.layouts)
    points = _points(200, generator)
    grad_out = torch.randn(points.shape[0], encoding.get_out_dim(), generator=generator).to(DEVICE)
    grad_out[::5] = 0.0  # samples a field masks out
    _compare(encoding, points, grad_out)


def test_fused_lookup_of_frozen_indices_matches_reference() -> None:
    generator = torch.Generator().manual_seed(2)
    encoding = _encoding(log2_codebook_size=6, index_bits=3, frozen_indices=True)
    points = _points(150, generator)
    _compare(encoding, points, torch.randn(points.shape[0], encoding.get_out_dim(), generator=generator).to(DEVICE))


def test_fused_lookup_keeps_the_batch_shape_and_matches_without_gradients() -> None:
    encoding = _encoding(log2_codebook_size=6)
    points = _points(40, torch.Generator().manual_seed(3))[:120].reshape(4, 30, 3)
    with torch.no_grad():
        encoding.fused = False
        reference = encoding(points)
        encoding.fused = True
        fused = encoding(points)
    assert fused.shape == (4, 30, encoding.get_out_dim())
    torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-5)


def test_positions_that_need_a_gradient_take_the_reference_path() -> None:
    encoding = _encoding(log2_codebook_size=6)
    points = _points(20, torch.Generator().manual_seed(4)).requires_grad_()
    assert not encoding._fusable(points)
    encoding(points).square().sum().backward()
    assert points.grad is not None and points.grad.abs().sum() > 0


@pytest.mark.parametrize("frozen", [False, True])
def test_fused_lookup_of_an_empty_batch(frozen: bool) -> None:
    encoding = _encoding(log2_codebook_size=6, frozen_indices=frozen)
    points = torch.zeros(0, 3, device=DEVICE)
    assert encoding._fusable(points)
    features = encoding(points)
    assert features.shape == (0, encoding.get_out_dim())
    features.sum().backward()
    for name, parameter in encoding.named_parameters():
        assert parameter.grad is not None and not parameter.grad.any(), name
