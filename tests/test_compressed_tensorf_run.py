"""`ns-train tensorf-compressed` on the demo scene as a user runs it: both stages in one run (with a 6-bit plane
decoder and a 6-bit field), and stage 2 alone on a run of nerfstudio's own tensorf; then export, decode and `ns-eval`
of the decoded file.

Offline (an empty torch hub cache) and on the installed torch, like the other end-to-end tests.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vqad_nerfstudio.demo.scene import DemoSceneConfig, write_demo_scene

PSNR_THRESHOLD = 15.0  # dB on the demo's eval views; an untrained model scores about 8 dB
SMALL = [
    "--vis", "tensorboard",
    "--machine.device-type", "cpu",
    "--pipeline.model.init-resolution", "32",
    "--pipeline.model.final-resolution", "32",
    "--pipeline.model.num-uniform-samples", "64",
    "--pipeline.model.num-samples", "32",
    "--pipeline.datamanager.train-num-rays-per-batch", "512",
]  # fmt: skip
STAGE2 = [
    "--pipeline.model.latent-channels", "16",
    "--pipeline.model.decoder-channels", "16",
    "--pipeline.model.importance-rays", "4096",
]  # fmt: skip

TENSORF_STAGE1 = """
import copy, sys
from pathlib import Path
from nerfstudio.configs.method_configs import all_methods
from nerfstudio.data.datamanagers.base_datamanager import VanillaDataManagerConfig
from nerfstudio.data.dataparsers.nerfstudio_dataparser import NerfstudioDataParserConfig
from vqad_nerfstudio.compat import offline_lpips

config = copy.deepcopy(all_methods["tensorf"])
config.pipeline.datamanager = VanillaDataManagerConfig(
    dataparser=NerfstudioDataParserConfig(), data=Path(sys.argv[1]), train_num_rays_per_batch=512
)
config.output_dir, config.vis, config.max_num_iterations = Path(sys.argv[2]), "tensorboard", int(sys.argv[3])
config.machine.device_type = "cpu"
model = config.pipeline.model
model.init_resolution = model.final_resolution = 32
model.num_uniform_samples, model.num_samples = 64, 32
config.set_timestamp()
config.save_config()
trainer = config.setup(local_rank=0, world_size=1)
with offline_lpips():  # nerfstudio's tensorf downloads LPIPS weights in its constructor
    trainer.setup()
trainer.train()
"""


def _run(tool: str, *args: str, env: dict, timeout: int = 900) -> subprocess.CompletedProcess:
    command = [str(Path(sys.executable).with_name(tool)), *args]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def offline_env(tmp_path_factory):
    env = dict(os.environ)
    env["TORCH_HOME"] = str(tmp_path_factory.mktemp("empty_torch_home"))
    env["HF_HUB_OFFLINE"] = "1"
    return env


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> Path:
    config = DemoSceneConfig(resolution=40, num_train=30, num_eval=3)
    return write_demo_scene(tmp_path_factory.mktemp("scene") / "demo", config, show_progress=False)


def _ns_eval(config: Path, env: dict) -> dict:
    output = config.parent / "eval.json"
    _run("ns-eval", "--load-config", str(config), "--output-path", str(output), env=env, timeout=600)
    return json.loads(output.read_text())["results"]


@pytest.fixture(scope="module")
def two_stage_run(scene, tmp_path_factory, offline_env) -> Path:
    output = tmp_path_factory.mktemp("runs")
    start = ["--pipeline.model.compression-start-step", "200", "--pipeline.model.compression-steps", "100"]
    bits = ["--pipeline.model.decoder-bits", "6", "--pipeline.model.field-bits", "6"]  # fp16: the codec's unit tests
    _run("ns-train", "tensorf-compressed", "--data", str(scene), "--output-dir", str(output), *SMALL, *STAGE2, *start,
         *bits, env=offline_env)  # fmt: skip
    (config,) = output.glob("*/tensorf-compressed/*/config.yml")
    return config


def test_two_stage_run_exports_and_decodes_to_the_same_psnr(two_stage_run, scene, tmp_path, offline_env):
    (checkpoint,) = (two_stage_run.parent / "nerfstudio_models").glob("*.ckpt")
    assert checkpoint.name == "step-000000299.ckpt"  # 200 + 100 steps: the run length follows its two stages
    trained = _ns_eval(two_stage_run, offline_env)
    assert trained["psnr"] > PSNR_THRESHOLD, trained
    assert "lpips" not in trained

    _run("ns-export", "vqad-compressed", "--load-config", str(two_stage_run), "--output-dir", str(tmp_path / "file"),
         env=offline_env)  # fmt: skip
    report = json.loads((tmp_path / "file" / "model.size.json").read_text())
    assert report["method"] == "tensorf-compressed"
    assert report["file_bytes"] == (tmp_path / "file" / "model.vqnf").stat().st_size
    assert report["grid_ratio"] > 5  # coded planes + decoder against the fp32 planes

    _run("vqad-export", "decode", "--file", str(tmp_path / "file" / "model.vqnf"), "--data", str(scene),
         "--output-dir", str(tmp_path / "decoded"), env=offline_env)  # fmt: skip
    (decoded_config,) = (tmp_path / "decoded").glob("*/tensorf-compressed/decoded/config.yml")
    decoded = _ns_eval(decoded_config, offline_env)
    assert decoded["psnr"] == pytest.approx(trained["psnr"], abs=0.05)


def test_stage_two_alone_compresses_a_nerfstudio_tensorf_run(scene, tmp_path, offline_env):
    stage1 = subprocess.run(
        [sys.executable, "-c", TENSORF_STAGE1, str(scene), str(tmp_path / "tensorf"), "300"],
        capture_output=True, text=True, env=offline_env, timeout=900,
    )  # fmt: skip
    assert stage1.returncode == 0, stage1.stderr[-3000:]
    (tensorf_config,) = (tmp_path / "tensorf").glob("*/tensorf/*/config.yml")
    flags = ["--pipeline.model.tensorf-checkpoint", str(tensorf_config), "--pipeline.model.compression-steps", "150"]
    result = _run("ns-train", "tensorf-compressed", "--data", str(scene), "--output-dir", str(tmp_path / "runs"),
                  *SMALL, *STAGE2, *flags, env=offline_env)  # fmt: skip
    assert "Loaded tensorf planes (32^2)" in result.stdout
    (config,) = (tmp_path / "runs").glob("*/tensorf-compressed/*/config.yml")
    (checkpoint,) = (config.parent / "nerfstudio_models").glob("*.ckpt")
    assert checkpoint.name == "step-000000149.ckpt"  # stage 2 only
    compressed = _ns_eval(config, offline_env)
    assert compressed["psnr"] > PSNR_THRESHOLD, compressed


def test_a_missing_tensorf_checkpoint_fails_clearly(scene, tmp_path, offline_env):
    missing = ["--pipeline.model.tensorf-checkpoint", str(tmp_path / "none")]
    command = [str(Path(sys.executable).with_name("ns-train")), "tensorf-compressed", "--data", str(scene),
               "--output-dir", str(tmp_path), *SMALL, *missing]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=offline_env, timeout=600)
    assert result.returncode != 0
    assert "does not exist" in result.stdout + result.stderr
