"""benchmarks/lego_benchmark.py: the reference rows' settings, overrides, the late step time and the ratio lines."""

import importlib.util
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "lego_benchmark.py"
_spec = importlib.util.spec_from_file_location("lego_benchmark", SCRIPT)
bench = importlib.util.module_from_spec(_spec)
sys.modules["lego_benchmark"] = bench  # dataclasses look their module up by name
_spec.loader.exec_module(bench)


BLENDER_SCENE = Path(tempfile.mkdtemp(prefix="lego-")) / "lego"
"""A Blender-format scene as far as the settings go (only its transforms_train.json, which is not read)."""
BLENDER_SCENE.mkdir()
(BLENDER_SCENE / "transforms_train.json").write_text("{}")


def _config(method: str, schedule_steps: int = 0, **overrides: str):
    options = bench.BenchmarkConfig(data=BLENDER_SCENE, schedule_steps=schedule_steps, overrides=overrides)
    return bench._trainer_config(method, options)


def test_a_reference_row_runs_the_pytorch_path_and_overrides_still_apply() -> None:
    reference = _config("vqad@ref", **{"vqad@ref.pipeline.model.num_samples": "64"})
    model = reference.pipeline.model
    assert (model.sampling, model.fused_kernels, model.tf32) == ("dense", False, False)
    assert reference.pipeline.datamanager.train_num_rays_per_batch == 8192
    assert model.eval_num_rays_per_chunk == 16384 and model.num_samples == 64
    assert not reference.pipeline.datamanager.device_batches
    optimizers = [group["optimizer"] for group in reference.optimizers.values()]
    assert not any(getattr(optimizer, "fused", False) for optimizer in optimizers)
    assert any(hasattr(optimizer, "in_backward") for optimizer in optimizers)
    assert not any(getattr(optimizer, "in_backward", False) for optimizer in optimizers)
    fast = _config("vqad")
    assert (fast.pipeline.model.sampling, fast.pipeline.model.fused_kernels) == ("packed", True)
    assert fast.pipeline.datamanager.device_batches


def test_numbered_reference_rows_repeat_the_reference_path() -> None:
    repeat = _config("vqad@ref2").pipeline.model
    assert (repeat.sampling, repeat.fused_kernels, repeat.tf32) == ("dense", False, False)
    assert _config("vqad@refined").pipeline.model.sampling == "packed"  # only ref and ref<N> name the reference


def test_nerfacto_runs_with_the_object_scene_settings_on_a_blender_scene() -> None:
    model = _config("nerfacto@anchor", **{"nerfacto.pipeline.model.far_plane": "7.0"}).pipeline.model
    assert (model.background_color, model.disable_scene_contraction, model.camera_optimizer.mode) == (
        "white",
        True,
        "off",
    )
    assert (model.near_plane, model.far_plane, model.distortion_loss_mult) == (2.0, 7.0, 0.0)  # overrides still apply


def test_a_reference_row_of_a_method_without_one_is_refused() -> None:
    with pytest.raises(SystemExit, match="only vqad and vqad-float have a reference path"):
        _config("tensorf@ref")


@pytest.mark.parametrize("method", ["vqad", "tensorf-compressed@0.01"])  # one decay length, and two stages' decays
def test_schedules_stretch_so_that_the_longest_decays_over_the_given_steps(method: str) -> None:
    default = {name: group["scheduler"].max_steps for name, group in _config(method).optimizers.items()}
    stretched = {name: group["scheduler"].max_steps for name, group in _config(method, 4000).optimizers.items()}
    assert max(stretched.values()) == 4000
    scale = 4000 / max(default.values())
    assert stretched == {name: max(1, round(steps * scale)) for name, steps in default.items()}


