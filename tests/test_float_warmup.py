"""The float warm-up of the learned indices: float rows first, then k-means into codebook and indices."""

import pytest
import torch

from vqad_nerfstudio.encodings.kmeans import entropy_constrained, kmeans, squared_distances
from vqad_nerfstudio.encodings.vertex_features import CodebookFeatures


def test_kmeans_finds_separated_clusters():
    generator = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    labels = torch.randint(3, (600,), generator=generator)
    points = centres[labels] + 0.1 * torch.randn(600, 2, generator=generator)
    centroids, assignment = kmeans(points, 3, generator=generator)
    # every centre has one centroid next to it, and the points of a centre share its centroid
    nearest = torch.cdist(centres, centroids).argmin(dim=-1)
    assert sorted(nearest.tolist()) == [0, 1, 2]
    assert torch.allclose(centroids[nearest], centres, atol=0.05)
    assert torch.equal(assignment, nearest[labels])


def test_kmeans_with_more_clusters_than_distinct_points():
    points = torch.tensor([[1.0, 2.0]] * 5 + [[3.0, 4.0]] * 5)
    centroids, assignment = kmeans(points, 4, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(centroids[assignment], points)


@pytest.mark.parametrize("points, clusters", [(torch.zeros(0, 3), 2), (torch.zeros(5), 2), (torch.zeros(5, 3), 0)])
def test_kmeans_rejects_bad_input(points, clusters):
    with pytest.raises(ValueError, match="k-means"):
        kmeans(points, clusters)


def _warm_store(rows: int = 200, bits: int = 3, dim: int = 4) -> CodebookFeatures:
    torch.manual_seed(0)
    store = CodebookFeatures(rows, bits, dim, float_warmup=True)
    store.warmup_features.data = torch.randn(rows, dim)
    return store


def test_lookups_read_the_float_rows_until_quantised():
    store = _warm_store()
    rows = torch.tensor([3, 0, 3, 7])
    assert store.in_float_warmup
    assert torch.equal(store(rows), store.warmup_features[rows])
    store.eval()  # the viewer and eval during the warm-up see the float rows too
    assert torch.equal(store(rows), store.warmup_features[rows])


def test_quantising_takes_the_nearest_codeword_and_empties_the_float_rows():
    store = _warm_store()
    features = store.warmup_features.detach().clone()
    old = store.warmup_features
    swaps = store.quantize_float_warmup(generator=torch.Generator().manual_seed(0))
    assert swaps == [(old, store.warmup_features)] and not store.in_float_warmup
    assert store.warmup_features.shape == (0, 4)
    nearest = torch.cdist(features, store.codebook.detach()).argmin(dim=-1)
    assert torch.equal(store.hard_indices(), nearest)
    # k-means beats any single codeword: the quantisation error is below the features' variance
    error = (store.codebook[nearest] - features).square().sum(dim=-1).mean()
    assert error < 0.5 * features.var(dim=0).sum()
    assert store.quantize_float_warmup() == []  # once only


def test_straight_through_training_after_quantising():
    store = _warm_store()
    store.quantize_float_warmup(generator=torch.Generator().manual_seed(0))
    store.temperature = 0.2
    rows = torch.arange(50)
    store(rows).square().sum().backward()
    assert store.logits.grad is not None and store.logits.grad.abs().sum() > 0
    assert store.codebook.grad is not None and store.codebook.grad.abs().sum() > 0


def test_pruning_during_the_warm_up_keeps_surviving_float_rows():
    store = _warm_store(rows=6)
    old = store.warmup_features.detach().clone()
    store.remap(torch.tensor([5, -1, 0]))
    assert store.warmup_features.shape == (3, 4) and store.logits.shape == (3, 8)
    assert torch.equal(store.warmup_features[0], old[5]) and torch.equal(store.warmup_features[2], old[0])


def test_checkpoints_load_before_and_after_the_warm_up():
    during = _warm_store(rows=10)
    fresh = CodebookFeatures(10, 3, 4)  # built without a warm-up: takes the saved float rows
    fresh.load_state_dict(during.state_dict())
    assert fresh.in_float_warmup and torch.equal(fresh.warmup_features, during.warmup_features)

    during.quantize_float_warmup()
    resumed = CodebookFeatures(10, 3, 4, float_warmup=True)  # built with one: the saved store has ended it
    resumed.load_state_dict(during.state_dict())
    assert not resumed.in_float_warmup and torch.equal(resumed.hard_indices(), during.hard_indices())

    older = {k: v for k, v in during.state_dict().items() if k != "warmup_features"}  # saved before the table existed
    resumed.load_state_dict(older)
    assert not resumed.in_float_warmup


def test_weighted_kmeans_pulls_centroids_towards_important_points():
    points = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    weights = torch.tensor([1.0, 1.0, 1.0, 97.0])
    centroids, assignment = kmeans(points, 1, weights=weights)
    assert torch.allclose(centroids, torch.tensor([[(0 + 1 + 2 + 3 * 97) / 100]]))
    assert assignment.tolist() == [0, 0, 0, 0]


@pytest.mark.parametrize(
    "weights", [torch.ones(3), torch.tensor([1.0, 0.0, 1.0, 1.0]), torch.tensor([1.0, 1, 1, float("inf")])]
)
def test_kmeans_rejects_bad_weights(weights):
    with pytest.raises(ValueError, match="weights"):
        kmeans(torch.zeros(4, 2), 2, weights=weights)


def _gaussian_rows(rows: int = 3000, dim: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed))


