"""tensorf-compressed models through the compressed-file container: latents, masks and tables round-trip."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from nerfstudio.cameras.rays import RayBundle
from nerfstudio.data.scene_box import SceneBox

from vqad_nerfstudio.codec import FormatError, TruncatedError, describe, read_container, write_container
from vqad_nerfstudio.export.formats import encode_any, load_any
from vqad_nerfstudio.export.size_report import size_report
from vqad_nerfstudio.fields.quantized_linear import quantizable_layers
from vqad_nerfstudio.models.compressed_tensorf import CompressedTensoRFModelConfig
from vqad_nerfstudio.rounding import rounded_rows


def _model(latents: str = "random"):
    """A compressing model with fp16-exact weights and latents drawn as ``latents`` says."""
    torch.manual_seed(0)
    config = CompressedTensoRFModelConfig(
        init_resolution=24, num_den_components=4, num_color_components=6, latent_channels=5, decoder_channels=6
    )
    model = config.setup(scene_box=SceneBox(aabb=torch.tensor([[-1.0] * 3, [1.0] * 3])), num_train_data=1)
    model.resize_planes(22)
    with torch.no_grad():
        for parameter in (p for p in model.parameters() if p.requires_grad):  # not the scene box
            parameter.normal_().mul_(0.3)
            parameter.copy_(parameter.half().float())
        planes = model.latent_planes
        if latents == "random":
            planes.latents.normal_(0, 4)
        elif latents == "skewed":  # mostly zero, a long tail
            planes.latents.copy_(torch.distributions.Laplace(0, 0.4).sample(planes.latents.shape))
        else:  # degenerate: one value everywhere
            planes.latents.fill_(3.0)
        planes.mask_logits.normal_()
    model.compressing.fill_(True)
    return model.eval()


@pytest.mark.parametrize("latents", ["random", "skewed", "degenerate"])
def test_latents_masks_and_renders_round_trip(latents):
    model = _model(latents)
    encoded = encode_any(model)
    assert encoded.header["method"] == "tensorf-compressed"
    decoded, info = load_any(write_container(encoded.header, encoded.chunks))
    assert info.complete and info.method == "tensorf-compressed"
    assert torch.equal(decoded.latent_planes.hard_latents(), model.latent_planes.hard_latents())
    assert torch.equal(decoded.latent_planes.hard_masks(), model.latent_planes.hard_masks())
    with torch.no_grad():
        expected = model.latent_planes().planes
        assert torch.equal(decoded.latent_planes().planes, expected)  # same fp16-exact decoder, same integers
        for name in ("density_encoding", "color_encoding"):
            ours, theirs = getattr(decoded.field, name), getattr(model.field, name)
            assert torch.equal(ours.line_coef, theirs.line_coef)


def test_coded_latents_are_smaller_when_skewed_and_masked():
    sizes = {}
    for latents in ("random", "skewed"):
        encoded = encode_any(_model(latents))
        sizes[latents] = len(next(chunk.payload for chunk in encoded.chunks if chunk.tag == "LATS"))
    assert sizes["skewed"] < 0.5 * sizes["random"]
    model = _model("random")
    with torch.no_grad():
        model.latent_planes.mask_logits.fill_(-1.0)  # nothing coded: the latents cost (almost) nothing
    lats = next(chunk.payload for chunk in encode_any(model).chunks if chunk.tag == "LATS")
    assert len(lats) < 16


def test_refuses_a_model_before_its_compression_stage():
    model = _model()
    model.compressing.fill_(False)
    with pytest.raises(ValueError, match="compression stage"):
        encode_any(model)


def test_truncated_and_malformed_files_fail_clearly():
    encoded = encode_any(_model())
    data = write_container(encoded.header, encoded.chunks)
    with pytest.raises(TruncatedError, match="need"):
        load_any(data[: len(data) // 2])
    with pytest.raises(ValueError, match="no levels of detail"):
        load_any(data, max_lod=0)
    header = dict(encoded.header, plane_resolution=-3)
    with pytest.raises(FormatError, match="plane_resolution"):
        load_any(write_container(header, encoded.chunks))
    without_tables = [chunk for chunk in encoded.chunks if chunk.tag != "LTAB"]
    with pytest.raises(FormatError, match="LTAB"):
        load_any(write_container(encoded.header, without_tables))


def test_size_statistics_compare_against_fp32_planes():
    model = _model()
    encoded = encode_any(model)
    (level,) = encoded.levels
    assert level.float_grid_bytes == 3 * (4 + 6) * 22 * 22 * 4
    assert level.vertices == int(model.latent_planes.hard_masks().sum())
    tags = [(chunk.tag, chunk.lod) for chunk in read_container(write_container(encoded.header, encoded.chunks)).chunks]
    assert tags == [("NETS", None), ("PDEC", 0), ("MASK", 0), ("LTAB", 0), ("LATS", 0)]
    assert np.isfinite(level.float_grid_bytes)
    data = write_container(encoded.header, encoded.chunks)
    pdec = next(row for row in describe(read_container(data)) if row["tag"] == "PDEC")
    assert size_report(encoded, data)["decoder_bytes"] == pdec["chunk_bytes"]  # the plane decoder, not NETS


def _quantized_model(bits: int = 6):
    """:func:`_model` whose plane decoder trains and is stored at ``bits`` bits."""
    model = _model()
    model.config.decoder_bits = bits
    for layer in quantizable_layers(model.latent_planes.decoder):
        layer.bits = bits
    return model


def _quantized_round_trip(model, key: str, first_tags: list):
    """``model``'s encoding and its decoded model, checking the header (``key``, the model's bits, required), the
    first two chunks' tags, the version and the decoded config."""
    bits = getattr(model.config, key)
    encoded = encode_any(model)
    assert encoded.header["requires"] == [key] and encoded.header["model"][key] == bits
    assert [chunk.tag for chunk in encoded.chunks][:2] == first_tags
    data = write_container(encoded.header, encoded.chunks)
    assert read_container(data).version == (2, 0)  # readers without the feature refuse the file by its version
    decoded, _ = load_any(data)
    assert getattr(decoded.config, key) == bits
    return encoded, decoded


