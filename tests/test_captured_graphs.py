"""A training step's preparation replayed as CUDA graphs (:mod:`vqad_nerfstudio.kernels.captured`) against the same
work launched one by one; the graph tests run where CUDA is present."""

from __future__ import annotations

import pytest
import torch

from vqad_nerfstudio.kernels.captured import CapturedWork

from model_steps import straight_through_steps

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")


def _matmul_and_sum(weight: torch.Tensor):
    return lambda inputs: [inputs[0] @ weight, inputs[0].sum()]


def test_work_off_cuda_runs_as_it_is() -> None:
    captured = CapturedWork()
    x, weight = torch.randn(3, 8), torch.randn(8, 4)
    product, total = captured.run("key", [x], _matmul_and_sum(weight), x.device)
    assert torch.equal(product, x @ weight) and torch.equal(total, x.sum())
    assert captured.captures == 0


@needs_cuda
def test_replays_follow_inputs_and_parameters_and_record_again_for_a_new_key() -> None:
    """A key's first call runs as it is, its second records the graph; replays read the inputs given and the
    parameters where they are; another key or input shape records again."""
    captured = CapturedWork()
    weight = torch.randn(8, 4, device="cuda")
    work = _matmul_and_sum(weight)
    key = ("w", weight.data_ptr())
    x = torch.randn(3, 8, device="cuda")
    torch.testing.assert_close(captured.run(key, [x], work, x.device)[0], x @ weight)
    assert captured.captures == 0  # the warm-up
    y = torch.randn(3, 8, device="cuda")
    first = captured.run(key, [y], work, y.device)
    assert captured.captures == 1
    torch.testing.assert_close(first[0], y @ weight)
    second = captured.run(key, [x], work, x.device)
    assert captured.captures == 1 and second[0] is first[0]  # one graph, its own output buffers
    torch.testing.assert_close(second[0], x @ weight)
    torch.testing.assert_close(second[1], x.sum())
    weight.mul_(2)  # in place: the graph reads it where it is
    torch.testing.assert_close(captured.run(key, [y], work, y.device)[0], y @ weight)
    z = torch.randn(5, 8, device="cuda")  # another shape: warmed up, then recorded again
    for _ in range(2):
        torch.testing.assert_close(captured.run(key, [z], work, z.device)[0], z @ weight)
    assert captured.captures == 2
    other = torch.randn(8, 4, device="cuda")
    for _ in range(2):
        moved = captured.run(("w", other.data_ptr()), [z], _matmul_and_sum(other), z.device)
        torch.testing.assert_close(moved[0], z @ other)
    assert captured.captures == 3
    captured.run(key, [z], work, z.device)  # the last two keys keep their graphs
    captured.run(key, [x], work, x.device)  # dropped for the two since: warmed up again
    assert captured.captures == 3


@needs_cuda
def test_work_that_updates_in_place_runs_once_per_call() -> None:
    """The warm-up is a call's own run and a capture runs nothing: every call updates once."""
    captured = CapturedWork()
    total = torch.zeros(4, device="cuda")
    step = torch.ones(4, device="cuda")

    def accumulate(inputs):
        total.add_(inputs[0])
        return [total * 2]

    for _ in range(4):
        doubled = captured.run(("total", total.data_ptr()), [step], accumulate, step.device)
    assert captured.captures == 1
    assert torch.equal(total, torch.full((4,), 4.0, device="cuda")) and torch.equal(doubled[0], total * 2)


@needs_cuda
def test_disabled_work_is_never_recorded() -> None:
    captured = CapturedWork(enabled=False)
    x, weight = torch.randn(3, 8, device="cuda"), torch.randn(8, 4, device="cuda")
    torch.testing.assert_close(captured.run("key", [x], _matmul_and_sum(weight), x.device)[0], x @ weight)
    assert captured.captures == 0


@needs_cuda
@pytest.mark.parametrize("freeze", [False, True])
def test_straight_through_steps_with_graphs_equal_launches_one_by_one(freeze: bool) -> None:
    """A model's straight-through steps (forecast indices, rate, rounded decoders and codebooks), or its steps on
    frozen indices, train as without graphs; the graphs were recorded and replayed."""
    freeze_at = 2 if freeze else None
    runs = [
        straight_through_steps(4, freeze_at, network_bits=7, codebook_bits=6, cuda_graphs=graphs)
        for graphs in (True, False)
    ]
    (graph_losses, graph_model), (losses, model) = runs
    # the codebook gradient's atomic additions may round in another order, and float16 logits' stochastic rounding
    # may then pick the other neighbour: a logit's last bit (a missed or doubled update would move them by steps)
    torch.testing.assert_close(graph_losses, losses, rtol=1e-4, atol=1e-6)
    for (name, got), expected in zip(graph_model.named_parameters(), model.parameters()):
        torch.testing.assert_close(got, expected, rtol=1e-3, atol=5e-3, msg=name)
    assert graph_model.grid.preparation_graph.captures >= 1 and graph_model.field.rounding_graph.captures == 1
    assert model.grid.preparation_graph.captures == 0 and model.field.rounding_graph.captures == 0
    updates = [level.features.update_graph.captures for level in graph_model.grid.levels if level.num_vertices]
    assert all(captures == 1 for captures in updates)  # one graph for the logits while they stay put
    assert all(level.features.update_graph.captures == 0 for level in model.grid.levels)
