"""The straight-through estimator: hard codewords forward, softmax-relaxed gradients backward."""

import pytest
import torch

from vqad_nerfstudio.encodings.straight_through import straight_through_lookup
from vqad_nerfstudio.encodings.vertex_features import CodebookFeatures, FloatFeatures


def reference_lookup(rows, logits, codebook, temperature=1.0):
    """The paper's formulation, materialising the soft keys (what we must match without doing this)."""
    soft = torch.softmax(logits[rows] / temperature, dim=-1)
    hard = torch.nn.functional.one_hot(soft.argmax(dim=-1), logits.shape[1]).to(soft.dtype)
    return (hard - soft.detach() + soft) @ codebook


@pytest.mark.parametrize("num_rows,num_lookups", [(40, 300), (500, 64)])  # full-table and unique-rows paths
@pytest.mark.parametrize("bits,temperature", [(1, 1.0), (4, 1.0), (6, 1.0), (4, 0.1)])
def test_forward_is_hard_lookup_and_gradients_match_reference(num_rows, num_lookups, bits, temperature):
    torch.manual_seed(bits)
    logits = torch.randn(num_rows, 2**bits, dtype=torch.float64, requires_grad=True)
    codebook = torch.randn(2**bits, 5, dtype=torch.float64, requires_grad=True)
    rows = torch.randint(0, num_rows, (num_lookups,))
    upstream = torch.randn(num_lookups, 5, dtype=torch.float64)

    out = straight_through_lookup(rows, logits, codebook, temperature)
    assert torch.equal(out, codebook[logits[rows].argmax(dim=-1)])  # exactly what will be stored
    (out * upstream).sum().backward()

    logits_ref = logits.detach().clone().requires_grad_()
    codebook_ref = codebook.detach().clone().requires_grad_()
    (reference_lookup(rows, logits_ref, codebook_ref, temperature) * upstream).sum().backward()
    torch.testing.assert_close(logits.grad, logits_ref.grad)
    torch.testing.assert_close(codebook.grad, codebook_ref.grad)
    assert logits.grad.abs().sum() > 0 and codebook.grad.abs().sum() > 0


def test_relaxed_lookup_is_the_soft_mixture_and_approaches_hard_as_temperature_falls():
    torch.manual_seed(0)
    logits = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    codebook = torch.randn(16, 4, dtype=torch.float64)
    rows = torch.randint(0, 50, (30,))
    soft = straight_through_lookup(rows, logits, codebook, temperature=2.0, relaxed=True)
    torch.testing.assert_close(soft, torch.softmax(logits[rows] / 2.0, dim=-1) @ codebook)
    soft.sum().backward()
    assert logits.grad[rows].abs().sum() > 0
    hard = codebook[logits[rows].argmax(dim=-1)]
    errors = [
        (straight_through_lookup(rows, logits, codebook, temperature=t, relaxed=True) - hard).abs().max().item()
        for t in (1.0, 0.1, 0.001)
    ]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-6


def test_gradients_reach_logits_codebook_and_mlp():
    torch.manual_seed(0)
    store = CodebookFeatures(num_rows=64, index_bits=4, feature_dim=8)
    mlp = torch.nn.Linear(8, 1)
    loss = mlp(store(torch.randint(0, 64, (256,)))).pow(2).mean()
    loss.backward()
    for name, param in [("logits", store.logits), ("codebook", store.codebook), ("mlp", mlp.weight)]:
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_training_changes_indices():
    torch.manual_seed(0)
    store = CodebookFeatures(num_rows=32, index_bits=3, feature_dim=4)
    target = torch.randn(32, 4)
    before = store.hard_indices().clone()
    optimizer = torch.optim.Adam(store.parameters(), lr=0.1)
    for _ in range(100):
        optimizer.zero_grad()
        (store(torch.arange(32)) - target).pow(2).mean().backward()
        optimizer.step()
    assert (store.hard_indices() != before).any()


def test_no_grad_lookup_equals_training_lookup():
    store = CodebookFeatures(num_rows=100, index_bits=5, feature_dim=3)
    rows = torch.randint(0, 100, (1000,))
    with torch.no_grad():
        inference = store(rows)
    assert torch.equal(inference, store(rows).detach())


def test_load_codewords_roundtrip_and_validation():
    with pytest.raises(ValueError, match="frozen indices only"):
        CodebookFeatures(num_rows=10, index_bits=2, feature_dim=3).load_codewords(torch.zeros(4, 3), torch.zeros(10))
    store = CodebookFeatures(num_rows=10, index_bits=2, feature_dim=3, frozen=True)
    indices = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0, 0, 1])
    codebook = torch.randn(4, 3)
    store.load_codewords(codebook, indices)
    assert torch.equal(store.hard_indices(), indices) and torch.equal(store.codebook, codebook)
    assert torch.equal(store.eval()(torch.arange(10)), codebook[indices])
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        store.load_codewords(codebook, torch.full((10,), 4))
    with pytest.raises(ValueError, match="10 indices"):
        store.load_codewords(codebook, indices[:9])


@pytest.mark.parametrize("bits", [0, 17])
def test_bits_out_of_range(bits):
    with pytest.raises(ValueError, match="index_bits must be in 1..16"):
        CodebookFeatures(num_rows=4, index_bits=bits, feature_dim=2)


def test_remap_keeps_surviving_rows():
    for store, name in ((CodebookFeatures(6, 3, 2), "logits"), (FloatFeatures(6, 2), "features")):
        old = getattr(store, name)
        source = torch.tensor([5, -1, 0])
        swaps = store.remap(source)
        new = getattr(store, name)
        assert swaps == [(old, new)] and new.shape[0] == 3
        assert torch.equal(new.data[0], old.data[5]) and torch.equal(new.data[2], old.data[0])


