"""Every VQAD setting is checked where it is defined: the config dataclass (the command line and decoded files both
build one)."""

from __future__ import annotations

import pytest
import torch

from vqad_nerfstudio.models.vqad import VQADModelConfig


@pytest.mark.parametrize(
    "settings,message",
    [
        ({"num_levels": 9}, r"num_levels \(L\) must be an integer in 1..8"),
        ({"num_levels": 8, "base_resolution": 32}, "finest level's resolution.* = 4096, must be at most 2048"),
        ({"hidden_dim": -1}, "hidden_dim"),
        ({"hidden_dim": 0}, "hidden_dim"),
        ({"hidden_dim": 300000}, "hidden_dim"),
        ({"network_bits": 9}, "network_bits"),
        ({"network_bits": 1}, "network_bits"),
        ({"num_samples": 0}, "num_samples"),
        ({"feature_dim": 0}, "feature_dim"),
        ({"coarse_lod_fraction": 5.0}, "coarse_lod_fraction"),
        ({"coarse_lod_fraction": float("nan")}, "coarse_lod_fraction"),
        ({"index_warmup_steps": -5}, "index_warmup_steps"),
        ({"occupancy_alpha_threshold": 1.0}, "occupancy_alpha_threshold"),
        ({"alpha_threshold": 1.0}, "alpha_threshold"),
        ({"alpha_threshold": -0.1}, "alpha_threshold"),
        ({"occupancy_update_every": 0}, "occupancy_update_every"),
        ({"prune_steps": (500, -1)}, "prune_steps"),
        ({"index_temperature": (1.0, 0.0)}, "index_temperature"),
        ({"dense_resolution": -1}, "dense_resolution"),
        ({"float_vertex_fraction": 1.0}, "float_vertex_fraction must be a finite number >= 0.0 and < 1.0"),
        ({"float_vertex_fraction": 0.01, "index_warmup": "soft"}, "float_vertex_fraction keeps float warm-up"),
        ({"logit_dtype": "bfloat16"}, "logit_dtype must be 'auto', 'float16' or 'float32'"),
    ],
)
def test_bad_settings_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        VQADModelConfig(**settings)


@pytest.mark.parametrize(
    "cuda,triton_found,fused,expected",
    [
        (False, True, True, torch.float32),
        (True, True, True, torch.float16),
        (True, False, True, torch.float32),
        (True, True, False, torch.float32),
    ],
)
def test_auto_logits_are_float16_only_where_the_fused_kernels_run(monkeypatch, cuda, triton_found, fused, expected):
    from vqad_nerfstudio import kernels

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(kernels, "triton", object() if triton_found else None)
    assert VQADModelConfig(fused_kernels=fused).logit_storage() == expected
    assert VQADModelConfig(logit_dtype="float32").logit_storage() == torch.float32
    assert VQADModelConfig(logit_dtype="float16", fused_kernels=fused).logit_storage() == torch.float16


PROPOSAL_NETWORK = {"hidden_dim": 16, "log2_hashmap_size": 13, "num_levels": 5, "max_res": 64}


def test_the_largest_settings_are_accepted():
    VQADModelConfig(num_levels=8, base_resolution=16, hidden_dim=1024, feature_dim=256, num_samples=4096)


@pytest.mark.parametrize(
    "settings,message",
    [
        ({"log2_codebook_size": 40}, "log2_codebook_size"),
        ({"index_table_size": 0}, "index_table_size"),
        ({"num_levels": 1000}, "num_levels"),
        ({"hidden_dim": 300000}, "hidden_dim"),
        ({"num_nerf_samples_per_ray": 0}, "num_nerf_samples_per_ray"),
        ({"num_proposal_samples_per_ray": (64,)}, "one count per proposal iteration"),
        ({"proposal_net_args_list": [{**PROPOSAL_NETWORK, "log2_hashmap_size": 40}] * 2}, "log2_hashmap_size"),
    ],
)
def test_bad_hash_settings_are_refused(settings, message):
    from vqad_nerfstudio.models.learned_index_nerfacto import LearnedIndexNerfactoModelConfig

    with pytest.raises(ValueError, match=message):
        LearnedIndexNerfactoModelConfig(**settings)


