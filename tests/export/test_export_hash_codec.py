"""vqad-hash / vqad-hash-random models through the compressed-file container."""

from __future__ import annotations

import math

import pytest
import torch
from nerfstudio.cameras.rays import RayBundle
from nerfstudio.data.scene_box import SceneBox
from vqad_nerfstudio.method_configs.vqad_hash import hash_model_config

from vqad_nerfstudio.codec import FormatError, TruncatedError, decode_array, read_container, write_container
from vqad_nerfstudio.export.formats import encode_any, load_any
from vqad_nerfstudio.export.methods import UnsupportedMethodError
from vqad_nerfstudio.export.size_report import size_report


def _model(mode: str, network_bits: int = 16):
    torch.manual_seed(0)
    config = hash_model_config(mode, 8)
    config.num_levels, config.max_res, config.network_bits = 4, 64, network_bits
    if mode == "learned":
        config.log2_codebook_size, config.index_table_size = 6, 3000
    model = config.setup(scene_box=SceneBox(aabb=torch.tensor([[-1.0] * 3, [1.0] * 3])), num_train_data=1)
    with torch.no_grad():  # what a file stores: fp16 values, random (trained-looking) indices
        for parameter in model.parameters():
            parameter.normal_().mul_(0.5)
            parameter.copy_(parameter.half().float())
    model.eval()
    return model


@pytest.mark.parametrize("mode", ["learned", "random"])
def test_round_trip_is_exact(mode):
    model = _model(mode)
    encoded = encode_any(model)
    assert encoded.header["method"] == ("vqad-hash" if mode == "learned" else "vqad-hash-random")
    decoded, info = load_any(write_container(encoded.header, encoded.chunks))
    assert info.complete and info.method == encoded.header["method"]
    points = torch.rand(500, 3)
    with torch.no_grad():
        assert torch.equal(decoded.encoding(points), model.encoding(points))
    original = dict(model.named_parameters())
    for name, parameter in decoded.named_parameters():
        if "index_logits" not in name:
            assert torch.equal(parameter, original[name]), name
    if mode == "learned":
        for level in range(len(model.encoding.layouts)):
            assert torch.equal(decoded.encoding.hard_indices(level), model.encoding.hard_indices(level))
        # one int32 per index entry, no logits; the checkpoint loads into a model built from the config, bit-exactly
        assert len(decoded.encoding.index_logits) == 0 and decoded.encoding.indices.dtype == torch.int32
        assert decoded.encoding.indices.numel() == sum(layout.rows for layout in model.encoding.layouts)
        fresh = decoded.config.setup(scene_box=decoded.scene_box, num_train_data=1)
        fresh.load_state_dict(decoded.state_dict())
        again = encode_any(fresh.eval())
        assert write_container(again.header, again.chunks) == write_container(encoded.header, encoded.chunks)


def _rays(count: int = 64) -> RayBundle:
    generator = torch.Generator().manual_seed(1)
    directions = torch.nn.functional.normalize(torch.randn(count, 3, generator=generator), dim=-1)
    return RayBundle(
        origins=-1.8 * directions + 0.1 * torch.randn(count, 3, generator=generator),
        directions=directions,
        pixel_area=torch.full((count, 1), 1e-4),
        camera_indices=torch.zeros(count, 1, dtype=torch.long),
    )


@pytest.mark.parametrize("mode", ["learned", "random"])
def test_quantised_networks_decode_to_what_was_rendered(mode):
    """network_bits 6: the file stores the networks and proposal grids in NETQ, smaller than fp16 NETS, and the
    decoded model renders exactly what the trained one rendered (both read the same rounded weights)."""
    model, fp16_model = _model(mode, network_bits=6), _model(mode)
    encoded = encode_any(model)
    assert encoded.header["requires"] == ["network_bits"] and encoded.header["model"]["network_bits"] == 6
    nets = {chunk.tag: len(chunk.payload) for chunk in encoded.chunks if chunk.tag in ("NETS", "NETQ")}
    fp16_nets = {chunk.tag: len(chunk.payload) for chunk in encode_any(fp16_model).chunks if chunk.tag == "NETS"}
    assert set(nets) == {"NETQ"} and nets["NETQ"] < 0.5 * fp16_nets["NETS"]
    decoded, _ = load_any(write_container(encoded.header, encoded.chunks))
    assert decoded.config.network_bits == 6
    with torch.no_grad():
        trained, rendered, unrounded = model(_rays()), decoded(_rays()), fp16_model(_rays())
    assert torch.equal(rendered["rgb"], trained["rgb"]) and torch.equal(rendered["depth"], trained["depth"])
    assert not torch.equal(unrounded["rgb"], trained["rgb"])  # the rounding is in what renders
    points = torch.rand(300, 3)
    with torch.no_grad():  # ... but not in the position encoding (the random twin's table stays fp16)
        assert torch.equal(model.encoding(points), fp16_model.encoding(points))
    again = encode_any(decoded)
    assert write_container(again.header, again.chunks) == write_container(encoded.header, encoded.chunks)


