"""decode and vqad-compressed on hostile names and paths: nothing leaves the output directory, every refusal is one
line, and the printed follow-up commands survive spaces."""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

import pytest

from vqad_nerfstudio.export.cli import main, vqad_export_main


def _run(command, *args: str) -> int:
    try:
        command(list(args))
    except SystemExit as exit_info:
        return int(exit_info.code or 0)
    return 0


def _tree(root: Path) -> set:
    return {path.relative_to(root) for path in root.rglob("*")}


def test_a_file_named_dots_decodes_inside_the_output_directory(encoded, trained, tmp_path):
    file = tmp_path / "in" / "...vqnf"
    file.parent.mkdir()
    file.write_bytes(encoded)
    output = tmp_path / "out"
    args = ("--file", str(file), "--output-dir", str(output), "--load-config", str(trained.config_path))
    assert _run(vqad_export_main, "decode", *args) == 0
    assert (output / "decoded" / "vqad" / "lod2" / "config.yml").is_file()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["in", "out"]


@pytest.mark.parametrize("name", ["..", "../escaped", "a/b", "/abs", "."])
def test_an_experiment_name_that_leaves_the_output_directory_is_refused(encoded, trained, tmp_path, capsys, name):
    file = tmp_path / "model.vqnf"
    file.write_bytes(encoded)
    output = tmp_path / "out"
    args = ("--file", str(file), "--output-dir", str(output), "--load-config", str(trained.config_path))
    assert _run(vqad_export_main, "decode", *args, "--experiment-name", name) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("decode: error: experiment name") and "\n" not in error
    assert _tree(tmp_path) == {Path("model.vqnf")}


def test_decode_into_a_file_is_one_line(encoded, trained, tmp_path, capsys):
    file = tmp_path / "model.vqnf"
    file.write_bytes(encoded)
    args = ("--file", str(file), "--output-dir", str(file), "--load-config", str(trained.config_path))
    assert _run(vqad_export_main, "decode", *args) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("decode: error: cannot write the run into") and "\n" not in error


@pytest.mark.skipif(os.geteuid() == 0, reason="permissions do not bind root")
def test_decode_into_a_read_only_directory_is_one_line(encoded, trained, tmp_path, capsys):
    file = tmp_path / "model.vqnf"
    file.write_bytes(encoded)
    output = tmp_path / "read-only"
    output.mkdir(mode=0o500)
    args = ("--file", str(file), "--output-dir", str(output), "--load-config", str(trained.config_path))
    assert _run(vqad_export_main, "decode", *args) == 1
    assert capsys.readouterr().err.startswith("decode: error: cannot write the run into")


def test_follow_up_commands_are_quoted(encoded, trained, tmp_path, capsys):
    file = tmp_path / "my model.vqnf"
    file.write_bytes(encoded)
    output = tmp_path / "with space"
    args = ("--file", str(file), "--output-dir", str(output), "--load-config", str(trained.config_path))
    assert _run(vqad_export_main, "decode", *args) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if "ns-eval --load-config" in line)
    words = shlex.split(line)
    assert words[words.index("--load-config") + 1] == str(output / "my model" / "vqad" / "lod2" / "config.yml")


def test_export_refuses_what_is_not_a_run_of_this_package(trained, tmp_path, capsys):
    transforms = tmp_path / "transforms.json"
    transforms.write_text(json.dumps({"frames": []}))
    assert _run(main, "vqad-compressed", "--load-config", str(transforms), "--output-dir", str(tmp_path / "o")) == 1
    assert "is not a nerfstudio run config" in capsys.readouterr().err
    nerfacto = tmp_path / "config.yml"
    nerfacto.write_text(trained.config_path.read_text().replace("method_name: vqad", "method_name: nerfacto"))
    assert _run(main, "vqad-compressed", "--load-config", str(nerfacto), "--output-dir", str(tmp_path / "o")) == 1
    assert "is a nerfacto run; vqad-compressed writes runs of" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_export_into_a_file_is_one_line(trained, tmp_path, capsys):
    target = tmp_path / "a-file"
    target.write_text("")
    assert _run(main, "vqad-compressed", "--load-config", str(trained.config_path), "--output-dir", str(target)) == 1
    assert capsys.readouterr().err.strip() == f"vqad-compressed: error: {target} is not a directory"