def _entropy_bits(assignment: torch.Tensor) -> float:
    shares = torch.bincount(assignment).float() / assignment.numel()
    shares = shares[shares > 0]
    return float(-(shares * torch.log2(shares)).sum())


def test_entropy_constrained_quantisation_trades_error_for_bits():
    points = _gaussian_rows()
    weights = torch.ones(points.shape[0])
    start, _ = kmeans(points, 16, generator=torch.Generator().manual_seed(0))
    entropies, errors = [], []
    for rate in (0.0, 0.2, 1.0, 5.0):
        centroids, assignment, bits = entropy_constrained(points, start, weights, rate)
        entropies.append(_entropy_bits(assignment))
        errors.append(float((points - centroids[assignment]).square().sum(dim=-1).mean()))
        # the assignment is the least-cost choice under the centroids and code lengths returned
        cost = squared_distances(points, centroids) + rate * bits
        assert torch.equal(cost.gather(1, assignment[:, None]), cost.min(dim=-1, keepdim=True).values)
    assert entropies == sorted(entropies, reverse=True) and entropies[-1] < entropies[0] - 1.0
    assert errors == sorted(errors)


def test_quantising_with_a_rate_shrinks_the_coded_indices_and_spares_important_rows():
    from vqad_nerfstudio.codec import encode_categorical

    features = _gaussian_rows(rows=4000)
    importance = torch.full((4000,), 1e-3)
    importance[:200] = 100.0  # a few rows matter (the surface), most hardly (empty or hidden space)
    sizes = {}
    for rate in (0.0, 2.0):
        torch.manual_seed(0)
        store = CodebookFeatures(4000, 6, 4, float_warmup=True)
        store.warmup_features.data = features.clone()
        store.quantize_float_warmup(generator=torch.Generator().manual_seed(0), importance=importance, rate=rate)
        indices = store.hard_indices()
        sizes[rate] = len(encode_categorical(indices.numpy(), 64))
        nearest = squared_distances(features, store.codebook.detach()).argmin(dim=-1) == indices
        assert nearest[:200].float().mean() > 0.9  # the important rows (nearly all) keep their nearest codeword
        if rate > 0:
            assert nearest[200:].float().mean() < 0.5  # the others mostly give theirs up for a frequent one
    assert sizes[2.0] < 0.5 * sizes[0.0]


def test_quantising_without_importance_or_rate_is_plain_kmeans():
    store, twin = _warm_store(), _warm_store()
    store.quantize_float_warmup(generator=torch.Generator().manual_seed(0))
    twin.quantize_float_warmup(generator=torch.Generator().manual_seed(0), importance=torch.zeros(200))
    assert torch.equal(store.codebook, twin.codebook) and torch.equal(store.logits, twin.logits)


def test_fisher_importance_reads_adams_second_moments():
    from types import SimpleNamespace

    from vqad_nerfstudio.models.vqad import fisher_importance

    rows = torch.nn.Parameter(torch.zeros(3, 2))
    adam = torch.optim.Adam([rows])
    optimizers = SimpleNamespace(optimizers={"grid_features": adam})
    assert fisher_importance(optimizers, rows) is None and fisher_importance(None, rows) is None  # no state yet
    rows.grad = torch.tensor([[1.0, 2.0], [0.0, 0.0], [3.0, 0.0]])
    adam.step()
    importance = fisher_importance(optimizers, rows)
    assert importance is not None and torch.allclose(importance, 0.001 * torch.tensor([5.0, 0.0, 9.0]))


