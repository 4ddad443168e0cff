"""What a training step would take if some of its device work were faster or ran beside the host's launches: a
replay of a profiled step's trace (``lego_benchmark.py --profile METHOD`` writes ``METHOD.profile.trace.json.gz``).

The profilers slow the host, not the device, so a profiled step shows a device that is idle most of the time even
where an unprofiled step waits for it. The replay runs the trace's host timeline at ``--host-speed`` times its
profiled pace (the unprofiled step's wall time over the profiled one's, about 0.5 for lego's steps at ``10db846``),
puts each launch's kernels on one queue in launch order, no earlier than their launch, and makes the host wait at
each synchronisation until the queue is empty. Kernels whose names contain one of ``--kernels`` are then scaled by
``--scale`` (0: removed), or moved to a second queue that no synchronisation waits for (``--side-stream``): what
a faster kernel, or the same kernel overlapped with the host's next launches, would save.

    python benchmarks/trace_replay.py out/vqad.profile.trace.json.gz --steps 5 --host-speed 0.5 --kernels logit_grad

Prints, per variant, the replayed milliseconds per step and the host's waits in them. With ``--census`` it prints
instead the step's launches by kernel and launcher (Triton's launches go through ``cuLaunchKernelEx``, PyTorch's
through ``cudaLaunchKernel``), beside another trace's with ``--against``: where one method's launches beyond
another's come from, each of which costs the host its launch path.

    python benchmarks/trace_replay.py out/vqad.profile.trace.json.gz --census \
        --against out/vqad-float.profile.trace.json.gz
"""

from __future__ import annotations

import collections
import gzip
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import tyro

_LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernelEx", "cudaMemcpyAsync", "cudaMemsetAsync")
"""Runtime calls that queue device work (their kernels share the call's correlation id)."""
_WAITS = ("cudaStreamSynchronize", "cudaDeviceSynchronize")
"""Runtime calls in which the host waits for the device."""


@dataclass
class Args:
    trace: tyro.conf.Positional[Path]
    """A profiled stretch's trace (``METHOD.profile.trace.json.gz``)."""
    steps: int = 5
    """Training steps in the trace (lego_benchmark.py profiles 5)."""
    host_speed: Tuple[float, ...] = (0.5,)
    """Unprofiled over profiled host time: each is replayed (the unprofiled step's ms over the profiled one's)."""
    kernels: Tuple[str, ...] = ("logit_grad",)
    """Substrings of the kernel names that the variants change."""
    scale: Tuple[float, ...] = (0.5, 0.0)
    """Factors on those kernels' durations, one variant each (0: the kernels removed)."""
    census: bool = False
    """Print the launches per step by kernel and launcher instead of replaying."""
    against: Optional[Path] = None
    """With ``--census``: another trace of as many steps (e.g. the float twin's), whose launches are listed beside."""


@dataclass
class _Trace:
    host: List[dict]
    """Runtime calls in host order."""
    device: Dict[int, List[dict]]
    """Device events by correlation id."""


def _load(path: Path) -> _Trace:
    try:
        with gzip.open(path) as file:
            events = [e for e in json.load(file)["traceEvents"] if e.get("ph") == "X" and "dur" in e]
    except (OSError, EOFError, ValueError, KeyError, TypeError) as error:
        raise SystemExit(f"{path} is not a readable gzipped chrome trace ({type(error).__name__}: {error})") from None
    host = sorted((e for e in events if e.get("cat") in ("cuda_runtime", "cuda_driver")), key=lambda e: e["ts"])
    device: Dict[int, List[dict]] = collections.defaultdict(list)
    for event in events:
        if event.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"):
            device[event["args"].get("correlation")].append(event)
    if not host:
        raise SystemExit(f"{path} holds no CUDA runtime calls: profile on a GPU")
    return _Trace(host, device)


def _queued(trace: _Trace, call: dict) -> List[dict]:
    """The device work a launching runtime call queued (its correlation id's kernels, copies or memsets)."""
    return trace.device.get(call["args"].get("correlation"), [])


