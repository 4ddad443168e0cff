"""The plane coder of tensorf-compressed on tensors alone: entropy model, masks, rate, importance."""

import pytest
import torch

from vqad_nerfstudio.encodings.factorized_prior import FactorizedPrior
from vqad_nerfstudio.encodings.masked_latent_planes import MaskedLatentPlanes, latent_resolution
from vqad_nerfstudio.encodings.plane_importance import importance_weights, splat_importance, weighted_plane_error


def _toy_planes(resolution: int = 16, channels: int = 6) -> torch.Tensor:
    torch.manual_seed(0)
    y, x = torch.meshgrid(torch.linspace(-1, 1, resolution), torch.linspace(-1, 1, resolution), indexing="ij")
    blob = torch.exp(-4 * (x**2 + y**2))
    return torch.stack([blob * (c + 1) / channels for c in range(channels)])[None].repeat(3, 1, 1, 1)


def test_prior_likelihoods_are_probabilities_that_sum_to_one():
    prior = FactorizedPrior(4)
    values = torch.arange(-2000, 2001, dtype=torch.float32)[None].repeat(4, 1)
    p = prior.likelihood(values)
    assert bool(((p > 0) & (p <= 1)).all())
    assert torch.allclose(p.sum(1), torch.ones(4), atol=1e-3)  # the unit intervals tile the line
    pmfs = prior.integer_pmfs(torch.tensor([-2000] * 4), torch.tensor([2000] * 4))
    assert all(abs(pmf.sum() - 1) < 1e-3 for pmf in pmfs)


def test_prior_rejects_values_of_the_wrong_shape():
    with pytest.raises(ValueError, match=r"\[3, n\]"):
        FactorizedPrior(3).likelihood(torch.zeros(2, 5))


def _fit(rate_lambda: float, steps: int = 150) -> MaskedLatentPlanes:
    target = _toy_planes()
    torch.manual_seed(0)
    planes = MaskedLatentPlanes(3, target.shape[1], target.shape[-1], latent_channels=4, decoder_channels=8)
    weights = torch.ones(3, target.shape[-1], target.shape[-1])
    optimizer = torch.optim.Adam(
        [
            {"params": [planes.latents, planes.mask_logits], "lr": 0.05},
            {"params": list(planes.decoder.parameters()) + list(planes.prior.parameters()), "lr": 5e-3},
        ]
    )
    for step in range(steps):
        planes.temperature = 10 * 0.01 ** (step / steps)
        decoded = planes()
        loss = weighted_plane_error(decoded.planes, target, weights) + rate_lambda * decoded.bits
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return planes.eval()


def test_rate_falls_as_lambda_rises_on_a_toy_plane():
    bits = [float(_fit(rate_lambda)().bits.detach()) for rate_lambda in (0.0, 0.05, 1.0)]
    assert bits[0] > bits[1] > bits[2]
    assert bits[2] < 0.5 * bits[0]


def test_masked_positions_cost_zero_bits():
    planes = MaskedLatentPlanes(3, 4, 16, latent_channels=5, decoder_channels=4).eval()
    with torch.no_grad():
        planes.latents.normal_(0, 3)
        planes.mask_logits.fill_(-1.0)
    assert float(planes().bits.detach()) == 0.0
    with torch.no_grad():
        planes.mask_logits[1, 2, 3] = 1.0  # one position of one plane coded
    expected = planes.prior.bits(torch.round(planes.latents[1, :, 2, 3])[:, None]).sum()
    assert torch.allclose(planes().bits, expected)


def test_training_forward_gives_gradients_to_latents_masks_decoder_and_prior():
    planes = MaskedLatentPlanes(3, 4, 16, latent_channels=5, decoder_channels=4)
    with torch.no_grad():
        planes.latents.normal_(0, 2)
    decoded = planes()
    (decoded.planes.square().sum() + decoded.bits).backward()
    for name, parameter in planes.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_evaluation_decodes_rounded_masked_latents():
    planes = MaskedLatentPlanes(3, 4, 18, latent_channels=5, decoder_channels=4).eval()
    with torch.no_grad():
        planes.latents.normal_(0, 2)
        planes.mask_logits.normal_()
    assert latent_resolution(18) == 5
    expected = planes.decoder(planes.hard_latents().float())[..., :18, :18]
    assert planes().planes.shape == (3, 4, 18, 18)
    assert torch.equal(planes().planes, expected)
    stored_latents, stored_masks = planes.hard_latents(), planes.hard_masks()
    planes.load_hard(stored_latents, stored_masks)
    assert torch.equal(planes().planes, expected)


def test_load_hard_rejects_wrong_shapes():
    planes = MaskedLatentPlanes(3, 4, 16, latent_channels=5, decoder_channels=4)
    with pytest.raises(ValueError, match="expected latents"):
        planes.load_hard(torch.zeros(3, 5, 3, 3, dtype=torch.int64), torch.zeros(3, 3, 3, dtype=torch.bool))


def test_splat_importance_distributes_each_weight_bilinearly():
    # A sample halfway between columns 1 and 2 of row 3 (resolution 5, align_corners=True): half to each.
    x = torch.tensor(1.5 / 4 * 2 - 1)
    y = torch.tensor(3 / 4 * 2 - 1)
    coordinates = torch.stack([x, y])[None, None].repeat(3, 1, 1)
    importance = splat_importance(coordinates, torch.tensor([2.0]), 5)
    expected = torch.zeros(5, 5)
    expected[3, 1] = expected[3, 2] = 1.0
    assert torch.allclose(importance, expected[None].repeat(3, 1, 1))
    many = torch.rand(3, 1000, 2) * 2 - 1
    weights = torch.rand(1000)
    assert torch.allclose(splat_importance(many, weights, 7).sum((1, 2)), weights.sum().repeat(3), rtol=1e-5)


def test_importance_weights_are_log_scaled_to_unit_range():
    importance = torch.zeros(3, 4, 4)
    importance[:, 0, 0] = 100.0
    importance[:, 1, 1] = 0.99
    weights = importance_weights(importance)
    assert torch.allclose(weights.amin((1, 2)), torch.zeros(3)) and torch.allclose(weights.amax((1, 2)), torch.ones(3))
    assert torch.allclose(weights[:, 1, 1], torch.full((3,), 0.5), atol=1e-6)  # log(1) between log(.01), log(100)
