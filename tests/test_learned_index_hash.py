"""The learned-index hash encoding: lookups, gradients, training of the indices, size accounting."""

import pytest
import torch

from vqad_nerfstudio.encodings.learned_index_hash import (
    LearnedIndexHashEncoding,
    learned_matching_random,
    learned_stored_bits,
    level_layouts,
)
from vqad_nerfstudio.encodings.sparse_grid import CORNER_OFFSETS
from vqad_nerfstudio.encodings.straight_through import candidate_rows

SMALL = dict(num_levels=3, min_res=4, max_res=16, features_per_level=2)


def learned(**kwargs) -> LearnedIndexHashEncoding:
    return LearnedIndexHashEncoding(**{**SMALL, "log2_codebook_size": 6, "index_table_size": 200, **kwargs})


def test_layout_dense_coarse_levels_and_hashed_fine_levels():
    encoding = learned()
    assert [(layout.resolution, layout.dense, layout.rows) for layout in encoding.layouts] == [
        (4, True, 125),
        (8, False, 200),
        (16, False, 200),
    ]


def test_output_shape_and_gradients_reach_indices_and_codebooks():
    torch.manual_seed(0)
    encoding = learned()
    points = torch.rand(7, 5, 3)
    out = encoding(points)
    assert out.shape == (7, 5, encoding.get_out_dim()) == (7, 5, 6)
    out.square().sum().backward()
    for level in range(3):
        assert encoding.index_logits[level].grad.abs().sum() > 0, level
        assert encoding.codebooks[level].grad.abs().sum() > 0, level


def _level0_choice(encoding: LearnedIndexHashEncoding, vertices: torch.Tensor) -> torch.Tensor:
    """Codebook rows that level 0's index entries choose for ``vertices``."""
    entries, first = encoding.entries_and_bases(vertices[:, None, None, :].expand(-1, encoding.num_levels, 1, 3))
    entries, first = entries[:, 0, 0], first[:, 0, 0]
    return candidate_rows(first, encoding.hard_indices(0)[entries], 2**encoding.log2_codebook_size)


def test_vertices_read_their_chosen_codeword():
    torch.manual_seed(1)
    encoding = learned()
    with torch.no_grad():
        for codebook in encoding.codebooks:
            codebook.normal_()
    vertices = torch.tensor([[0, 0, 0], [1, 2, 3], [4, 4, 4], [3, 0, 2]])
    out = encoding(vertices.float() / 4)[:, :2]  # level 0 (resolution 4): exactly on its vertices
    torch.testing.assert_close(out, encoding.codebooks[0][_level0_choice(encoding, vertices)])


def test_full_width_indices_choose_from_the_whole_codebook():
    encoding = learned(log2_codebook_size=3, index_bits=3)
    vertices = torch.randint(0, 5, (10, 3))
    entries = encoding.entries_and_bases(vertices[:, None, None, :].expand(-1, 3, 1, 3))[0][:, 0, 0]
    assert torch.equal(_level0_choice(encoding, vertices), encoding.hard_indices(0)[entries])


@pytest.mark.parametrize("log2_codebook_size,index_bits", [(6, 3), (3, 3), (8, 2)])
def test_gradients_match_a_per_lookup_softmax_reference(log2_codebook_size, index_bits):
    """The fused estimator equals ``(one_hot - soft.detach() + soft) @ candidates`` written out per lookup."""
    torch.manual_seed(3)
    encoding = learned(log2_codebook_size=log2_codebook_size, index_bits=index_bits, init_scale=1.0).double()
    encoding.temperature = 0.7
    points = torch.rand(200, 3, dtype=torch.float64)
    upstream = torch.randn(200, encoding.get_out_dim(), dtype=torch.float64)
    upstream[::4] = 0.0  # samples a field masks out: their lookups are dropped from the backward pass
    (encoding(points) * upstream).sum().backward()

    size, choices = 2**log2_codebook_size, 2**index_bits
    logits = torch.cat([p.detach() for p in encoding.index_logits]).requires_grad_()
    codebook = torch.cat([p.detach() for p in encoding.codebooks]).requires_grad_()
    features = []
    for level, resolution in enumerate(encoding.resolutions):
        scaled = points * resolution
        corner = scaled.floor().clamp(0, resolution - 1)
        offsets = CORNER_OFFSETS.double()
        vertices = (corner[:, None, :] + offsets).long()  # [n, 8, 3]
        weights = torch.where(offsets.bool(), (scaled - corner)[:, None], 1 - (scaled - corner)[:, None]).prod(-1)
        entries, first = encoding.entries_and_bases(vertices[:, None].expand(-1, 3, 8, 3))
        entries, first = entries[:, level], first[:, level]
        soft = torch.softmax(logits[entries] / 0.7, dim=-1)  # [n, 8, c]
        keys = torch.nn.functional.one_hot(soft.argmax(-1), choices) - soft.detach() + soft
        candidates = codebook[candidate_rows(first[..., None], torch.arange(choices), size)]  # [n, 8, c, k]
        features.append(torch.einsum("nc,ncj,ncjk->nk", weights, keys, candidates))
    (torch.cat(features, dim=-1) * upstream).sum().backward()
    torch.testing.assert_close(torch.cat([p.grad for p in encoding.index_logits]), logits.grad)
    torch.testing.assert_close(torch.cat([p.grad for p in encoding.codebooks]), codebook.grad)


