"""tensorf-compressed models through the compressed-file container: latents, masks and tables round-trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from nerfstudio.data.scene_box import SceneBox

from vqad_nerfstudio.codec import FormatError, TruncatedError, describe, read_container, write_container
from vqad_nerfstudio.export.formats import encode_any, load_any
from vqad_nerfstudio.export.size_report import size_report
from vqad_nerfstudio.fields.quantized_linear import quantizable_layers
from vqad_nerfstudio.models.compressed_tensorf import CompressedTensoRFModelConfig


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


def test_a_quantized_plane_decoder_decodes_to_the_planes_it_renders():
    model = _quantized_model(6)
    encoded = encode_any(model)
    assert encoded.header["requires"] == ["decoder_bits"] and encoded.header["model"]["decoder_bits"] == 6
    assert [chunk.tag for chunk in encoded.chunks][:2] == ["NETS", "PDCQ"]
    data = write_container(encoded.header, encoded.chunks)
    assert read_container(data).version == (2, 0)  # readers without the feature refuse the file by its version
    decoded, _ = load_any(data)
    assert decoded.config.decoder_bits == 6
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