def test_only_variants_with_other_kernel_shapes_get_a_kernel_warm_up_of_their_own() -> None:
    options = bench.BenchmarkConfig(
        data=Path("scene"),
        overrides={
            "vqad@b10.pipeline.model.index_bits": "10",
            "vqad@w.pipeline.model.index_rate_weight": "3e-5",
            "vqad@pd.pipeline.model.fused_decoders": "False",
        },
    )
    methods = ("vqad", "vqad@b10", "vqad@w", "vqad@pd", "vqad-float")
    shapes = {method: bench._kernel_shapes(method, options) for method in methods}
    assert shapes["vqad@w"] == shapes["vqad"]  # the same kernels: warmed up once
    assert len({shapes["vqad"], shapes["vqad@b10"], shapes["vqad@pd"], shapes["vqad-float"]}) == 4


@pytest.mark.parametrize("row_processes", [True, False])
def test_each_row_warms_up_in_its_own_process_or_once_per_kernel_shape_in_one(row_processes: bool) -> None:
    overrides = {"vqad@w.pipeline.model.index_rate_weight": "3e-5", "vqad@b10.pipeline.model.index_bits": "10"}
    options = bench.BenchmarkConfig(data=BLENDER_SCENE, row_processes=row_processes, overrides=overrides)
    methods = ["tensorf", "vqad", "vqad@w", "vqad@b10", "tensorf-compressed@0.002"]
    expected = [True, True, True, True, False] if row_processes else [True, True, False, True, False]
    assert bench._kernel_warm_ups(methods, options) == expected  # tensorf-compressed: fixed steps, never timed
    options.kernel_warmup_steps = 0
    assert bench._kernel_warm_ups(methods, options) == [False] * 5


def test_unknown_methods_are_refused_before_any_row_runs() -> None:
    with pytest.raises(SystemExit, match="unknown methods nosuch, nosuch@2; nerfstudio knows .*vqad-float"):
        bench._check_method_names(["vqad", "nosuch", "vqad-float@ref", "nosuch@2"])
    bench._check_method_names(["vqad@b10", "tensorf", "vqad-hash-random@14"])


def test_a_row_in_its_own_process_runs_in_another_process_and_raises_there() -> None:
    assert bench._in_own_process(os.getpid) != os.getpid()
    with pytest.raises(ValueError, match="invalid literal"):
        bench._in_own_process(int, "not a number")


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="threads' CPU times are read from Linux's /proc")
def test_the_busiest_threads_are_those_that_spent_the_most_cpu_time_between_readings() -> None:
    import threading

    def spin(name: str, release: threading.Event) -> threading.Thread:
        def run() -> None:
            Path(f"/proc/self/task/{threading.get_native_id()}/comm").write_text(name)  # the name /proc shows
            end = time.thread_time() + 0.3
            while time.thread_time() < end:
                pass
            release.wait()

        thread = threading.Thread(target=run, name=name)
        thread.start()
        return thread

    ended, running = threading.Event(), threading.Event()
    ended.set()
    spin("ended", ended).join()  # spins, then ends before the second reading
    before = bench._thread_cpu_seconds()
    spinner = spin("spinner", running)
    time.sleep(0.6)
    try:
        busiest = bench._busiest_threads(before, bench._thread_cpu_seconds())
    finally:
        running.set()
        spinner.join()
    assert busiest[0][0] == "spinner" and busiest[0][1] >= 0.2
    assert "ended" not in [name for name, _ in busiest]


def test_the_late_step_time_is_the_last_quarters_mean() -> None:
    seconds = [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.5, 0.4]  # the last quarter: steps 6 and 7
    assert bench._late_ms_per_step(seconds) == pytest.approx(450.0)
    assert math.isnan(bench._late_ms_per_step([1.0, 1.0]))


def test_pauses_are_listed_apart_and_left_out_of_the_late_step_time() -> None:
    seconds = [0.02] * 100
    seconds[0], seconds[50], seconds[90] = 1.5, 0.1, 8.0  # set-up, a slow step (5x: not a pause), the k-means
    assert bench._pauses(seconds) == [(0, 1.5), (90, 8.0)]
    assert bench._late_ms_per_step(seconds) == pytest.approx(20.0)
    assert bench._pauses([]) == []


