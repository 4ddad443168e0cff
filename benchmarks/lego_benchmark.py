"""Side-by-side benchmark on a Blender scene: nerfstudio's tensorf, vqad and vqad-float (and, on request,
vqad-hash against its random-index twin, and tensorf-compressed at several rate weights). A scene in
nerfstudio's own format (a transforms.json, e.g. ``vqad-demo-scene DIR --background textured`` for an
unbounded scene) is read with nerfstudio's parser instead.

Every method trains for the same wall-clock budget (nerfstudio's Trainer, stopped by a callback when
the budget is spent), each in a fresh process of its own as ns-train runs it (--no-row-processes: all
in this one), then renders the eval split at full resolution.
Models of this package are then written as compressed files (in memory), decoded again, and
evaluated per level of detail; the time from file bytes to the first rendered frame is measured.
The last thing printed is the tables. Run on one GPU:

    python benchmarks/lego_benchmark.py --data ../shared/data/blender-lego-400 --budget-s 120

``--plane-lambdas`` compresses the tensorf run just trained (its checkpoint, no retraining) with
tensorf-compressed once per rate weight, each for ``--plane-steps`` steps, and adds a rate-distortion
table and plot.

tensorf builds LPIPS (a download) in its constructor; models are built inside
``vqad_nerfstudio.compat.offline_lpips``, so the comparison runs offline. LPIPS is not part of the table.
"""

from __future__ import annotations

import ast
import collections
import copy
import gc
import json
import math
import os
import re
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Set, Tuple, TypeVar

import torch
import tyro


@dataclass
class BenchmarkConfig:
    """Options of the benchmark."""

    data: Path
    """Blender-format scene (transforms_{train,val,test}.json), or a nerfstudio-format one (transforms.json)."""
    methods: Tuple[str, ...] = ("tensorf", "vqad", "vqad-float")
    """nerfstudio method names to compare; METHOD@TAG runs METHOD again under another name (for overrides);
    METHOD@ref runs vqad or vqad-float on the PyTorch reference path (see REFERENCE_PATH) and adds ratio lines
    (METHOD@ref2, @ref3, ...: repeats of it, e.g. to measure its spread);
    nerfacto runs with nerfstudio's object-scene settings on Blender scenes (see OBJECT_SCENE_SETTINGS);
    instant-ngp-bounded (nerfacc) runs with nerfacc's CUDA extension patched for CUDA 13 in this process only
    (benchmarks/patched_nerfacc.py); tensorf-compressed@RATE (e.g. @0.002, or a variant @0.002f8 for overrides)
    compresses the call's tensorf run at that rate weight, as --plane-lambdas does."""
    budget_s: float = 120.0
    """Wall-clock training budget per method, in seconds."""
    max_steps: int = 0
    """Also stop each method after this many training steps (0: the wall-clock budget alone), e.g. to compare
    methods of different speed at equal steps. The runs' own step-based settings do not scale with it (their
    length is open-ended, for the budget): set vqad's warm-up with --overrides, e.g.
    vqad.pipeline.model.index_warmup_steps 400 for 700 steps, or a run may end before its indices exist."""
    output_dir: Path = Path("outputs/benchmark")
    """Where runs, checkpoints and results.json go."""
    max_eval_views: int = 25
    """Eval views rendered per method (from the test split)."""
    eval_chunk_sizes: Tuple[int, ...] = ()
    """Also time the eval views with these rays per chunk (the model's eval_num_rays_per_chunk; reported as
    eval_rays_per_s_by_chunk)."""
    lod_eval_views: int = 5
    """Eval views rendered per level of detail of each decoded compressed file (0: skip per-LOD evaluation)."""
    keep_files: bool = False
    """Also write each method's compressed file to OUTPUT_DIR/METHOD.vqnf (@ written as -), e.g. to decode it
    elsewhere with `vqad-export decode`."""
    hash_sizes: Tuple[int, ...] = ()
    """Also run vqad-hash (learned indices) and vqad-hash-random at these sizes of the random twin's table
    (log2 entries per level), each pair matched in stored bytes; adds a table and hash_comparison.png, and
    times the two encodings alone (forward and backward on --encoding-points random points)."""
    encoding_points: int = 200_000
    """Points per forward/backward pass when timing the encodings of --hash-sizes."""
    encoding_masked_share: float = 0.5
    """Share of those points placed at the origin with a zero gradient (samples a field masks out)."""
    plane_lambdas: Tuple[float, ...] = ()
    """Also compress the tensorf run (tensorf must be in --methods) with tensorf-compressed at these rate weights;
    adds a rate-distortion table and planes_rd.png."""
    plane_steps: int = 2000
    """Compression steps of each tensorf-compressed run (fixed steps, not the time budget)."""
    profile: Tuple[str, ...] = ()
    """Methods (as named in the run, e.g. vqad-hash@14) whose training steps --profile-from .. +4 run under torch's
    profiler and Python's cProfile; the busiest operators (by GPU and by CPU time) and Python functions are printed
    and written to METHOD.profile.txt (@ written as -), with torch's trace in METHOD.profile.trace.json.gz (for
    chrome://tracing or Perfetto); one eval view is rendered again under the profilers into METHOD.eval-profile.txt."""
    profile_from: int = 5
    """First profiled training step (after the first steps' one-off costs; later steps see the pruned grid)."""
    network_bits: Optional[int] = None
    """Bits per decoder-MLP weight in the compressed files of vqad and vqad-float (16, or 2..8 quantised; None:
    each run's own --pipeline.model.network-bits, as ns-export writes it); the other methods' files keep fp16
    networks."""
    codebook_bits: Optional[int] = None
    """Bits per codebook value in the compressed files of vqad (16, or 2..8 rounded per feature channel; None: each
    run's own --pipeline.model.codebook-bits, as ns-export writes it)."""
    kernel_warmup_steps: int = 100
    """On CUDA, train the first run of each base method (vqad, vqad-float, ...) and of each of its kernel shapes
    (:data:`KERNEL_SHAPE_SETTINGS`, e.g. other index bits) this many steps untimed before its clock starts (a run
    this short passes its warm-up, prunings and quantisation at scaled steps), so that the Triton kernels it uses are
    compiled and cached and no row pays the call's compilation; 0: off."""
    schedule_steps: int = 0
    """Stretch (or shrink) every method's learning-rate schedules so that its longest one decays over this many steps
    (the others in proportion; 0: the methods' own, e.g. 10000 steps for vqad on a GPU): to fit the schedules to
    budgets shorter or longer than a default run, e.g. 3000 for 100 s of vqad."""
    row_processes: bool = True
    """Run each row (its kernel warm-up, training, evaluation and files) in a process of its own, as ``ns-train`` runs
    one trainer per process, so that nothing a row leaves behind in a process reaches the next row (in one process
    the same vqad-float stepped 1.8x slower last in a call than first; docs/benchmarks.md). Each row then pays its own
    untimed kernel warm-up (Triton's disk cache keeps it short after the first) and a few seconds of start-up; False:
    every row in this process, the warm-up once per kernel shape."""
    overrides: Dict[str, str] = field(default_factory=dict)
    """Extra per-method settings as METHOD.attr.path=value (e.g. vqad.pipeline.model.index_bits=6); METHOD may be a
    tagged name (vqad-hash@12) or a base name for all its tags."""


