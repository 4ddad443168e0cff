"""``vqad-demo-scene``: write the built-in demo scene, ready for ``ns-train vqad --data <dir>``."""

from __future__ import annotations

import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn, Optional, Sequence

import tyro

from vqad_nerfstudio.demo.scene import DemoSceneConfig, write_demo_scene


@dataclass
class DemoSceneCommand:
    """Render a small synthetic scene (coloured solids on a plinth) and write it in nerfstudio's data
    format: transforms.json, scene.json and images/. Train on it with `ns-train vqad --data <output_dir>`;
    no download needed."""

    output_dir: tyro.conf.Positional[Path]
    """Directory to write the scene into; created if missing, must be empty unless --overwrite is given."""
    scene: tyro.conf.OmitArgPrefixes[DemoSceneConfig] = field(default_factory=DemoSceneConfig)
    """Scene generator settings."""
    overwrite: bool = False
    """Write into a non-empty directory, replacing the demo scene files (other files are left alone)."""


def _fail(message: str) -> NoReturn:
    print(f"vqad-demo-scene: error: {message}", file=sys.stderr)
    raise SystemExit(1)


def main(args: Optional[Sequence[str]] = None) -> None:
    """Entry point of the ``vqad-demo-scene`` console script."""
    command = tyro.cli(DemoSceneCommand, args=args, prog="vqad-demo-scene")
    try:
        command.scene.validate()
    except ValueError as error:
        _fail(str(error))
    try:
        start = time.perf_counter()
        output_dir = write_demo_scene(command.output_dir, command.scene, overwrite=command.overwrite)
        elapsed = time.perf_counter() - start
    except (FileExistsError, ValueError) as error:
        _fail(str(error))
    except OSError as error:
        _fail(f"could not write {command.output_dir}: {error.strerror or error}")
    config = command.scene
    print(
        f"Wrote the demo scene ({config.num_train} train + {config.num_eval} eval views, "
        f"{config.resolution}x{config.resolution} px) to {output_dir.resolve()} in {elapsed:.1f} s."
    )
    print("Next, train on it with:")
    print(f"  ns-train vqad --data {shlex.quote(str(output_dir))}")


if __name__ == "__main__":
    main()