def test_the_table_compares_fast_rows_with_their_reference() -> None:
    def row(method: str, ms: float, late: float, eval_rays: float) -> dict:
        return {
            "method": method, "psnr": 30.0, "ssim": 0.9, "steps": 100, "ms_per_step": ms, "late_ms_per_step": late,
            "train_rays_per_s": 1e6 / ms, "eval_rays_per_s": eval_rays, "peak_mem_mib": 1000.0,
            "stored_bytes": 5e5, "feature_grid_bytes": 4e5, "checkpoint_bytes": 1e8,
        }  # fmt: skip

    table = bench._table([row("vqad@ref", 30.0, 28.0, 5e5), row("vqad", 30.0, 14.0, 5e6)])
    assert "vqad vs vqad@ref: eval rays/s x10.00, training rays/s x1.00, ms/step x1.00 (late steps x0.50)" in table
    assert "runs)" not in table  # one run of each: no means

    psnrs = {"vqad": 29.75, "vqad@ref": 29.77, "vqad@2": 29.51, "vqad@ref2": 29.59, "vqad@w2": 35.0}
    rows = [{**row(method, 30.0, 20.0, 1e6), "psnr": psnr} for method, psnr in psnrs.items()]
    assert (
        "vqad (2 runs) vs vqad@ref (2 runs): mean PSNR 29.63 against 29.68, -0.05 dB; spread 0.24 and 0.18 dB"
        in bench._table(rows)
    )  # vqad@w2 is a variant, not a repeat


def test_a_run_that_ends_in_its_float_warmup_is_told_apart() -> None:
    import torch
    from nerfstudio.data.scene_box import SceneBox

    from vqad_nerfstudio.models.vqad import VQADModelConfig

    def model(**settings):
        config = VQADModelConfig(num_levels=2, base_resolution=4, dense_resolution=8, hidden_dim=8, **settings)
        return config.setup(scene_box=SceneBox(aabb=torch.tensor([[-1.0] * 3, [1.0] * 3])), num_train_data=1)

    assert bench._in_float_warmup(model())  # float rows until index_warmup_steps: no indices to store
    assert not bench._in_float_warmup(model(index_warmup="soft"))  # indices from the first step
    assert not bench._in_float_warmup(model(feature_store="float"))  # the float twin stores its rows


def test_train_metrics_are_means_of_the_last_steps_and_nan_where_missing() -> None:
    import torch

    class Pipeline:
        def get_train_loss_dict(self, step: int):
            return {}, {}, {"psnr": torch.tensor(float(step)), "other": torch.tensor(1.0)}

    pipeline = Pipeline()
    recent = bench._record_train_metrics(pipeline)
    for step in range(bench.TRAIN_METRIC_STEPS + 10):
        pipeline.get_train_loss_dict(step=step)
    means = bench._mean_train_metrics(recent)
    assert means["train_psnr"] == pytest.approx(10 + (bench.TRAIN_METRIC_STEPS - 1) / 2)  # steps 10..109
    assert math.isnan(means["train_samples_per_ray"]) and set(means) == set(bench.TRAIN_METRICS.values())


def test_tensorf_compressed_variants_take_their_rate_from_the_tag_and_their_overrides() -> None:
    variant = _config("tensorf-compressed@0.002f8", **{"tensorf-compressed@0.002f8.pipeline.model.field_bits": "8"})
    assert (variant.pipeline.model.rate_lambda, variant.pipeline.model.field_bits) == (0.002, 8)
    assert _config("tensorf-compressed@1e-05").pipeline.model.rate_lambda == 1e-5
    with pytest.raises(SystemExit, match="starts with its rate weight"):
        _config("tensorf-compressed@f8")


def test_every_row_starts_from_the_random_state_ns_train_starts_from() -> None:
    class Trainer:
        def setup(self) -> None:
            self.draw = torch.rand(3)

    class Config:
        machine = type("Machine", (), {"seed": 42})()

        def setup(self, local_rank: int, world_size: int) -> Trainer:
            return Trainer()

    first = bench._set_up_trainer(Config()).draw
    torch.rand(100)  # what an earlier row of the call drew
    assert torch.equal(bench._set_up_trainer(Config()).draw, first)
    torch.manual_seed(42)
    assert torch.equal(torch.rand(3), first)


