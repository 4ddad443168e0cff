"""nerfstudio model for VQAD ("Variable Bitrate Neural Fields", Takikawa et al. 2022).

Candidate samples are spaced uniformly along each ray (as nerfstudio's stratified samplers space them,
:mod:`vqad_nerfstudio.rendering.candidate_intervals`); candidates outside the
sparse grid's occupied cells at the ray's level of detail are dropped (and, until the first pruning,
also those in voxels the occupancy estimate marks empty). The rest are packed ray by ray
(:mod:`vqad_nerfstudio.rendering.packed`): a density pass without gradients ends each ray once its
transmittance is negligible, and only the samples in front of that go through :class:`VQADField`
and are composited (``sampling="dense"`` keeps the reference [rays, samples] path). From the first
pruning on, training samples exactly what a decoded model samples (the stored topology). Training
callbacks update the occupancy estimate and prune the grid to the occupied region; each ray is
trained at the finest level of detail or, for a fraction of rays, at a random coarser one so that
every prefix of the levels renders.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Dict, List, Literal, Optional, Tuple, Type

import torch
from jaxtyping import Float, Int
from nerfstudio.cameras.camera_optimizers import CameraOptimizer, CameraOptimizerConfig
from nerfstudio.cameras.cameras import Cameras
from nerfstudio.cameras.rays import RayBundle, RaySamples
from nerfstudio.data.scene_box import OrientedBox
from nerfstudio.engine.callbacks import TrainingCallback, TrainingCallbackAttributes, TrainingCallbackLocation
from nerfstudio.engine.optimizers import Optimizers
from nerfstudio.model_components import renderers
from nerfstudio.model_components.losses import MSELoss
from nerfstudio.model_components.renderers import AccumulationRenderer, DepthRenderer, RGBRenderer
from nerfstudio.model_components.scene_colliders import NearFarCollider
from nerfstudio.models.base_model import Model, ModelConfig
from nerfstudio.utils import colormaps
from nerfstudio.viewer.viewer_elements import ViewerSlider, ViewerText
from torch import Tensor
from torch.nn import Parameter

from vqad_nerfstudio import kernels
from vqad_nerfstudio.compat import allow_nerfstudio_checkpoints, optional_lpips
from vqad_nerfstudio.encodings.index_factors import check_factors
from vqad_nerfstudio.encodings.occupancy import OccupancyEstimator
from vqad_nerfstudio.encodings.sparse_grid import RowRemap, SparseFeatureGrid, cell_vertex_ids, coords_of
from vqad_nerfstudio.encodings.vertex_features import (
    CodebookFeatures,
    FeatureStore,
    FloatFeatures,
    ParameterSwap,
    rows_from,
)
from vqad_nerfstudio.fields.vqad_field import VQADField
from vqad_nerfstudio.kernels import candidates, compositing
from vqad_nerfstudio.models.limits import (
    MAX_FEATURE_DIM,
    MAX_HIDDEN_DIM,
    MAX_NUM_LEVELS,
    MAX_NUM_SAMPLES,
    MAX_RESOLUTION,
    check_int,
    check_real,
)
from vqad_nerfstudio.models.size_accounting import stored_kib
from vqad_nerfstudio.optim import InBackwardAdam
from vqad_nerfstudio.rendering import packed
from vqad_nerfstudio.rendering.box_collider import BoxCollider
from vqad_nerfstudio.rendering.candidate_intervals import candidate_edges
from vqad_nerfstudio.rounding import check_weight_bits

allow_nerfstudio_checkpoints()


_RENAMED_FIELDS = {"bits": "index_bits", "index_relaxation_steps": "index_warmup_steps"}
"""Former names of VQADModelConfig fields."""

UNBOUNDED_ALPHA_THRESHOLD = 0.01
"""Unbounded scenes skip samples less opaque than this unless alpha_threshold says otherwise (nerfacc's examples
use it for unbounded captures; docs/benchmarks.md measures it on the demo dome)."""

DEFAULT_SHELL_LOD = 2
"""The background's level of detail in unbounded scenes unless shell_lod says otherwise: on the demo dome a file
5.4x smaller than every level everywhere, and no worse (docs/benchmarks.md)."""

FREEZE_CAP_SEVENTHS = 6
"""index_freeze_step is capped at this many sevenths of the run, so that a run shorter than it still ends on frozen
indices (and leaves a checkpoint without logits): 12000 of ``ns-train vqad``'s 14000 steps on a GPU."""

