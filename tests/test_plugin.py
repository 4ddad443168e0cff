"""Registration with nerfstudio: our entry points load, and a broken import does not break others."""

import subprocess
import sys
import zipfile
from importlib.metadata import entry_points
from pathlib import Path

import tomllib

from vqad_nerfstudio.plugin import UnavailableMethod, load_method

ROOT = Path(__file__).resolve().parents[1]


def test_entry_points_give_method_specifications():
    from nerfstudio.plugins.types import MethodSpecification

    ours = {ep.name: ep for ep in entry_points(group="nerfstudio.method_configs") if ep.value.startswith("vqad_")}
    assert {"vqad", "vqad-float"} <= set(ours)
    for name, ep in ours.items():
        spec = ep.load()
        assert isinstance(spec, MethodSpecification)
        assert spec.config.method_name == name


def test_broken_method_names_our_package_and_is_skipped(capsys):
    def build():
        raise ImportError("No module named 'somedependency'")

    placeholder = load_method("vqad", build)
    assert isinstance(placeholder, UnavailableMethod)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("vqad-nerfstudio: method 'vqad' is unavailable")
    assert "somedependency" in err and "vqad-nerfstudio" in repr(placeholder)


def test_every_subpackage_is_packaged():
    """pyproject lists packages explicitly (method_configs/ maps into our namespace): none may be missing."""
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {
        "vqad_nerfstudio." + p.parent.relative_to(ROOT / "vqad_nerfstudio").as_posix().replace("/", ".")
        for p in (ROOT / "vqad_nerfstudio").rglob("__init__.py")
    }
    found = {name.replace("vqad_nerfstudio..", "vqad_nerfstudio") for name in found} | {
        "vqad_nerfstudio.method_configs"
    }
    assert found == listed


def test_wheel_installs_method_configs_under_our_namespace(tmp_path):
    """The built wheel holds vqad_nerfstudio/method_configs/ and nothing named plain method_configs."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("vqad_nerfstudio-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "vqad_nerfstudio/method_configs/vqad.py" in names
    assert not any(name.startswith("method_configs/") for name in names)
