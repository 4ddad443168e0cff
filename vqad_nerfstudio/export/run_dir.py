"""A decoded model as a nerfstudio run: ``config.yml`` and a checkpoint, for nerfstudio's own tools.

nerfstudio finds a run's checkpoints at ``{output_dir}/{experiment_name}/{method}/{timestamp}/``
(its viewer also writes its log there), so a decoded run follows the same layout, with the
timestamp slot naming the finest level of detail it holds (``lod4``; ``decoded`` for methods
without levels of detail). ``ns-eval``, ``ns-render`` and ``ns-viewer`` then open it with
``--load-config <run>/config.yml``, unchanged.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch
import yaml

from vqad_nerfstudio.data.scene_format import is_blender_scene
from vqad_nerfstudio.export.formats import method_format
from vqad_nerfstudio.export.methods import trainer_config
from vqad_nerfstudio.export.vqad_codec import DecodeInfo

if TYPE_CHECKING:
    from nerfstudio.engine.trainer import TrainerConfig
    from nerfstudio.models.base_model import Model

__all__ = ["check_experiment_name", "load_run_config", "decoded_run_config", "write_run_dir"]

CHECKPOINT_NAME = "step-000000000.ckpt"


def check_experiment_name(name: str) -> str:
    """``name`` if it names one directory inside the output directory; ``ValueError`` otherwise."""
    if name in ("", ".", "..") or any(char in name for char in "/\\\0"):
        raise ValueError(f"experiment name {name!r} must be one directory name (no '/' or '\\', not '.' or '..')")
    return name


def load_run_config(path: Path) -> "TrainerConfig":
    """The trainer config of an ns-train run's config.yml; ``ValueError`` (one line) if ``path`` is not one."""
    from nerfstudio.engine.trainer import TrainerConfig

    try:
        config = yaml.load(Path(path).read_text(), Loader=yaml.Loader)
    except (OSError, UnicodeDecodeError, yaml.YAMLError, AttributeError, TypeError, ImportError) as error:
        raise ValueError(f"{path} is not a readable nerfstudio run config ({type(error).__name__})") from None
    if not isinstance(config, TrainerConfig):
        raise ValueError(f"{path} is not a nerfstudio run config (the config.yml that ns-train writes)")
    return config


def decoded_run_config(
    model: "Model",
    info: DecodeInfo,
    output_dir: Path,
    experiment_name: str,
    data: Optional[Path] = None,
    load_config: Optional[Path] = None,
) -> "TrainerConfig":
    """The trainer config of a decoded run (``model``, and ``info`` of its file): the model's config, and the data of
    ``data`` or of ``load_config``.

    ``data`` is a scene in nerfstudio's or the Blender data format; ``load_config`` (the original run's
    config.yml) keeps that run's data and dataparser settings instead. Paths are made absolute,
    so the run opens from any working directory.
    """
    if (data is None) == (load_config is None):
        raise ValueError("give exactly one of data (a nerfstudio-format scene) or load_config (the original run)")
    if load_config is not None:
        config = load_run_config(load_config)
    else:
        config = trainer_config(info.method)
        config.pipeline.datamanager.data = data
        if is_blender_scene(data):
            from nerfstudio.data.dataparsers.blender_dataparser import BlenderDataParserConfig

            config.pipeline.datamanager.dataparser = BlenderDataParserConfig()
    if config.pipeline.datamanager.data is not None:
        config.pipeline.datamanager.data = Path(config.pipeline.datamanager.data).absolute()
    config.method_name = info.method
    # The run's (or method's) render chunk size: a speed setting that files do not store.
    config.pipeline.model = dataclasses.replace(
        model.config, eval_num_rays_per_chunk=config.pipeline.model.eval_num_rays_per_chunk
    )
    config.output_dir = Path(output_dir).absolute()
    config.experiment_name = check_experiment_name(experiment_name)
    config.timestamp = f"lod{info.levels_decoded - 1}" if method_format(info.method).levels_of_detail else "decoded"
    config.load_dir = config.load_checkpoint = config.load_step = None
    return config


def write_run_dir(config: "TrainerConfig", model: "Model", overwrite: bool = False) -> Path:
    """Write ``config.yml`` and the model's checkpoint into ``config``'s run directory; return the config path.

    Raises ``FileExistsError`` if the run directory exists (unless ``overwrite``), or if it holds
    other checkpoints (nerfstudio would load the latest of them instead).
    """
    run_dir = config.get_base_dir()
    config_path = run_dir / "config.yml"
    checkpoint_dir = config.get_checkpoint_dir()
    checkpoint = checkpoint_dir / CHECKPOINT_NAME
    if run_dir.exists() and not overwrite:
        raise FileExistsError(f"{run_dir} already exists; pass --overwrite to replace it")
    others = sorted(path.name for path in checkpoint_dir.glob("*.ckpt") if path != checkpoint)
    if others:
        raise FileExistsError(f"{checkpoint_dir} holds other checkpoints ({', '.join(others)}); choose another output")
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    config_path.write_text(yaml.dump(config), "utf8")
    state = {f"_model.{name}": value for name, value in model.state_dict().items()}
    torch.save({"step": 0, "pipeline": state}, checkpoint)
    return config_path
