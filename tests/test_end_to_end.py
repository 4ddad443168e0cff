"""`ns-train vqad` (and `vqad-hash`) on the demo scene as a user runs it, then `ns-eval` on the result.

Runs offline (an empty torch hub cache, so LPIPS must be skipped rather than downloaded) and on the
installed torch, whose ``torch.load`` defaults to ``weights_only=True`` from 2.6 on: ``ns-eval``
loading our checkpoint exercises the checkpoint-loading fix.
"""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vqad_nerfstudio.demo.scene import DemoSceneConfig, write_demo_scene

STEPS = 250
PSNR_THRESHOLD = 15.0  # dB on the demo's eval views; an untrained model scores far below (checked below)
TRAIN_FLAGS = [
    "--max-num-iterations", str(STEPS),
    "--steps-per-save", str(STEPS),
    "--vis", "tensorboard",
    "--machine.device-type", "cpu",
    "--pipeline.model.prune-steps", "200",
    "--pipeline.model.base-resolution", "8",
    "--pipeline.model.num-levels", "4",
    "--pipeline.model.num-samples", "96",
    "--pipeline.datamanager.train-num-rays-per-batch", "768",
]  # fmt: skip


HASH_STEPS = 200
HASH_PSNR_THRESHOLD = 14.0  # dB; nerfacto-style training starts slower than vqad's
HASH_FLAGS = [
    "--max-num-iterations", str(HASH_STEPS),
    "--steps-per-save", str(HASH_STEPS),
    "--vis", "tensorboard",
    "--machine.device-type", "cpu",
    "--pipeline.model.num-levels", "8",
    "--pipeline.model.max-res", "256",
    "--pipeline.model.log2-codebook-size", "8",
    "--pipeline.model.index-table-size", "8192",
    "--pipeline.model.num-proposal-samples-per-ray", "64", "32",
    "--pipeline.model.num-nerf-samples-per-ray", "24",
    "--pipeline.datamanager.train-num-rays-per-batch", "512",
]  # fmt: skip


