"""nerfstudio's torch hash grid with the sparse backward pass: the same lookups and gradients."""

import copy

import pytest
import torch
from nerfstudio.data.scene_box import SceneBox
from nerfstudio.field_components.encodings import HashEncoding
from vqad_nerfstudio.method_configs.vqad_hash import hash_model_config

from vqad_nerfstudio.encodings.torch_hash_grid import gather_rows, hash_grid_forward, sparse_backward_hash_grids


def _grid(**kwargs) -> HashEncoding:
    torch.manual_seed(0)
    settings = dict(num_levels=4, min_res=4, max_res=32, log2_hashmap_size=8, implementation="torch")
    grid = HashEncoding(**{**settings, **kwargs})
    grid.hash_table.data.normal_()  # features of order 1, so that differences show
    return grid


@pytest.mark.parametrize("shape", [(300, 3), (20, 16, 3)])
def test_same_features_and_gradients_as_nerfstudio(shape):
    reference = _grid()
    sparse = copy.deepcopy(reference)
    assert sparse_backward_hash_grids(sparse) == 1
    positions = torch.rand(*shape)
    positions.view(-1, 3)[::3] = 0.0  # what a field does to samples outside its box
    upstream = torch.randn(*shape[:-1], reference.get_out_dim())
    upstream.view(-1, upstream.shape[-1])[::3] = 0.0  # ... and their gradient is zero
    expected, actual = reference(positions), sparse(positions)
    torch.testing.assert_close(actual, expected)
    (expected * upstream).sum().backward()
    (actual * upstream).sum().backward()
    torch.testing.assert_close(sparse.hash_table.grad, reference.hash_table.grad)
    assert sparse.hash_table.grad.abs().sum() > 0


def test_gather_rows_gradient_sums_repeated_rows():
    table = torch.zeros(5, 2, requires_grad=True)
    indices = torch.tensor([[1, 1], [3, 0]])
    out = gather_rows(table, indices)
    assert out.shape == (2, 2, 2)
    upstream = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[5.0, 6.0], [0.0, 0.0]]])
    (out * upstream).sum().backward()
    torch.testing.assert_close(table.grad, torch.tensor([[0.0, 0], [4, 6], [0, 0], [5, 6], [0, 0]]))


def test_only_torch_fallback_grids_change():
    module = torch.nn.ModuleList([_grid(), _grid(), torch.nn.Linear(2, 2)])
    assert sparse_backward_hash_grids(module) == 2


@pytest.mark.parametrize("backward,changed", [("nerfstudio", False), ("sparse", True)])
def test_hash_nerfacto_uses_the_sparse_backward_only_when_asked(backward, changed):
    config = hash_model_config("random", 8)
    config.hash_grid_backward = backward
    model = config.setup(scene_box=SceneBox(aabb=torch.tensor([[-1.0] * 3, [1.0] * 3])), num_train_data=1)
    grids = [m for m in model.modules() if isinstance(m, HashEncoding)]
    assert len(grids) == 3  # the field's and the two proposal networks'
    assert all((getattr(g.pytorch_fwd, "func", None) is hash_grid_forward) == changed for g in grids)


def test_rounded_tables_look_up_rounded_features_and_pass_gradients_straight_through():
    """A table rounded to 4 bits (one scale per level): lookups read its rounded values, as a file decodes them,
    and the gradient reaches the float table as if it had not been rounded."""
    float_grid, rounded_grid = _grid(), _grid()
    sparse_backward_hash_grids(float_grid)
    sparse_backward_hash_grids(rounded_grid, table_bits=4)
    positions, upstream = torch.rand(200, 3), torch.randn(200, float_grid.get_out_dim())
    by_level = rounded_grid.hash_table.detach().view(rounded_grid.num_levels, -1)
    scales = (by_level.abs().amax(dim=1) / 7).half().float()[:, None]
    expected_table = ((by_level / scales).round() * scales).view_as(rounded_grid.hash_table)
    assert not torch.equal(expected_table, rounded_grid.hash_table)
    with torch.no_grad():
        float_grid.hash_table.copy_(expected_table)
    rounded, reference = rounded_grid(positions), float_grid(positions)
    torch.testing.assert_close(rounded, reference, rtol=0, atol=1e-6)
    (rounded * upstream).sum().backward()
    (reference * upstream).sum().backward()
    torch.testing.assert_close(rounded_grid.hash_table.grad, float_grid.hash_table.grad)
