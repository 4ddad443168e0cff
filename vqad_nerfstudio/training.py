"""The nerfstudio trainer settings every method of this package shares, and its trainer: nerfstudio's, which
also prints, when training ends, the size of the compressed file the run exports to and the command that writes it.

Imported only when a method of this package is built (nerfstudio is loaded by then).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Mapping, Optional, Tuple, Type

import tyro
from nerfstudio.engine.callbacks import TrainingCallback, TrainingCallbackLocation
from nerfstudio.engine.optimizers import AdamOptimizerConfig
from nerfstudio.engine.trainer import Trainer, TrainerConfig
from nerfstudio.utils import comms
from nerfstudio.utils.rich_utils import CONSOLE

from vqad_nerfstudio.optim import InBackwardAdam
from vqad_nerfstudio.pipeline import decide_scene_bounds, fail, missing_data_message

if TYPE_CHECKING:
    from nerfstudio.models.base_model import ModelConfig

STEPS = 3000
"""Training steps of every method (the learning rates decay over them)."""


def export_command(config_path: Path) -> str:
    """The command that writes the compressed file of the run whose config is ``config_path``."""
    output_dir = shlex.quote(str(config_path.parent / "export"))
    return f"ns-export vqad-compressed --load-config {shlex.quote(str(config_path))} --output-dir {output_dir}"


def compressed_size_line(model) -> str:
    """The size of the file ``model`` exports to by default (entropy-coded indices, fp16 networks), and of its
    coarsest level of detail where it has levels."""
    from vqad_nerfstudio.codec import describe, read_container, write_container
    from vqad_nerfstudio.export.formats import encode_any

    encoded = encode_any(model)
    data = write_container(encoded.header, encoded.chunks)
    line = f"Compressed file: {len(data) / 1024:.1f} KiB ({len(data):,} bytes)"
    rows = describe(read_container(data))
    lods = sorted({row["lod"] for row in rows if row["lod"] is not None})
    if len(lods) > 1:
        finer = sum(row["chunk_bytes"] for row in rows if row["lod"] is not None and row["lod"] > lods[0])
        line += f"; levels 0..{lods[0]} alone: {(len(data) - finer) / 1024:.1f} KiB"
    return line


class VQADTrainer(Trainer):
    """nerfstudio's trainer. A run shorter than its learning-rate schedules decays them over its own length, and
    the defaults a CPU run changes are printed; when training ends it prints the compressed size and the export
    command."""

    config: "VQADTrainerConfig"

    def setup(self, test_mode="val") -> None:
        shorten_schedules(self.config)
        if comms.is_main_process() and self.config.device_note and self.config.machine.device_type == "cpu":
            CONSOLE.print(self.config.device_note, soft_wrap=True, markup=False)
        super().setup(test_mode=test_mode)
        self.callbacks.append(TrainingCallback([TrainingCallbackLocation.AFTER_TRAIN], self.print_export_hint))

    def print_export_hint(self, step: int) -> None:
        if not comms.is_main_process():
            return
        try:
            size = compressed_size_line(self.pipeline.model)
        except Exception as error:  # training succeeded: a model that cannot be written yet only loses the hint
            size = f"Compressed file: not available yet ({error})"
        CONSOLE.print(size)
        CONSOLE.print("Export it with:")
        CONSOLE.print(f"  {export_command(self.config.get_base_dir() / 'config.yml')}", soft_wrap=True, markup=False)


@dataclass
class VQADTrainerConfig(TrainerConfig):
    """nerfstudio's TrainerConfig, training with :class:`VQADTrainer`."""

    _target: Type = field(default_factory=lambda: VQADTrainer)
    device_note: tyro.conf.Suppress[str] = ""
    """Printed when a run starts on the CPU: the defaults the method changed for a machine without CUDA."""

    overwrite: bool = False
    """Replace a run already in this run's folder (same --output-dir, method and --timestamp): its checkpoints and
    event logs are deleted first. Without it such a run is refused, unless it resumes from that folder
    (--load-dir, or --load-checkpoint of one of its checkpoints)."""

    def set_experiment_name(self) -> None:
        """nerfstudio's (the data folder's name), also where the data is given to a parser subcommand
        (``ns-train vqad blender-data --data lego`` runs in ``outputs/lego``, not ``outputs/unnamed``)."""
        datamanager = self.pipeline.datamanager
        parser_data = getattr(datamanager.dataparser, "data", None)
        if self.experiment_name is None and datamanager.data is None and parser_data is not None:
            data = Path(parser_data)
            self.experiment_name = (data.parent if data.suffix == ".json" else data).stem  # as nerfstudio names it
        super().set_experiment_name()

    def save_config(self) -> None:
        """nerfstudio's, once the data path is known to exist (a run that cannot start leaves no run folder) and
        the run folder holds no other run (:func:`earlier_run_files`), with the scene's bounds decided
        (:func:`~vqad_nerfstudio.pipeline.decide_scene_bounds`)."""
        problem = missing_data_message(self.pipeline)
        if problem is not None:
            fail(problem)
        base_dir = self.get_base_dir()
        earlier = earlier_run_files(base_dir, self.get_checkpoint_dir())
        here = self.get_checkpoint_dir().resolve()
        resumes_here = (self.load_dir is not None and Path(self.load_dir).resolve() == here) or (
            self.load_checkpoint is not None and Path(self.load_checkpoint).resolve().parent == here
        )
        if earlier and not resumes_here:
            if not self.overwrite:
                fail(
                    f"{base_dir} already holds a run ({len(earlier)} checkpoint and log files): pass another "
                    f"--timestamp, --overwrite True to replace it, or --load-dir {self.get_checkpoint_dir()} to "
                    "resume it"
                )
            for path in earlier:
                path.unlink()
            CONSOLE.print(
                f"--overwrite: deleted the earlier run's {len(earlier)} checkpoint and log files in {base_dir}"
            )
        decide_scene_bounds(self.pipeline)  # config.yml records the decision
        super().save_config()