def test_a_quantized_plane_decoder_decodes_to_the_planes_it_renders():
    model = _quantized_model(6)
    encoded, decoded = _quantized_round_trip(model, "decoder_bits", ["NETS", "PDCQ"])
    with torch.no_grad():
        torch.testing.assert_close(decoded.latent_planes().planes, model.latent_planes().planes, rtol=0, atol=1e-3)
        for layer, trained in zip(decoded.latent_planes.decoder, model.latent_planes.decoder):
            if isinstance(layer, torch.nn.ConvTranspose2d):  # the rounded kernels, exactly
                assert torch.equal(layer.weight, trained.rounded_weight())
    again = encode_any(decoded)  # the rounded kernels round to themselves (the prior's tables are not kept)
    assert again.chunks[1].tag == "PDCQ" and again.chunks[1].payload == encoded.chunks[1].payload
    fp16 = next(chunk.payload for chunk in encode_any(_model()).chunks if chunk.tag == "PDEC")
    quantized = next(chunk.payload for chunk in encoded.chunks if chunk.tag == "PDCQ")
    assert len(quantized) < 0.6 * len(fp16)


def test_the_decoder_trains_on_its_grid_with_straight_through_gradients():
    model = _quantized_model(3).train()
    kernel = model.latent_planes.decoder[0]
    rounded = kernel.rounded_weight().detach()
    assert not torch.equal(rounded, kernel.weight) and torch.unique(rounded[0]).numel() <= 7  # 3 bits: -3..3
    model.latent_planes().planes.square().sum().backward()
    assert kernel.weight.grad is not None and kernel.weight.grad.abs().sum() > 0


def test_quantized_decoder_headers_are_checked():
    encoded = encode_any(_quantized_model(6))
    unrequired = dict(encoded.header)
    del unrequired["requires"]
    with pytest.raises(FormatError, match="set but not required"):
        load_any(write_container(unrequired, encoded.chunks))
    for bits in (9, 16, 6.0):
        header = dict(encoded.header, model=dict(encoded.header["model"], decoder_bits=bits))
        with pytest.raises(FormatError, match="integer in 2..8"):
            load_any(write_container(header, encoded.chunks))
    header = dict(encoded.header, model=dict(encoded.header["model"], decoder_bits=5))
    with pytest.raises(FormatError, match="differ from the header"):
        load_any(write_container(header, encoded.chunks))
    fp16_chunks = encode_any(_model()).chunks
    with pytest.raises(FormatError, match="PDCQ"):  # a quantised header needs the quantised decoder
        load_any(write_container(encoded.header, fp16_chunks))


@pytest.mark.parametrize("bits", [1, 9, 12])
def test_decoder_bits_outside_2_to_8_or_16_are_refused(bits):
    with pytest.raises(ValueError, match="decoder_bits"):
        CompressedTensoRFModelConfig(decoder_bits=bits)


def _rays(count: int = 64) -> RayBundle:
    """Rays from outside the unit cube through it (the collider sets their near and far planes)."""
    generator = torch.Generator().manual_seed(1)
    origins = torch.nn.functional.normalize(torch.randn(count, 3, generator=generator), dim=-1) * 2.5
    directions = torch.nn.functional.normalize(torch.rand(count, 3, generator=generator) * 0.6 - 0.3 - origins, dim=-1)
    return RayBundle(origins, directions, torch.ones(count, 1), camera_indices=torch.zeros(count, 1, dtype=torch.long))