def test_relaxed_store_is_soft_in_training_mode_only():
    torch.manual_seed(0)
    store = CodebookFeatures(num_rows=20, index_bits=3, feature_dim=4, codebook_init_std=1.0)
    store.relaxed = True
    rows = torch.arange(20)
    hard = store.codebook[store.hard_indices()]
    with torch.no_grad():  # e.g. occupancy updates and pruning during the warm-up see the soft field
        assert not torch.allclose(store(rows), hard)
    store.eval()
    assert torch.equal(store(rows), hard)


def test_eval_lookups_share_one_hard_table_until_the_mode_or_parameters_change() -> None:
    store = CodebookFeatures(50, index_bits=3, feature_dim=2, logit_init_std=1.0).eval()
    with torch.no_grad():
        first = store.table()
        assert store.table() is first
        store.codebook.add_(1.0)  # an in-place change bumps the version
        changed = store.table()
        assert changed is not first and torch.allclose(changed, first + 1.0)
        store.codebook.data.add_(1.0)  # as a fused optimiser step does: no version bump
        store.train().eval()  # a training stretch ends every cached table
        assert torch.allclose(store.table(), first + 2.0)
        store.train()
        assert store.table() is not store.table()  # training mode: no cache


@pytest.mark.parametrize("fuse_rate", [False, True])
def test_held_indices_are_computed_once_and_change_nothing(monkeypatch, fuse_rate) -> None:
    """Inside hold_indices a training step's table without gradients and its graded table share one computation of
    the hard indices (and rate) and one gather of their codewords: the same table, rate and gradients as computing
    them twice."""
    from vqad_nerfstudio.encodings import straight_through, vertex_features

    calls = []
    step_indices = straight_through.step_indices
    for module in (vertex_features, straight_through):  # the store's calls and the lookups'
        monkeypatch.setattr(module, "step_indices", lambda *args: calls.append(args) or step_indices(*args))

    def step(hold: bool):
        torch.manual_seed(0)
        store = CodebookFeatures(300, 4, 5, logit_init_std=1.0, fuse_rate=fuse_rate, use_kernels=False).train()
        calls.clear()
        store.hold_indices(hold)
        with torch.no_grad():
            first = store.table()
        table = store.table()
        rate = store.index_rate_bits() if fuse_rate else torch.zeros(())
        store.hold_indices(False)
        (table.square().sum() + rate).backward()
        gathered_once = table.data_ptr() == first.data_ptr()
        return len(calls), gathered_once, first, table.detach(), rate.detach(), store.logits.grad, store.codebook.grad

    held, again = step(True), step(False)
    assert held[:2] == (1, True) and again[:2] == (2, False)
    for a, b in zip(held[2:], again[2:]):
        assert torch.equal(a, b)
    assert torch.equal(held[2], held[3])


def test_a_steps_rounded_decoders_and_codebooks_are_one_autograd_node_each() -> None:
    """Inside a training step's holds every rounded decoder weight is one straight-through node, every prepared
    rounded codebook another, whichever pass reads them; the float decoder weights and the coarsest codebook (the
    finer levels have no rows before their growth) get gradients."""
    from nerfstudio.cameras.rays import RayBundle

    from model_steps import straight_through_steps

    _, model = straight_through_steps(1, network_bits=7, codebook_bits=6)
    origins = torch.tensor([[0.0, 0.0, 3.0], [0.2, 0.1, 3.0]], device=model.field.aabb.device)
    rays = RayBundle(origins=origins, directions=-origins / origins.norm(dim=-1, keepdim=True),
                     pixel_area=torch.ones(2, 1, device=origins.device))  # fmt: skip
    model.train()
    stores = [level.features for level in model.grid.levels]
    layers = model.field.decoder_layers
    for parameter in model.parameters():
        parameter.grad = None
    with model.field.decoders_rounded_once(), model.grid.indices_once():
        decoder_nodes = {id(layer.rounded_weight().grad_fn) for layer in layers}
        codebook_nodes = {id(store.lookup_codebook().grad_fn) for store in stores}
        outputs = model._outputs(model.collider(rays))
    assert len(decoder_nodes) == 1 and len(codebook_nodes) == 1 and decoder_nodes != codebook_nodes
    outputs["rgb"].sum().backward()
    assert all(layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0 for layer in layers)
    assert stores[0].codebook.grad is not None and stores[0].codebook.grad.abs().sum() > 0  # every sample reads it


def test_held_indices_end_with_the_hold() -> None:
    """Held indices do not follow the logits (the caller's promise); after hold_indices(False) they do again."""
    store = CodebookFeatures(10, 2, 3, logit_init_std=1.0, use_kernels=False).train()
    store.hold_indices(True)
    with torch.no_grad():
        before = store.table().clone()
        store.logits.neg_()
        held = store.table()
        store.hold_indices(False)
        fresh = store.table()
    assert torch.equal(before, held) and not torch.equal(before, fresh)


def test_transient_attributes_are_no_parameters_buffers_or_submodules() -> None:
    """The per-step attributes that skip nn.Module's __setattr__ (TransientState) never name a parameter, buffer or
    submodule, which that skip would leave unregistered."""
    from vqad_nerfstudio.fields.quantized_linear import quantizable_layers

    layer = quantizable_layers(torch.nn.Sequential(torch.nn.Linear(3, 4)))[0]
    for module in (CodebookFeatures(num_rows=10, index_bits=2, feature_dim=3, codebook_bits=6), layer):
        registered = {name for name, _ in module.named_parameters(recurse=False)}
        registered |= {name for name, _ in module.named_buffers(recurse=False)}
        registered |= {name for name, _ in module.named_children()} | set(module._buffers) | set(module._parameters)
        assert module.TRANSIENT and not module.TRANSIENT & registered