def replay(
    trace: _Trace, host_speed: float, kernels: Tuple[str, ...] = (), scale: float = 1.0, side_stream: bool = False
) -> Tuple[float, float]:
    """The replayed step's microseconds in all and the host's waits in them (see the module's description)."""
    start = trace.host[0]["ts"]
    delay = queue_end = side_end = waits = 0.0
    for call in trace.host:
        now = delay + (call["ts"] - start) * host_speed
        if call["name"] in _LAUNCHES:
            for kernel in _queued(trace, call):
                duration, chosen = kernel["dur"], any(name in kernel["name"] for name in kernels)
                if chosen and side_stream:
                    side_end = max(now, side_end) + duration
                    continue
                queue_end = max(now, queue_end) + duration * (scale if chosen else 1.0)
        elif call["name"] in _WAITS:
            done = delay + (call["ts"] + call["dur"] - start) * host_speed
            if queue_end > done:
                waits += queue_end - done
                delay += queue_end - done
    last = trace.host[-1]
    end = delay + (last["ts"] + last["dur"] - start) * host_speed
    return max(end, queue_end, side_end), waits


_LAUNCHERS = {"cuLaunchKernelEx": "Triton", "cudaLaunchKernel": "PyTorch"}
"""Who launches through each runtime call (copies and memsets are listed as their calls)."""


def census(trace: _Trace) -> "collections.Counter[Tuple[str, str]]":
    """Launches in the trace by (launcher, kernel name): a kernel counts once per runtime call that queued it."""
    counts: "collections.Counter[Tuple[str, str]]" = collections.Counter()
    for call in trace.host:
        if call["name"] in _LAUNCHES:
            launcher = _LAUNCHERS.get(call["name"], call["name"])
            for kernel in _queued(trace, call):
                counts[launcher, kernel["name"]] += 1
    return counts


def _short(kernel: str) -> str:
    """A kernel's name without the namespaces and return type that PyTorch's templated kernels repeat."""
    for noise in ("void ", "at_cuda_detail::", "at::native::", "(anonymous namespace)::"):
        kernel = kernel.replace(noise, "")
    return kernel[:90]


def _print_census(args: Args, trace: _Trace) -> None:
    beside = args.against is not None
    ours, other = census(trace), census(_load(args.against)) if beside else collections.Counter()
    keys = {key for key in ours.keys() | other.keys() if not beside or ours[key] != other[key]}  # beside: what differs
    rows = [(key, ours[key], other[key]) for key in sorted(keys, key=lambda key: (other[key] - ours[key], key))]
    rows.append((("all", ""), sum(ours.values()), sum(other.values())))
    title = f"Launches per step of {args.trace.name} ({args.steps} steps)"
    print(title + (f", beside {args.against.name}'s" if beside else ""))
    print("| launcher | kernel | launches per step |" + (" beside | difference |" if beside else ""))
    print("|---|---|---|" + ("---|---|" if beside else ""))
    for (launcher, name), mine, theirs in rows:
        cells = [launcher, _short(name), f"{mine / args.steps:g}"]
        if beside:
            cells += [f"{theirs / args.steps:g}", f"{(mine - theirs) / args.steps:+g}"]
        print("| " + " | ".join(cells) + " |")


def main(args: Args) -> None:
    trace = _load(args.trace)
    if args.census:
        _print_census(args, trace)
        return
    if args.against is not None:
        raise SystemExit("--against goes with --census")
    variants = [("as profiled", {})]
    variants += [(f"{'+'.join(args.kernels)} x{s:g}", dict(kernels=args.kernels, scale=s)) for s in args.scale]
    variants.append((f"{'+'.join(args.kernels)} on a side stream", dict(kernels=args.kernels, side_stream=True)))
    print(f"Replay of {args.trace} ({args.steps} steps): ms per step (host waits)")
    print("| host speed | " + " | ".join(name for name, _ in variants) + " |")
    print("|---" * (len(variants) + 1) + "|")
    for speed in args.host_speed:
        cells = []
        for _, settings in variants:
            total, waits = replay(trace, speed, **settings)
            cells.append(f"{total / 1000 / args.steps:.2f} ({waits / 1000 / args.steps:.2f})")
        print(f"| {speed:g} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(tyro.cli(Args))