def test_training_changes_the_learned_indices():
    torch.manual_seed(0)
    encoding = learned(init_scale=0.5)
    points, target = torch.rand(512, 3), torch.randn(512, 6)
    before = [encoding.hard_indices(level).clone() for level in range(3)]
    optimizer = torch.optim.Adam(encoding.parameters(), lr=0.05)
    first = None
    for _ in range(60):
        optimizer.zero_grad()
        loss = (encoding(points) - target).square().mean()
        first = first if first is not None else loss.item()
        loss.backward()
        optimizer.step()
    assert loss.item() < first
    assert any((encoding.hard_indices(level) != before[level]).any() for level in range(3))


def test_random_mode_has_no_indices_and_stores_its_table():
    encoding = LearnedIndexHashEncoding(**SMALL, log2_codebook_size=6, mode="random", implementation="torch")
    assert not hasattr(encoding, "index_logits")
    assert encoding(torch.rand(4, 3)).shape == (4, 6)
    assert encoding.stored_bits() == 3 * 2**6 * 2 * 16


def test_learned_size_counts_codebooks_and_b_bit_entries():
    encoding = learned(index_bits=3)
    assert encoding.stored_bits() == 3 * 2**6 * 2 * 16 + (125 + 200 + 200) * 3
    assert encoding.stored_bits() == learned_stored_bits(encoding.layouts, 6, 2, 3)


@pytest.mark.parametrize("log2_table,bits", [(8, 2), (10, 3), (12, 4)])
def test_matching_size_is_the_largest_learned_encoding_within_the_random_bytes(log2_table, bits):
    log2_codebook, table = learned_matching_random(log2_table, 3, 4, 16, 2, bits)
    budget = 3 * 2**log2_table * 2 * 16
    size = learned_stored_bits(level_layouts(3, 4, 16, table), log2_codebook, 2, bits)
    larger = learned_stored_bits(level_layouts(3, 4, 16, table + 1), log2_codebook, 2, bits)
    assert size <= budget and (larger > budget or larger == size)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"index_bits": 7}, "index_bits"),
        ({"index_bits": 0}, "index_bits"),
        ({"mode": "lucky"}, "mode"),
        ({"min_res": 32}, "min_res"),
    ],
)
def test_bad_settings_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        learned(**kwargs)


def test_inference_lookup_equals_training_lookup():
    torch.manual_seed(2)
    encoding = learned(init_scale=1.0)
    points = torch.rand(300, 3)
    with torch.no_grad():
        inference = encoding(points)
    torch.testing.assert_close(inference, encoding(points).detach())


@pytest.mark.parametrize("mode", ["learned", "random"])
def test_without_position_gradient_positions_get_none_and_tables_the_same(mode):
    """nerfacto hands the encoding positions that require a gradient (for normals); without normals the encoding
    detaches them, and the tables' gradients stay what they were."""
    grads = {}
    for position_gradient in (True, False):
        torch.manual_seed(0)
        encoding = learned(mode=mode, implementation="torch", position_gradient=position_gradient)
        points = torch.rand(40, 3, generator=torch.Generator().manual_seed(1)).requires_grad_()
        encoding(points).square().sum().backward()
        assert (points.grad is not None) == position_gradient
        grads[position_gradient] = [p.grad.clone() for p in encoding.parameters() if p.grad is not None]
    assert len(grads[True]) == len(grads[False]) > 0
    for with_positions, without in zip(grads[True], grads[False]):
        torch.testing.assert_close(with_positions, without)


def test_nerfacto_detaches_positions_unless_it_predicts_normals():
    from vqad_nerfstudio.method_configs.vqad_hash import hash_model_config

    from vqad_nerfstudio.models.learned_index_nerfacto import encoding_of

    config = hash_model_config("learned", 12)
    assert not encoding_of(config).position_gradient
    config.predict_normals = True
    assert encoding_of(config).position_gradient