REFERENCE_PATH = {
    "pipeline.model.sampling": "dense",
    "pipeline.model.fused_kernels": "False",
    "pipeline.model.tf32": "False",
    "pipeline.datamanager.train_num_rays_per_batch": "8192",
    "pipeline.model.eval_num_rays_per_chunk": "16384",
    "pipeline.datamanager.device_batches": "False",
}
"""What a ``METHOD@ref`` row changes (before any --overrides): the plain-PyTorch reference path of vqad and
vqad-float, at the batch and chunk sizes it used before the fast path, with nerfstudio's pixel sampling and ray
generation on the CPU (and Adam neither fused nor applied in the backward pass: see ``_trainer_config``)."""

REFERENCE_TAG = re.compile(r"ref\d*")
"""Tags of reference rows: ``METHOD@ref`` and its repeats ``METHOD@ref2``, ``METHOD@ref3``, ..."""


OBJECT_SCENE_SETTINGS = {
    "nerfacto": {
        "pipeline.model.background_color": "white",
        "pipeline.model.disable_scene_contraction": "True",
        "pipeline.model.proposal_initial_sampler": "uniform",
        "pipeline.model.near_plane": "2.0",
        "pipeline.model.far_plane": "6.0",
        "pipeline.model.use_average_appearance_embedding": "False",
        "pipeline.model.distortion_loss_mult": "0.0",
        "pipeline.model.camera_optimizer.mode": "off",
    },
    "instant-ngp-bounded": {"pipeline.model.background_color": "white"},  # Blender views are composited on white
}
"""Settings nerfstudio's methods get on a Blender scene (before any --overrides): nerfacto as nerfstudio's
documentation runs it on the NeRF-synthetic scenes (with tinycudann's hash grid and MLPs when it is installed,
nerfstudio's PyTorch ones otherwise) and instant-ngp-bounded on white: the speed and quality anchors."""


def _apply_override(config, path: str, value: str) -> None:
    """Set ``config``'s field at the dotted ``path`` from the command-line text ``value``, parsed as the field's
    current value's type (a field that is None, e.g. an optional level, takes a Python literal: ``-1``, ``0.5``)."""
    target = config
    *parents, leaf = path.split(".")
    for name in parents:
        target = target[name] if isinstance(target, dict) else getattr(target, name)
    current = getattr(target, leaf)
    if isinstance(current, bool):
        parsed = value.lower() in ("1", "true", "yes")
    elif isinstance(current, tuple):
        parsed = tuple(type(current[0])(v) for v in value.split(",")) if current else tuple(value.split(","))
    elif current is None:
        parsed = ast.literal_eval(value)
    else:
        parsed = type(current)(value)
    setattr(target, leaf, parsed)


def _trainer_config(method: str, bench: BenchmarkConfig, tensorf_checkpoint: Optional[Path] = None):
    from nerfstudio.configs.method_configs import all_methods
    from nerfstudio.data.dataparsers.blender_dataparser import BlenderDataParserConfig
    from nerfstudio.data.dataparsers.nerfstudio_dataparser import NerfstudioDataParserConfig

    from vqad_nerfstudio.data.scene_format import is_blender_scene

    base, _, tag = method.partition("@")
    config = copy.deepcopy(all_methods[base])
    size = re.match(r"\d+", tag)  # vqad-hash@14, or a variant of that size such as vqad-hash@14s
    if base in ("vqad-hash", "vqad-hash-random") and size:  # a size of the learned-vs-random comparison
        from vqad_nerfstudio.method_configs.vqad_hash import hash_model_config

        mode = "random" if base == "vqad-hash-random" else "learned"
        config.pipeline.model = hash_model_config(mode, int(size.group()))
    if base == "tensorf-compressed":  # one point of the rate-distortion curve, e.g. @0.002 or a variant @0.002f8
        rate = re.match(r"\d+(\.\d*)?(e-?\d+)?", tag)
        if rate is None:
            raise SystemExit(f"{method}: tensorf-compressed@TAG starts with its rate weight, e.g. @0.002 or @0.002f8")
        config.pipeline.model.tensorf_checkpoint = tensorf_checkpoint
        config.pipeline.model.rate_lambda = float(rate.group())
        config.pipeline.model.compression_steps = bench.plane_steps
    blender = is_blender_scene(bench.data)
    config.pipeline.datamanager.dataparser = BlenderDataParserConfig() if blender else NerfstudioDataParserConfig()
    config.pipeline.datamanager.data = bench.data
    schedulers = [group.get("scheduler") for group in config.optimizers.values()]
    schedulers = [scheduler for scheduler in schedulers if hasattr(scheduler, "max_steps")]
    if bench.schedule_steps and schedulers:
        scale = bench.schedule_steps / max(scheduler.max_steps for scheduler in schedulers)
        for scheduler in schedulers:
            scheduler.max_steps = max(1, round(scheduler.max_steps * scale))
    config.output_dir = bench.output_dir
    config.experiment_name = "bench"
    config.timestamp = method.replace("@", "-")
    config.max_num_iterations = 10**7
    config.steps_per_eval_batch = config.steps_per_eval_image = config.steps_per_eval_all_images = 10**9
    config.steps_per_save = 10**9
    config.vis = "tensorboard"
    config.machine.device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if blender:
        for path, value in OBJECT_SCENE_SETTINGS.get(base, {}).items():
            _apply_override(config, path, value)
    if REFERENCE_TAG.fullmatch(tag):
        if not hasattr(config.pipeline.model, "sampling"):
            raise SystemExit(f"{method}: only vqad and vqad-float have a reference path (@ref)")
        for path, value in REFERENCE_PATH.items():
            _apply_override(config, path, value)
        for group in config.optimizers.values():  # torch's plain Adam: not fused, gradients stored
            for flag in ("fused", "in_backward"):
                if hasattr(group["optimizer"], flag):
                    setattr(group["optimizer"], flag, False)
    for key, value in bench.overrides.items():
        for name in (method, base):  # METHOD@TAG.path, or METHOD.path for every tag of METHOD
            if key.startswith(name + "."):
                _apply_override(config, key[len(name) + 1 :], value)
                break
    return config


KERNEL_SHAPE_SETTINGS = ("index_bits", "base_index_bits", "feature_dim", "num_levels", "fused_decoders")
"""Model settings that change which Triton kernels run or the shapes they are compiled for (codewords per level,
channels, levels, the fused decoders): a run differing from every warmed-up run of its base method in one of them
is warmed up too."""


def _kernel_shapes(method: str, bench: BenchmarkConfig) -> Tuple:
    """What decides which Triton kernels ``method`` compiles: its base method and :data:`KERNEL_SHAPE_SETTINGS`."""
    model = _trainer_config(method, bench).pipeline.model
    return (method.partition("@")[0],) + tuple(getattr(model, name, None) for name in KERNEL_SHAPE_SETTINGS)


def _check_method_names(methods: List[str]) -> None:
    """``SystemExit`` naming the methods (before any ``@TAG``) that nerfstudio does not know, before any row runs."""
    from nerfstudio.configs.method_configs import all_methods

    unknown = [method for method in methods if method.partition("@")[0] not in all_methods]
    if unknown:
        raise SystemExit(f"unknown methods {', '.join(unknown)}; nerfstudio knows {', '.join(sorted(all_methods))}")


