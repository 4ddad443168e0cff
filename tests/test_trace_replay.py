"""The trace replay's arithmetic on a hand-made trace: kernels queue in launch order, the host waits at a
synchronisation for the queue, and the variants scale or move the chosen kernels."""

import gzip
import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "trace_replay.py"
_spec = importlib.util.spec_from_file_location("trace_replay", SCRIPT)
trace_replay = importlib.util.module_from_spec(_spec)
sys.modules["trace_replay"] = trace_replay  # dataclasses look their module up by name
_spec.loader.exec_module(trace_replay)


def _call(name: str, ts: float, dur: float, correlation: int = 0) -> dict:
    return {"ph": "X", "cat": "cuda_runtime", "name": name, "ts": ts, "dur": dur, "args": {"correlation": correlation}}


def _kernel(name: str, dur: float, correlation: int) -> dict:
    return {"ph": "X", "cat": "kernel", "name": name, "ts": 0.0, "dur": dur, "args": {"correlation": correlation}}


def _write(path: Path, events: list) -> Path:
    with gzip.open(path, "wt") as file:
        json.dump({"traceEvents": events}, file)
    return path


@pytest.fixture()
def trace(tmp_path: Path):
    """Host: launch an Adam-like kernel of 100 us at 0 and a small one at 10, synchronise at 50 (5 us), launch a
    last kernel at 200 (1 us each call)."""
    events = [
        _call("cudaLaunchKernel", 0, 1, 1), _kernel("_logit_grad_kernel", 100, 1),
        _call("cuLaunchKernelEx", 10, 1, 2), _kernel("small", 20, 2),
        _call("cudaStreamSynchronize", 50, 5),
        _call("cudaLaunchKernel", 200, 1, 3), _kernel("last", 10, 3),
    ]  # fmt: skip
    return trace_replay._load(_write(tmp_path / "step.trace.json.gz", events))


def test_the_host_waits_at_a_synchronisation_for_the_queue(trace) -> None:
    # the queue ends at 120 (100 + 20 after it); the host's sync ends at 55: it waits 65, then launches at 265
    assert trace_replay.replay(trace, 1.0) == (275.0, 65.0)
    # at half the host's pace the sync ends at 27.5: a wait of 92.5; the last launch at 100 + 92.5
    assert trace_replay.replay(trace, 0.5) == (202.5, 92.5)


def test_faster_removed_or_overlapped_kernels_shorten_the_wait(trace) -> None:
    chosen = ("logit_grad",)
    assert trace_replay.replay(trace, 1.0, chosen, scale=0.5) == (225.0, 15.0)  # queue ends at 70
    assert trace_replay.replay(trace, 1.0, chosen, scale=0.0) == (210.0, 0.0)  # queue ends at 30, before 55
    assert trace_replay.replay(trace, 1.0, chosen, side_stream=True) == (210.0, 0.0)  # no sync waits for it


def test_a_trace_without_device_calls_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "cpu.trace.json.gz"
    with gzip.open(path, "wt") as file:
        json.dump({"traceEvents": [{"ph": "X", "cat": "cpu_op", "name": "aten::add", "ts": 0, "dur": 1}]}, file)
    with pytest.raises(SystemExit, match="no CUDA runtime calls"):
        trace_replay._load(path)


@pytest.mark.parametrize("content", [None, b"not gzip", gzip.compress(b"{truncated"), gzip.compress(b"{}")])
def test_a_missing_or_unreadable_trace_is_refused_clearly(tmp_path: Path, content) -> None:
    path = tmp_path / "step.trace.json.gz"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(SystemExit, match="not a readable gzipped chrome trace"):
        trace_replay._load(path)


def test_the_census_counts_launches_by_launcher_and_kernel(trace) -> None:
    assert trace_replay.census(trace) == {
        ("PyTorch", "_logit_grad_kernel"): 1, ("Triton", "small"): 1, ("PyTorch", "last"): 1,
    }  # fmt: skip


def test_the_census_beside_another_trace_lists_what_differs(tmp_path: Path, capsys) -> None:
    ours = _write(tmp_path / "ours.trace.json.gz", [
        _call("cuLaunchKernelEx", 0, 1, 1), _kernel("_rate_kernel", 5, 1),
        _call("cuLaunchKernelEx", 10, 1, 2), _kernel("_rate_kernel", 5, 2),
        _call("cudaLaunchKernel", 20, 1, 3), _kernel("void at::native::common", 5, 3),
    ])  # fmt: skip
    twin = _write(tmp_path / "twin.trace.json.gz", [
        _call("cudaLaunchKernel", 0, 1, 1), _kernel("void at::native::common", 5, 1),
        _call("cudaMemsetAsync", 10, 1, 2), _kernel("Memset (Device)", 1, 2),
    ])  # fmt: skip
    trace_replay.main(trace_replay.Args(trace=ours, steps=2, census=True, against=twin))
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert rows == [
        "| Triton | _rate_kernel | 1 | 0 | +1 |",
        "| cudaMemsetAsync | Memset (Device) | 0 | 0.5 | -0.5 |",
        "| all |  | 1.5 | 1 | +0.5 |",
    ]  # the common kernel, launched equally often, is left out


def test_against_without_census_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path / "step.trace.json.gz", [_call("cudaLaunchKernel", 0, 1, 1), _kernel("k", 1, 1)])
    with pytest.raises(SystemExit, match="--against goes with --census"):
        trace_replay.main(trace_replay.Args(trace=path, against=path))