DIVERGENCE_CHECK_EVERY = 100
"""Training steps between checks that the loss is finite (a check waits for the GPU once)."""


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite: the parameters are lost, and training stops instead of running on."""


@dataclass
class VQADModelConfig(ModelConfig):
    """VQAD model: a sparse multi-resolution grid of learned b-bit indices into per-level codebooks."""

    _target: Type = field(default_factory=lambda: VQADModel)
    index_bits: int = 4
    """b: bit width of each vertex index; each level's codebook has 2**b vectors (1..16). ``ns-train vqad`` sets 8
    on CUDA and keeps 4 on the CPU (method_configs/vqad.py)."""
    base_index_bits: Optional[int] = None
    """b of level 0, the coarsest (1..16; None: index_bits). Its codebook is part of the coarsest stream prefix:
    4 bits store 16 codewords (0.5 kB in fp16) where 8 store 256 (8 kB)."""
    index_factors: Literal[1, 2] = 1
    """How each index is learned: 1, as 2**b logits per vertex (VQAD); 2, as two 2**(b/2)-way choices whose
    softmaxes multiply (32 logits per vertex at b = 8 instead of 256, 64 at b = 10 instead of 1024: a fraction of the
    memory and bytes a training step moves through them). The codebooks, the hard indices and the file are the same;
    index_bits and base_index_bits must be even."""
    num_levels: int = 5
    """L: number of levels of detail, coarse to fine (>= 1)."""
    base_resolution: int = 16
    """Grid resolution (cells per side) of the coarsest level; level l has base_resolution * 2**l."""
    feature_dim: int = 16
    """k: width of each codebook vector (the features summed over levels)."""
    feature_store: Literal["codebook", "float"] = "codebook"
    """'codebook': learned indices into codebooks (VQAD). 'float': a float vector per vertex (the uncompressed twin)."""
    dense_resolution: int = 64
    """Levels up to this resolution start dense; finer levels are grown inside occupied space at the first pruning."""
    hidden_dim: int = 64
    """Width of the density and colour MLPs."""
    network_bits: int = 16
    """Bits per weight of the density and colour MLPs' matrices in the file ns-export writes by default: 16 (fp16,
    as trained), or 2..8 (each matrix row quantised, range-coded). Below 16 every forward pass rounds the weights to
    that grid once the float warm-up has ended (straight-through gradients to the float weights), so that the
    decoded file renders what was trained."""
    codebook_bits: int = 16
    """Bits per value of each level's codebook in the file: 16 (fp16), or 2..8 (each feature channel rounded with
    its own scale, range-coded: a file stores 2**b x k values per level, 8 kB per level in fp16 at b = 8, k = 16).
    Below 16 every lookup reads the rounded codebook (straight-through gradients to the float codebook), so that
    the decoded file renders what was trained."""
    num_samples: int = 512
    """Candidate samples per ray (uniform between the ray's entry and exit of the scene box; about one finest
    voxel apart at the default) before empty-space skipping and early termination."""
    warmup_sample_spacing: Literal["grown", "finest"] = "grown"
    """Candidate spacing of training rays before the first pruning, while the finest levels are not grown yet.
    'grown': about one voxel of the finest grown level (num_samples halved for each missing level: the detail they
    would hold does not exist yet). 'finest': num_samples from the first step. Renders always use num_samples."""
    sampling: Literal["packed", "dense"] = "packed"
    """'packed': only candidates in occupied cells are kept, packed ray by ray with ray indices; a density pass
    without gradients stops each ray where its transmittance falls below early_stop_eps, and only the samples
    before that are evaluated. 'dense': the reference path, every occupied candidate evaluated and composited in a
    [rays, num_samples] layout (same image up to the early-termination tolerance)."""
    early_stop_eps: float = 1e-4
    """Packed sampling ends a ray once its transmittance falls below this (0: never)."""
    alpha_threshold: Optional[float] = None
    """Samples less opaque than this are skipped, neither shaded nor composited, in every render and in training
    from the first pruning on (nerfacc's alpha_thre): rays cross a thin haze without evaluating it. None:
    UNBOUNDED_ALPHA_THRESHOLD (0.01, nerfacc's setting for unbounded scenes) when unbounded, 0 (every sample)
    otherwise."""
    fused_kernels: bool = True
    """On CUDA, when Triton is installed, test candidates, place the packed samples and find their cells with one
    kernel each, interpolate the grid with the fused Triton kernel, compute the indices' softmax side (hard indices,
    rate, logit gradients) with the relaxed-index kernels, the view directions' spherical harmonics with their kernel
    and the packed samples' visibility and composite with the compositing kernels; False: the PyTorch reference path
    everywhere."""
    fused_decoders: bool = True
    """With fused_kernels: run each decoder MLP's forward and backward pass as one Triton kernel each
    (kernels/fused_mlp.py; same parameters and file layout; on an H200, lego's float twin evaluated ×1.49 faster in
    half the peak training memory); False: nerfstudio's MLP."""
    cuda_graphs: bool = True
    """With fused_kernels, on CUDA: replay CUDA graphs for a training step's small launches instead of issuing them
    one by one: its preparation (decoder weights and codebooks rounded to their bits, the levels' hard indices,
    index rates and codeword tables) and each level's in-backward Adam update of its logits with its codebook
    gradient; recorded again whenever the parameters move (pruning, freezing). False: launched one by one (the same
    numbers)."""
    tf32: bool = True
    """On CUDA, let float32 matrix products (the MLPs) use TF32 tensor cores: torch's
    set_float32_matmul_precision("high"), which applies to the whole process."""
    unbounded: Optional[bool] = None
    """True: contract space (as nerfacto does) for captures of the real world, whose photos show a background
    beyond the scene box; False: an object scene inside the box. None: decided from the training images when a
    run starts (True where their borders show a background, False where they are one flat colour or transparent,
    as Blender scenes are; data/scene_bounds.py), and recorded in the run's config.yml; a model built without data
    is bounded."""
    SCENE_BOUNDS_FLAGS: ClassVar[Tuple[str, str]] = (
        "--pipeline.model.unbounded False",
        "--pipeline.model.unbounded True",
    )
    """The flags that keep a run to the scene box and that fit a background (what the decision's message names)."""
    shell_lod: Optional[int] = None
    """Unbounded scenes: the finest level of detail of the background, the contracted space outside the scene box
    (finer levels hold cells only inside the box). None: DEFAULT_SHELL_LOD (level 2) when unbounded; -1: every
    level everywhere. Coarser backgrounds, smaller files."""
    occupancy_resolution: int = 64
    """Voxels per side of the occupancy estimate (capped at the finest level's resolution)."""
    occupancy_update_every: int = 16
    """Steps between occupancy updates (until the first pruning: from then on training samples the pruned grid's
    cells, and the estimate is no longer read)."""
    occupancy_alpha_threshold: float = 0.01
    """Space is empty where one finest voxel of it would be more transparent than this opacity (sampling, pruning)."""
    prune_steps: Tuple[int, ...] = (500, 1000, 2000)
    """Steps at which cells with no density above the threshold are pruned; the first one grows the fine levels.
    A run that would end before the last of them prunes at steps scaled by its length / prune_steps_reference_run."""
    prune_steps_reference_run: int = 3000
    """Run length (steps) for which prune_steps are written (see prune_steps)."""
    index_warmup_steps: int = 1000
    """Warm-up steps before straight-through training of the indices (0: straight-through from the first step);
    capped at a third of the run's iterations so that short runs end straight-through."""
    index_warmup: Literal["float", "soft"] = "float"
    """What the warm-up trains. 'float': free float features per vertex (as the float twin), which k-means then
    turns into each level's codebook, each vertex taking its nearest codeword as index.
    'soft': soft indices, the forward pass uses softmax(C/t) @ codebook (the paper)."""
    warmup_grown_levels: bool = False
    """Whether the levels the first pruning grows (those finer than dense_resolution) also start with float rows
    when it falls inside a float warm-up, to be quantised with the others when it ends. False: they start
    straight-through from random logits and codewords. ``ns-train vqad`` sets True on CUDA (on lego in 85 s: 2.66
    to 1.60 dB below the float twin) and keeps False on the CPU (method_configs/vqad.py)."""
    quantization_importance: Literal["fisher", "uniform"] = "fisher"
    """How the quantisation weighs each vertex's error. 'fisher': by the optimiser's running mean of the squared
    gradient of the vertex's float features (the diagonal Fisher information: how much the loss feels a change of
    that vertex; 0 for vertices no ray reaches). 'uniform': all alike."""
    float_vertex_fraction: float = 0.0
    """Share of each warmed-up level's vertices (0..1) that keep their float features when a float warm-up ends,
    instead of an index into the codebook: those whose quantisation would cost the loss most (importance x squared
    distance to the nearest codeword), as VQRF keeps its most important voxels. Levels grown by the first pruning
    keep none unless they warm up too (warmup_grown_levels). The file stores them as fp16 rows (32 bytes each at
    k = 16, plus their positions) beside every vertex's index. On the CPU quick start 0.003 adds 0.69 dB for 8.1 KiB;
    on lego with 8-bit indices 0.001-0.003 changed nothing measurable, or 0.12 dB for 0.156 MB with the grown levels
    warmed up (docs/benchmarks.md)."""
    index_freeze_step: int = 0
    """Step from which every index is frozen at its hard value, the one the file stores (0: never): the rest of the
    run trains the codebooks, float rows and decoders on a fixed assignment (VQRF's fine-tuning after vector
    quantisation), without the indices' logits, their optimiser state and the rate term. At or before the end of the
    warm-up, the indices freeze as the warm-up's k-means assigns them. Capped at six sevenths of the run (a shorter
    run still ends frozen); it must come after the first pruning where that grows levels (their indices would freeze
    untrained)."""
    index_temperature: Tuple[float, float] = (1.0, 0.2)
    """Softmax temperature t of the indices at the first step and at the end of a soft warm-up (annealed
    geometrically); the straight-through steps after any warm-up use the end value. A low end value (0.05) freezes the
    indices: the softmax gradient vanishes as it turns one-hot."""
    logit_dtype: Literal["auto", "float16", "float32"] = "auto"
    """Storage of the indices' logits (2**b per vertex) while they train. 'float16': half the memory and half the
    bytes each training step moves through them; every computation is float32, and Adam's updates (with the second
    moment then in bfloat16) round stochastically, so that steps below float16's resolution survive on average. On
    an H200 (lego, 60 s) it cut peak training memory from x2.6 to x1.8 the float twin's at equal step time and PSNR
    (docs/benchmarks.md). 'auto': float16 where the fused kernels run (CUDA with Triton, one index factor), float32
    on the CPU and with two factors, whose reference path only widens and rounds 16-bit logits at a cost."""
    frozen_indices: bool = False
    """Hold each vertex's index as an integer instead of 2**b trainable logits: what decoding a file builds (memory
    in proportion to the file). Such indices render and export, but do not train."""
    index_rate_weight: float = 1e-4
    """Weight of the indices' estimated entropy-coded size (mean bits per index, see
    CodebookFeatures.index_rate_bits) in the loss: > 0 trades PSNR for smaller entropy-coded indices (the default:
    8-bit lego files 2.6x smaller than without it for 0.46 dB, 4-bit demo files 25% smaller at equal PSNR)."""
    coarse_lod_fraction: float = 0.1
    """Fraction of training rays rendered at a random coarser level of detail, so that every LOD prefix renders."""
    background_color: Literal["random", "last_sample", "black", "white"] = "white"
    """Background colour; white for nerfstudio's blender-format object scenes."""
    camera_optimizer: CameraOptimizerConfig = field(default_factory=lambda: CameraOptimizerConfig(mode="off"))
    """Camera pose refinement (off for scenes with known poses)."""

    def __setstate__(self, state: Dict[str, Any]) -> None:
        """Restore a pickled or YAML-loaded config (a run's config.yml), with the names runs written before the
        renames used and the behaviour of fields they did not have."""
        for old, new in _RENAMED_FIELDS.items():
            if old in state:
                state[new] = state.pop(old)
        state.setdefault("alpha_threshold", 0.0)  # runs from before the field trained and rendered every sample
        self.__dict__.update(state)

    def __post_init__(self) -> None:
        check_int("index_bits (b)", self.index_bits, 1, 16)
        if self.base_index_bits is not None:
            check_int("base_index_bits", self.base_index_bits, 1, 16)
        check_factors(self.index_bits, self.index_factors, "index_bits (b)")
        check_factors(self.level_index_bits(0), self.index_factors, "base_index_bits")
        check_int("num_levels (L)", self.num_levels, 1, MAX_NUM_LEVELS)
        check_int("base_resolution", self.base_resolution, 1, MAX_RESOLUTION)
        finest = self.base_resolution * 2 ** (self.num_levels - 1)
        if finest > MAX_RESOLUTION:
            raise ValueError(
                f"the finest level's resolution, base_resolution * 2**(num_levels - 1) = {finest}, must be at most "
                f"{MAX_RESOLUTION}"
            )
        check_int("feature_dim (k)", self.feature_dim, 1, MAX_FEATURE_DIM)
        check_int("dense_resolution", self.dense_resolution, 0)
        check_int("hidden_dim", self.hidden_dim, 1, MAX_HIDDEN_DIM)
        check_weight_bits("network_bits", self.network_bits)
        check_weight_bits("codebook_bits", self.codebook_bits)
        check_int("num_samples", self.num_samples, 1, MAX_NUM_SAMPLES)
        check_int("occupancy_resolution", self.occupancy_resolution, 1, MAX_RESOLUTION)
        check_int("occupancy_update_every", self.occupancy_update_every, 1)
        check_real("occupancy_alpha_threshold", self.occupancy_alpha_threshold, 0, 1, open_low=True, open_high=True)
        for step in self.prune_steps:
            check_int("each of prune_steps", step, 0)
        check_int("prune_steps_reference_run", self.prune_steps_reference_run, 1)
        check_real("early_stop_eps", self.early_stop_eps, 0.0, 1.0, open_high=True)
        if self.alpha_threshold is not None:
            check_real("alpha_threshold", self.alpha_threshold, 0.0, 1.0, open_high=True)
        check_int("index_warmup_steps", self.index_warmup_steps, 0)
        check_int("index_freeze_step", self.index_freeze_step, 0)
        if len(self.index_temperature) != 2:
            raise ValueError(f"index_temperature must be two positive numbers, got {self.index_temperature}")
        for temperature in self.index_temperature:
            check_real("each index_temperature", temperature, 0.0, open_low=True)
        check_real("index_rate_weight", self.index_rate_weight, 0.0)
        if self.logit_dtype not in ("auto", "float16", "float32"):
            raise ValueError(f"logit_dtype must be 'auto', 'float16' or 'float32', got {self.logit_dtype!r}")
        check_real("float_vertex_fraction", self.float_vertex_fraction, 0.0, 1.0, open_high=True)
        if self.float_vertex_fraction > 0 and self.index_warmup != "float":
            raise ValueError("float_vertex_fraction keeps float warm-up features: it needs index_warmup='float'")
        check_real("coarse_lod_fraction", self.coarse_lod_fraction, 0.0, 1.0)
        if self.shell_lod is not None:
            check_int("shell_lod", self.shell_lod, -1, self.num_levels - 1)
            if self.shell_lod >= 0 and self.unbounded is False:
                raise ValueError("shell_lod caps the background of unbounded scenes: it needs unbounded=True")

    def logit_storage(self) -> torch.dtype:
        """The logits' dtype that logit_dtype names ('auto' resolved on this machine)."""
        if self.logit_dtype == "auto":
            fast = self.fused_kernels and self.index_factors == 1 and kernels.triton is not None
            fast = fast and torch.cuda.is_available()
            return torch.float16 if fast else torch.float32
        return getattr(torch, self.logit_dtype)

    def level_index_bits(self, level: int) -> int:
        """b of level ``level`` (base_index_bits for level 0, index_bits for the others)."""
        return self.base_index_bits if level == 0 and self.base_index_bits is not None else self.index_bits

    @property
    def skipped_alpha(self) -> float:
        """The opacity below which samples are skipped (see alpha_threshold)."""
        if self.alpha_threshold is not None:
            return self.alpha_threshold
        return UNBOUNDED_ALPHA_THRESHOLD if self.unbounded else 0.0

    @property
    def background_lod(self) -> Optional[int]:
        """The level of detail that caps the background of an unbounded scene (see shell_lod); None: uncapped."""
        if not self.unbounded or self.shell_lod == -1:
            return None
        return min(DEFAULT_SHELL_LOD, self.num_levels - 1) if self.shell_lod is None else self.shell_lod


class VQADModel(Model):
    """VQAD radiance field with streaming levels of detail."""

    config: VQADModelConfig
    field: VQADField

    def populate_modules(self) -> None:
        super().populate_modules()
        cfg = self.config
        self.grid = SparseFeatureGrid(
            cfg.base_resolution,
            cfg.num_levels,
            self._store_factory(),
            dense_resolution=cfg.dense_resolution,
            shell_lod=cfg.background_lod,
        )
        self.grid.fused = cfg.fused_kernels
        if cfg.tf32 and torch.cuda.is_available():
            torch.set_float32_matmul_precision("high")
        self.field = VQADField(self.scene_box.aabb, self.grid, unbounded=bool(cfg.unbounded), hidden_dim=cfg.hidden_dim)
        self.field.fused_decoders = cfg.fused_kernels and cfg.fused_decoders
        graphs = cfg.fused_kernels and cfg.cuda_graphs
        self.grid.preparation_graph.enabled = self.field.rounding_graph.enabled = graphs
        for level in self.grid.levels:
            if isinstance(level.features, CodebookFeatures):
                level.features.update_graph.enabled = graphs

        if cfg.unbounded:
            self.collider = NearFarCollider(near_plane=0.05, far_plane=1000.0)
            extent = torch.full((3,), 4.0)  # contracted space spans 4 units per side
        else:
            self.collider = BoxCollider(self.scene_box)
            extent = self.scene_box.aabb[1] - self.scene_box.aabb[0]
        step = float(extent.max()) / self.grid.resolutions[-1]  # one finest voxel
        occupancy_resolution = min(cfg.occupancy_resolution, self.grid.resolutions[-1])
        # density is per world unit; the threshold makes one finest voxel at most this opaque
        threshold = -torch.log1p(torch.tensor(-cfg.occupancy_alpha_threshold)).item() / step
        self.occupancy = OccupancyEstimator(occupancy_resolution, density_threshold=threshold)

        self.renderer_rgb = RGBRenderer(background_color=cfg.background_color)
        self.renderer_accumulation = AccumulationRenderer()
        self.renderer_depth = DepthRenderer(method="expected")
        self.rgb_loss = MSELoss()
        self._last_loss: Optional[Tensor] = None

        self.lpips = optional_lpips()

        self.camera_optimizer: CameraOptimizer = cfg.camera_optimizer.setup(
            num_cameras=self.num_train_data, device="cpu"
        )

        finest = cfg.num_levels - 1
        self.lod_size_text = ViewerText(
            "Stored size at LOD",
            "",
            disabled=True,
            hint="Bytes of topology, indices, codebooks and MLPs up to this level",
        )
        self.lod_slider = ViewerSlider(
            "Level of detail",
            finest,
            0,
            finest,
            step=1,
            cb_hook=lambda _: self._update_lod_text(),
            hint="Render with levels 0..LOD only (what a stream prefix holds)",
        )
        # A checkpoint of a decoded stream prefix holds fewer levels than the config: the viewer's slider
        # (created after loading) then offers only those. A checkpoint from after the float warm-up renders with
        # rounded decoder weights.
        self.register_load_state_dict_post_hook(lambda module, _: module.cap_lod_slider())
        self.register_load_state_dict_post_hook(lambda module, _: module.round_decoder_weights())
        self.round_decoder_weights()

    def round_decoder_weights(self) -> None:
        """Let the decoder MLPs use their weights rounded to network_bits once no level is in its float warm-up."""
        warmup = any(getattr(level.features, "in_float_warmup", False) for level in self.grid.levels)
        bits = None if self.config.network_bits == 16 or warmup else self.config.network_bits
        self.field.set_weight_bits(bits)

    def cap_lod_slider(self) -> None:
        """Limit the level-of-detail slider to the levels the grid holds."""
        finest = max(self.grid.grown_levels() - 1, 0)
        self.lod_slider.max = finest
        self.lod_slider.value = min(int(self.lod_slider.value), finest)

    def _store_factory(self):
        cfg = self.config

        def make(level: int, rows: int) -> FeatureStore:
            if cfg.feature_store == "float":
                return FloatFeatures(rows, cfg.feature_dim)
            return CodebookFeatures(
                rows,
                cfg.level_index_bits(level),
                cfg.feature_dim,
                float_warmup=cfg.index_warmup == "float" and (rows > 0 or cfg.warmup_grown_levels),
                frozen=cfg.frozen_indices,
                fuse_rate=cfg.index_rate_weight > 0,  # the rate term is computed with the table (one buffer)
                use_kernels=cfg.fused_kernels,
                codebook_bits=None if cfg.codebook_bits == 16 else cfg.codebook_bits,
                logit_dtype=cfg.logit_storage(),
                index_factors=cfg.index_factors,
            )

        return make

    def _update_lod_text(self) -> None:
        lod = int(self.lod_slider.value)
        self.lod_size_text.value = f"{stored_kib(self, lod):.1f} KiB (levels 0..{lod})"

    # ----------------------------------------------------------------------------------- training
    def get_param_groups(self) -> Dict[str, List[Parameter]]:
        groups = {"fields": list(self.field.density_mlp.parameters()) + list(self.field.color_mlp.parameters())}
        for level in self.grid.levels:
            for name, parameters in level.features.parameter_groups().items():
                groups.setdefault(name, []).extend(parameters)
        self.camera_optimizer.get_param_groups(param_groups=groups)
        return groups

    def get_training_callbacks(
        self, training_callback_attributes: TrainingCallbackAttributes
    ) -> List[TrainingCallback]:
        def update_occupancy(step: int) -> None:
            if not self.grid.pruned:  # only the sampling before the first pruning reads the estimate
                self.occupancy.update(self._density_for_occupancy)

        trainer = training_callback_attributes.trainer
        warmup = self.config.index_warmup_steps
        prune_steps = tuple(self.config.prune_steps)
        freeze = self.config.index_freeze_step
        if trainer is not None:
            run = trainer.config.max_num_iterations
            warmup = min(warmup, run // 3)
            if prune_steps and max(prune_steps) >= run:  # the run would end before the last pruning
                scale = run / self.config.prune_steps_reference_run
                prune_steps = tuple(sorted({int(step * scale) for step in prune_steps}))
            if freeze > 0:
                freeze = min(freeze, run * FREEZE_CAP_SEVENTHS // 7)
        self._check_freeze_after_growth(prune_steps, freeze)

        def follow(remaps: List[RowRemap]) -> None:
            if training_callback_attributes.optimizers is not None:
                for remap in remaps:
                    _remap_optimizer_state(training_callback_attributes.optimizers.optimizers.values(), remap)

        def relax_indices(step: int) -> None:
            self._set_index_relaxation(step, warmup)
            if step >= warmup:
                follow(self._quantize_float_warmup(training_callback_attributes.optimizers))
            if 0 < freeze <= step:
                follow(self._freeze_indices())
            self.round_decoder_weights()

        def prune(step: int) -> None:
            follow(self.grid.prune(self._cells_with_density))

        def stop_if_diverged(step: int) -> None:
            if self._last_loss is not None and not torch.isfinite(self._last_loss):
                raise TrainingDiverged(
                    f"the training loss is {float(self._last_loss)} at step {step}: the model's parameters are no "
                    "longer finite and further steps cannot recover them. Restart from an earlier checkpoint "
                    "(--load-dir) or with lower learning rates (--optimizers.GROUP.optimizer.lr; ns-train vqad "
                    "--help lists the groups)."
                )

        return [
            TrainingCallback([TrainingCallbackLocation.BEFORE_TRAIN_ITERATION], relax_indices),
            TrainingCallback(
                [TrainingCallbackLocation.BEFORE_TRAIN_ITERATION],
                update_occupancy,
                update_every_num_iters=self.config.occupancy_update_every,
            ),
            TrainingCallback([TrainingCallbackLocation.AFTER_TRAIN_ITERATION], prune, iters=prune_steps),
            TrainingCallback(
                [TrainingCallbackLocation.AFTER_TRAIN_ITERATION],
                stop_if_diverged,
                update_every_num_iters=DIVERGENCE_CHECK_EVERY,
            ),
        ]

    def _set_index_relaxation(self, step: int, warmup: int) -> None:
        """Soft-to-hard schedule: ``warmup`` steps of soft indices with falling temperature, then straight-through.
        (A float warm-up has no soft phase: straight-through at the end temperature once quantised.)"""
        start, end = self.config.index_temperature
        progress = min(step / warmup, 1.0) if warmup > 0 else 1.0
        soft = self.config.index_warmup == "soft"
        for level in self.grid.levels:
            if isinstance(level.features, CodebookFeatures):
                level.features.temperature = start ** (1.0 - progress) * end**progress if soft else end
                level.features.relaxed = soft and step < warmup

    def _quantize_float_warmup(self, optimizers: Optional[Optimizers] = None) -> List[RowRemap]:
        """End a float warm-up: each level's float rows become its codebook and indices (importance-weighted k-means;
        the importance from ``optimizers``' state where the config asks for it)."""

        def quantize(store: CodebookFeatures) -> List[ParameterSwap]:
            if not store.in_float_warmup:
                return []
            importance = None
            if self.config.quantization_importance == "fisher":
                importance = fisher_importance(optimizers, store.warmup_features)
            return store.quantize_float_warmup(importance=importance, float_fraction=self.config.float_vertex_fraction)

        return self._replace_in_stores(quantize)

    def _check_freeze_after_growth(self, prune_steps: Tuple[int, ...], freeze: int) -> None:
        """``ValueError`` where the indices would freeze (at step ``freeze``) before the first pruning grows the finest
        levels: the grown vertices' indices would never train."""
        grows = not self.grid.pruned and self.grid.grown_levels() < self.grid.num_levels
        if freeze > 0 and grows and prune_steps and freeze <= min(prune_steps):
            raise ValueError(
                f"the indices would freeze at step {freeze} (index_freeze_step, at most six sevenths of the run), "
                f"before the first pruning (step {min(prune_steps)}), which grows the finest levels: their indices "
                "would freeze untrained. Raise it or the run's length, or set it to 0 (never)."
            )

    def _freeze_indices(self) -> List[RowRemap]:
        """Freeze every level's indices at their hard values (see index_freeze_step)."""
        return self._replace_in_stores(lambda store: [] if store.in_float_warmup else store.freeze_indices())

    def _replace_in_stores(self, replace: Callable[[CodebookFeatures], List[ParameterSwap]]) -> List[RowRemap]:
        """Apply ``replace`` to each level's codebook store; the parameters it swaps, as remaps for the optimisers
        (no rows move)."""
        remaps = []
        for level in self.grid.levels:
            if isinstance(level.features, CodebookFeatures):
                swaps = replace(level.features)
                if swaps:
                    remaps.append(RowRemap(torch.empty(0, dtype=torch.long, device=level.cells.device), swaps))
        return remaps

    @torch.no_grad()
    def _cells_with_density(self, cells: Tensor, resolution: int, batch: int = 1 << 19) -> Tensor:
        """Cells where the field's density exceeds the pruning threshold at a corner or the centre.

        Neighbouring cells share corners: the density is evaluated once per distinct corner.
        """
        corners = cell_vertex_ids(cells, resolution)  # [n, 8] ids in the (resolution + 1)^3 vertex grid
        vertices, corner_rows = torch.unique(corners, return_inverse=True)
        points = (
            torch.cat([coords_of(vertices, resolution + 1).float(), coords_of(cells, resolution).float() + 0.5])
            / resolution
        )
        dense = (
            torch.cat([self.field.density_at(chunk.clamp(0, 1))[0][:, 0] for chunk in torch.split(points, batch)])
            > self.occupancy.density_threshold
        )
        return dense[corner_rows].any(dim=-1) | dense[vertices.numel() :]

    @torch.no_grad()
    def _density_for_occupancy(self, unit_positions: Tensor) -> Tensor:
        density, _, _ = self.field.density_at(unit_positions)
        return density[:, 0]

    # ---------------------------------------------------------------------------------- rendering
    def candidates_per_ray(self) -> int:
        """Candidates the sampler proposes per ray: num_samples, or fewer for training rays before the first pruning
        (see warmup_sample_spacing)."""
        missing = self.grid.num_levels - max(self.grid.grown_levels(), 1)
        warmup = self.training and not self.grid.pruned
        if self.config.warmup_sample_spacing == "finest" or not warmup or missing == 0:
            return self.config.num_samples
        return max(1, -(-self.config.num_samples // 2**missing))

    def _ray_lods(self, num_rays: int, device: torch.device) -> Tuple[Int[Tensor, "r"], int]:
        """Each ray's level of detail, and the finest level any ray may use."""
        finest = self.grid.grown_levels() - 1
        if not self.training:
            lod = min(int(self.lod_slider.value), finest)
            return torch.full((num_rays,), lod, dtype=torch.long, device=device), lod
        lods = torch.full((num_rays,), finest, dtype=torch.long, device=device)
        if finest > 0 and self.config.coarse_lod_fraction > 0:
            coarse = torch.rand(num_rays, device=device) < self.config.coarse_lod_fraction
            lods = torch.where(coarse, torch.randint(0, finest, (num_rays,), device=device), lods)
        return lods, finest

    @torch.no_grad()
    def get_outputs_for_camera(self, camera: Cameras, obb_box: Optional[OrientedBox] = None) -> Dict[str, Tensor]:
        """nerfstudio's, with the pixel grid made on the camera's device: nerfstudio builds it on the CPU and copies
        it over, which takes a GPU render of a 400 x 400 view longer than its ray marching."""
        height, width = int(camera.height.reshape(-1)[0]), int(camera.width.reshape(-1)[0])
        rows = torch.arange(height, device=camera.device, dtype=torch.float32)
        columns = torch.arange(width, device=camera.device, dtype=torch.float32)
        coords = torch.stack(torch.meshgrid(rows, columns, indexing="ij"), dim=-1) + 0.5  # (y, x), as nerfstudio's
        rays = camera.generate_rays(camera_indices=0, coords=coords, keep_shape=True, obb_box=obb_box)
        return self.get_outputs_for_camera_ray_bundle(rays)

    def get_outputs(self, ray_bundle: RayBundle) -> Dict[str, Tensor]:
        with self.field.decoders_rounded_once(), self.grid.indices_once():
            return self._outputs(ray_bundle)

    def _outputs(self, ray_bundle: RayBundle) -> Dict[str, Tensor]:
        if self.training:
            self.camera_optimizer.apply_to_raybundle(ray_bundle)
        assert ray_bundle.nears is not None and ray_bundle.fars is not None, "the model's collider sets them"
        edges = candidate_edges(
            ray_bundle.nears.reshape(-1, 1),
            ray_bundle.fars.reshape(-1, 1),
            self.candidates_per_ray(),
            jitter=self.training,
            spacing="lin-disp" if self.config.unbounded else "uniform",
        )
        starts, ends = edges[:, :-1], edges[:, 1:]
        num_rays, num_samples = starts.shape
        ray_lods, finest_lod = self._ray_lods(num_rays, starts.device)
        # warm-up: also skip space the occupancy estimate marks empty
        estimate = self.occupancy if self.training and not self.grid.pruned else None
        origins, directions = ray_bundle.origins.reshape(-1, 3), ray_bundle.directions.reshape(-1, 3)
        box = None if self.config.unbounded else self.field.aabb
        if self.config.sampling == "packed" and self.grid.fused and candidates.available(starts):
            keep = candidates.occupied_candidates(
                origins,
                directions,
                starts,
                ends,
                ray_lods,
                self.grid.occupancy_bits(),
                self.grid.resolutions[-1],
                box,
                None if estimate is None else estimate.binary,
                0 if estimate is None else estimate.resolution,
                self.grid.shell_lod,
            )
            samples = packed.pack(starts, ends, keep)
            positions = candidates.unit_positions(
                origins, directions, samples.ray_indices, samples.starts, samples.ends, box
            )
        else:  # the PyTorch reference: every candidate's position, then its occupancy at the ray's level of detail
            midpoints = ((starts + ends) / 2)[..., None]
            positions = self.field.to_unit_cube(origins[:, None] + directions[:, None] * midpoints).reshape(-1, 3)
            keep = self.grid.inside(positions, ray_lods[:, None].expand(num_rays, num_samples).reshape(-1))
            if estimate is not None:
                keep &= estimate.occupied_at(positions)
            if self.config.sampling == "dense":
                ray_samples = ray_bundle.get_ray_samples(bin_starts=starts[..., None], bin_ends=ends[..., None])
                return self._render_dense(ray_samples, positions, ray_lods, keep, finest_lod)
            samples = packed.pack(starts, ends, keep.reshape(num_rays, -1))
            positions = positions[samples.candidate_ids]
        located = self.grid.locate(positions, finest_lod + 1)  # the samples' cells, for every density pass
        return self._render_packed(samples, positions, located, ray_lods, directions)

    def _skipped_alpha(self) -> float:
        """The opacity below which samples are skipped: config.skipped_alpha, from the first pruning on in training
        (before it the field is still a thin haze everywhere, and skipping it would leave nothing to train)."""
        return self.config.skipped_alpha if self.grid.pruned or not self.training else 0.0

    def _render_packed(
        self,
        samples: packed.PackedSamples,
        positions: Tensor,
        located: Int[Tensor, "c l"],
        ray_lods: Int[Tensor, "r"],
        directions: Tensor,
    ) -> Dict[str, Tensor]:
        """Composite packed samples: a density pass without gradients ends each ray early (and drops samples
        below the alpha threshold), then the samples kept are evaluated (with gradients when training) and
        composited. ``positions`` and ``located`` (their cells) are per packed sample, ``ray_lods`` and
        ``directions`` per ray."""
        skipped_alpha = self._skipped_alpha()
        fused = self.grid.fused and compositing.available(positions)
        with torch.no_grad():
            density, geo, _ = self.field.density_at(positions, ray_lods[samples.ray_indices], located)
            find_visible = compositing.visible if fused else packed.visible
            keep, in_front = find_visible(density[:, 0], samples, self.config.early_stop_eps, skipped_alpha)
        kept = torch.nonzero(keep).squeeze(-1)
        samples = samples[kept]
        if torch.is_grad_enabled():
            density, geo, _ = self.field.density_at(positions[kept], ray_lods[samples.ray_indices], located[kept])
        else:
            density, geo = density[kept], geo[kept]
        rgb = self.field.rgb_at(geo, directions[samples.ray_indices])
        if fused:
            return self._composited(compositing.composite(density[:, 0], rgb, samples))
        if torch.is_grad_enabled():
            weights = packed.render_weights(density[:, 0], samples)[:, None]
        else:  # unless samples were skipped, the kept ones are a prefix of each ray with the first pass's transmittance
            in_front = None if skipped_alpha > 0 else in_front[kept]
            weights = packed.render_weights(density[:, 0], samples, in_front)[:, None]
        num_rays, ray_indices = samples.num_rays, samples.ray_indices
        accumulation = packed.accumulate(weights, ray_indices, num_rays)
        midpoints = (samples.starts + samples.ends)[:, None] / 2
        depth = packed.accumulate(weights * midpoints, ray_indices, num_rays) / accumulation.clamp_min(1e-10)
        counts = packed.accumulate(torch.ones_like(weights), ray_indices, num_rays)  # no sync, as bincount has
        return {
            "rgb": self.renderer_rgb(rgb=rgb, weights=weights, ray_indices=ray_indices, num_rays=num_rays),
            "accumulation": accumulation,
            "depth": depth,
            "samples_per_ray": counts,
        }

    def _composited(self, sums: Float[Tensor, "r 6"]) -> Dict[str, Tensor]:
        """The outputs of :func:`compositing.composite`'s per-ray sums, the colour blended with the background as
        nerfstudio's RGBRenderer blends it (in eval: clamped to [0, 1])."""
        rgb, accumulation, depth_sum = sums[:, :3], sums[:, 3:4], sums[:, 4:5]
        background = self.renderer_rgb.background_color
        if renderers.BACKGROUND_COLOR_OVERRIDE is not None:
            background = renderers.BACKGROUND_COLOR_OVERRIDE
        if background == "last_sample":
            raise NotImplementedError("background_color 'last_sample' needs dense samples (sampling='dense')")
        if background != "random":  # nerfstudio returns a random background's colour unblended, as if black
            # one colour, broadcast over the rays: nerfstudio's shape=rgb.shape expands it on the host and copies a
            # [rays, 3] tensor to the device every step (a copy that also wakes every thread of torch's CPU pool)
            colour = RGBRenderer.get_background_color(background, shape=(3,), device=rgb.device)
            rgb = rgb + colour * (1.0 - accumulation)
        if not self.training:
            rgb = rgb.clamp(0.0, 1.0)
        return {
            "rgb": rgb,
            "accumulation": accumulation,
            "depth": depth_sum / accumulation.clamp_min(1e-10),
            "samples_per_ray": sums[:, 5:].detach(),
        }

    def _render_dense(
        self,
        ray_samples: RaySamples,
        positions: Tensor,
        ray_lods: Int[Tensor, "r"],
        candidate: Tensor,
        finest_lod: int,
    ) -> Dict[str, Tensor]:
        """The reference path: every occupied candidate evaluated, composited in a [rays, samples] layout."""
        num_rays, num_samples = ray_samples.shape[:2]
        index = torch.nonzero(candidate).squeeze(-1)
        located = self.grid.locate(positions[index], finest_lod + 1)
        density, geo, _ = self.field.density_at(positions[index], ray_lods[index // num_samples], located)
        directions = ray_samples.frustums.directions.reshape(-1, 3)[index]
        rgb = self.field.rgb_at(geo, directions)

        total = num_rays * num_samples
        density_all = torch.zeros(total, 1, device=positions.device, dtype=density.dtype).index_put((index,), density)
        skipped_alpha = self._skipped_alpha()
        if skipped_alpha > 0:  # skipped samples composite as empty space, as the packed path drops them
            alpha = packed.opacity(density_all * ray_samples.deltas.reshape(-1, 1))
            density_all = torch.where(alpha < skipped_alpha, 0.0, density_all)
        rgb_all = torch.zeros(total, 3, device=positions.device, dtype=rgb.dtype).index_put((index,), rgb)
        weights = ray_samples.get_weights(density_all.reshape(num_rays, num_samples, 1))
        return {
            "rgb": self.renderer_rgb(rgb=rgb_all.reshape(num_rays, num_samples, 3), weights=weights),
            "accumulation": self.renderer_accumulation(weights=weights),
            "depth": self.renderer_depth(weights=weights, ray_samples=ray_samples),
            "samples_per_ray": candidate.reshape(num_rays, num_samples).sum(dim=-1, keepdim=True).float(),
        }

    def get_metrics_dict(self, outputs, batch) -> Dict[str, Tensor]:
        image = batch["image"].to(outputs["rgb"].device)
        image = self.renderer_rgb.blend_background(image)
        metrics = {
            "psnr": psnr(outputs["rgb"], image),
            "samples_per_ray": outputs["samples_per_ray"].mean(),
        }
        self.camera_optimizer.get_metrics_dict(metrics)
        return metrics

    def get_loss_dict(self, outputs, batch, metrics_dict=None) -> Dict[str, Tensor]:
        image = batch["image"].to(outputs["rgb"].device)
        pred, gt = self.renderer_rgb.blend_background_for_loss_computation(
            pred_image=outputs["rgb"], pred_accumulation=outputs["accumulation"], gt_image=image
        )
        loss_dict = {"rgb_loss": self.rgb_loss(gt, pred)}
        if self.config.index_rate_weight > 0 and self.training:
            stores = [level.features for level in self.grid.levels if isinstance(level.features, CodebookFeatures)]
            stores = [s for s in stores if s.num_rows > 0 and not s.in_float_warmup and not s.frozen]
            if stores:
                loss_dict["index_rate"] = self.config.index_rate_weight * self.grid.index_bits_per_row(stores)
        self.camera_optimizer.get_loss_dict(loss_dict)
        if self.training:
            self._last_loss = sum(loss.detach() for loss in loss_dict.values())
        return loss_dict

    def get_image_metrics_and_images(
        self, outputs: Dict[str, Tensor], batch: Dict[str, Tensor]
    ) -> Tuple[Dict[str, float], Dict[str, Tensor]]:
        image = self.renderer_rgb.blend_background(batch["image"].to(outputs["rgb"].device))
        rgb = outputs["rgb"]
        gt_nchw = torch.moveaxis(image, -1, 0)[None]
        rgb_nchw = torch.moveaxis(rgb, -1, 0)[None].clamp(0, 1)
        from torchmetrics.functional import structural_similarity_index_measure

        metrics = {
            "psnr": float(psnr(rgb_nchw, gt_nchw)),
            "ssim": float(structural_similarity_index_measure(rgb_nchw, gt_nchw)),  # type: ignore[arg-type]
            "stored_kib": stored_kib(self),
        }
        if self.lpips is not None:
            metrics["lpips"] = float(self.lpips(gt_nchw, rgb_nchw).item())
        images = {
            "img": torch.cat([image, rgb], dim=1),
            "accumulation": colormaps.apply_colormap(outputs["accumulation"]),
            "depth": colormaps.apply_depth_colormap(outputs["depth"], accumulation=outputs["accumulation"]),
        }
        return metrics, images


def psnr(prediction: Tensor, target: Tensor) -> Tensor:
    """Peak signal-to-noise ratio of images in [0, 1], in dB."""
    return -10.0 * torch.log10(torch.mean((prediction - target) ** 2))


def fisher_importance(optimizers: Optional[Optimizers], rows: Parameter) -> Optional[Float[Tensor, "m"]]:
    """Per row of ``rows``, Adam's running mean of the squared gradient summed over the row's columns: the diagonal
    Fisher information of the row, i.e. how much the loss feels a change of it. None without such state."""
    for optimizer in [] if optimizers is None else optimizers.optimizers.values():
        state = optimizer.state.get(rows, {})
        if torch.is_tensor(state.get("exp_avg_sq")) and state["exp_avg_sq"].shape == rows.shape:
            return state["exp_avg_sq"].float().sum(dim=-1)
    return None


def _remap_optimizer_state(optimizers, remap: RowRemap) -> None:
    """Point optimisers at the replaced row parameters; carry moments of surviving rows over.

    A replaced parameter's rows are released (emptied) before its moments are moved: at the peak the old and the new
    rows of one table exist, and one moment in two versions, not all of them twice."""
    for old, new in remap.swaps:
        follows_rows = new.shape[0] == remap.source_rows.shape[0]  # else a new parameter whose state starts afresh
        states = []
        for optimizer in optimizers:
            owned = any(p is old for group in optimizer.param_groups for p in group["params"])
            for group in optimizer.param_groups:
                group["params"] = [new if p is old else p for p in group["params"]]
            if owned and isinstance(optimizer, InBackwardAdam):
                optimizer.adopt(new)
            state = optimizer.state.pop(old, None)
            if state and follows_rows:
                states.append((optimizer, state))
        old.data = old.data.new_empty((0, *old.shape[1:]))
        for optimizer, state in states:
            for key, value in state.items():
                if torch.is_tensor(value) and value.dim() > 0 and value.shape[1:] == new.shape[1:]:
                    state[key] = rows_from(value, remap.source_rows)  # the old moment is freed before the next
            optimizer.state[new] = state


__all__ = ["VQADModel", "VQADModelConfig", "fisher_importance"]
