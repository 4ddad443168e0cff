"""The occupancy estimate: a decayed running maximum of density per voxel, updated until the first pruning."""

import torch
from nerfstudio.data.scene_box import SceneBox
from nerfstudio.engine.callbacks import TrainingCallbackAttributes, TrainingCallbackLocation

from vqad_nerfstudio.encodings.occupancy import UNKNOWN, OccupancyEstimator
from vqad_nerfstudio.models.vqad import VQADModelConfig


def test_the_first_update_sees_every_voxel_and_empty_space_is_skipped():
    estimator = OccupancyEstimator(8, density_threshold=1.0)
    assert bool(estimator.occupied().all())  # unknown space counts as occupied
    estimator.update(lambda points: (points[:, 0] < 0.5).float() * 10.0)  # dense in the half x < 0.5
    assert not bool((estimator.density == UNKNOWN).any())
    occupied = estimator.occupied()
    assert bool(occupied[:4].all()) and not bool(occupied[4:].any())
    inside, outside = torch.tensor([[0.2, 0.5, 0.5]]), torch.tensor([[0.8, 0.5, 0.5]])
    assert bool(estimator.occupied_at(inside)) and not bool(estimator.occupied_at(outside))


def test_training_updates_the_estimate_until_the_first_pruning():
    config = VQADModelConfig(num_levels=2, base_resolution=4, dense_resolution=8, occupancy_resolution=4)
    model = config.setup(scene_box=SceneBox(aabb=torch.tensor([[-1.0] * 3, [1.0] * 3])), num_train_data=1)
    calls = []

    def density(points: torch.Tensor) -> torch.Tensor:
        calls.append(points.shape[0])
        return torch.ones(points.shape[0])

    model._density_for_occupancy = density
    callbacks = model.get_training_callbacks(TrainingCallbackAttributes(None, None, None, None))

    def run(step: int) -> None:
        for callback in callbacks:
            callback.run_callback_at_location(step, TrainingCallbackLocation.BEFORE_TRAIN_ITERATION)

    run(0)
    assert calls == [64]  # every voxel of the 4^3 estimate
    model.grid.prune(lambda cells, resolution: torch.ones_like(cells, dtype=torch.bool))
    run(config.occupancy_update_every)
    assert calls == [64]  # sampling no longer reads the estimate: nothing evaluated