def _quantized_field_model(bits: int = 6):
    """:func:`_model` whose line factors, appearance matrix and rendering MLP train and are stored at ``bits``."""
    model = _model()
    model.config.field_bits = bits
    return model


def test_a_quantized_field_decodes_to_what_it_renders():
    model = _quantized_field_model(6)
    encoded, decoded = _quantized_round_trip(model, "field_bits", ["NETQ", "PDEC"])
    with torch.no_grad():
        trained, rendered = model(_rays()), decoded(_rays())
        assert torch.equal(rendered["rgb"], trained["rgb"]) and torch.equal(rendered["depth"], trained["depth"])
        assert not torch.equal(_model()(_rays())["rgb"], trained["rgb"])  # the float field renders otherwise
        lines = model.field.density_encoding
        lines.line_bits = 6
        assert torch.equal(decoded.field.density_encoding.line_coef, lines.lines())  # stored as trained
        assert model.field.density_encoding is lines and model.field.B.bits is None  # renders restore the floats
    again = encode_any(decoded)  # the rounded parameters round to themselves
    assert again.chunks[0].tag == "NETQ" and again.chunks[0].payload == encoded.chunks[0].payload
    fp16 = next(chunk.payload for chunk in encode_any(_model()).chunks if chunk.tag == "NETS")
    assert len(encode_any(_quantized_field_model(8)).chunks[0].payload) < 0.6 * len(fp16)


def test_line_factors_train_on_their_grid_with_straight_through_gradients():
    lines = _model().field.color_encoding
    lines.line_bits = 3
    rounded = lines.lines()
    assert not torch.equal(rounded, lines.line_coef)
    assert max(torch.unique(row).numel() for row in rounded.detach().view(-1, rounded.shape[2])) <= 7  # -3..3 per line
    (rounded * torch.arange(rounded.numel()).view_as(rounded)).sum().backward()
    assert torch.equal(lines.line_coef.grad, torch.arange(rounded.numel()).view_as(rounded).float())


def test_a_stage_two_step_renders_the_rounded_field_and_trains_the_float_one():
    model = _quantized_field_model(4).train()
    rounded = copy.deepcopy(model)
    rounded.config.field_bits = 16
    with torch.no_grad():  # what a 4-bit file of the float parameters holds
        for encoding in rounded.plane_encodings:
            encoding.line_coef.copy_(rounded_rows(encoding.line_rows(), 4).view_as(encoding.line_coef))
        for layer in rounded._field_layers:
            layer.weight.copy_(rounded_rows(layer.weight, 4))
    torch.manual_seed(3)  # the same jittered samples in both
    rgb = model.get_outputs(model.collider(_rays()))["rgb"]
    torch.manual_seed(3)
    assert torch.equal(rgb, rounded.get_outputs(rounded.collider(_rays()))["rgb"])
    rgb.sum().backward()
    field = model.field
    for parameter in (field.color_encoding.line_coef, field.B.weight, field.mlp_head.layers[0].weight):
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0


def test_quantized_field_and_decoder_together():
    model = _quantized_model(6)
    model.config.field_bits = 5
    encoded = encode_any(model)
    assert encoded.header["requires"] == ["decoder_bits", "field_bits"]
    assert [chunk.tag for chunk in encoded.chunks][:2] == ["NETQ", "PDCQ"]
    decoded, _ = load_any(write_container(encoded.header, encoded.chunks))
    assert (decoded.config.field_bits, decoded.config.decoder_bits) == (5, 6)
    with torch.no_grad():
        assert torch.equal(decoded(_rays())["rgb"], model(_rays())["rgb"])


def test_quantized_field_headers_are_checked():
    encoded = encode_any(_quantized_field_model(6))
    unrequired = dict(encoded.header, requires=[])
    with pytest.raises(FormatError, match="field_bits is set but not required"):
        load_any(write_container(unrequired, encoded.chunks))
    header = dict(encoded.header, model=dict(encoded.header["model"], field_bits=16))
    with pytest.raises(FormatError, match="field_bits must be an integer in 2..8"):
        load_any(write_container(header, encoded.chunks))
    header = dict(encoded.header, model=dict(encoded.header["model"], field_bits=7))
    with pytest.raises(FormatError, match="NETQ: its bits differ from the header's model.field_bits"):
        load_any(write_container(header, encoded.chunks))
    with pytest.raises(FormatError, match="NETQ"):  # a quantised header needs the quantised field
        load_any(write_container(encoded.header, encode_any(_model()).chunks))


@pytest.mark.parametrize("bits", [0, 9, 32])
def test_field_bits_outside_2_to_8_or_16_are_refused(bits):
    with pytest.raises(ValueError, match="field_bits"):
        CompressedTensoRFModelConfig(field_bits=bits)
