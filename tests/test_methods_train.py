"""Every method we register trains, as nerfstudio's own tests/test_train.py checks its methods.

nerfstudio's pattern: take each method's TrainerConfig, shrink it (2 iterations, no GPU, tiny data), and run the
trainer. Here the configs come from our `nerfstudio.method_configs` entry points (so a new method is tested as soon
as it is registered), the data is a tiny demo scene written by `vqad_nerfstudio.demo` (nothing is downloaded), and
every model knob that sets a resolution or a sample count is shrunk so that one method trains in seconds on a CPU.
"""

from __future__ import annotations

import copy
import re
import shlex
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from vqad_nerfstudio.demo.scene import DemoSceneConfig, write_demo_scene

OURS = sorted(
    ep.name for ep in entry_points(group="nerfstudio.method_configs") if ep.value.startswith("vqad_nerfstudio.")
)

TINY_MODEL = {
    # vqad, vqad-float
    "num_levels": 2,
    "base_resolution": 8,
    "dense_resolution": 16,
    "occupancy_resolution": 8,
    "prune_steps": (1,),  # the pruning callback (which also grows the fine levels) runs on the second step
    "num_samples": 16,
    # vqad-hash, vqad-hash-random (nerfacto)
    "max_res": 64,
    "log2_codebook_size": 6,
    "index_table_size": 256,
    "num_proposal_samples_per_ray": (8, 8),
    "num_nerf_samples_per_ray": 8,
    # tensorf-compressed(-l): stage 1 on the first step, stage 2 on the second
    "init_resolution": 16,
    "final_resolution": 16,
    "upsampling_iters": (),
    "num_uniform_samples": 16,
    "compression_start_step": 1,
    "compression_steps": 1,
    "latent_channels": 8,
    "decoder_channels": 8,
    "importance_rays": 256,
}
"""Model settings shrunk for the test, applied to every model config that has the field."""


def test_every_registered_method_is_covered():
    assert {"vqad", "vqad-float", "vqad-hash", "vqad-hash-random", "tensorf-compressed"} <= set(OURS)


@pytest.fixture(scope="module")
def tiny_scene(tmp_path_factory) -> Path:
    config = DemoSceneConfig(resolution=16, num_train=3, num_eval=1, supersample=1)
    return write_demo_scene(tmp_path_factory.mktemp("scene") / "demo", config, show_progress=False)


def reduced_config(name: str, data: Path, output_dir: Path):
    """The method's TrainerConfig from its entry point, shrunk as nerfstudio's test_train shrinks its own."""
    (ep,) = [ep for ep in entry_points(group="nerfstudio.method_configs") if ep.name == name]
    config = copy.deepcopy(ep.load().config)
    config.machine.num_devices = 1
    config.machine.device_type = "cpu"
    config.max_num_iterations = 2
    config.output_dir = output_dir
    config.vis = "tensorboard"
    config.viewer.quit_on_train_completion = True
    datamanager = config.pipeline.datamanager
    datamanager.data = data
    datamanager.train_num_rays_per_batch = 64
    datamanager.eval_num_rays_per_batch = 64
    model = config.pipeline.model
    for key, value in TINY_MODEL.items():
        if hasattr(model, key):
            setattr(model, key, value)
    model.eval_num_rays_per_chunk = 256
    return config


@pytest.mark.parametrize("name", OURS)
def test_method_trains_two_iterations_on_cpu(name, tiny_scene, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))  # no cached weights: nothing to load
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = reduced_config(name, tiny_scene, tmp_path / "outputs")
    config.set_timestamp()
    config.save_config()
    trainer = config.setup(local_rank=0, world_size=1)
    trainer.setup()
    trainer.train()

    assert trainer.step == 1  # steps 0 and 1
    (checkpoint,) = (tmp_path / "outputs").glob(f"*/{name}/*/nerfstudio_models/step-*.ckpt")
    assert checkpoint.stat().st_size > 0

    # the run ends by printing its compressed size and the command that writes the file
    out = capsys.readouterr().out
    assert re.search(r"Compressed file: [0-9.]+ KiB \(([0-9,]+) bytes\)", out), out[-2000:]
    config_path = next((tmp_path / "outputs").glob(f"*/{name}/*/config.yml"))
    assert f"ns-export vqad-compressed --load-config {shlex.quote(str(config_path))} --output-dir" in out


def test_printed_export_command_writes_the_printed_size(tiny_scene, tmp_path, monkeypatch, capsys):
    """The hint is exact: running the printed command writes a file of the printed size."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    config = reduced_config("vqad", tiny_scene, tmp_path / "outputs")
    config.set_timestamp()
    config.save_config()
    trainer = config.setup(local_rank=0, world_size=1)
    trainer.setup()
    trainer.train()
    out = capsys.readouterr().out
    size = int(re.search(r"Compressed file: [0-9.]+ KiB \(([0-9,]+) bytes\)", out).group(1).replace(",", ""))
    (command,) = [line.strip() for line in out.splitlines() if line.strip().startswith("ns-export vqad-compressed")]
    args = shlex.split(command)
    args[0] = str(Path(sys.executable).with_name(args[0]))
    result = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    (vqnf,) = (config.get_base_dir() / "export").glob("*.vqnf")
    assert vqnf.stat().st_size == size


def test_vqad_trains_float16_logits_with_bfloat16_second_moments(tiny_scene, tmp_path, monkeypatch):
    """``--pipeline.model.logit-dtype float16``: the logits train in float16 (their second moment in bfloat16) and
    the run's checkpoint loads into a fresh model of the same config."""
    import torch

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    config = reduced_config("vqad", tiny_scene, tmp_path / "outputs")
    config.pipeline.model.logit_dtype = "float16"
    config.pipeline.model.index_warmup_steps = 0  # straight-through from the first step: the logits train
    config.set_timestamp()
    trainer = config.setup(local_rank=0, world_size=1)
    trainer.setup()
    start = [s.features.logits.detach().clone() for s in trainer.pipeline.model.grid.levels]
    trainer.train()

    stores = [level.features for level in trainer.pipeline.model.grid.levels]
    assert all(store.logits.dtype == torch.float16 for store in stores)
    assert not torch.equal(stores[0].logits, start[0])  # level 0 is not regrown: the same rows, trained
    optimizer = trainer.optimizers.optimizers["grid_logits"]
    moments = [optimizer.state[store.logits] for store in stores]
    assert all(m["exp_avg_sq"].dtype == torch.bfloat16 and m["exp_avg"].dtype == torch.bfloat16 for m in moments)
    (checkpoint,) = (tmp_path / "outputs").glob("*/vqad/*/nerfstudio_models/step-*.ckpt")
    fresh = config.pipeline.model.setup(
        scene_box=trainer.pipeline.datamanager.train_dataset.scene_box, num_train_data=3
    )
    state = {k.removeprefix("_model."): v for k, v in torch.load(checkpoint, weights_only=False)["pipeline"].items()}
    fresh.load_state_dict(state)
    assert torch.equal(fresh.grid.levels[0].features.logits, stores[0].logits)
