"""VQAD in contracted space (--pipeline.model.unbounded True) on the demo scene's textured dome."""

from __future__ import annotations

import copy

import pytest
import torch
from nerfstudio.engine.optimizers import Optimizers
from vqad_nerfstudio.method_configs.vqad import vqad

from vqad_nerfstudio.demo.scene import DemoSceneConfig, write_demo_scene


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Small tensors: one thread is faster than two on a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory):
    scene = DemoSceneConfig(resolution=24, num_train=6, num_eval=1, supersample=1, background="textured")
    data = write_demo_scene(tmp_path_factory.mktemp("unbounded") / "scene", scene, show_progress=False)
    config = copy.deepcopy(vqad.config)
    config.pipeline.datamanager.data = data
    config.pipeline.datamanager.train_num_rays_per_batch = 256
    model = config.pipeline.model
    model.unbounded, model.num_levels, model.base_resolution, model.dense_resolution = True, 3, 8, 16
    model.num_samples, model.occupancy_resolution = 48, 16
    torch.manual_seed(0)
    pipeline = config.pipeline.setup(device="cpu", test_mode="val")
    return pipeline, Optimizers(config.optimizers, pipeline.get_param_groups())


def test_training_steps_reach_the_grid_and_lower_the_loss(pipeline) -> None:
    pipeline, optimizers = pipeline
    pipeline.train()
    losses = []
    for step in range(10):
        optimizers.zero_grad_all()
        _, loss_dict, metrics = pipeline.get_train_loss_dict(step)
        loss = sum(loss_dict.values())
        loss.backward()
        if step == 0:
            level = pipeline.model.grid.levels[0].features  # in its float warm-up: the float rows train
            assert level.in_float_warmup and bool(level.warmup_features.grad.abs().sum() > 0)
        optimizers.optimizer_step_all()
        losses.append(float(loss))
        assert metrics["samples_per_ray"] > 1
    assert sum(losses[-3:]) < sum(losses[:3])


def test_background_rays_march_into_the_contracted_shell(pipeline) -> None:
    """Rays that miss the solids still find density: the dome lies beyond the unit ball, in contracted space."""
    pipeline, _ = pipeline
    model = pipeline.model
    model.eval()
    camera = pipeline.datamanager.eval_dataset.cameras[0:1]
    bundle = camera.generate_rays(camera_indices=0).flatten()
    with torch.no_grad():
        unit = model.field.to_unit_cube(bundle.origins + bundle.directions * 100.0)
        outputs = model(bundle)
    assert bool(((unit - 0.5).abs().amax(dim=-1) > 0.25).all())  # beyond the unit ball, contracted
    assert bool(model.grid.inside(unit, 0).all())  # the dense coarse level covers the far field
    assert bool(torch.isfinite(outputs["rgb"]).all())
    assert float(outputs["samples_per_ray"].mean()) > 1


def test_faint_samples_are_skipped_from_the_first_pruning_on(pipeline) -> None:
    """The field starts as a haze below the threshold everywhere: training skips nothing until the grid is pruned;
    renders always skip."""
    pipeline, _ = pipeline
    model = copy.deepcopy(pipeline.model)
    assert model.config.skipped_alpha == 0.01
    model.train()
    if model.grid.pruned:
        pytest.skip("the module's training steps reached a pruning")
    assert model._skipped_alpha() == 0.0
    model.eval()
    assert model._skipped_alpha() == 0.01
    model.train()
    model.grid.prune(lambda cells, resolution: torch.ones_like(cells, dtype=torch.bool))
    assert model.grid.pruned and model._skipped_alpha() == 0.01
