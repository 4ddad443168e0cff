"""nerfstudio's VanillaPipeline, with input checks that fail in one line instead of a traceback, and the scene's
bounds decided from its photos where the model leaves them open."""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Type

from nerfstudio.pipelines.base_pipeline import VanillaPipeline, VanillaPipelineConfig
from nerfstudio.utils.rich_utils import CONSOLE

from vqad_nerfstudio.data.scene_bounds import FLAT_BORDER_SHARE, flat_border_share
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


def training_images(config: VanillaPipelineConfig) -> List[Path]:
    """The training images of the configured data, as its parser lists them."""
    datamanager = config.datamanager
    parser = copy.deepcopy(datamanager.dataparser)
    if getattr(datamanager, "data", None) is not None:  # as nerfstudio's datamanagers hand it to their parser
        parser.data = Path(datamanager.data)
    return list(parser.setup().get_dataparser_outputs(split="train").image_filenames)


def decide_scene_bounds(config: VanillaPipelineConfig) -> None:
    """Where the model's ``unbounded`` is None (the default of vqad's and the hash methods' models), set it from
    the training images' borders, in place: True where they show a background (a capture of the real world), False
    where they are one flat colour or transparent (an object scene); say which in one line, naming the model's
    SCENE_BOUNDS_FLAGS. Does nothing where it is already set or the model has no such setting."""
    model = config.model
    if getattr(model, "unbounded", False) is not None:
        return
    try:
        share = flat_border_share(training_images(config))
    except FileNotFoundError as error:
        fail(f"cannot read the data: {error.strerror}: '{error.filename}'")
    except OSError as error:  # PIL's UnidentifiedImageError among them
        fail(f"cannot read a training image to decide the scene's bounds: {error}")
    except (AssertionError, KeyError, IndexError, ValueError) as error:  # nerfstudio's parsers' checks, no images
        fail(f"cannot read the data's cameras and images: {type(error).__name__}: {error}")
    model.unbounded = share < FLAT_BORDER_SHARE
    box_flag, background_flag = model.SCENE_BOUNDS_FLAGS
    decision = (
        f"The training images' borders show a background ({share:.0%} of them one flat colour): training in "
        f"contracted space ({box_flag} keeps to the scene box)."
        if model.unbounded
        else f"The training images' borders are one flat colour or transparent ({share:.0%}): an object scene "
        f"inside the scene box ({background_flag} also fits a background)."
    )
    CONSOLE.print(decision, soft_wrap=True, markup=False)
    if not model.unbounded and getattr(model, "shell_lod", None) not in (None, -1):
        fail(
            "shell_lod caps the background of unbounded scenes, and these images show none: pass "
            "--pipeline.model.unbounded True to train it unbounded anyway"
        )


class CheckedPipeline(VanillaPipeline):
    """A VanillaPipeline that refuses to start on data that is not there, and decides the scene's bounds where the
    model leaves them open (:func:`decide_scene_bounds`)."""

    def __init__(self, config: VanillaPipelineConfig, *args, **kwargs) -> None:
        problem = missing_data_message(config)
        if problem is not None:
            fail(problem)
        try:
            decide_scene_bounds(config)
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
