"""The float warm-up of the learned indices: float rows first, then k-means into codebook and indices."""

import pytest
import torch

from vqad_nerfstudio.encodings.kmeans import kmeans
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


def test_kmeans_seeds_distinct_points_before_any_duplicate():
    # k-means++ gives a point already seeded probability 0: seeding as many clusters as there are distinct points
    # takes each of them once (a uniform or off-by-one draw would repeat some)
    points = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [5.0, 5.0], [-2.0, 3.0]]).repeat_interleave(3, dim=0)
    for seed in range(10):
        centroids, _ = kmeans(points, 5, iterations=0, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(centroids.unique(dim=0), points.unique(dim=0))


def test_kmeans_seeding_weighs_points_by_squared_distance():
    # one far outlier among 1000 points near the origin: k-means++ seeds it (probability about 0.99 per draw)
    points = 0.01 * torch.randn(1001, 2, generator=torch.Generator().manual_seed(0))
    points[500] = torch.tensor([100.0, 0.0])
    for seed in range(10):
        centroids, _ = kmeans(points, 2, iterations=0, generator=torch.Generator().manual_seed(seed))
        assert (centroids == points[500]).all(dim=-1).any()


def test_kmeans_repeats_with_the_same_generator_seed():
    points = torch.randn(300, 3, generator=torch.Generator().manual_seed(0))
    first, second = (kmeans(points, 8, generator=torch.Generator().manual_seed(7))[0] for _ in range(2))
    assert torch.equal(first, second)


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
    old, old_logits = store.warmup_features, store.logits
    swaps = store.quantize_float_warmup(generator=torch.Generator().manual_seed(0))
    assert swaps == [(old, store.warmup_features), (old_logits, store.logits)] and not store.in_float_warmup
    assert store.warmup_features.shape == (0, 4) and store.logits.shape == (200, 8) and store.num_rows == 200
    nearest = torch.cdist(features, store.codebook.detach()).argmin(dim=-1)
    assert torch.equal(store.hard_indices(), nearest)
    # k-means beats any single codeword: the quantisation error is below the features' variance
    error = (store.codebook[nearest] - features).square().sum(dim=-1).mean()
    assert error < 0.5 * features.var(dim=0).sum()
    assert store.quantize_float_warmup() == []  # once only


def test_a_store_in_its_warm_up_holds_no_logits():
    # with 10-bit indices they would take 4 kB a row that nothing reads until the warm-up ends
    store = _warm_store(rows=6)
    assert store.logits.shape == (0, 8) and store.num_rows == 6
    with pytest.raises(RuntimeError, match="warm-up"):
        store.hard_indices()


def test_the_logits_rank_codewords_by_distance_with_rows_kept_in_float():
    store = _warm_store()
    features = store.warmup_features.detach().clone()
    store.quantize_float_warmup(generator=torch.Generator().manual_seed(0), float_fraction=0.1)
    kept = store.float_rows
    assert int(kept.sum()) == 20 and store.logits.shape == (200, 8)
    assert torch.equal(store.logits[kept], torch.zeros(20, 8))
    distances = torch.cdist(features[~kept], store.codebook.detach()).square()
    order = distances.argsort(dim=-1)
    assert torch.equal(store.logits[~kept].argsort(dim=-1, descending=True), order)


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
    assert store.warmup_features.shape == (3, 4) and store.logits.shape == (0, 8) and store.num_rows == 3
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


def test_checkpoints_from_inside_the_warm_up_with_logits_still_load():
    # stores saved in their warm-up before it emptied the logits held a random row of them per vertex
    during = _warm_store(rows=10)
    saved = dict(during.state_dict(), logits=torch.randn(10, 8))
    resumed = _warm_store(rows=10)
    resumed.load_state_dict(saved)
    assert resumed.in_float_warmup and resumed.num_rows == 10
    assert torch.equal(resumed.table(), during.table())
    resumed.remap(torch.tensor([9, -1, 0]))  # pruning keeps them in step with the float rows
    assert resumed.logits.shape == (3, 8) and resumed.warmup_features.shape == (3, 4)
    resumed.quantize_float_warmup(generator=torch.Generator().manual_seed(0))
    assert resumed.logits.shape == (3, 8) and resumed.hard_indices().shape == (3,)


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


def _quantisation_error(store: CodebookFeatures, features: torch.Tensor) -> torch.Tensor:
    return (store.codebook.detach()[store.hard_indices()] - features).square().sum(dim=-1)


def test_quantising_with_importance_spares_the_rows_that_matter():
    features = _gaussian_rows(rows=4000)
    importance = torch.full((4000,), 1e-3)
    importance[:200] = 100.0  # a few rows matter (the surface), most hardly (empty or hidden space)
    errors = {}
    for weighted in (False, True):
        torch.manual_seed(0)
        store = CodebookFeatures(4000, 5, 4, float_warmup=True)
        store.warmup_features.data = features.clone()
        store.quantize_float_warmup(
            generator=torch.Generator().manual_seed(0), importance=importance if weighted else None
        )
        errors[weighted] = _quantisation_error(store, features)
    assert errors[True][:200].mean() < 0.8 * errors[False][:200].mean()
    assert errors[True][200:].mean() > errors[False][200:].mean()


def test_quantising_without_importance_is_plain_kmeans():
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
    """The warm-up ends inside ns-train's callback: the importance comes from the optimisers' state (the rows rays
    reach are quantised more finely than with uniform weights), and the optimisers follow the replaced parameters."""
    import copy

    from nerfstudio.data.scene_box import SceneBox
    from nerfstudio.engine.callbacks import TrainingCallbackAttributes, TrainingCallbackLocation
    from nerfstudio.engine.optimizers import Optimizers
    from vqad_nerfstudio.method_configs.vqad import vqad

    box = SceneBox(aabb=torch.tensor([[-1.0] * 3, [1.0] * 3]))
    errors = {}
    for importance in ("uniform", "fisher"):
        torch.manual_seed(0)
        config = copy.deepcopy(vqad.config)
        model_config = config.pipeline.model
        model_config.num_levels, model_config.base_resolution, model_config.dense_resolution = 1, 16, 16
        model_config.index_bits, model_config.index_warmup_steps = 6, 1
        model_config.quantization_importance = importance
        model = model_config.setup(scene_box=box, num_train_data=1)
        optimizers = Optimizers(config.optimizers, model.get_param_groups())
        store = model.grid.levels[0].features
        seen = torch.arange(0, store.num_rows, 50)  # the rows rays reach get gradients, the others none
        store(seen).square().sum().backward()
        optimizers.optimizer_step_all()
        features = store.warmup_features.detach().clone()
        callbacks = model.get_training_callbacks(TrainingCallbackAttributes(optimizers, None, None, None))
        for callback in callbacks:
            callback.run_callback_at_location(1, TrainingCallbackLocation.BEFORE_TRAIN_ITERATION)
        assert not store.in_float_warmup
        grouped = {id(p) for group in optimizers.optimizers["grid_features"].param_groups for p in group["params"]}
        assert id(store.warmup_features) in grouped
        errors[importance] = _quantisation_error(store, features)[seen].mean()
    assert errors["fisher"] < 0.5 * errors["uniform"]


def _store_with_float_rows(fraction: float = 0.05) -> tuple:
    """A quantised store of 4000 Gaussian rows whose first 100 matter 10^5 times more, with ``fraction`` kept float."""
    features = _gaussian_rows(rows=4000)
    importance = torch.full((4000,), 1e-3)
    importance[:100] = 100.0
    torch.manual_seed(0)
    store = CodebookFeatures(4000, 3, 4, float_warmup=True)
    store.warmup_features.data = features.clone()
    swaps = store.quantize_float_warmup(
        generator=torch.Generator().manual_seed(0), importance=importance, float_fraction=fraction
    )
    return store, features, swaps


def test_float_fraction_keeps_the_costliest_rows_and_reads_their_features():
    store, features, swaps = _store_with_float_rows(0.05)
    assert store.has_float_rows and int(store.float_rows.sum()) == 200  # 5% of 4000, rounded down
    # the important rows cost most to quantise (but for the few that the weighted k-means puts next to a codeword),
    # and among the others the farthest from any codeword are kept
    assert int(store.float_rows[:100].sum()) >= 90
    others = torch.cdist(features[100:], store.codebook.detach()).min(dim=-1).values
    assert others[store.float_rows[100:]].min() > others.median()
    assert len(swaps) == 3 and swaps[2][1] is store.float_features  # the optimisers must follow the new rows
    rows = torch.arange(4000)
    kept = store.float_rows
    assert torch.equal(store(rows)[kept], features[kept])
    assert torch.equal(store(rows)[~kept], store.codebook.detach()[store.hard_indices()][~kept])
    assert torch.equal(store.table(), store(rows))
    store.eval()
    with torch.no_grad():
        assert torch.equal(store.table(), store(rows))


def test_float_rows_need_fewer_codewords_for_the_rest():
    """The codebook is fitted to the rows that are quantised: their error shrinks once the costliest are kept."""
    plain, features, _ = _store_with_float_rows(0.0)
    kept_store, _, _ = _store_with_float_rows(0.05)
    rest = ~kept_store.float_rows
    assert not plain.has_float_rows and plain.float_features.shape == (0, 4)
    error = {
        "plain": _quantisation_error(plain, features)[rest].mean(),
        "kept": _quantisation_error(kept_store, features)[rest].mean(),
    }
    assert error["kept"] < error["plain"]


def test_gradients_of_float_rows_go_to_their_features_only():
    store, _, _ = _store_with_float_rows(0.05)
    store.temperature = 0.2
    store.table().square().sum().backward()
    kept = store.float_rows
    assert bool(store.float_features.grad[kept].abs().sum(dim=-1).gt(0).all())
    assert bool(store.float_features.grad[~kept].eq(0).all())
    assert bool(store.logits.grad[kept].eq(0).all()) and bool(store.logits.grad[~kept].ne(0).any())


@pytest.mark.parametrize("fraction", [-0.1, 1.0])
def test_float_fraction_outside_0_to_1_is_rejected(fraction):
    with pytest.raises(ValueError, match="float_fraction"):
        _warm_store().quantize_float_warmup(float_fraction=fraction)


def test_pruning_keeps_surviving_float_rows():
    store, features, _ = _store_with_float_rows(0.05)
    kept_rows = torch.nonzero(store.float_rows).squeeze(-1)
    source = torch.cat([kept_rows[:3], torch.tensor([-1]), torch.nonzero(~store.float_rows)[:2, 0]])
    store.remap(source)
    assert store.float_rows.tolist() == [True, True, True, False, False, False]
    assert torch.equal(store.float_features[:3], features[kept_rows[:3]])


def test_checkpoints_with_float_rows_load_into_a_fresh_store():
    store, _, _ = _store_with_float_rows(0.05)
    resumed = CodebookFeatures(4000, 3, 4, float_warmup=True)
    resumed.load_state_dict(store.state_dict())
    rows = torch.arange(4000)
    assert resumed.has_float_rows and torch.equal(resumed(rows), store(rows))
    older = {k: v for k, v in store.state_dict().items() if not k.startswith("float_")}  # saved before float rows
    resumed.load_state_dict(older)
    assert not resumed.has_float_rows


def test_an_empty_store_built_with_a_warm_up_grows_float_rows_until_it_ends():
    store = CodebookFeatures(0, 3, 4, float_warmup=True)
    assert store.in_float_warmup
    store.remap(torch.full((50,), -1))
    assert store.in_float_warmup and store.warmup_features.shape == (50, 4)
    store.quantize_float_warmup(generator=torch.Generator().manual_seed(0))
    assert not store.in_float_warmup and store.warmup_features.shape == (0, 4)


def test_an_empty_store_whose_warm_up_ends_grows_indexed_rows():
    store = CodebookFeatures(0, 3, 4, float_warmup=True)
    assert store.quantize_float_warmup(float_fraction=0.5) == [] and not store.in_float_warmup
    store.remap(torch.full((50,), -1))
    assert not store.in_float_warmup and store.logits.shape == (50, 8) and store.warmup_features.shape == (0, 4)


@pytest.mark.parametrize("warmup_grown_levels", [False, True])
def test_levels_grown_by_the_first_pruning_warm_up_when_asked(warmup_grown_levels):
    """By default the fine levels, empty until the first pruning grows them, start straight-through from random
    logits and never hold rows kept in float (on the CPU demo that scored 26.66 dB in 40.9 KiB against 26.06 in
    46.0 with a warm-up of their own, docs/benchmarks.md); warmup_grown_levels gives them float rows."""
    from nerfstudio.data.scene_box import SceneBox

    from vqad_nerfstudio.models.vqad import VQADModelConfig

    config = VQADModelConfig(
        num_levels=2, base_resolution=4, dense_resolution=4, warmup_grown_levels=warmup_grown_levels
    )
    box = SceneBox(aabb=torch.tensor([[-1.0] * 3, [1.0] * 3]))
    model = config.setup(scene_box=box, num_train_data=1)
    dense, grown = (level.features for level in model.grid.levels)
    assert dense.in_float_warmup and grown.num_rows == 0
    model.grid.prune(lambda cells, resolution: torch.ones_like(cells, dtype=torch.bool))
    assert grown.num_rows > 0 and grown.in_float_warmup == warmup_grown_levels
    assert grown.warmup_features.shape[0] == (grown.num_rows if warmup_grown_levels else 0)
    # a checkpoint from inside the warm-up resumes it, the grown level's float rows included
    fresh = config.setup(scene_box=box, num_train_data=1)
    fresh.load_state_dict(model.state_dict())
    resumed = fresh.grid.levels[1].features
    assert resumed.in_float_warmup == warmup_grown_levels and torch.equal(resumed.table(), grown.table())