def test_every_row_logs_to_its_own_event_writers_only(tmp_path: Path) -> None:
    from nerfstudio.configs.base_config import LocalWriterConfig
    from nerfstudio.utils import writer

    class Trainer:
        def setup(self) -> None:  # what nerfstudio's Trainer.setup registers: a tensorboard and a console writer
            writer.setup_event_writer(False, True, False, log_dir=tmp_path / self.name, experiment_name="row")
            writer.setup_local_writer(writer.cfg.LoggingConfig(local_writer=LocalWriterConfig(enable=True)), 10)

    class Config:
        machine = type("Machine", (), {"seed": 42})()

        def setup(self, local_rank: int, world_size: int) -> Trainer:
            trainer = Trainer()
            trainer.name = f"row{len(rows)}"
            return trainer

    rows: list = []
    try:
        for _ in range(3):
            rows.append(bench._set_up_trainer(Config()))
            assert len(writer.EVENT_WRITERS) == 2  # not 2, 4, 6: each logging step wrote to every earlier row's too
        tensorboard = [w for w in writer.EVENT_WRITERS if isinstance(w, writer.TensorboardWriter)]
        assert Path(tensorboard[0].tb_writer.log_dir) == tmp_path / "row2"
    finally:
        bench._close_event_writers()
    assert writer.EVENT_WRITERS == []


def test_a_profiled_steps_summary_is_its_device_time_launches_and_host_waits_per_step() -> None:
    """From torch's profiler's averages: the kernels' self device time (the operators that launched them report it
    again, and are not counted), the runtime's and the driver's (Triton's) launches, and the host's waits on a
    stream."""
    from functools import partial
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    host, device = (
        partial(SimpleNamespace, device_type=DeviceType.CPU),
        partial(SimpleNamespace, device_type=DeviceType.CUDA),
    )
    averages = [
        host(key="aten::add", count=50, self_device_time_total=6000.0),
        device(key="elementwise_kernel", count=50, self_device_time_total=6000.0),
        host(key="_FusedFunctionBackward", count=10, self_device_time_total=4000.0),
        device(key="_fused_kernel", count=10, self_device_time_total=4000.0),
        host(key="cudaLaunchKernel", count=50, self_device_time_total=0.0),
        host(key="cuLaunchKernelEx", count=10, self_device_time_total=0.0),
        host(key="cudaStreamSynchronize", count=20, self_device_time_total=0.0),
        host(key="cudaDeviceSynchronize", count=1, self_device_time_total=0.0),  # the profiler's own, at its end
    ]
    summary = bench._profile_summary(averages, steps=10)
    assert summary == {"device_ms": 1.0, "launches": 6.0, "host_waits": 2.0}


def test_host_tensor_operations_are_counted_by_name_and_size_with_their_first_caller() -> None:
    """The counter of benchmarks/host_tensor_operations.py: operations with a host tensor among their arguments (also
    inside lists), large from the given size, each with where it was first called from; device tensors (the meta
    device here) are not counted."""
    sys.path.insert(0, str(SCRIPT.parent))
    from host_tensor_operations import HostTensorOperations

    counter = HostTensorOperations(large=100)
    with counter:
        small, large = torch.ones(3), torch.ones(200)
        torch.cat([small, small]), large * 2, large * 3, torch.ones(3, device="meta") + 1
    assert counter.counts[("aten::cat", False)] == 1 and counter.counts[("aten::mul", True)] == 2
    assert not any(name == "aten::add" for name, _ in counter.counts)
    assert "test_host_tensor_operations" in counter.first_caller[("aten::mul", True)]


def test_the_host_speed_is_the_median_time_per_operation(monkeypatch: pytest.MonkeyPatch) -> None:
    """host_speed's microseconds per operation: the median run's (a clock that advances 1 s per reading makes each
    run of 4 operations take 1 s, 250000 us each; on a CPU only the CPU entry)."""
    readings = iter(range(1000))
    monkeypatch.setattr(bench.time, "perf_counter", lambda: float(next(readings)))
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: False)
    assert bench.host_speed(operations=4, repeats=3) == {"host_us_per_cpu_op": 250000.0}
