"""tensorf-compressed models through the compressed-file container: latents, masks and tables round-trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from nerfstudio.data.scene_box import SceneBox

from vqad_nerfstudio.codec import FormatError, TruncatedError, read_container, write_container
from vqad_nerfstudio.export.formats import encode_any, load_any
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