def test_quantised_network_headers_are_checked():
    encoded = encode_any(_model("random", network_bits=8))
    unrequired = {**encoded.header, "requires": []}
    with pytest.raises(FormatError, match="set but not required"):
        load_any(write_container(unrequired, encoded.chunks))
    wide = {**encoded.header, "model": {**encoded.header["model"], "network_bits": 12}}
    with pytest.raises(FormatError, match="integer in 2..8"):
        load_any(write_container(wide, encoded.chunks))
    fp16_chunks = encode_any(_model("random")).chunks
    with pytest.raises(FormatError, match="one NETQ chunk"):
        load_any(write_container(encoded.header, fp16_chunks))


@pytest.mark.parametrize(
    "settings,message",
    [
        ({"network_bits": 9}, "network_bits must be 16"),
        ({"network_bits": 8, "hash_grid_backward": "nerfstudio"}, "hash_grid_backward 'sparse'"),
        ({"network_bits": 8, "implementation": "tcnn"}, "implementation 'torch'"),
    ],
)
def test_bad_network_bits_are_refused(settings, message):
    config = hash_model_config("learned", 8)
    for key, value in settings.items():
        setattr(config, key, value)
    with pytest.raises(ValueError, match=message):
        config.__post_init__()


@pytest.mark.parametrize("index_coding", ["raw", "entropy"])
def test_size_accounting_matches_the_exported_encoding_bytes(index_coding):
    model = _model("learned")
    encoded = encode_any(model, index_coding=index_coding)
    tags = {"raw": "IDXR", "entropy": "IDXE"}
    index_bytes = sum(len(c.payload) for c in encoded.chunks if c.tag in ("IDXR", "IDXE"))
    codebook_bytes = sum(decode_array(c.payload).nbytes for c in encoded.chunks if c.tag == "CBOK")
    levels = len(model.encoding.layouts)
    stored = model.encoding_bytes()
    if index_coding == "raw":
        assert {c.tag for c in encoded.chunks if c.lod is not None} == {"CBOK", tags["raw"]}
        assert 0 <= index_bytes + codebook_bytes - stored < levels  # each level's entries end on a byte boundary
        packed = sum(math.ceil(layout.rows * model.encoding.index_bits / 8) for layout in model.encoding.layouts)
        assert index_bytes == packed
    else:  # random indices do not compress: the coder falls back to packing where that is smaller
        assert index_bytes + codebook_bytes <= stored + levels + 64 * levels
    data = write_container(encoded.header, encoded.chunks)
    assert size_report(encoded, data)["decoder_bytes"] is None  # NETS holds the MLPs with other parameters


def test_truncated_files_and_levels_of_detail_are_refused():
    encoded = encode_any(_model("learned"))
    data = write_container(encoded.header, encoded.chunks)
    with pytest.raises(TruncatedError, match="need every level"):
        load_any(data[: len(data) - 40])
    with pytest.raises(ValueError, match="no levels of detail"):
        load_any(data, max_lod=1)
    assert read_container(data).complete


def test_foreign_models_are_refused_by_name():
    with pytest.raises(UnsupportedMethodError, match="Linear cannot be written.*vqad-hash"):
        encode_any(torch.nn.Linear(2, 2))


def test_decoded_models_use_pytorch_modules_and_tinycudann_runs_are_refused():
    """Files hold PyTorch's parameter layout: decoding builds PyTorch modules even where tinycudann is installed,
    and a run trained through tinycudann modules is refused with what to do instead."""
    model = _model("random")
    encoded = encode_any(model)
    decoded, _ = load_any(write_container(encoded.header, encoded.chunks))
    assert decoded.config.implementation == "torch"
    model.field.mlp_head.tcnn_encoding = torch.nn.Identity()  # what a tinycudann-backed network carries
    with pytest.raises(ValueError, match="implementation torch"):
        encode_any(model)
