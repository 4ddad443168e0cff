"""TensoRF-VM whose feature planes are compressed to masked latents (Pham & Mandt 2024, "ECTensoRF").

Stage 1 is nerfstudio's tensorf, unchanged, for ``compression_start_step`` steps, or an existing
tensorf run given with ``tensorf_checkpoint`` (no retraining; compression starts at step 0). At the
start of stage 2 the three planes (density and colour components of each orientation, concatenated
to one C-channel plane) are frozen, importance maps are estimated by rendering training rays, and
latents (zeros), masks, decoder and prior are trained for ``compression_steps`` steps with

    render loss + plane_loss_weight * sum_i ||(P_i - D(Z_i M_i)) W_i||^2 + rate_lambda * bits,

while the rendering MLP and the line factors keep training (on the grid of ``field_bits`` when it is below 16).
From then on the model renders from the decoded planes only, in training, evaluation, the viewer and after
decoding a file.

Choices where the paper is silent: one decoder for the three planes, density and colour channels
decoded together; mask logits trained with the latents' learning rate and initialised to
``mask_init_logit``; TensoRF's plane regularisers dropped in stage 2 (the planes are frozen targets).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Type

import torch
from jaxtyping import Bool, Int
from nerfstudio.cameras.rays import RayBundle
from nerfstudio.data.scene_box import SceneBox
from nerfstudio.engine.callbacks import TrainingCallback, TrainingCallbackAttributes, TrainingCallbackLocation
from nerfstudio.models.tensorf import TensoRFModel, TensoRFModelConfig
from nerfstudio.utils.rich_utils import CONSOLE
from torch import Tensor
from torch.nn import Parameter

from vqad_nerfstudio.compat import SkippedLPIPS, allow_nerfstudio_checkpoints, offline_lpips
from vqad_nerfstudio.encodings.masked_latent_planes import MaskedLatentPlanes
from vqad_nerfstudio.encodings.plane_importance import importance_weights, splat_importance, weighted_plane_error
from vqad_nerfstudio.encodings.vm_planes import DecodableVMEncoding
from vqad_nerfstudio.fields.quantized_linear import quantizable_layers
from vqad_nerfstudio.models.limits import MAX_COMPONENTS, MAX_HIDDEN_DIM, MAX_NUM_SAMPLES, check_int
from vqad_nerfstudio.progress import track
from vqad_nerfstudio.rounding import check_weight_bits

allow_nerfstudio_checkpoints()

__all__ = ["CompressedTensoRFModel", "CompressedTensoRFModelConfig", "resolve_tensorf_checkpoint"]

_REGULARISERS = ("tv_reg_density", "tv_reg_color", "l1_reg")


@dataclass
class CompressedTensoRFModelConfig(TensoRFModelConfig):
    """nerfstudio's tensorf, then per-scene compression of its feature planes."""

    _target: Type = field(default_factory=lambda: CompressedTensoRFModel)
    compression_start_step: int = 30000
    """Steps of plain tensorf training (stage 1) before the planes are frozen and compressed."""
    compression_steps: int = 5000
    """Steps of stage 2 (the run ends after them: ``--max-num-iterations`` is set to start + these)."""
    tensorf_checkpoint: Optional[Path] = None
    """Compress this nerfstudio tensorf run instead of training stage 1: its config.yml, its checkpoint
    directory or a .ckpt file. Its model settings (components, appearance_dim) must match this config's."""
    rate_lambda: float = 1e-3
    """lambda: weight of the latents' code length in bits; larger gives smaller files."""
    plane_loss_weight: float = 1.0
    """Weight of the importance-weighted squared error between decoded and frozen planes (summed, as in the paper)."""
    latent_channels: int = 192
    """C_z: channels of each plane's latent code (paper: 192 for -H, 384 for -L)."""
    decoder_channels: int = 96
    """Hidden channels of the two-layer decoder (paper: 96 for -H, 192 for -L)."""
    decoder_bits: int = 16
    """Bits per weight of the plane decoder's kernels in the file: 16 (fp16), or 2..8 (rows quantised, range-coded;
    the decoder then trains on that grid, straight-through, so the decoded file renders what was trained). The
    fp16 decoder is most of a file with fp16 parameters (442 kB of 0.65 MB on lego); 8 bits store it in about half,
    6 in about a third."""
    field_bits: int = 16
    """Bits per value of what the file keeps beside the coded planes: TensoRF's line factors (one scale per line),
    appearance matrix and rendering MLP. 16: fp16; 2..8: rounded and range-coded, trained on that grid in stage 2
    (straight-through), so the decoded file renders what was trained."""
    mask_temperature: Tuple[float, float] = (10.0, 0.1)
    """Gumbel-softmax temperature of the masks, annealed geometrically from the first to the second value."""
    mask_init_logit: float = 2.0
    """Initial logit of each latent position being coded (mask on)."""
    importance_rays: int = 1 << 20
    """Training rays rendered at the start of stage 2 to estimate the planes' importance maps."""

    def __post_init__(self) -> None:
        if self.tensorf_encoding != "vm":
            raise ValueError(f"plane compression needs tensorf_encoding='vm', got {self.tensorf_encoding!r}")
        if self.compression_steps < 1 or self.compression_start_step < 0:
            raise ValueError("compression_steps must be >= 1 and compression_start_step >= 0")
        if self.rate_lambda < 0 or self.plane_loss_weight < 0:
            raise ValueError("rate_lambda and plane_loss_weight must be >= 0")
        check_int("num_den_components", self.num_den_components, 1, MAX_COMPONENTS)
        check_int("num_color_components", self.num_color_components, 1, MAX_COMPONENTS)
        check_int("appearance_dim", self.appearance_dim, 1, MAX_HIDDEN_DIM)
        check_int("latent_channels", self.latent_channels, 1, MAX_HIDDEN_DIM)
        check_int("decoder_channels", self.decoder_channels, 1, MAX_HIDDEN_DIM)
        check_weight_bits("decoder_bits", self.decoder_bits)
        check_weight_bits("field_bits", self.field_bits)
        check_int("num_samples", self.num_samples, 1, MAX_NUM_SAMPLES)
        check_int("num_uniform_samples", self.num_uniform_samples, 1, MAX_NUM_SAMPLES)
        if self.tensorf_checkpoint is not None:
            resolve_tensorf_checkpoint(self.tensorf_checkpoint)  # fail at the command line, not after data loading

    @property
    def start_step(self) -> int:
        """The step stage 2 begins at."""
        return 0 if self.tensorf_checkpoint is not None else self.compression_start_step


