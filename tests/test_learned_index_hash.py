"""The learned-index hash encoding: lookups, gradients, training of the indices, size accounting."""

import pytest
import torch

from vqad_nerfstudio.encodings.learned_index_hash import (
    LearnedIndexHashEncoding,
    learned_matching_random,
    learned_stored_bits,
    level_layouts,
)

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


def test_vertices_read_their_chosen_codeword():
    torch.manual_seed(1)
    encoding = learned()
    with torch.no_grad():
        for codebook in encoding.codebooks:
            codebook.normal_()
    vertices = torch.tensor([[0, 0, 0], [1, 2, 3], [4, 4, 4], [3, 0, 2]])
    out = encoding(vertices.float() / 4)[:, :2]  # level 0 (resolution 4): exactly on its vertices
    rows = encoding.vertex_rows(0, vertices)
    chosen = encoding.candidates(vertices).gather(-1, encoding.hard_indices(0)[rows][:, None]).squeeze(-1)
    torch.testing.assert_close(out, encoding.codebooks[0][chosen])


def test_full_width_indices_choose_from_the_whole_codebook():
    encoding = learned(log2_codebook_size=3, index_bits=3)
    candidates = encoding.candidates(torch.randint(0, 9, (10, 3)))
    assert torch.equal(candidates, torch.arange(8).expand(10, 8))


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
