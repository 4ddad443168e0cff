"""Freezing trained indices at their hard values (index_freeze_step): the rest of a run trains on the assignment
the file stores."""

import copy

import pytest
import torch

from vqad_nerfstudio.encodings.vertex_features import CodebookFeatures


def _trained_store(rows: int = 50, bits: int = 3, dim: int = 4) -> CodebookFeatures:
    torch.manual_seed(0)
    store = CodebookFeatures(rows, bits, dim)
    store.logits.data = torch.randn(rows, 2**bits)
    store.codebook.data = torch.randn(2**bits, dim)
    return store


def test_freezing_keeps_the_hard_table_and_releases_the_logits():
    store = _trained_store()
    indices = store.hard_indices()
    store.eval()
    with torch.no_grad():
        table = store.table().clone()
    store.train()
    old = store.logits
    swaps = store.freeze_indices()
    assert swaps == [(old, store.logits)] and store.logits.shape == (0, 8)
    assert store.frozen and store.indices.dtype == torch.int32 and store.num_rows == 50
    assert torch.equal(store.hard_indices(), indices)
    assert torch.equal(store.table(), table)  # training mode, with gradients: the same rows as the hard table
    assert store.freeze_indices() == []  # once


def test_a_frozen_store_trains_its_codebook_only():
    store = _trained_store()
    store.freeze_indices()
    rows = torch.tensor([0, 5, 5, 49])
    store(rows).sum().backward()
    expected = torch.zeros_like(store.codebook).index_add_(0, store.indices[rows].long(), torch.ones(4, 4))
    assert torch.equal(store.codebook.grad, expected)
    assert store.logits.grad is None
    with pytest.raises(RuntimeError, match="frozen"):
        store.index_rate_bits()


def test_a_store_in_its_float_warm_up_cannot_freeze():
    store = CodebookFeatures(10, 3, 4, float_warmup=True)
    with pytest.raises(RuntimeError, match="warm-up"):
        store.freeze_indices()


def test_a_checkpoint_after_freezing_resumes_frozen_and_prunes():
    store = _trained_store()
    store.freeze_indices()
    fresh = CodebookFeatures(50, 3, 4)  # built from the run's config: with logits
    kept = fresh.logits  # the optimiser's parameter stays the module's (emptied)
    fresh.load_state_dict(store.state_dict())
    assert fresh.frozen and fresh.logits is kept and kept.shape == (0, 8)
    assert torch.equal(fresh.indices, store.indices) and torch.equal(fresh.table(), store.table())
    fresh.remap(torch.tensor([49, -1, 0]))
    assert torch.equal(fresh.indices, torch.stack([store.indices[49], store.indices.new_tensor(0), store.indices[0]]))


def test_the_training_callback_freezes_at_its_step_and_optimisers_follow():
    from nerfstudio.data.scene_box import SceneBox
    from nerfstudio.engine.callbacks import TrainingCallbackAttributes, TrainingCallbackLocation
    from nerfstudio.engine.optimizers import Optimizers
    from vqad_nerfstudio.method_configs.vqad import vqad

    config = copy.deepcopy(vqad.config)
    model_config = config.pipeline.model
    model_config.num_levels, model_config.base_resolution, model_config.dense_resolution = 2, 4, 8
    model_config.index_warmup_steps, model_config.index_freeze_step = 2, 4
    box = SceneBox(aabb=torch.tensor([[-1.0] * 3, [1.0] * 3]))
    torch.manual_seed(0)
    model = config.pipeline.model.setup(scene_box=box, num_train_data=1)
    optimizers = Optimizers(config.optimizers, model.get_param_groups())
    callbacks = model.get_training_callbacks(TrainingCallbackAttributes(optimizers, None, None, None))
    stores = [level.features for level in model.grid.levels]

    def run(step: int) -> None:
        for callback in callbacks:
            callback.run_callback_at_location(step, TrainingCallbackLocation.BEFORE_TRAIN_ITERATION)

    run(2)  # the warm-up ends
    assert all(not s.in_float_warmup and not s.frozen for s in stores)
    indices = [s.hard_indices() for s in stores]
    run(3)
    assert not any(s.frozen for s in stores)
    run(4)
    assert all(s.frozen for s in stores)
    assert all(torch.equal(s.hard_indices(), i) for s, i in zip(stores, indices))
    grouped = [p for group in optimizers.optimizers["grid_logits"].param_groups for p in group["params"]]
    assert all(any(p is s.logits for p in grouped) for s in stores) and all(p.numel() == 0 for p in grouped)
    # the rate term leaves frozen stores out: nothing in the loss but the colours
    outputs = {"rgb": torch.zeros(3, 3), "accumulation": torch.ones(3, 1)}
    assert set(model.get_loss_dict(outputs, {"image": torch.zeros(3, 3)})) == {"rgb_loss"}