def test_training_callback_quantises_with_the_optimisers_fisher_information():
    """The warm-up ends inside ns-train's callback: the importance comes from the optimisers' state, the rate
    shrinks the coded indices, and the optimisers follow the replaced parameters."""
    import copy

    from nerfstudio.data.scene_box import SceneBox
    from nerfstudio.engine.callbacks import TrainingCallbackAttributes, TrainingCallbackLocation
    from nerfstudio.engine.optimizers import Optimizers
    from vqad_nerfstudio.method_configs.vqad import vqad

    from vqad_nerfstudio.codec import encode_categorical

    box = SceneBox(aabb=torch.tensor([[-1.0] * 3, [1.0] * 3]))
    coded = {}
    for rate in (0.0, 4.0):
        torch.manual_seed(0)
        config = copy.deepcopy(vqad.config)
        model_config = config.pipeline.model
        model_config.num_levels, model_config.base_resolution, model_config.dense_resolution = 1, 16, 16
        model_config.index_bits, model_config.index_warmup_steps, model_config.quantization_rate = 6, 1, rate
        model = model_config.setup(scene_box=box, num_train_data=1)
        optimizers = Optimizers(config.optimizers, model.get_param_groups())
        store = model.grid.levels[0].features
        seen = torch.arange(0, store.num_rows, 7)  # the rows rays reach get gradients, the others none
        store(seen).square().sum().backward()
        optimizers.optimizer_step_all()
        callbacks = model.get_training_callbacks(TrainingCallbackAttributes(optimizers, None, None, None))
        for callback in callbacks:
            callback.run_callback_at_location(1, TrainingCallbackLocation.BEFORE_TRAIN_ITERATION)
        assert not store.in_float_warmup
        grouped = {id(p) for group in optimizers.optimizers["grid_features"].param_groups for p in group["params"]}
        assert id(store.warmup_features) in grouped
        indices = store.hard_indices()
        coded[rate] = len(encode_categorical(indices.numpy(), 64))
        if rate > 0:  # the unseen rows (no Fisher information) share one codeword
            unseen = torch.ones(store.num_rows, dtype=torch.bool)
            unseen[seen] = False
            assert torch.bincount(indices[unseen]).max() > 0.9 * int(unseen.sum())
    assert coded[4.0] < 0.5 * coded[0.0]


def test_freezing_keeps_the_hard_indices_and_drops_the_logits():
    store = _warm_store()
    with pytest.raises(RuntimeError, match="quantise"):
        store.freeze_indices()
    store.quantize_float_warmup(generator=torch.Generator().manual_seed(0))
    indices, rows = store.hard_indices(), torch.arange(200)
    before = store(rows).detach()
    old = store.logits
    assert store.freeze_indices() == [(old, store.logits)] and store.freeze_indices() == []
    assert store.frozen and store.logits.shape == (0, 8) and torch.equal(store.hard_indices(), indices)
    store.train()
    features = store(rows)
    assert torch.equal(features.detach(), before)
    features.square().sum().backward()
    assert store.codebook.grad is not None and store.codebook.grad.abs().sum() > 0  # the codebook trains on

    resumed = CodebookFeatures(200, 3, 4, float_warmup=True)  # built as training builds it: logits and warm-up
    logits = resumed.logits
    resumed.load_state_dict(store.state_dict())
    assert resumed.frozen and resumed.logits is logits and logits.shape == (0, 8)  # resized in place
    assert torch.equal(resumed.hard_indices(), indices) and torch.equal(resumed(rows), before)


