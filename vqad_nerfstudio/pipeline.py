"""nerfstudio's VanillaPipeline, with input checks that fail in one line instead of a traceback."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Type

from nerfstudio.pipelines.base_pipeline import VanillaPipeline, VanillaPipelineConfig

from vqad_nerfstudio.data.scene_format import metadata_file


def missing_data_message(config: VanillaPipelineConfig) -> Optional[str]:
    """Why the configured data cannot be read, or ``None`` when it can be."""
    datamanager = config.datamanager
    data: Optional[Path] = getattr(datamanager, "data", None) or getattr(datamanager.dataparser, "data", None)
    if data is None:
        return "no data given: pass --data PATH (a nerfstudio-format scene, or a parser subcommand's data)"
    if not Path(data).exists():
        return f"data path '{data}' does not exist"
    wanted = metadata_file(datamanager.dataparser, Path(data))
    if wanted is not None and not wanted.exists():
        return f"cannot read the data: no {wanted.name} in '{data}'"
    return None


class CheckedPipeline(VanillaPipeline):
    """A VanillaPipeline that refuses to start on data that is not there."""

    def __init__(self, config: VanillaPipelineConfig, *args, **kwargs) -> None:
        problem = missing_data_message(config)
        if problem is not None:
            fail(problem)
        try:
            super().__init__(config, *args, **kwargs)
        except FileNotFoundError as error:  # e.g. a scene folder without its transforms.json
            fail(f"cannot read the data: {error.strerror}: '{error.filename}'")


def fail(problem: str) -> None:
    """Stop the command with ``problem`` in one line on stderr (exit status 2), no traceback."""
    print(f"vqad-nerfstudio: error: {problem}", file=sys.stderr)
    raise SystemExit(2)


@dataclass
class CheckedPipelineConfig(VanillaPipelineConfig):
    """VanillaPipeline config whose pipeline checks its inputs first."""

    _target: Type = field(default_factory=lambda: CheckedPipeline)
