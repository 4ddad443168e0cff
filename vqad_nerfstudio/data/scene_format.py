"""Which data format a scene directory is in, and the file each format's nerfstudio parser reads first."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

__all__ = ["BLENDER_TRANSFORMS", "NERFSTUDIO_TRANSFORMS", "is_blender_scene", "metadata_file"]

NERFSTUDIO_TRANSFORMS = "transforms.json"
"""The cameras and images of a scene in nerfstudio's data format."""
BLENDER_TRANSFORMS = "transforms_train.json"
"""The training split of a scene in the Blender (NeRF-synthetic) format."""


def is_blender_scene(data: Path) -> bool:
    """Whether ``data`` is a scene in the Blender format (NeRF-synthetic scenes such as lego: ``transforms_train.json``
    and no ``transforms.json``), which nerfstudio reads with its ``blender-data`` parser, not its default one."""
    data = Path(data)
    return not (data / NERFSTUDIO_TRANSFORMS).exists() and (data / BLENDER_TRANSFORMS).exists()


def metadata_file(dataparser: object, data: Path) -> Optional[Path]:
    """The file that ``dataparser`` reads first from ``data`` where it is nerfstudio's parser of the nerfstudio or the
    Blender format (None for other parsers, which check their data themselves, and for a transforms file given as
    the data)."""
    from nerfstudio.data.dataparsers.blender_dataparser import BlenderDataParserConfig
    from nerfstudio.data.dataparsers.nerfstudio_dataparser import NerfstudioDataParserConfig

    data = Path(data)
    if isinstance(dataparser, NerfstudioDataParserConfig) and data.suffix != ".json":
        return data / NERFSTUDIO_TRANSFORMS
    if isinstance(dataparser, BlenderDataParserConfig):
        return data / BLENDER_TRANSFORMS
    return None