def earlier_run_files(base_dir: Path, checkpoint_dir: Path) -> List[Path]:
    """The checkpoints and event logs a run already wrote to ``base_dir``: a new run there would mix with them
    (nerfstudio loads the latest step's checkpoint, whichever run wrote it)."""
    return sorted(checkpoint_dir.glob("*.ckpt")) + sorted(base_dir.glob("events.out.tfevents.*"))


@dataclass
class FusedAdamOptimizerConfig(AdamOptimizerConfig):
    """nerfstudio's Adam config with torch's fused implementation as an option."""

    fused: bool = False
    """Update all of the group's parameters in one kernel (torch.optim.Adam(fused=True); CUDA): fewer launches
    per step than the default multi-tensor Adam, same update."""


@dataclass
class InBackwardAdamOptimizerConfig(AdamOptimizerConfig):
    """Adam whose update the index logits' backward pass applies as it computes their gradient
    (:class:`vqad_nerfstudio.optim.InBackwardAdam`): the gradient of 2**b logits per vertex is never stored."""

    _target: Type = InBackwardAdam
    exp_avg_dtype: str = "bfloat16"
    """dtype of Adam's first moment (a running mean moving by 10% a step: bfloat16 holds it)."""
    exp_avg_sq_dtype: str = "param"
    """dtype of Adam's second moment: float32, bfloat16, float16, or "param": float32 for float32 logits, bfloat16
    for float16 ones (a 16-bit second moment is stochastically rounded: it moves by 0.1% a step, below bfloat16's
    resolution)."""
    in_backward: bool = True
    """Apply the update in the backward pass (False: store the gradient and update in the optimiser step, as
    torch's Adam; needed for gradient clipping or accumulation)."""

    def setup(self, params) -> "InBackwardAdam":
        if self.in_backward and self.max_norm is not None:
            raise ValueError("gradient clipping (max_norm) needs the gradient: set in_backward False for its group")
        return super().setup(params)


def shorten_schedules(config: TrainerConfig) -> None:
    """Make every learning-rate schedule longer than the run decay over the run's steps instead (longer runs keep
    theirs and train on at the final rate)."""
    for group in config.optimizers.values():
        scheduler = group.get("scheduler")
        if scheduler is not None and getattr(scheduler, "max_steps", 0) > config.max_num_iterations:
            scheduler.max_steps = config.max_num_iterations


def base_trainer_config(
    method_name: str,
    model: "ModelConfig",
    rays_per_batch: int,
    learning_rates: Dict[str, Tuple[float, float]],
    steps: int = STEPS,
    decay_steps: Optional[Mapping[str, int]] = None,
    device_note: str = "",
    in_backward_groups: Tuple[str, ...] = (),
) -> "TrainerConfig":
    """nerfstudio-format data (any parser through its subcommand) drawn on the device where it fits, the checked
    pipeline, ``steps`` steps, Adam (fused on CUDA; updated in the backward pass for ``in_backward_groups``) per
    parameter group decaying exponentially from its first to its last learning rate over ``decay_steps[group]``
    steps (default: ``steps``), on CUDA when present, else on the CPU."""
    import torch
    from nerfstudio.configs.base_config import MachineConfig, ViewerConfig
    from nerfstudio.data.dataparsers.nerfstudio_dataparser import NerfstudioDataParserConfig
    from nerfstudio.engine.schedulers import ExponentialDecaySchedulerConfig

    from vqad_nerfstudio.data.device_batches import DeviceDataManagerConfig
    from vqad_nerfstudio.pipeline import CheckedPipelineConfig

    cuda = torch.cuda.is_available()
    optimizers = {
        group: {
            "optimizer": (
                InBackwardAdamOptimizerConfig(lr=first, eps=1e-15)
                if group in in_backward_groups
                else FusedAdamOptimizerConfig(lr=first, eps=1e-15, fused=cuda)
            ),
            "scheduler": ExponentialDecaySchedulerConfig(
                lr_final=last, max_steps=(decay_steps or {}).get(group, steps)
            ),
        }
        for group, (first, last) in learning_rates.items()
    }
    return VQADTrainerConfig(
        method_name=method_name,
        steps_per_eval_batch=500,
        steps_per_eval_image=500,
        steps_per_save=1000,
        max_num_iterations=steps,
        mixed_precision=False,
        machine=MachineConfig(device_type="cuda" if cuda else "cpu"),
        pipeline=CheckedPipelineConfig(
            datamanager=DeviceDataManagerConfig(
                dataparser=NerfstudioDataParserConfig(),
                train_num_rays_per_batch=rays_per_batch,
                eval_num_rays_per_batch=rays_per_batch,
            ),
            model=model,
        ),
        optimizers=optimizers,
        viewer=ViewerConfig(num_rays_per_chunk=1 << 15),
        vis="viewer",
        device_note=device_note,
    )