def resolve_tensorf_checkpoint(path: Path) -> Path:
    """The checkpoint a tensorf run path names: a .ckpt file, the latest in a directory, or that of a config.yml."""
    path = Path(path)
    if path.suffix in (".yml", ".yaml"):
        path = path.parent / "nerfstudio_models"
    elif path.is_dir() and (path / "nerfstudio_models").is_dir():
        path = path / "nerfstudio_models"
    if path.is_dir():
        checkpoints = sorted(path.glob("step-*.ckpt"))
        if not checkpoints:
            raise FileNotFoundError(f"no step-*.ckpt checkpoint in {path}")
        return checkpoints[-1]
    if not path.is_file():
        raise FileNotFoundError(f"tensorf checkpoint {path} does not exist")
    return path


class CompressedTensoRFModel(TensoRFModel):
    """tensorf whose planes, from stage 2 on, are decoded from entropy-coded latents."""

    config: CompressedTensoRFModelConfig

    def __init__(self, config: CompressedTensoRFModelConfig, **kwargs) -> None:
        super().__init__(config=config, **kwargs)
        # No upsampling once the planes are frozen (their resolution fixes the latents').
        self.upsampling_iters = tuple(step for step in self.upsampling_iters if step < config.start_step)
        self._decoded_cache: Optional[Tensor] = None

    def populate_modules(self) -> None:
        with offline_lpips():
            super().populate_modules()
        cfg = self.config
        self.field.density_encoding = DecodableVMEncoding(self.init_resolution, cfg.num_den_components)
        self.field.color_encoding = DecodableVMEncoding(self.init_resolution, cfg.num_color_components)
        self.latent_planes = MaskedLatentPlanes(
            3,
            cfg.num_den_components + cfg.num_color_components,
            self._resolution_at(cfg.start_step),
            cfg.latent_channels,
            cfg.decoder_channels,
            cfg.mask_init_logit,
        )
        for layer in quantizable_layers(self.latent_planes.decoder):
            layer.bits = None if cfg.decoder_bits == 16 else cfg.decoder_bits
        self._field_layers = quantizable_layers(self.field)  # rounded to field_bits in stage 2 (get_outputs)
        resolution = self.latent_planes.plane_resolution
        self.register_buffer("plane_weights", torch.zeros(3, resolution, resolution))
        self.register_buffer("compressing", torch.tensor(False))
        self._register_load_state_dict_pre_hook(self._resize_to_state)

    def _resolution_at(self, step: int) -> int:
        done = sum(1 for iteration in self.config.upsampling_iters if iteration < step)
        return self.init_resolution if done == 0 else self.upsampling_steps[done - 1]

    # ------------------------------------------------------------------------------------ planes
    @property
    def plane_encodings(self) -> Tuple[DecodableVMEncoding, DecodableVMEncoding]:
        """The density and colour encodings, whose planes are decoded together (density channels first)."""
        return self.field.density_encoding, self.field.color_encoding

    def frozen_planes(self) -> Tensor:
        """Stage 1's planes, density and colour components concatenated: the distortion target."""
        density, color = self.plane_encodings
        return torch.cat([density.plane_coef, color.plane_coef], dim=1).detach()

    def resize_planes(self, resolution: int) -> None:
        """Planes, lines, latents, masks and importance maps for planes of side ``resolution`` (zeros)."""
        for encoding in self.plane_encodings:
            encoding.resize(resolution)
        self.latent_planes.reset(resolution)
        self.plane_weights = self.plane_weights.new_zeros(3, resolution, resolution)

    def load_coded_planes(
        self, latents: Int[Tensor, "planes channels side side"], masks: Bool[Tensor, "planes side side"]
    ) -> None:
        """Set the latents and masks to a file's integer values; the model then renders its decoded planes."""
        self.latent_planes.load_hard(latents, masks)
        self.compressing.fill_(True)
        self._decoded_cache = None

    def _resize_to_state(self, state_dict: Dict[str, Tensor], prefix: str, *args) -> None:
        """Before loading: give planes, latents and masks the shapes the state holds."""
        planes = state_dict.get(prefix + "field.density_encoding.plane_coef")
        if planes is not None and planes.shape[-1] != self.field.density_encoding.resolution:
            self.resize_planes(int(planes.shape[-1]))
        self._decoded_cache = None

    def update_to_step(self, step: int) -> None:
        """Nothing: loading a state gives planes, latents and masks its shapes (in place, so optimizers keep
        their parameters; tensorf's own upsampling on load would replace them)."""

    def _decoded(self) -> Tuple[Tensor, Optional[Tensor]]:
        """Decoded planes and (training only) the latents' code length in bits; cached in evaluation."""
        if self.training:
            decoded = self.latent_planes()
            return decoded.planes, decoded.bits
        if self._decoded_cache is None:
            with torch.no_grad():
                self._decoded_cache = self.latent_planes().planes
        return self._decoded_cache, None

    def train(self, mode: bool = True) -> "CompressedTensoRFModel":
        self._decoded_cache = None
        return super().train(mode)

    # ---------------------------------------------------------------------------- nerfstudio API
    def get_param_groups(self) -> Dict[str, List[Parameter]]:
        groups = super().get_param_groups()
        groups["latents"] = [self.latent_planes.latents, self.latent_planes.mask_logits]
        groups["plane_coder"] = list(self.latent_planes.decoder.parameters()) + list(
            self.latent_planes.prior.parameters()
        )
        return groups

    def get_training_callbacks(self, attributes: TrainingCallbackAttributes) -> List[TrainingCallback]:
        callbacks = super().get_training_callbacks(attributes)
        cfg = self.config
        trainer = attributes.trainer
        end = cfg.start_step + cfg.compression_steps
        if trainer is not None and trainer.config.max_num_iterations != end:
            CONSOLE.print(f"[bold]tensorf-compressed[/bold]: {cfg.start_step} + {cfg.compression_steps} steps")
            trainer.config.max_num_iterations = end

        def start(step: int) -> None:
            if not bool(self.compressing):
                self.start_compression(attributes, step)

        def anneal(step: int) -> None:
            progress = min(max((step - cfg.start_step) / cfg.compression_steps, 0.0), 1.0)
            first, last = cfg.mask_temperature
            self.latent_planes.temperature = first * (last / first) ** progress

        location = [TrainingCallbackLocation.BEFORE_TRAIN_ITERATION]
        return callbacks + [
            TrainingCallback(location, start, iters=(cfg.start_step,)),
            TrainingCallback(location, anneal),
        ]

    def start_compression(self, attributes: TrainingCallbackAttributes, step: int) -> None:
        """Stage 2: load the tensorf run if one is given, freeze the planes, estimate importance, reset the coder."""
        if self.config.tensorf_checkpoint is not None:
            self.load_tensorf(self.config.tensorf_checkpoint)
        for encoding in self.plane_encodings:
            encoding.plane_coef.requires_grad_(False)
        self.latent_planes.reset(self.field.density_encoding.resolution)
        assert attributes.pipeline is not None
        self.plane_weights = importance_weights(self.estimate_importance(attributes.pipeline.datamanager, step))
        self.compressing.fill_(True)
        self._restart_optimizers(attributes, ("latents", "plane_coder"))

    def _restart_optimizers(self, attributes: TrainingCallbackAttributes, groups: Tuple[str, ...]) -> None:
        """Fresh optimizers and schedulers for ``groups`` (schedules start at stage 2, span its steps)."""
        optimizers = attributes.optimizers
        assert optimizers is not None
        param_groups = self.get_param_groups()
        for group in groups:
            config = optimizers.config[group]
            optimizers.optimizers[group] = config["optimizer"].setup(params=param_groups[group])
            if config["scheduler"]:
                scheduler = dataclasses.replace(config["scheduler"], max_steps=self.config.compression_steps).setup()
                optimizers.schedulers[group] = scheduler.get_scheduler(
                    optimizer=optimizers.optimizers[group], lr_init=config["optimizer"].lr
                )

    @torch.no_grad()
    def load_tensorf(self, path: Path) -> None:
        """Load a nerfstudio tensorf run's field (planes, lines, MLP) into this model."""
        checkpoint = resolve_tensorf_checkpoint(path)
        state = torch.load(checkpoint, map_location="cpu")["pipeline"]
        prefix = next((p for p in ("_model.field.", "module._model.field.") if p + "B.weight" in state), None)
        if prefix is None or prefix + "density_encoding.plane_coef" not in state:
            raise ValueError(f"{checkpoint} is not a checkpoint of a TensoRF-VM model (no field planes)")
        field_state = {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}
        for name, encoding in zip(("density_encoding", "color_encoding"), self.plane_encodings):
            planes = field_state[f"{name}.plane_coef"]
            if planes.shape[1] != encoding.num_components:
                raise ValueError(
                    f"{checkpoint}: {name} has {planes.shape[1]} components, this model {encoding.num_components}; "
                    "pass the run's --pipeline.model.num-den-components / --pipeline.model.num-color-components"
                )
        self.resize_planes(int(field_state["density_encoding.plane_coef"].shape[-1]))
        try:
            self.field.load_state_dict(field_state)
        except RuntimeError as error:
            raise ValueError(f"{checkpoint}: the tensorf field does not match this model's settings: {error}") from None
        CONSOLE.print(f"Loaded tensorf planes ({self.field.density_encoding.resolution}^2) from {checkpoint}")

    @torch.no_grad()
    def estimate_importance(self, datamanager, step: int) -> Tensor:
        """Eq. 4: rendering weights of the fine samples of training rays, splatted onto the three planes."""
        resolution = self.field.density_encoding.resolution
        importance = torch.zeros(3, resolution, resolution, device=self.device)
        batches = max(1, math.ceil(self.config.importance_rays / datamanager.config.train_num_rays_per_batch))
        for _ in track(range(batches), "Importance maps"):
            ray_bundle, _ = datamanager.next_train(step)
            ray_bundle = ray_bundle.to(self.device)
            if self.collider is not None:
                ray_bundle = self.collider(ray_bundle)
            uniform = self.sampler_uniform(ray_bundle)
            fine = self.sampler_pdf(ray_bundle, uniform, uniform.get_weights(self.field.get_density(uniform)))
            weights = fine.get_weights(self.field.get_density(fine)).reshape(-1)
            positions = SceneBox.get_normalized_positions(fine.frustums.get_positions(), self.field.aabb) * 2 - 1
            positions = positions.reshape(-1, 3)
            coordinates = torch.stack([positions[:, [0, 1]], positions[:, [0, 2]], positions[:, [1, 2]]])
            importance += splat_importance(coordinates, weights, resolution)
        return importance

    def get_outputs(self, ray_bundle: RayBundle) -> Dict[str, Tensor]:
        if not bool(self.compressing):
            return super().get_outputs(ray_bundle)
        planes, bits = self._decoded()
        density, color = self.plane_encodings
        density.decoded_planes, color.decoded_planes = planes.split([density.num_components, color.num_components], 1)
        self._round_field(None if self.config.field_bits == 16 else self.config.field_bits)
        try:
            outputs = super().get_outputs(ray_bundle)
        finally:
            density.decoded_planes = color.decoded_planes = None
            self._round_field(None)
        if bits is not None:  # training: the loss terms of stage 2
            outputs["plane_bits"] = bits
            outputs["plane_error"] = weighted_plane_error(planes, self.frozen_planes(), self.plane_weights)
        return outputs

    def _round_field(self, bits: Optional[int]) -> None:
        """Line factors and the field's linear layers rounded to ``bits`` (None: float) in what renders next."""
        for encoding in self.plane_encodings:
            encoding.line_bits = bits
        for layer in self._field_layers:
            layer.bits = bits

    def get_metrics_dict(self, outputs, batch) -> Dict[str, Tensor]:
        metrics = super().get_metrics_dict(outputs, batch)
        if "plane_bits" in outputs:
            metrics["plane_latents_kib"] = outputs["plane_bits"].detach() / 8 / 1024
        return metrics

    def get_loss_dict(self, outputs, batch, metrics_dict=None) -> Dict[str, Tensor]:
        losses = super().get_loss_dict(outputs, batch, metrics_dict)
        if "plane_bits" in outputs:
            for name in _REGULARISERS:
                losses.pop(name, None)
            losses["plane_distortion"] = self.config.plane_loss_weight * outputs["plane_error"]
            losses["rate"] = self.config.rate_lambda * outputs["plane_bits"]
        return losses

    def get_image_metrics_and_images(self, outputs, batch):
        metrics, images = super().get_image_metrics_and_images(outputs, batch)
        if isinstance(self.lpips, SkippedLPIPS):
            metrics.pop("lpips", None)
        return metrics, images
