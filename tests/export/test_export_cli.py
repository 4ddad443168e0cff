"""The commands: ns-export's union with vqad-compressed, and decoded runs opened by nerfstudio's own loader."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vqad_nerfstudio.codec import describe, read_container
from vqad_nerfstudio.export.cli import main, vqad_export_main
from vqad_nerfstudio.export.vqad_codec import load_compressed


def _ns_export(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "vqad_nerfstudio.export.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory) -> Path:
    """``ns-export vqad-compressed`` run on the trained run; returns the output directory."""
    output_dir = tmp_path_factory.mktemp("exported")
    result = _ns_export("vqad-compressed", "--load-config", str(trained.config_path), "--output-dir", str(output_dir))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Levels of detail" in result.stdout and "Float reference" in result.stdout
    return output_dir


def test_export_writes_the_file_and_its_size_report(exported, encoded):
    data = (exported / "model.vqnf").read_bytes()
    assert data == encoded  # the checkpoint, loaded by nerfstudio, encodes exactly like the model in memory
    report = json.loads((exported / "model.size.json").read_text())
    assert report["file_bytes"] == len(data)
    assert report["chunks"] == describe(read_container(data))
    assert [level["lod"] for level in report["levels"]] == [0, 1, 2]
    assert report["levels"][-1]["cumulative_bytes"] + 16 == len(data)  # then only the END! chunk
    assert report["index_bytes_entropy"] <= report["index_bytes_raw"] + 3 * len(report["levels"])
    assert report["float_reference_bytes"] > report["file_bytes"] and report["file_ratio"] > 1
    assert report["decoder_bytes"] == next(row["chunk_bytes"] for row in report["chunks"] if row["tag"] == "MLPS")


def test_export_refuses_to_overwrite(exported, trained):
    path = exported / "model.vqnf"
    before = path.read_bytes()
    result = _ns_export("vqad-compressed", "--load-config", str(trained.config_path), "--output-dir", str(exported))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"vqad-compressed: error: {path} already exists; pass --overwrite to replace it"
    )
    assert "Traceback" not in result.stderr
    assert path.read_bytes() == before


def test_nerfstudio_subcommands_are_still_there(capsys):
    """In this process: nerfstudio's exporters are imported here anyway (by eval_setup), a new one takes 15 s."""
    with pytest.raises(SystemExit) as exit_info:
        main(["pointcloud", "--help"])
    output = capsys.readouterr()
    if "export subcommands cannot be loaded" in output.err:  # e.g. open3d without its system libraries
        pytest.skip(output.err.strip().splitlines()[-1])
    assert exit_info.value.code == 0, output.err[-3000:]
    assert "usage: ns-export pointcloud" in output.out and "--num-points" in output.out


def _decode(*args: str) -> None:
    vqad_export_main(["decode", *args])


def test_decoded_run_opens_with_nerfstudio_eval_setup(exported, trained, tmp_path):
    from nerfstudio.utils.eval_utils import eval_setup

    file = exported / "model.vqnf"
    _decode("--file", str(file), "--output-dir", str(tmp_path), "--load-config", str(trained.config_path))
    config_path = tmp_path / "model" / "vqad" / "lod2" / "config.yml"
    _, pipeline, checkpoint, step = eval_setup(config_path, test_mode="test")  # what ns-eval/ns-render/ns-viewer do
    assert (checkpoint.name, step) == ("step-000000000.ckpt", 0)
    decoded, _ = load_compressed(file)
    for camera, _ in trained.views():
        assert torch.equal(trained.render(pipeline.model, camera), trained.render(decoded, camera))
    metrics = pipeline.get_average_eval_image_metrics()  # ns-eval's computation
    assert metrics["psnr"] > 0 and metrics["stored_kib"] > 0


def test_decode_from_scene_data_keeps_only_coarse_levels(exported, trained, tmp_path):
    from nerfstudio.utils.eval_utils import eval_setup

    scene = Path(trained.pipeline.datamanager.config.data)
    file = exported / "model.vqnf"
    _decode("--file", str(file), "--output-dir", str(tmp_path), "--data", str(scene), "--max-lod", "0")
    config, pipeline, _, _ = eval_setup(tmp_path / "model" / "vqad" / "lod0" / "config.yml", test_mode="inference")
    assert config.pipeline.datamanager.data == scene.absolute()
    assert pipeline.model.grid.grown_levels() == 1


def test_decode_from_a_blender_format_scene_reads_it_with_the_blender_parser(exported, tmp_path):
    # NeRF-synthetic scenes (lego) have transforms_{train,val,test}.json, not nerfstudio's transforms.json
    import yaml
    from nerfstudio.data.dataparsers.blender_dataparser import BlenderDataParserConfig

    from vqad_nerfstudio.data.scene_format import is_blender_scene

    scene = tmp_path / "lego"
    scene.mkdir()
    (scene / "transforms_train.json").write_text("{}")
    _decode("--file", str(exported / "model.vqnf"), "--output-dir", str(tmp_path / "runs"), "--data", str(scene))
    config = yaml.load((tmp_path / "runs" / "model" / "vqad" / "lod2" / "config.yml").read_text(), Loader=yaml.Loader)
    assert type(config.pipeline.datamanager.dataparser) is BlenderDataParserConfig
    (scene / "transforms.json").write_text("{}")  # a scene in both formats is read as nerfstudio's
    assert not is_blender_scene(scene)


def test_decode_errors_are_one_line(exported, trained, tmp_path, capsys):
    file = str(exported / "model.vqnf")
    with pytest.raises(SystemExit) as exit_info:
        _decode("--file", file, "--output-dir", str(tmp_path))
    assert exit_info.value.code == 1
    assert "decode: error: pass --data" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _decode("--file", file, "--output-dir", str(tmp_path), "--data", str(tmp_path / "missing"))
    assert f"decode: error: {tmp_path / 'missing'} does not exist" in capsys.readouterr().err

    args = ("--file", file, "--output-dir", str(tmp_path), "--load-config", str(trained.config_path), "--max-lod", "1")
    _decode(*args)
    with pytest.raises(SystemExit):
        _decode(*args)
    assert "already exists; pass --overwrite" in capsys.readouterr().err

    damaged = tmp_path / "damaged.vqnf"
    damaged.write_bytes(b"NOPE" + (exported / "model.vqnf").read_bytes()[4:])
    with pytest.raises(SystemExit):
        _decode("--file", str(damaged), "--output-dir", str(tmp_path), "--load-config", str(trained.config_path))
    assert "decode: error: cannot decode" in capsys.readouterr().err