def _kernel_warm_ups(methods: List[str], bench: BenchmarkConfig) -> List[bool]:
    """Whether each row of ``methods`` (on CUDA) starts with an untimed kernel warm-up: every row in a process of its
    own (``bench.row_processes``), else the first row of each kernel shape (see :func:`_kernel_shapes`); never a
    fixed-step row or with ``bench.kernel_warmup_steps`` 0."""
    warmed_up: Set[Tuple] = set()  # kernel shapes compiled in this process
    warm_ups = []
    for method in methods:
        if bench.kernel_warmup_steps == 0 or _fixed_steps(method):
            warm_ups.append(False)
            continue
        shapes = _kernel_shapes(method, bench)
        warm_ups.append(shapes not in warmed_up)
        if not bench.row_processes:
            warmed_up.add(shapes)
    return warm_ups


def _fixed_steps(method: str) -> bool:
    """Whether ``method`` trains for a fixed number of steps rather than the time budget (tensorf-compressed, which
    compresses the call's tensorf checkpoint)."""
    return method.startswith("tensorf-compressed")


def _set_up_trainer(config):
    """``config``'s trainer, set up offline (see ``vqad_nerfstudio.compat.offline_lpips``) from the random state
    ``ns-train`` starts from (``config.machine.seed`` for Python, numpy and torch) and with only its own event
    writers (:func:`_close_event_writers`), whatever ran before it in the call."""
    import random

    import numpy as np

    from vqad_nerfstudio.compat import offline_lpips

    _close_event_writers()
    random.seed(config.machine.seed)
    np.random.seed(config.machine.seed)
    torch.manual_seed(config.machine.seed)
    trainer = config.setup(local_rank=0, world_size=1)
    with offline_lpips():
        trainer.setup()
    return trainer


def _close_event_writers() -> None:
    """Close and forget the event writers of the trainers set up before in this process.

    nerfstudio keeps them in one module-level list that every trainer's set-up appends to (a console and a
    tensorboard writer each; ``ns-train`` sets up one trainer per process), and every logging step writes to all of
    them: without this, each row of a call logged once more than the row before it.
    """
    from nerfstudio.utils import writer

    for event_writer in writer.EVENT_WRITERS:
        if isinstance(event_writer, writer.TensorboardWriter):
            event_writer.tb_writer.close()
    writer.EVENT_WRITERS.clear()


def _compile_kernels(method: str, bench: BenchmarkConfig) -> None:
    """Train ``method`` for ``bench.kernel_warmup_steps`` steps, untimed, in a scratch directory and without the
    end-of-run checkpoint and size report (see ``BenchmarkConfig.kernel_warmup_steps``)."""
    from nerfstudio.engine.callbacks import TrainingCallbackLocation

    config = _trainer_config(method, bench)
    config.output_dir = bench.output_dir / "kernel-warmup"
    config.max_num_iterations = bench.kernel_warmup_steps  # its warm-up and prunings scale with the run's length
    trainer = _set_up_trainer(config)
    trainer.save_checkpoint = lambda step: None
    trainer.callbacks = [c for c in trainer.callbacks if TrainingCallbackLocation.AFTER_TRAIN not in c.where_to_run]
    trainer.train()