def test_freezing_at_the_end_of_the_warm_up_takes_the_kmeans_assignment():
    from nerfstudio.data.scene_box import SceneBox
    from nerfstudio.engine.callbacks import TrainingCallbackAttributes, TrainingCallbackLocation

    from vqad_nerfstudio.models.vqad import VQADModelConfig

    config = VQADModelConfig(
        num_levels=1, base_resolution=4, dense_resolution=4, index_warmup_steps=3, index_freeze_step=3
    )
    model = config.setup(scene_box=SceneBox(aabb=torch.tensor([[-1.0] * 3, [1.0] * 3])), num_train_data=1)
    store = model.grid.levels[0].features
    for callback in model.get_training_callbacks(TrainingCallbackAttributes(None, None, None, None)):
        callback.run_callback_at_location(3, TrainingCallbackLocation.BEFORE_TRAIN_ITERATION)
    assert store.frozen and not store.in_float_warmup and store.num_rows == 125


def test_a_negative_freeze_step_is_rejected():
    from vqad_nerfstudio.models.vqad import VQADModelConfig

    with pytest.raises(ValueError, match="index_freeze_step"):
        VQADModelConfig(index_freeze_step=-1)


def test_a_run_frozen_in_training_exports_what_it_trained():
    from nerfstudio.data.scene_box import SceneBox
    from nerfstudio.engine.callbacks import TrainingCallbackAttributes, TrainingCallbackLocation

    from vqad_nerfstudio.codec import write_container
    from vqad_nerfstudio.export.vqad_codec import encode_model, load_compressed
    from vqad_nerfstudio.models.vqad import VQADModelConfig

    torch.manual_seed(0)
    config = VQADModelConfig(
        num_levels=2, base_resolution=4, dense_resolution=8, index_warmup_steps=1, index_freeze_step=2
    )
    model = config.setup(scene_box=SceneBox(aabb=torch.tensor([[-1.0] * 3, [1.0] * 3])), num_train_data=1)
    for step in (1, 2):
        for callback in model.get_training_callbacks(TrainingCallbackAttributes(None, None, None, None)):
            callback.run_callback_at_location(step, TrainingCallbackLocation.BEFORE_TRAIN_ITERATION)
    stores = [level.features for level in model.grid.levels]
    assert all(store.frozen for store in stores)
    encoded = encode_model(model)
    decoded, _ = load_compressed(write_container(encoded.header, encoded.chunks))
    for store, again in zip(stores, (level.features for level in decoded.grid.levels)):
        assert torch.equal(again.indices, store.indices) and torch.equal(again.codebook, store.codebook.half().float())


def test_freezing_before_the_first_pruning_grows_the_finest_levels_is_refused():
    from nerfstudio.data.scene_box import SceneBox
    from nerfstudio.engine.callbacks import TrainingCallbackAttributes

    from vqad_nerfstudio.models.vqad import VQADModelConfig

    box = SceneBox(aabb=torch.tensor([[-1.0] * 3, [1.0] * 3]))
    attributes = TrainingCallbackAttributes(None, None, None, None)
    grown_later = dict(num_levels=2, base_resolution=4, dense_resolution=4, prune_steps=(500, 1000))
    with pytest.raises(ValueError, match=r"freeze at step 500 .* before the first pruning \(step 500\)"):
        VQADModelConfig(**grown_later, index_freeze_step=500).setup(
            scene_box=box, num_train_data=1
        ).get_training_callbacks(attributes)
    VQADModelConfig(**grown_later, index_freeze_step=501).setup(scene_box=box, num_train_data=1).get_training_callbacks(
        attributes
    )


@pytest.mark.parametrize("run, freeze, expected", [(14000, 12000, 12000), (7000, 12000, 6000), (10**7, 2100, 2100)])
def test_a_shorter_run_freezes_at_six_sevenths_of_it(run, freeze, expected):
    from types import SimpleNamespace

    from nerfstudio.data.scene_box import SceneBox
    from nerfstudio.engine.callbacks import TrainingCallbackAttributes, TrainingCallbackLocation

    from vqad_nerfstudio.models.vqad import VQADModelConfig

    config = VQADModelConfig(
        num_levels=1, base_resolution=4, dense_resolution=4, index_warmup_steps=0, index_freeze_step=freeze
    )
    model = config.setup(scene_box=SceneBox(aabb=torch.tensor([[-1.0] * 3, [1.0] * 3])), num_train_data=1)
    trainer = SimpleNamespace(config=SimpleNamespace(max_num_iterations=run))
    callbacks = model.get_training_callbacks(TrainingCallbackAttributes(None, None, None, trainer))
    store = model.grid.levels[0].features
    for step in (expected - 1, expected):
        for callback in callbacks:
            callback.run_callback_at_location(step, TrainingCallbackLocation.BEFORE_TRAIN_ITERATION)
        assert store.frozen == (step == expected)