@pytest.mark.parametrize(
    "settings,message",
    [
        ({"num_den_components": 100000}, "num_den_components"),
        ({"latent_channels": 0}, "latent_channels"),
        ({"num_samples": 0}, "num_samples"),
    ],
)
def test_bad_plane_settings_are_refused(settings, message):
    from vqad_nerfstudio.models.compressed_tensorf import CompressedTensoRFModelConfig

    with pytest.raises(ValueError, match=message):
        CompressedTensoRFModelConfig(**settings)


def test_a_config_yml_with_the_former_field_names_loads():
    """Runs written before ``bits`` and ``index_relaxation_steps`` became ``index_bits`` and ``index_warmup_steps``."""
    import yaml

    text = yaml.dump(VQADModelConfig(index_bits=6, index_warmup_steps=123))
    legacy = text.replace("index_bits:", "bits:").replace("index_warmup_steps:", "index_relaxation_steps:")
    assert "index_bits" not in legacy and "index_relaxation_steps" in legacy
    config = yaml.load(legacy, Loader=yaml.Loader)  # how nerfstudio reads a run's config.yml
    assert (config.index_bits, config.index_warmup_steps) == (6, 123) and not hasattr(config, "bits")


def _run_config(tmp_path, **settings):
    import copy

    from vqad_nerfstudio.method_configs.vqad import vqad

    config = copy.deepcopy(vqad.config)
    (tmp_path / "transforms.json").write_text("{}")  # only its existence is checked before the run starts
    config.pipeline.datamanager.data = tmp_path
    config.pipeline.model.unbounded = False  # given: no images to decide it from
    config.output_dir, config.timestamp = tmp_path / "out", "t"
    for name, value in settings.items():
        setattr(config, name, value)
    return config


def test_a_run_never_lands_silently_on_an_earlier_runs_checkpoints(tmp_path, capsys):
    """nerfstudio loads a folder's latest checkpoint whichever run wrote it: a second run with the same
    --timestamp is refused, replaces the first with --overwrite True, and may resume it with --load-dir."""
    first = _run_config(tmp_path)
    first.save_config()
    checkpoints = first.get_checkpoint_dir()
    checkpoints.mkdir()
    (checkpoints / "step-000000599.ckpt").write_bytes(b"first run")
    with pytest.raises(SystemExit):
        _run_config(tmp_path).save_config()
    assert "already holds a run" in capsys.readouterr().err
    assert (checkpoints / "step-000000599.ckpt").exists()
    _run_config(tmp_path, load_dir=checkpoints).save_config()  # resuming in place
    _run_config(tmp_path, load_checkpoint=checkpoints / "step-000000599.ckpt").save_config()
    assert (checkpoints / "step-000000599.ckpt").exists()
    _run_config(tmp_path, overwrite=True).save_config()
    assert not any(checkpoints.iterdir()) and (first.get_base_dir() / "config.yml").exists()


def test_runs_of_a_parser_subcommand_are_named_after_their_data(tmp_path):
    """``ns-train vqad blender-data --data lego`` gives the data to the parser, not the datamanager: its runs go
    to outputs/lego as nerfstudio's default parser's do, not outputs/unnamed."""
    from nerfstudio.data.dataparsers.blender_dataparser import BlenderDataParserConfig

    config = _run_config(tmp_path)
    config.pipeline.datamanager.data = None
    config.pipeline.datamanager.dataparser = BlenderDataParserConfig(data=tmp_path / "lego")
    assert config.get_base_dir() == tmp_path / "out" / "lego" / "vqad" / "t"
    named = _run_config(tmp_path, experiment_name="mine")
    assert named.get_base_dir() == tmp_path / "out" / "mine" / "vqad" / "t"