def test_fixed_index_training_freezes_at_the_warm_up_end_and_resumes_with_its_optimisers(tmp_path):
    import copy

    from nerfstudio.data.scene_box import SceneBox
    from nerfstudio.engine.callbacks import TrainingCallbackAttributes, TrainingCallbackLocation
    from nerfstudio.engine.optimizers import Optimizers
    from vqad_nerfstudio.method_configs.vqad import vqad

    box = SceneBox(aabb=torch.tensor([[-1.0] * 3, [1.0] * 3]))
    config = copy.deepcopy(vqad.config)
    model_config = config.pipeline.model
    model_config.num_levels, model_config.base_resolution, model_config.dense_resolution = 2, 4, 8
    model_config.index_warmup_steps, model_config.index_training, model_config.quantization_rate = 1, "fixed", 1.0

    def build():
        torch.manual_seed(0)
        model = model_config.setup(scene_box=box, num_train_data=1)
        return model, Optimizers(config.optimizers, model.get_param_groups())

    def step(model, optimizers):
        optimizers.zero_grad_all()
        points = torch.rand(500, 3)
        model.grid(points)[0].square().sum().backward()
        optimizers.optimizer_step_all()

    model, optimizers = build()
    step(model, optimizers)
    for callback in model.get_training_callbacks(TrainingCallbackAttributes(optimizers, None, None, None)):
        callback.run_callback_at_location(1, TrainingCallbackLocation.BEFORE_TRAIN_ITERATION)
    stores = [level.features for level in model.grid.levels]
    assert all(store.frozen and store.logits.shape[0] == 0 for store in stores)
    grouped = [p for group in optimizers.optimizers["grid_logits"].param_groups for p in group["params"]]
    assert [id(p) for p in grouped] == [id(store.logits) for store in stores]
    codebooks = [store.codebook.detach().clone() for store in stores]
    step(model, optimizers)
    assert any(not torch.equal(store.codebook, before) for store, before in zip(stores, codebooks))

    # a checkpoint of it resumes as nerfstudio resumes: a model and optimisers built from the config, then loaded
    saved = {"model": model.state_dict(), "optimizers": optimizers.optimizers}
    saved = {"model": saved["model"], "optimizers": {k: v.state_dict() for k, v in saved["optimizers"].items()}}
    torch.save(saved, tmp_path / "step.ckpt")
    loaded = torch.load(tmp_path / "step.ckpt", weights_only=False)
    resumed, resumed_optimizers = build()
    resumed.load_state_dict(loaded["model"])
    resumed_optimizers.load_optimizers(loaded["optimizers"])
    for store, twin in zip(stores, (level.features for level in resumed.grid.levels)):
        assert twin.frozen and torch.equal(twin.hard_indices(), store.hard_indices())
    step(resumed, resumed_optimizers)


def test_post_training_quantisation_of_a_float_model_renders_like_it_and_exports_smaller():
    from nerfstudio.cameras.rays import RayBundle
    from nerfstudio.data.scene_box import SceneBox

    from vqad_nerfstudio.codec import write_container
    from vqad_nerfstudio.export.formats import encode_any, load_any
    from vqad_nerfstudio.models.post_training_quantization import fisher_from_optimizer_state, quantize_float_model
    from vqad_nerfstudio.models.vqad import VQADModelConfig

    torch.manual_seed(0)
    box = SceneBox(aabb=torch.tensor([[-1.0] * 3, [1.0] * 3]))
    config = VQADModelConfig(feature_store="float", num_levels=2, base_resolution=4, dense_resolution=8)
    model = config.setup(scene_box=box, num_train_data=1).eval()
    for level in model.grid.levels:
        level.features.features.data = torch.randn_like(level.features.features) * 0.3
    rows = model.grid.levels[1].features.num_rows
    state = {"grid_features": {"state": {1: {"exp_avg_sq": torch.rand(rows, 16)}}}}
    importance = fisher_from_optimizer_state(model, state)
    assert importance[0] is None and importance[1].shape == (rows,)

    bundle = RayBundle(
        origins=torch.tensor([[0.0, 0.0, -3.0]]).repeat(64, 1),
        directions=torch.nn.functional.normalize(torch.randn(64, 3) * 0.1 + torch.tensor([0.0, 0.0, 1.0]), dim=-1),
        pixel_area=torch.ones(64, 1),
        camera_indices=torch.zeros(64, 1, dtype=torch.long),
    )
    reference = model(bundle)["rgb"]
    errors, sizes = [], []
    for bits, rate in ((2, 0.0), (8, 0.0), (8, 4.0)):
        quantised = quantize_float_model(model, bits, rate, importance, torch.Generator().manual_seed(0))
        assert all(level.features.frozen for level in quantised.grid.levels)
        errors.append(float((quantised(bundle)["rgb"] - reference).square().mean()))
        encoded = encode_any(quantised)
        data = write_container(encoded.header, encoded.chunks)
        sizes.append(len(data))
        decoded, info = load_any(data)
        assert info.method == "vqad" and torch.allclose(decoded(bundle)["rgb"], quantised(bundle)["rgb"], atol=1e-3)
    assert errors[1] < errors[0]  # more codewords, closer to the float model
    assert sizes[2] < sizes[1]  # the rate shrinks the file
    with pytest.raises(ValueError, match="vqad-float"):
        quantize_float_model(quantised)
