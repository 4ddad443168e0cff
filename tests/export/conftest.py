"""A briefly trained VQAD model of a small demo scene, shared by the export tests.

It is trained in this process (about 20 s on one CPU core): three levels of detail (8³, 16³,
32³), pruned once, with half of the rays rendered at a random coarser level so that every
level-of-detail prefix is trained.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, List, Tuple

import pytest
import torch

from vqad_nerfstudio.demo.scene import DemoSceneConfig, write_demo_scene

SCENE = DemoSceneConfig(resolution=32, num_train=16, num_eval=2, supersample=1, seed=1)
STEPS = 120
NUM_LEVELS = 3


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run torch on one thread: the tensors are small, and two threads thrash on a busy CPU (8x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    with one_torch_thread():
        yield


@dataclass
class TrainedRun:
    """A trained pipeline, the run directory it was saved to (as ns-train leaves one), and views of its scene."""

    pipeline: Any
    config_path: Path

    @property
    def model(self) -> Any:
        return self.pipeline.model

    def views(self, split: str = "eval") -> List[Tuple[Any, torch.Tensor]]:
        """Up to three (camera, ground-truth image) pairs of the ``eval`` or ``train`` split."""
        datamanager = self.pipeline.datamanager
        dataset = datamanager.eval_dataset if split == "eval" else datamanager.train_dataset
        return [(dataset.cameras[i : i + 1], dataset[i]["image"][..., :3]) for i in range(min(3, len(dataset)))]

    @staticmethod
    def render(model: Any, camera: Any) -> torch.Tensor:
        """RGB image of ``model`` (in eval mode) seen from ``camera``."""
        with torch.no_grad():
            return model.get_outputs_for_camera(camera)["rgb"]

    def psnr(self, model: Any, split: str = "eval") -> float:
        """Mean PSNR of ``model``'s renders against the images of :meth:`views`."""
        views = self.views(split)
        return sum(self.image_psnr(self.render(model, camera), image) for camera, image in views) / len(views)

    @staticmethod
    def image_psnr(a: torch.Tensor, b: torch.Tensor) -> float:
        """PSNR in dB of two images with values in [0, 1]."""
        return float(-10 * torch.log10(((a - b) ** 2).mean()))


def _train(scene: Path, output_dir: Path) -> TrainedRun:
    from nerfstudio.engine.callbacks import TrainingCallbackAttributes, TrainingCallbackLocation
    from nerfstudio.engine.optimizers import Optimizers
    from vqad_nerfstudio.method_configs.vqad import vqad

    torch.manual_seed(0)
    config = copy.deepcopy(vqad.config)
    config.output_dir = output_dir
    config.pipeline.datamanager.data = scene
    config.pipeline.datamanager.train_num_rays_per_batch = 512
    model = config.pipeline.model
    model.num_levels, model.base_resolution, model.dense_resolution = NUM_LEVELS, 8, 16
    model.num_samples, model.prune_steps, model.coarse_lod_fraction = 32, (STEPS // 4,), 0.5
    model.index_warmup_steps = STEPS // 3  # what ns-train's cap gives a run this short
    model.codebook_bits = 16  # fp16 codebooks (CBOK), the format's base case; CBKQ: test_quantized_codebooks.py
    model.network_bits = 16  # fp16 decoders (MLPS), the format's base case; MLPQ: test_quantized_decoders.py
    model.occupancy_update_every = STEPS + 1  # once, at step 0: the occupancy estimate only speeds training up
    for group in config.optimizers.values():
        group["scheduler"].max_steps = STEPS
    pipeline = config.pipeline.setup(device="cpu", test_mode="test")
    optimizers = Optimizers(config.optimizers, pipeline.get_param_groups())
    attributes = TrainingCallbackAttributes(optimizers=optimizers, grad_scaler=None, pipeline=pipeline, trainer=None)
    callbacks = pipeline.get_training_callbacks(attributes)
    pipeline.train()
    for step in range(STEPS):
        for callback in callbacks:
            callback.run_callback_at_location(step, TrainingCallbackLocation.BEFORE_TRAIN_ITERATION)
        optimizers.zero_grad_all()
        _, losses, _ = pipeline.get_train_loss_dict(step)
        sum(losses.values()).backward()
        optimizers.optimizer_step_all()
        optimizers.scheduler_step_all(step)
        for callback in callbacks:
            callback.run_callback_at_location(step, TrainingCallbackLocation.AFTER_TRAIN_ITERATION)
    pipeline.eval()

    config.set_timestamp()
    config.save_config()
    checkpoint_dir = config.get_checkpoint_dir()
    checkpoint_dir.mkdir(parents=True)
    torch.save({"step": STEPS, "pipeline": pipeline.state_dict()}, checkpoint_dir / f"step-{STEPS:09d}.ckpt")
    return TrainedRun(pipeline, config.get_base_dir() / "config.yml")


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> TrainedRun:
    scene = write_demo_scene(tmp_path_factory.mktemp("scene") / "demo", SCENE, show_progress=False)
    with one_torch_thread():
        return _train(scene, tmp_path_factory.mktemp("runs"))


@pytest.fixture(scope="session")
def encoded(trained: TrainedRun) -> bytes:
    """The trained model as a compressed file (entropy-coded indices)."""
    from vqad_nerfstudio.codec import write_container
    from vqad_nerfstudio.export.vqad_codec import encode_model

    model = encode_model(trained.model)
    return write_container(model.header, model.chunks)


@pytest.fixture
def assert_checkpoint_exports_as_the_file(trained: TrainedRun):
    """A check of a file ``data``: see :func:`_assert_checkpoint_exports_as_the_file`."""
    return lambda data: _assert_checkpoint_exports_as_the_file(trained, data)


def _assert_checkpoint_exports_as_the_file(trained: TrainedRun, data: bytes) -> None:
    """Decode ``data``, reload the decoded model's state into a model built from its config (as nerfstudio's tools
    build it), and check that it renders like the decoded model and exports to ``data`` again, byte for byte."""
    from vqad_nerfstudio.codec import write_container
    from vqad_nerfstudio.export.vqad_codec import encode_model, load_compressed

    decoded, _ = load_compressed(data)
    fresh = decoded.config.setup(scene_box=decoded.scene_box, num_train_data=1)
    fresh.load_state_dict(decoded.state_dict())
    fresh.eval()
    camera, _ = trained.views()[0]
    assert torch.equal(trained.render(fresh, camera), trained.render(decoded, camera))
    again = encode_model(fresh)
    assert write_container(again.header, again.chunks) == data