def _train(method: str, bench: BenchmarkConfig, tensorf_checkpoint: Optional[Path] = None):
    from nerfstudio.engine.callbacks import TrainingCallback, TrainingCallbackLocation

    fixed_steps = _fixed_steps(method)
    config = _trainer_config(method, bench, tensorf_checkpoint)
    held_before = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0  # earlier runs': not this one's
    trainer = _set_up_trainer(config)

    step_ends: List[float] = []

    def stop_when_spent(step: int) -> None:
        step_ends.append(time.perf_counter())
        spent = step_ends[-1] - start >= bench.budget_s or 0 < bench.max_steps <= step + 1
        if not fixed_steps and spent:
            trainer.stop_training = True

    trainer.callbacks.append(TrainingCallback([TrainingCallbackLocation.AFTER_TRAIN_ITERATION], stop_when_spent))
    recent_train_metrics = _record_train_metrics(trainer.pipeline)
    profiler = None
    if method in bench.profile:
        path = bench.output_dir / f"{method.replace('@', '-')}.profile.txt"
        profiled = range(bench.profile_from, bench.profile_from + 5)
        callbacks, profiler = _profiled_steps(path, profiled)
        trainer.callbacks += callbacks
        pruned = sorted(set(getattr(trainer.pipeline.model.config, "prune_steps", ())) & set(profiled))
        if pruned:  # a pruning evaluates the field at every cell's corners: it would dominate the profile
            print(f"{method}: the profiled steps {profiled[0]}..{profiled[-1]} include a pruning (step "
                  f"{pruned[0]}); --profile-from past it profiles training steps alone")  # fmt: skip
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    threads_before = _thread_cpu_seconds()
    start, cpu_start = time.perf_counter(), time.process_time()
    trainer.train()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    cpu_seconds = time.process_time() - cpu_start
    threads = _busiest_threads(threads_before, _thread_cpu_seconds())
    peak = (torch.cuda.max_memory_allocated() - held_before) / 2**20 if torch.cuda.is_available() else float("nan")
    if held_before:
        print(f"{method}: {held_before / 2**20:.0f} MiB were allocated before its setup (not counted in its peak)")
    steps = trainer.step + 1
    checkpoint = max(trainer.checkpoint_dir.glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    train_metrics = _mean_train_metrics(recent_train_metrics)
    train_metrics["cpu_ms_per_step"] = 1000 * cpu_seconds / steps  # the process's CPU time, all its threads
    train_metrics["busiest_threads"] = threads
    if profiler is not None and profiler.summary:  # per profiled step: device ms, kernel launches, host waits
        train_metrics["profiled_step"] = profiler.summary
        print(f"{method}: a profiled step: " + ", ".join(f"{k} {v:.1f}" for k, v in profiler.summary.items()))
    step_seconds = [end - begin for begin, end in zip([start] + step_ends[:-1], step_ends)]
    return trainer, steps, seconds, peak, checkpoint, train_metrics, step_seconds


def _thread_cpu_seconds() -> Dict[int, Tuple[str, float]]:
    """Each thread of this process (Linux: /proc/self/task) as thread id -> (name, CPU seconds so far), the main
    thread's name marked "(main)"; empty where /proc is not there."""
    import threading

    ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    main = threading.main_thread().native_id
    threads = {}
    for task in Path("/proc/self/task").glob("*"):
        try:
            name = (task / "comm").read_text().strip() + (" (main)" if int(task.name) == main else "")
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended meanwhile
            continue
        threads[int(task.name)] = (name, (int(fields[11]) + int(fields[12])) / ticks)  # utime + stime
    return threads


def _busiest_threads(
    before: Dict[int, Tuple[str, float]], after: Dict[int, Tuple[str, float]], count: int = 6
) -> List[Tuple[str, float]]:
    """The ``count`` threads that spent the most CPU time between two :func:`_thread_cpu_seconds` readings, as (name,
    seconds): which threads beside the one that launches the kernels keep cores busy during a row."""
    spent = [(name, seconds - before.get(tid, (name, 0.0))[1]) for tid, (name, seconds) in after.items()]
    return sorted(spent, key=lambda thread: -thread[1])[:count]


LATE_SHARE = 0.25
"""The late step time is the mean over this last share of a run's steps (its warm-up and prunings are behind it)."""

PAUSE_FACTOR = 10.0
"""A step that took more than this many times the run's median step is a pause (the warm-up's k-means, a pruning,
a first call's set-up): listed apart and left out of the late step time, which measures the steady steps."""


def _pauses(step_seconds: List[float]) -> List[Tuple[int, float]]:
    """The (step, seconds) of each step longer than :data:`PAUSE_FACTOR` times the median step (``step_seconds``:
    each step's wall-clock time, callbacks included)."""
    if not step_seconds:
        return []
    limit = PAUSE_FACTOR * statistics.median(step_seconds)
    return [(step, seconds) for step, seconds in enumerate(step_seconds) if seconds > limit]


def _late_ms_per_step(step_seconds: List[float]) -> float:
    """Mean wall-clock milliseconds per step over the last :data:`LATE_SHARE` of the steps, pauses left out (see
    :func:`_pauses`)."""
    paused = {step for step, _ in _pauses(step_seconds)}
    first = int(len(step_seconds) * (1 - LATE_SHARE))
    late = [seconds for step, seconds in enumerate(step_seconds[first:], first) if step not in paused]
    return 1000 * statistics.fmean(late) if len(late) >= 2 else math.nan


TRAIN_METRIC_STEPS = 100
"""The train metrics reported are means over the training batches of this many last steps."""

TRAIN_METRICS = {"psnr": "train_psnr", "samples_per_ray": "train_samples_per_ray"}
"""Training metrics a row reports (the model's metric name -> the row's key) where the model computes them. Next to
the test PSNR, the train PSNR tells a model that cannot fit the views from one that does not generalise; the
samples per ray (evaluated after empty-space skipping and early termination) explain step times."""


def _record_train_metrics(pipeline) -> Dict[str, collections.deque]:
    """Keep the :data:`TRAIN_METRICS` of the last :data:`TRAIN_METRIC_STEPS` training batches (as tensors: no sync
    per step)."""
    recent = {name: collections.deque(maxlen=TRAIN_METRIC_STEPS) for name in TRAIN_METRICS}
    get_train_loss_dict = pipeline.get_train_loss_dict

    def recording(step: int):
        outputs, losses, metrics = get_train_loss_dict(step=step)
        for name, values in recent.items():
            if name in metrics:
                values.append(torch.as_tensor(metrics[name]).detach().float())
        return outputs, losses, metrics

    pipeline.get_train_loss_dict = recording
    return recent


def _mean_train_metrics(recent: Dict[str, collections.deque]) -> Dict[str, float]:
    """The row entries of :func:`_record_train_metrics`' values (NaN for a metric the model did not report)."""
    return {
        TRAIN_METRICS[name]: float(torch.stack(list(values)).mean()) if values else math.nan
        for name, values in recent.items()
    }


ENCODING_VARIANTS = ("learned", "random", "random-sparse")
"""Encodings the timing compares: learned indices, nerfstudio's torch random hash grid, and the same grid with the
sparse backward pass (--pipeline.model.hash-grid-backward sparse)."""


def _time_encodings(size: int, points: int, masked_share: float, repeats: int = 5) -> Dict[str, float]:
    """Milliseconds and peak MiB of one forward and backward pass of vqad-hash's encodings at the matched size
    ``size`` (the field's encoding alone). As nerfacto's fields do for samples outside the scene box, a
    ``masked_share`` of the positions is set to the origin and gets a zero gradient."""
    from vqad_nerfstudio.method_configs.vqad_hash import hash_model_config

    from vqad_nerfstudio.encodings.torch_hash_grid import sparse_backward_hash_grids
    from vqad_nerfstudio.models.learned_index_nerfacto import encoding_of

    device = "cuda" if torch.cuda.is_available() else "cpu"
    kept = (torch.rand(points, 1, device=device) >= masked_share).float()
    positions = torch.rand(points, 3, device=device) * kept
    timing: Dict[str, float] = {"size": size}
    for variant in ENCODING_VARIANTS:
        print(f"timing the {variant} encoding at 2^{size} on {points} points", flush=True)
        encoding = encoding_of(hash_model_config(variant.split("-")[0], size)).to(device)
        if variant.endswith("sparse"):
            sparse_backward_hash_grids(encoding)
        for _ in range(2):  # warm-up
            (encoding(positions) * kept).square().sum().backward()
        _sync()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for _ in range(repeats):
            (encoding(positions) * kept).square().sum().backward()
        _sync()
        timing[f"{variant}_ms"] = 1000 * (time.perf_counter() - start) / repeats
        peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else math.nan
        timing[f"{variant}_peak_mib"] = peak
        del encoding
    return timing


def _encoding_timing_table(timings: List[Dict[str, float]], points: int, masked_share: float) -> str:
    lines = [
        f"\nThe field's encoding alone, one forward and backward pass on {points} points ({masked_share:.0%} of them "
        "at the origin with zero gradient, as a field masks samples outside its box):",
        "| random table | learned ms | random ms | random, sparse backward, ms | learned / random "
        "| peak MiB learned / random / sparse |",
        "|---|---|---|---|---|---|",
    ]
    for t in timings:
        learned, random, sparse = (t[f"{v}_ms"] for v in ENCODING_VARIANTS)
        peaks = " / ".join(f"{t[f'{v}_peak_mib']:.0f}" for v in ENCODING_VARIANTS)
        lines.append(
            f"| 2^{t['size']} | {learned:.1f} | {random:.1f} | {sparse:.1f} | {learned / random:.2f} | {peaks} |"
        )
    return "\n".join(lines)


_LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx")
"""Runtime and driver calls that launch a kernel (PyTorch's, and Triton's)."""
_HOST_WAITS = ("cudaStreamSynchronize",)
"""Runtime calls in which the host waits for the device inside a step (``nonzero``, ``.item()``, copies to the host)."""


def _profile_summary(averages: Sequence[Any], steps: int) -> Dict[str, float]:
    """Per step of a profiled stretch of ``steps`` steps, from torch's profiler's ``key_averages()``: the device's
    busy time (its kernels' time, in ms), the kernel launches and the host's waits for the device. Against the
    step's wall time, the device's time tells whether a step is bound by the device or by the host. Only the
    kernels' own events count: the operators that launched them report the same time again (from ``e111413`` to
    ``965288e`` this summed both: twice the device's time)."""
    from torch.autograd import DeviceType

    device_us = sum(event.self_device_time_total for event in averages if event.device_type != DeviceType.CPU)
    launches = sum(event.count for event in averages if event.key in _LAUNCHES)
    waits = sum(event.count for event in averages if event.key in _HOST_WAITS)
    return {"device_ms": device_us / 1000 / steps, "launches": launches / steps, "host_waits": waits / steps}


class _Profiler:
    """torch's profiler and Python's cProfile over a stretch of work; :meth:`stop` prints and saves the busiest
    operators (by GPU and by CPU time) and Python functions, and keeps :func:`_profile_summary` in ``summary``."""

    def __init__(self, path: Path, title: str) -> None:
        import cProfile

        from torch.profiler import ProfilerActivity, profile

        self.path, self.title = path, title
        self.cuda = torch.cuda.is_available()
        self.torch_profiler = profile(
            activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        )
        self.python_profiler = cProfile.Profile()
        self.summary: Dict[str, float] = {}

    def start(self) -> None:
        _sync()
        self.torch_profiler.start()
        self.python_profiler.enable()

    def stop(self, steps: int = 1) -> None:
        import io
        import pstats

        _sync()
        self.python_profiler.disable()
        self.torch_profiler.stop()
        averages = self.torch_profiler.key_averages()
        self.summary = _profile_summary(averages, steps)
        tables = [averages.table(sort_by="self_cpu_time_total", row_limit=30)]
        if self.cuda:
            tables.insert(0, averages.table(sort_by="self_device_time_total", row_limit=25))
        python = io.StringIO()
        stats = pstats.Stats(self.python_profiler, stream=python)
        stats.sort_stats("cumulative").print_stats(45)
        stats.sort_stats("tottime").print_stats(60)
        text = "\n".join(tables) + "\n" + python.getvalue()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(text)
        self.torch_profiler.export_chrome_trace(str(self.path.with_suffix(".trace.json.gz")))  # gzipped by torch
        print(f"\n{self.title}:\n{text}", flush=True)


def around_steps(steps: range, begin: Callable[[], object], end: Callable[[], object]) -> List[Any]:
    """Training callbacks that call ``begin()`` before the first of ``steps`` and ``end()`` after the last."""
    from nerfstudio.engine.callbacks import TrainingCallback, TrainingCallbackLocation

    def before(step: int) -> None:
        if step == steps[0]:
            begin()

    def after(step: int) -> None:
        if step == steps[-1]:
            end()

    return [
        TrainingCallback([TrainingCallbackLocation.BEFORE_TRAIN_ITERATION], before),
        TrainingCallback([TrainingCallbackLocation.AFTER_TRAIN_ITERATION], after),
    ]


def _profiled_steps(path: Path, steps: range) -> Tuple[List[Any], _Profiler]:
    """Training callbacks that profile ``steps``, and their profiler (see :class:`_Profiler`)."""
    profiler = _Profiler(path, f"Steps {steps[0]}..{steps[-1]} of {path.stem}")
    return around_steps(steps, profiler.start, lambda: profiler.stop(len(steps))), profiler


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def host_speed(operations: int = 2000, repeats: int = 5) -> Dict[str, float]:
    """Microseconds the host takes per small PyTorch operation (an in-place add on a 16-value tensor; median of
    ``repeats`` runs of ``operations``): on a CPU tensor (``host_us_per_cpu_op``) and, with CUDA, launched on the GPU
    (``host_us_per_cuda_launch``, the host's side of a launch, timed before the queue is waited for). Training steps
    here are bound by the host, whose speed differs between machines of one kind: calls compare through these."""
    speeds = {}
    for name, device in (("cpu_op", "cpu"), ("cuda_launch", "cuda")):
        if device == "cuda" and not torch.cuda.is_available():
            continue
        values = torch.zeros(16, device=device)
        runs = []
        for _ in range(repeats):
            _sync()
            start = time.perf_counter()
            for _ in range(operations):
                values.add_(1.0)
            runs.append((time.perf_counter() - start) / operations * 1e6)
        _sync()
        speeds[f"host_us_per_{name}"] = statistics.median(runs)
    return speeds


def _eval_image(dataset, index: int, device) -> torch.Tensor:
    from nerfstudio.utils import colors

    image = dataset.get_image_float32(index).to(device)
    if image.shape[-1] == 4:
        image = image[..., :3] * image[..., 3:] + colors.WHITE.to(image.device) * (1 - image[..., 3:])
    return image


@torch.no_grad()
def _evaluate(
    model, dataset, device, max_views: int, profile_path: Optional[Path] = None
) -> Tuple[float, float, float]:
    """Mean PSNR, mean SSIM and rays per second of ``model`` over the first eval views of ``dataset``, timed after
    one untimed render of the first view (one-off costs such as compiling kernels or building the hard tables are
    not rays per second; ``decode_to_first_frame_s`` reports them); the first view is rendered once more, untimed,
    under :class:`_Profiler` into ``profile_path`` if given."""
    from torchmetrics.functional import structural_similarity_index_measure

    from vqad_nerfstudio.progress import track

    model.eval()
    cameras = dataset.cameras.to(device)
    psnrs, ssims, rays, seconds = [], [], 0, 0.0
    if max_views > 0 and len(dataset):
        model.get_outputs_for_camera(cameras[0:1])
    for index in track(range(min(max_views, len(dataset))), "Rendering eval views"):
        camera = cameras[index : index + 1]
        image = _eval_image(dataset, index, device)
        _sync()
        t = time.perf_counter()
        rgb = model.get_outputs_for_camera(camera)["rgb"].clamp(0, 1)
        _sync()
        seconds += time.perf_counter() - t
        rays += rgb.shape[0] * rgb.shape[1]
        mse = torch.mean((rgb - image) ** 2)
        psnrs.append(float(-10 * torch.log10(mse)))
        ssims.append(
            float(structural_similarity_index_measure(rgb.permute(2, 0, 1)[None], image.permute(2, 0, 1)[None]))
        )
    if profile_path is not None:
        profiler = _Profiler(profile_path, f"Eval view 0 of {profile_path.stem.split('.')[0]}")
        profiler.start()
        model.get_outputs_for_camera(cameras[0:1])
        profiler.stop()
    return sum(psnrs) / len(psnrs), sum(ssims) / len(ssims), rays / seconds


def _eval_speed_by_chunk(pipeline, bench: BenchmarkConfig) -> Dict[int, Dict[str, float]]:
    """Eval rays per second and peak memory (MiB, on CUDA) over the same views at each of
    ``bench.eval_chunk_sizes`` rays per chunk."""
    model, speeds = pipeline.model, {}
    default = model.config.eval_num_rays_per_chunk
    for size in bench.eval_chunk_sizes:
        model.config.eval_num_rays_per_chunk = size
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        rays_per_s = _evaluate(model, pipeline.datamanager.eval_dataset, pipeline.device, bench.max_eval_views)[2]
        peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else math.nan
        speeds[size] = {"eval_rays_per_s": rays_per_s, "peak_mem_mib": peak}
        print(f"eval with {size} rays per chunk: {rays_per_s / 1e3:.0f}k rays/s, peak {peak:.0f} MiB", flush=True)
    model.config.eval_num_rays_per_chunk = default
    return speeds


def _in_float_warmup(model) -> bool:
    """Whether a vqad run stopped before its indices exist (its levels still read float warm-up rows)."""
    from vqad_nerfstudio.encodings.vertex_features import CodebookFeatures

    levels = model.grid.levels if hasattr(model, "grid") else []
    return any(isinstance(level.features, CodebookFeatures) and level.features.in_float_warmup for level in levels)


def _stored_bytes(pipeline, method: str) -> Dict[str, float]:
    from vqad_nerfstudio.export.formats import METHOD_FORMATS

    model = pipeline.model
    entry = METHOD_FORMATS.get(method.split("@")[0])
    if entry is not None and entry.levels_of_detail:  # the file, level by level
        from vqad_nerfstudio.models.size_accounting import model_size_report

        report = model_size_report(model)
        return {
            "stored_bytes": report.total_bytes,
            "feature_grid_bytes": report.feature_bytes,
            "vertices": sum(model.grid.occupied_vertices()),
        }
    if hasattr(model, "encoding_bytes"):  # fp16 networks, the encoding as it would be stored
        encoding = set(model.encoding.parameters())
        others = sum(p.numel() for p in model.parameters() if p not in encoding)
        return {
            "stored_bytes": 2 * others + model.encoding_bytes(),
            "feature_grid_bytes": model.encoding_bytes(),
            "vertices": float("nan"),
        }
    params = sum(p.numel() for p in model.parameters())
    return {"stored_bytes": 4 * params, "feature_grid_bytes": float("nan"), "vertices": float("nan")}


@torch.no_grad()
def _compressed(pipeline, method: str, bench: BenchmarkConfig) -> Dict[str, object]:
    """File sizes (entropy-coded and raw-packed), decode time to the first frame, PSNR per level of detail."""
    from vqad_nerfstudio.codec import write_container
    from vqad_nerfstudio.export.formats import encode_any, load_any, method_format
    from vqad_nerfstudio.export.size_report import size_report

    base_method = method.split("@")[0]
    entry = method_format(base_method)
    network_bits = bench.network_bits if entry.quantised_parameters else None
    has_codebooks = getattr(pipeline.model.config, "feature_store", None) == "codebook"
    codebook_bits = bench.codebook_bits if entry.quantised_parameters and has_codebooks else None
    encoded = encode_any(pipeline.model, base_method, "entropy", network_bits, codebook_bits)
    data = write_container(encoded.header, encoded.chunks)
    if bench.keep_files:
        (bench.output_dir / f"{method.replace('@', '-')}.vqnf").write_bytes(data)
    report = size_report(encoded, data)
    if report["index_bytes_raw"] is None:  # no codebook indices: the raw-packed file is the same file
        raw_bytes = len(data)
    else:
        raw = encode_any(pipeline.model, base_method, "raw", network_bits, codebook_bits)
        raw_bytes = len(write_container(raw.header, raw.chunks))
    dataset, device = pipeline.datamanager.eval_dataset, pipeline.device

    _sync()
    start = time.perf_counter()
    decoded, _ = load_any(data)
    decoded.to(device).get_outputs_for_camera(dataset.cameras.to(device)[0:1])
    _sync()
    decode_s = time.perf_counter() - start
    decoded_psnr, _, _ = _evaluate(decoded, dataset, device, bench.max_eval_views)

    per_lod = []
    streams = entry.levels_of_detail and bench.lod_eval_views > 0  # levels of detail to evaluate
    for level in report["levels"] if streams else []:
        model, _ = load_any(data, max_lod=level["lod"])
        psnr, _, _ = _evaluate(model.to(device), dataset, device, bench.lod_eval_views)
        per_lod.append({"lod": level["lod"], "cumulative_bytes": level["cumulative_bytes"], "psnr": psnr})
    return {
        "file_bytes": len(data),
        "file_bytes_raw": raw_bytes,
        "index_bytes_entropy": report["index_bytes_entropy"],
        "index_bytes_raw": report["index_bytes_raw"],
        "decoder_bytes": report["decoder_bytes"],
        "grid_bytes": report["grid_bytes"],
        "float_grid_bytes": report["float_grid_bytes"],
        "decode_to_first_frame_s": decode_s,
        "decoded_psnr": decoded_psnr,
        "per_lod": per_lod,
    }


_T = TypeVar("_T")


def _in_this_process(function: Callable[..., _T], *args: Any) -> _T:
    """``function(*args)``, here (``--no-row-processes``)."""
    return function(*args)


def _in_own_process(function: Callable[..., _T], *args: Any) -> _T:
    """``function(*args)`` in a fresh Python process (spawned: it starts from imports, not from a copy of this one);
    its exceptions are raised here."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


def _run_row(
    method: str, bench: BenchmarkConfig, tensorf_checkpoint: Optional[Path], warm_up: bool
) -> Tuple[Dict[str, Any], Path]:
    """One row of the tables: ``method``'s untimed kernel warm-up (if ``warm_up``), its timed training, evaluation,
    and (for this package's methods) its compressed file; returns the row and the run's last checkpoint."""
    from vqad_nerfstudio.export.formats import METHOD_FORMATS  # also the checkpoint-loading shim of the models

    if warm_up:
        warmup_start = time.perf_counter()
        _compile_kernels(method, bench)
        gc.collect()  # after the call returns: its trainer's reference cycles hold the device memory until then
        torch.cuda.empty_cache()
        print(f"{method}: {time.perf_counter() - warmup_start:.0f} s of untimed warm-up steps", flush=True)
    print(f"training {method} for {bench.budget_s:g} s", flush=True)
    trainer, steps, seconds, peak, checkpoint, train_metrics, durations = _train(method, bench, tensorf_checkpoint)
    pauses = _pauses(durations)
    if pauses:
        print(f"{method}: pauses " + ", ".join(f"step {step} {pause:.2f} s" for step, pause in pauses), flush=True)
    pipeline = trainer.pipeline
    eval_profile = bench.output_dir / f"{method.replace('@', '-')}.eval-profile.txt"
    psnr, ssim, rays_per_s = _evaluate(
        pipeline.model,
        pipeline.datamanager.eval_dataset,
        pipeline.device,
        bench.max_eval_views,
        eval_profile if method in bench.profile else None,
    )
    by_chunk = _eval_speed_by_chunk(pipeline, bench)
    row = {
        "method": method,
        "psnr": psnr,
        "ssim": ssim,
        **train_metrics,
        "steps": steps,
        "ms_per_step": 1000 * seconds / steps,
        "late_ms_per_step": _late_ms_per_step(durations),
        "pauses": pauses,
        "train_rays_per_s": trainer.pipeline.datamanager.config.train_num_rays_per_batch * steps / seconds,
        "eval_rays_per_s": rays_per_s,
        **({"eval_rays_per_s_by_chunk": by_chunk} if by_chunk else {}),
        "peak_mem_mib": peak,
        "checkpoint_bytes": checkpoint.stat().st_size,
    }
    in_warmup = _in_float_warmup(pipeline.model)
    if in_warmup:  # a budget too short for the indices: nothing to store yet
        print(f"{method}: the budget ended in the float warm-up (step {steps}): no file; raise --budget-s")
        row.update(stored_bytes=math.nan, feature_grid_bytes=math.nan, vertices=math.nan)
    else:
        row.update(_stored_bytes(pipeline, method))
    if method.split("@")[0] in METHOD_FORMATS and not in_warmup:
        row["compressed"] = _compressed(pipeline, method, bench)
    if hasattr(pipeline.model, "latent_planes"):  # stored: the file (coded planes, decoder, fp16 lines and MLP)
        row.update(stored_bytes=row["compressed"]["file_bytes"], feature_grid_bytes=row["compressed"]["grid_bytes"])
    del trainer, pipeline
    gc.collect()  # the trainer and its callbacks form reference cycles: free its tensors before the next peak
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return row, checkpoint


def main(bench: BenchmarkConfig) -> None:
    if torch.cuda.is_available() and any(method.startswith("instant-ngp") for method in bench.methods):
        from patched_nerfacc import build_extension, use_patched_nerfacc  # nerfacc's extension, patched for CUDA 13

        use_patched_nerfacc(bench.output_dir / "patched-nerfacc")
        print(f"nerfacc's CUDA extension built in {build_extension():.0f} s (not part of any training budget)")
    # Imported here, not first inside a row: without tinycudann it keeps its ImportError, whose traceback would keep
    # the frames of the row that imported it, and with them its trainer, for as long as the process runs.
    import nerfstudio.utils.external  # noqa: F401

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    host = host_speed()
    results: List[Dict[str, float]] = []
    methods = list(bench.methods)
    for size in bench.hash_sizes:
        methods += [f"vqad-hash@{size}", f"vqad-hash-random@{size}"]
    methods += [f"tensorf-compressed@{rate:g}" for rate in bench.plane_lambdas]
    _check_method_names(methods)
    compressing = [i for i, method in enumerate(methods) if method.partition("@")[0] == "tensorf-compressed"]
    if compressing and ("tensorf" not in methods or methods.index("tensorf") > compressing[0]):
        raise SystemExit("tensorf-compressed rows compress the call's tensorf run: put tensorf first in --methods")
    encoding_timings = [
        _time_encodings(size, bench.encoding_points, bench.encoding_masked_share) for size in bench.hash_sizes
    ]
    tensorf_checkpoint = None
    warm_ups = _kernel_warm_ups(methods, bench) if torch.cuda.is_available() else [False] * len(methods)
    run = _in_own_process if bench.row_processes else _in_this_process
    for method, warm_up in zip(methods, warm_ups):
        row, checkpoint = run(_run_row, method, bench, tensorf_checkpoint, warm_up)
        if method == "tensorf":
            tensorf_checkpoint = checkpoint
        results.append(row)
        print(json.dumps(row), flush=True)
        bench.output_dir.mkdir(parents=True, exist_ok=True)
        (bench.output_dir / "results.json").write_text(  # after every method: a cut-short run keeps its rows
            json.dumps(
                {
                    "device": device,
                    **host,
                    "budget_s": bench.budget_s,
                    "max_steps": bench.max_steps,
                    "results": results,
                },
                indent=2,
            )
        )

    host_text = ", ".join(f"{value:.2f} {name.removeprefix('host_')}" for name, value in host.items())
    print(
        f"\nDevice: {device} (host: {host_text}); training budget {bench.budget_s:.0f} s per method"
        f"{f' or {bench.max_steps} steps' if bench.max_steps else ''}; "
        f"eval on {bench.max_eval_views} views of {bench.data}"
    )
    print(_table(results))
    print(_compressed_tables(results))
    if bench.hash_sizes:
        _plot_hash_comparison(results, bench.output_dir / "hash_comparison.png", device)
        print(_hash_table(results, bench.hash_sizes))
        print(_encoding_timing_table(encoding_timings, bench.encoding_points, bench.encoding_masked_share))
    if bench.plane_lambdas:
        _plot_planes(results, bench.output_dir / "planes_rd.png", device)
        print(_planes_table(results))


def _fmt_db(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2f}"  # nerfstudio's tensorf reports no training PSNR


def _fmt_bytes(value: float) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value / 1e6:.3f} MB" if value >= 1e5 else f"{value / 1e3:.1f} kB"


def _table(results: List[Dict[str, float]]) -> str:
    header = (
        "| method | PSNR | SSIM | train PSNR | steps | ms/step | late ms/step | train samples/ray | train rays/s "
        "| eval rays/s | peak MiB | stored | feature grid | checkpoint |\n" + "|---" * 14 + "|"
    )
    lines = [header]
    for r in results:
        lines.append(
            f"| {r['method']} | {r['psnr']:.2f} | {r['ssim']:.3f} | {_fmt_db(r.get('train_psnr', math.nan))} | "
            f"{r['steps']} | {r['ms_per_step']:.1f} | {r.get('late_ms_per_step', math.nan):.1f} | "
            f"{r.get('train_samples_per_ray', math.nan):.1f} | {r.get('train_rays_per_s', math.nan) / 1e3:.0f}k | "
            f"{r['eval_rays_per_s'] / 1e3:.0f}k | {r['peak_mem_mib']:.0f} | {_fmt_bytes(r['stored_bytes'])} | "
            f"{_fmt_bytes(r['feature_grid_bytes'])} | {_fmt_bytes(r['checkpoint_bytes'])} |"
        )
    by_name = {r["method"]: r for r in results}
    if "vqad" in by_name and "vqad-float" in by_name:
        v, f = by_name["vqad"], by_name["vqad-float"]
        lines.append(
            f"\nvqad vs vqad-float: feature grid {f['feature_grid_bytes'] / v['feature_grid_bytes']:.1f}x smaller, "
            f"PSNR {v['psnr'] - f['psnr']:+.2f} dB, time/step x{v['ms_per_step'] / f['ms_per_step']:.2f} "
            f"(late steps x{v.get('late_ms_per_step', math.nan) / f.get('late_ms_per_step', math.nan):.2f}), "
            f"peak memory x{v['peak_mem_mib'] / f['peak_mem_mib']:.2f}"
        )
    if "vqad" in by_name and "tensorf" in by_name:
        v, t = by_name["vqad"], by_name["tensorf"]
        lines.append(
            f"vqad vs tensorf: PSNR {v['psnr'] - t['psnr']:+.2f} dB, "
            f"stored {t['stored_bytes'] / v['stored_bytes']:.0f}x smaller, "
            f"training checkpoint x{v['checkpoint_bytes'] / t['checkpoint_bytes']:.1f} of tensorf's"
        )
    for name, fast in by_name.items():  # METHOD against METHOD@ref (the reference path, run in the same call)
        ref = by_name.get(f"{name}@ref")
        if ref is not None:
            lines.append(
                f"{name} vs {name}@ref: eval rays/s x{fast['eval_rays_per_s'] / ref['eval_rays_per_s']:.2f}, "
                f"training rays/s x{fast['train_rays_per_s'] / ref['train_rays_per_s']:.2f}, "
                f"ms/step x{fast['ms_per_step'] / ref['ms_per_step']:.2f} (late steps "
                f"x{fast.get('late_ms_per_step', math.nan) / ref.get('late_ms_per_step', math.nan):.2f}), "
                f"PSNR {fast['psnr'] - ref['psnr']:+.2f} dB, "
                f"peak memory x{fast['peak_mem_mib'] / ref['peak_mem_mib']:.2f}"
            )
            lines += _repeats_line(name, results)
    return "\n".join(lines)


def _repeats_line(name: str, results: List[Dict[str, float]]) -> List[str]:
    """Where METHOD or METHOD@ref ran more than once (METHOD@2, METHOD@ref2, ...): their mean PSNRs and the
    difference of the means, with each path's spread (max - min) to read it against."""
    runs = [(r["method"].partition("@"), r["psnr"]) for r in results]
    fast = [psnr for (base, _, tag), psnr in runs if base == name and (tag == "" or tag.isdigit())]
    ref = [psnr for (base, _, tag), psnr in runs if base == name and REFERENCE_TAG.fullmatch(tag)]
    if len(fast) + len(ref) <= 2:
        return []
    mean_fast, mean_ref = sum(fast) / len(fast), sum(ref) / len(ref)
    return [
        f"{name} ({len(fast)} runs) vs {name}@ref ({len(ref)} runs): mean PSNR {mean_fast:.2f} against "
        f"{mean_ref:.2f}, {mean_fast - mean_ref:+.2f} dB; spread {max(fast) - min(fast):.2f} and "
        f"{max(ref) - min(ref):.2f} dB"
    ]


def _compressed_tables(results: List[Dict]) -> str:
    """Compressed files of this package's models: sizes, ratios, decode time, PSNR per level of detail."""
    rows = [r for r in results if "compressed" in r]
    if not rows:
        return ""
    by_name = {r["method"]: r for r in results}
    float_grid = by_name.get("vqad-float", {}).get("feature_grid_bytes")
    tensorf_ckpt = by_name.get("tensorf", {}).get("checkpoint_bytes")
    lines = [
        "\n| method | file (coded) | file (raw-packed) | indices coded / raw | decoders | x float grid | "
        "x tensorf ckpt | decoded PSNR (trained) | file to first frame |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        c = r["compressed"]
        coded, raw = c["index_bytes_entropy"], c["index_bytes_raw"]
        saving = f"{coded / raw:.3f} ({100 * (1 - coded / raw):.1f}% saved)" if raw else "-"
        float_ratio = f"{float_grid / c['file_bytes']:.1f}" if float_grid else "-"  # needs vqad-float in the run
        tensorf_ratio = f"{tensorf_ckpt / c['file_bytes']:.0f}" if tensorf_ckpt else "-"  # needs tensorf
        lines.append(
            f"| {r['method']} | {_fmt_bytes(c['file_bytes'])} | {_fmt_bytes(c['file_bytes_raw'])} | {saving} | "
            f"{_fmt_bytes(c['decoder_bytes'])} | {float_ratio} | {tensorf_ratio} | "
            f"{c['decoded_psnr']:.2f} ({r['psnr']:.2f}) | {c['decode_to_first_frame_s']:.2f} s |"
        )
    levels = [(r["method"], level) for r in rows for level in r["compressed"]["per_lod"]]
    if levels:
        lines += ["\n| method | LOD | cumulative bytes | PSNR |", "|---|---|---|---|"]
        lines += [
            f"| {method} | {level['lod']} | {_fmt_bytes(level['cumulative_bytes'])} | {level['psnr']:.2f} |"
            for method, level in levels
        ]
    return "\n".join(lines)


def _hash_pairs(results: List[Dict], sizes: Tuple[int, ...]) -> List[Tuple[int, Dict, Dict]]:
    by_name = {r["method"]: r for r in results}
    return [(size, by_name[f"vqad-hash@{size}"], by_name[f"vqad-hash-random@{size}"]) for size in sizes]


def _hash_table(results: List[Dict], sizes: Tuple[int, ...]) -> str:
    """Learned vs random indices, pair by pair at matched encoding bytes."""
    lines = [
        "\n| random table | encoding learned / random | PSNR learned | PSNR random | learned - random | "
        "SSIM learned / random |",
        "|---|---|---|---|---|---|",
    ]
    for size, learned, random in _hash_pairs(results, sizes):
        lines.append(
            f"| 2^{size} | {_fmt_bytes(learned['feature_grid_bytes'])} / {_fmt_bytes(random['feature_grid_bytes'])} | "
            f"{learned['psnr']:.2f} | {random['psnr']:.2f} | {learned['psnr'] - random['psnr']:+.2f} dB | "
            f"{learned['ssim']:.3f} / {random['ssim']:.3f} |"
        )
    return "\n".join(lines)


@contextmanager
def _psnr_plot(path: Path, device: str, xlabel: str, log_x: bool) -> Iterator[Any]:
    """An axis for PSNR against size, saved to ``path`` when the block ends."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5, 3.5))
    if log_x:
        axis.set_xscale("log")
        axis.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # log-scale minor labels overlap
    yield axis
    axis.set_xlabel(xlabel)
    axis.set_ylabel("PSNR (dB)")
    axis.set_title(f"lego, {device}")
    axis.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)


def _plot_hash_comparison(results: List[Dict], path: Path, device: str) -> None:
    """PSNR against encoding bytes, learned and random indices."""
    with _psnr_plot(path, device, "encoding size (kB)", log_x=True) as axis:
        for prefix, label in (("vqad-hash@", "learned indices (vqad-hash)"), ("vqad-hash-random@", "random indices")):
            rows = sorted((r for r in results if r["method"].startswith(prefix)), key=lambda r: r["feature_grid_bytes"])
            sizes = [r["feature_grid_bytes"] / 1e3 for r in rows]
            axis.plot(sizes, [r["psnr"] for r in rows], "o-", label=label)
        axis.set_xticks(sizes)  # the matched sizes (both variants have the same)


def _plane_rows(results: List[Dict]) -> Tuple[Dict, List[Dict]]:
    by_name = {r["method"]: r for r in results}
    rows = [r for r in results if r["method"].startswith("tensorf-compressed@")]
    return by_name["tensorf"], sorted(rows, key=lambda r: r["compressed"]["file_bytes"])


def _planes_table(results: List[Dict]) -> str:
    """tensorf-compressed against the tensorf run it compressed: plane bytes, file, quality, time."""
    tensorf, rows = _plane_rows(results)
    lines = [
        f"\ntensorf (uncompressed): PSNR {tensorf['psnr']:.2f}, SSIM {tensorf['ssim']:.3f}, "
        f"{tensorf['steps']} steps, checkpoint {_fmt_bytes(tensorf['checkpoint_bytes'])}",
        "| lambda | planes before (fp32) | planes after (coded + decoder) | planes x smaller | file | PSNR | "
        "vs tensorf | SSIM | decoded PSNR | compression wall time | file to first frame |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        c = r["compressed"]
        lines.append(
            f"| {r['method'].split('@')[1]} | {_fmt_bytes(c['float_grid_bytes'])} | {_fmt_bytes(c['grid_bytes'])} | "
            f"{c['float_grid_bytes'] / c['grid_bytes']:.1f} | {_fmt_bytes(c['file_bytes'])} | {r['psnr']:.2f} | "
            f"{r['psnr'] - tensorf['psnr']:+.2f} dB | {r['ssim']:.3f} | {c['decoded_psnr']:.2f} | "
            f"{r['steps'] * r['ms_per_step'] / 1000:.0f} s ({r['steps']} steps) | "
            f"{c['decode_to_first_frame_s']:.2f} s |"
        )
    return "\n".join(lines)


def _plot_planes(results: List[Dict], path: Path, device: str) -> None:
    """Rate-distortion curve: PSNR against file bytes, with the uncompressed tensorf as a line."""
    tensorf, rows = _plane_rows(results)
    with _psnr_plot(path, device, "file size (MB)", log_x=False) as axis:
        sizes = [r["compressed"]["file_bytes"] / 1e6 for r in rows]
        axis.plot(sizes, [r["psnr"] for r in rows], "o-", label="tensorf-compressed (file)")
        for size, r in zip(sizes, rows):
            axis.annotate(f"λ={r['method'].split('@')[1]}", (size, r["psnr"]), fontsize=7)
        axis.axhline(tensorf["psnr"], color="gray", linestyle="--", label="tensorf (uncompressed)")


if __name__ == "__main__":
    main(tyro.cli(BenchmarkConfig))