def _run(tool: str, *args: str, env: dict, timeout: int) -> subprocess.CompletedProcess:
    """Run one of the installed ns-* commands next to this interpreter, capturing its output."""
    command = [str(Path(sys.executable).with_name(tool)), *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def offline_env(tmp_path_factory):
    env = dict(os.environ)
    env["TORCH_HOME"] = str(tmp_path_factory.mktemp("empty_torch_home"))  # no cached LPIPS weights
    env["HF_HUB_OFFLINE"] = "1"
    return env


@pytest.fixture(scope="module")
def demo_scene(tmp_path_factory) -> Path:
    return write_demo_scene(
        tmp_path_factory.mktemp("scene") / "demo",
        DemoSceneConfig(resolution=48, num_train=40, num_eval=4),
        show_progress=False,
    )


def _ns_train(method: str, flags: list, scene: Path, output: Path, env: dict) -> Path:
    """Train ``method`` on ``scene`` as a user would, offline; return the run's config.yml."""
    result = _run("ns-train", method, "--data", str(scene), "--output-dir", str(output), *flags, env=env, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stderr.count("LPIPS is skipped") == 1  # offline: one warning, no download attempt
    (config,) = output.glob(f"*/{method}/*/config.yml")
    return config


def _ns_eval(config: Path, output: Path, env: dict) -> dict:
    result = _run("ns-eval", "--load-config", str(config), "--output-path", str(output), env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(output.read_text())["results"]


@pytest.fixture(scope="module")
def trained_run(demo_scene, tmp_path_factory, offline_env) -> Path:
    return _ns_train("vqad", TRAIN_FLAGS, demo_scene, tmp_path_factory.mktemp("runs"), offline_env)


def test_ns_eval_clears_psnr_threshold(trained_run, tmp_path, offline_env):
    metrics = _ns_eval(trained_run, tmp_path / "eval.json", offline_env)
    assert metrics["psnr"] > PSNR_THRESHOLD, metrics
    assert "lpips" not in metrics  # skipped offline, not faked
    assert metrics["stored_kib"] > 0


@pytest.fixture(scope="module")
def trained_hash_run(demo_scene, tmp_path_factory, offline_env) -> Path:
    return _ns_train("vqad-hash", HASH_FLAGS, demo_scene, tmp_path_factory.mktemp("hash_runs"), offline_env)


@pytest.fixture(scope="module")
def hash_eval(trained_hash_run, offline_env) -> dict:
    return _ns_eval(trained_hash_run, trained_hash_run.parent / "eval.json", offline_env)


def test_vqad_hash_ns_eval_beats_an_untrained_model(hash_eval, demo_scene):
    from vqad_nerfstudio.encodings.learned_index_hash import learned_stored_bits, level_layouts

    assert hash_eval["psnr"] > HASH_PSNR_THRESHOLD, hash_eval
    assert "lpips" not in hash_eval
    layouts = level_layouts(8, 16, 256, 8192)
    assert hash_eval["encoding_kib"] == pytest.approx(learned_stored_bits(layouts, 8, 2, 3) / 8 / 1024)

    from vqad_nerfstudio.method_configs.vqad_hash import vqad_hash

    config = copy.deepcopy(vqad_hash.config)
    config.pipeline.datamanager.data = demo_scene
    config.pipeline.model.num_levels, config.pipeline.model.max_res = 8, 256
    config.pipeline.model.log2_codebook_size, config.pipeline.model.index_table_size = 8, 8192
    untrained = config.pipeline.setup(device="cpu", test_mode="test")
    untrained.eval()
    assert untrained.get_average_eval_image_metrics()["psnr"] < HASH_PSNR_THRESHOLD - 2


def test_vqad_hash_compressed_file_decodes_to_the_same_psnr(
    trained_hash_run, hash_eval, demo_scene, tmp_path, offline_env
):
    exported = _run(
        "ns-export", "vqad-compressed", "--load-config", str(trained_hash_run), "--output-dir", str(tmp_path / "file"),
        env=offline_env, timeout=600,
    )  # fmt: skip
    assert exported.returncode == 0, exported.stderr[-3000:]
    decoded = _run(
        "vqad-export", "decode", "--file", str(tmp_path / "file" / "model.vqnf"), "--data", str(demo_scene),
        "--output-dir", str(tmp_path / "decoded"), env=offline_env, timeout=600,
    )  # fmt: skip
    assert decoded.returncode == 0, decoded.stderr[-3000:]
    (config,) = (tmp_path / "decoded").glob("*/vqad-hash/decoded/config.yml")
    metrics = _ns_eval(config, tmp_path / "decoded-eval.json", offline_env)
    assert abs(metrics["psnr"] - hash_eval["psnr"]) < 0.05, (metrics["psnr"], hash_eval["psnr"])


def test_untrained_model_fails_the_threshold(demo_scene):
    from vqad_nerfstudio.method_configs.vqad import vqad

    config = copy.deepcopy(vqad.config)
    config.pipeline.datamanager.data = demo_scene
    pipeline = config.pipeline.setup(device="cpu", test_mode="test")
    pipeline.eval()
    metrics = pipeline.get_average_eval_image_metrics()
    assert metrics["psnr"] < PSNR_THRESHOLD - 3, metrics


def test_checkpoint_needs_and_gets_the_loading_fix(trained_run):
    """On torch >= 2.6 nerfstudio's plain torch.load only reads our checkpoints thanks to the fix."""
    (checkpoint,) = trained_run.parent.glob("nerfstudio_models/*.ckpt")
    state = torch.load(checkpoint, map_location="cpu")  # the fix is active: our model module is imported
    assert any(key.endswith("grid.levels.0.cells") for key in state["pipeline"])


@pytest.mark.parametrize("make_dir,message", [(False, "data path"), (True, "cannot read the data: no transforms.json")])
def test_missing_data_fails_in_one_line(make_dir, message, tmp_path, offline_env):
    data = tmp_path / "scene"
    if make_dir:  # a folder without transforms.json
        data.mkdir()
    result = _run(
        "ns-train", "vqad", "--data", str(data), "--output-dir", str(tmp_path / "out"), *TRAIN_FLAGS,
        env=offline_env, timeout=300,
    )  # fmt: skip
    assert result.returncode != 0
    assert f"vqad-nerfstudio: error: {message}" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()  # refused before nerfstudio writes the run's config: no run folder


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--pipeline.model.index-bits", "17"], "index_bits (b) must be an integer in 1..16, got 17"),
        (["--pipeline.model.index-bits", "0"], "index_bits (b) must be an integer in 1..16, got 0"),
        (["--pipeline.model.num-levels", "0"], "num_levels (L) must be an integer in 1..8, got 0"),
    ],
)
def test_bad_model_flags_fail_clearly(flags, message, demo_scene, tmp_path, offline_env):
    result = _run(
        "ns-train", "vqad", "--data", str(demo_scene), "--output-dir", str(tmp_path), *flags,
        env=offline_env, timeout=300,
    )  # fmt: skip
    output = " ".join((result.stdout + result.stderr).split()).replace("│ ", "")
    assert result.returncode != 0
    assert message in output
    assert "Traceback" not in result.stderr
