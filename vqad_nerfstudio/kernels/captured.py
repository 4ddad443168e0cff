"""Small device work replayed as one CUDA graph.

A vqad training step starts by preparing what its lookups read (the decoder weights and codebooks rounded to their
bits, each level's hard indices, index rate and codeword table from the last update's forecast), and its backward
pass updates each level's logits and sums its codebook gradient. That is a few dozen small launches, each with its
Python around it, and the step is bound by the host that issues them (docs/benchmarks.md, "GPU fast path").
:class:`CapturedWork` records such work as a CUDA graph and then issues it as one replay, for as long as the tensors
it reads stay where they are.

Work must be device work that neither synchronises with the host nor depends on values it reads (a graph replays the
same launches with the same sizes): it reads its inputs and the tensors its key names, may update the latter in place,
and returns new tensors. The first call of a key runs it as it is, which is the warm-up CUDA graphs need (kernels
compile, memory settles); the second records it (a capture runs nothing) and replays it, as do the calls after.
Elsewhere (the CPU, Triton's interpreter, while another graph is being captured, or disabled) it simply runs.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Hashable, Sequence, Tuple

import torch
from torch import Tensor

from vqad_nerfstudio.kernels import INTERPRETED

Work = Callable[[Sequence[Tensor]], Sequence[Tensor]]
"""Device work: from its inputs (see :meth:`CapturedWork.run`) to the tensors it makes."""


def input_layout(inputs: Sequence[Tensor]) -> Tuple:
    """What a graph recorded for ``inputs`` depends on, besides their values: shapes, dtypes and devices."""
    return tuple((tuple(t.shape), t.dtype, t.device) for t in inputs)


def place(tensor: Tensor) -> Tuple[int, torch.Size]:
    """Where ``tensor`` lives and its shape: what a graph that reads it (not as an input) depends on, for keys."""
    return tensor.data_ptr(), tensor.shape


def _remember(entries: "OrderedDict[Hashable, object]", key: Hashable, value: object, slots: int) -> None:
    """``entries[key] = value``, dropping the oldest entries beyond ``slots``."""
    entries[key] = value
    while len(entries) > slots:
        entries.popitem(last=False)


def _copy_into(buffers: Sequence[Tensor], values: Sequence[Tensor]) -> None:
    """``buffers[i].copy_(values[i])``: those on the buffers' device in one launch, host tensors (a step's scalars)
    one by one without waiting for the device."""
    same = [(b, v) for b, v in zip(buffers, values) if v.device == b.device]
    if same:
        torch._foreach_copy_([b for b, _ in same], [v for _, v in same])
    for buffer, value in zip(buffers, values):
        if value.device != buffer.device:
            buffer.copy_(value, non_blocking=True)


class _Recording:
    """A recorded graph with the buffers it reads its inputs from and writes its outputs to."""

    def __init__(self, graph: "torch.cuda.CUDAGraph", inputs: Tuple[Tensor, ...], outputs: Tuple[Tensor, ...]):
        self.graph, self.inputs, self.outputs = graph, inputs, outputs


class CapturedWork:
    """Runs :data:`Work` and, on a CUDA device, replays it as a CUDA graph recorded at the second call of each key.

    ``key`` must change whenever what the work reads other than ``inputs`` moves or changes shape (the data
    pointers and shapes of the parameters it reads, the settings it branches on); ``inputs`` are copied into the
    graph's own buffers on ``device`` before each replay (one launch for all; host tensors without waiting), so
    they may live anywhere. The tensors a replay returns are the graph's: the next replay of that key overwrites
    them, so they must not be needed beyond it.
    The last ``slots`` keys keep their graphs (a training step's and an evaluation's work differ).
    """

    def __init__(self, enabled: bool = True, slots: int = 2) -> None:
        self.enabled = enabled
        """Whether to record graphs at all (False: the work always runs as it is)."""
        self.slots = slots
        self._recordings: "OrderedDict[Hashable, _Recording]" = OrderedDict()
        self._warmed: "OrderedDict[Hashable, Tuple[Tensor, ...]]" = OrderedDict()
        """Keys whose work ran once as it is (recorded at their next call), with the input buffers it ran on."""
        self.captures = 0
        """Graphs recorded so far (each for a key not held at the time)."""

    def release(self) -> None:
        """Drop the recorded graphs and their buffers."""
        self._recordings.clear()
        self._warmed.clear()

    def capturable(self, device: torch.device) -> bool:
        """Whether work on ``device`` would be recorded (enabled, CUDA, no graph being captured already)."""
        return (
            self.enabled and device.type == "cuda" and not INTERPRETED and not torch.cuda.is_current_stream_capturing()
        )

    def run(self, key: Hashable, inputs: Sequence[Tensor], work: Work, device: torch.device) -> Tuple[Tensor, ...]:
        """``work(inputs)``, on a capturable ``device`` from the second call of ``(key, input_layout(inputs))`` on as
        a replay of its graph (recorded at that call)."""
        if not self.capturable(device):
            self.release()
            return _run_as_it_is(inputs, work, device)
        full_key = (key, input_layout(inputs))
        recording = self._recordings.get(full_key)
        if recording is None:
            own_inputs = self._warmed.pop(full_key, None)
            if own_inputs is None:  # the warm-up: this call's work, as it is, on the buffers the graph will read
                own_inputs = tuple(t.to(device, copy=True) for t in inputs)
                _remember(self._warmed, full_key, own_inputs, self.slots)
                with torch.no_grad():
                    return tuple(work(own_inputs))
            recording = self._record(own_inputs, work)
            _remember(self._recordings, full_key, recording, self.slots)
        self._recordings.move_to_end(full_key)
        _copy_into(recording.inputs, inputs)
        recording.graph.replay()
        return recording.outputs

    def _record(self, own_inputs: Tuple[Tensor, ...], work: Work) -> _Recording:
        """Records ``work`` on ``own_inputs``, the buffers its warm-up ran on (so that it launches the kernels that
        warm-up compiled)."""
        with torch.no_grad():
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                    outputs = tuple(work(own_inputs))
            except RuntimeError as error:
                raise RuntimeError(
                    f"recording a CUDA graph failed ({error}); train with --pipeline.model.cuda-graphs False to "
                    "launch the kernels one by one"
                ) from error
        self.captures += 1
        return _Recording(graph, own_inputs, outputs)


def _run_as_it_is(inputs: Sequence[Tensor], work: Work, device: torch.device) -> Tuple[Tensor, ...]:
    """``work`` on ``inputs`` moved to ``device``, without gradients."""
    with torch.no_grad():
        return tuple(work([t.to(device, non_blocking=True) for t in inputs]))


__all__ = ["CapturedWork", "Work", "input_layout", "place"]
