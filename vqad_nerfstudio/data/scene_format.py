"""Which data format a scene directory is in."""

from __future__ import annotations

from pathlib import Path

__all__ = ["is_blender_scene"]


def is_blender_scene(data: Path) -> bool:
    """Whether ``data`` is a scene in the Blender format (NeRF-synthetic scenes such as lego: ``transforms_train.json``
    and no ``transforms.json``), which nerfstudio reads with its ``blender-data`` parser, not its default one."""
    data = Path(data)
    return not (data / "transforms.json").exists() and (data / "transforms_train.json").exists()
