"""Rate-distortion curves from the results.json files of ``benchmarks/lego_benchmark.py``: decoded PSNR against
compressed file size, one curve per series of methods, with published compact-NeRF results drawn as published
(hollow) points, and a markdown table of the measured points. Run:

    python benchmarks/rate_distortion.py outputs/benchmark/results.json --output rd.png \\
        --series "vqad=vqad(@.*)?" "float then VQ=vqad-float>vq@.*" --reference "vqad-float (uncompressed)=vqad-float"

Rows without a compressed file are left out (``--reference`` draws one as a horizontal line).
"""

from __future__ import annotations

import json
import math
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import tyro


@dataclass(frozen=True)
class PublishedPoint:
    """One result as a paper reports it (not measured here)."""

    name: str
    megabytes: float
    psnr: float
    source: str


PUBLISHED: Tuple[PublishedPoint, ...] = (
    PublishedPoint("BiRF", 0.5, 32.0, "Shin & Park, Binary Radiance Fields, NeurIPS 2023"),
    PublishedPoint("CNC", 0.61, 31.7, "Chen et al., How Far Can We Compress Instant-NGP-Based NeRF?, CVPR 2024"),
    PublishedPoint("CNC", 0.99, 33.2, "Chen et al., How Far Can We Compress Instant-NGP-Based NeRF?, CVPR 2024"),
    PublishedPoint(
        "Masked Wavelet", 0.8, 31.95, "Rho et al., Masked Wavelet Representation for Compact NeRF, CVPR 2023"
    ),
    PublishedPoint("VQRF (VQ-DVGO)", 1.4, 31.8, "Li et al., Compressing Volumetric Radiance Fields to 1 MB, CVPR 2023"),
    PublishedPoint(
        "compact-NGP", 0.36, 30.7, "Takikawa et al., Compact Neural Graphics Primitives, SIGGRAPH Asia 2023"
    ),
    PublishedPoint("Neural NeRF Compression", 1.86, 31.3, "Pham et al., Neural NeRF Compression, ICML 2024"),
    PublishedPoint("Neural NeRF Compression", 3.9, 33.0, "Pham et al., Neural NeRF Compression, ICML 2024"),
)
"""NeRF-synthetic averages over the 8 scenes at 800x800, as the papers report them."""

PUBLISHED_LABEL = "published (NeRF-synthetic avg, 800²; not measured here)"

Series = Tuple[str, re.Pattern[str]]
"""A curve's label and the pattern its methods match in full (the method's name, or RESULTS/METHOD with RESULTS the
name of its results file without ``.json``)."""


@dataclass(frozen=True)
class RDPoint:
    """A measured point: one row of a results.json with a compressed file."""

    series: str
    method: str
    file_bytes: int
    decoded_psnr: float
    trained_psnr: float
    steps: int
    source: str


@dataclass(frozen=True)
class RDData:
    """The measured points (by series, each sorted by file size), the rows left out, and every row read."""

    points: Tuple[RDPoint, ...]
    uncompressed: Tuple[str, ...]
    """Methods (with their file) that have no compressed file."""
    unmatched: Tuple[str, ...]
    """Methods (with their file) with a compressed file that match no series."""
    rows: Tuple[Tuple[str, Dict[str, Any]], ...]
    """(source file, row) of every row, in the order read."""
    runs: Tuple[str, ...]
    """Distinct device and training budget of the files."""


@dataclass
class RDConfig:
    """Options of the rate-distortion plot."""

    results: tyro.conf.Positional[Tuple[Path, ...]]
    """results.json files written by benchmarks/lego_benchmark.py."""
    output: Path = Path("rd.png")
    """PNG file to write."""
    series: Tuple[str, ...] = ()
    """Curves as LABEL=REGEX: a row joins the first curve whose REGEX matches its method in full, or RESULTS/METHOD
    with RESULTS its file's name without .json, to tell apart runs of one method in several files (default: one
    curve per base method name, the part before '@')."""
    reference: Tuple[str, ...] = ()
    """Horizontal dashed lines as LABEL=METHOD at that method's trained PSNR (e.g. an uncompressed float twin)."""
    published: bool = True
    """Draw the published compact-NeRF points (--no-published: leave them out)."""


def read_results(path: Path) -> Dict[str, Any]:
    """The content of one results.json; a one-line SystemExit if it is missing or not such a file."""
    if not path.is_file():
        raise SystemExit(f"{path}: no such file")
    try:
        content = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise SystemExit(f"{path}: not JSON ({error})") from None
    if not isinstance(content, dict) or not isinstance(content.get("results"), list):
        raise SystemExit(f'{path}: no "results" list (not a results.json of benchmarks/lego_benchmark.py)')
    return content


def _split_spec(option: str, spec: str, right: str) -> Tuple[str, str]:
    label, sep, value = spec.partition("=")
    if not sep or not label.strip() or not value:
        raise SystemExit(f'{option} "{spec}": expected LABEL={right}')
    return label.strip(), value


def parse_series(specs: Sequence[str]) -> List[Series]:
    """LABEL=REGEX specs as (label, compiled pattern)."""
    series = []
    for spec in specs:
        label, pattern = _split_spec("--series", spec, "REGEX")
        try:
            series.append((label, re.compile(pattern)))
        except re.error as error:
            raise SystemExit(f'--series "{spec}": bad regular expression ({error})') from None
    return series


def _run_name(content: Dict[str, Any]) -> str:
    steps = content.get("max_steps", 0)
    budget = f"{content.get('budget_s', math.nan):g} s budget" + (f" or {steps} steps" if steps else "")
    return f"{content.get('device', 'unknown device')}, {budget}"


def load_points(paths: Sequence[Path], series: Sequence[Series] = ()) -> RDData:
    """The rows of ``paths`` with a compressed file, grouped into ``series`` (default: by base method name)."""
    by_series: Dict[str, List[RDPoint]] = {label: [] for label, _ in series}
    uncompressed, unmatched, rows, runs = [], [], [], []
    for path in paths:
        content = read_results(path)
        runs.append(_run_name(content))
        for row in content["results"]:
            rows.append((str(path), row))
            method = row["method"]
            if "compressed" not in row:
                uncompressed.append(f"{method} ({path})")
                continue
            if series:
                qualified = f"{path.stem}/{method}"
                label = next(
                    (label for label, pattern in series if pattern.fullmatch(method) or pattern.fullmatch(qualified)),
                    None,
                )
            else:
                label = method.split("@")[0]
            if label is None:
                unmatched.append(f"{method} ({path})")
                continue
            compressed = row["compressed"]
            point = RDPoint(
                label,
                method,
                compressed["file_bytes"],
                compressed["decoded_psnr"],
                row["psnr"],
                row["steps"],
                str(path),
            )
            by_series.setdefault(label, []).append(point)
    points = [p for group in by_series.values() for p in sorted(group, key=lambda p: (p.file_bytes, p.decoded_psnr))]
    return RDData(tuple(points), tuple(uncompressed), tuple(unmatched), tuple(rows), tuple(dict.fromkeys(runs)))


def resolve_references(data: RDData, specs: Sequence[str]) -> List[Tuple[str, float]]:
    """LABEL=METHOD specs as (label, trained PSNR of METHOD's first row)."""
    references = []
    for spec in specs:
        label, method = _split_spec("--reference", spec, "METHOD")
        psnr = next((row["psnr"] for _, row in data.rows if row["method"] == method), None)
        if psnr is None:
            raise SystemExit(f'--reference "{spec}": no row of method {method} in the results')
        references.append((label, psnr))
    return references


def rd_table(data: RDData) -> str:
    """The measured points as a markdown table, by series, each by file size."""
    lines = [
        "| series | method | file MB | decoded PSNR | trained PSNR | steps | source |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in data.points:
        lines.append(
            f"| {p.series} | {p.method} | {p.file_bytes / 1e6:.3f} | {p.decoded_psnr:.2f} | {p.trained_psnr:.2f} | "
            f"{p.steps} | {p.source} |"
        )
    return "\n".join(lines)


def plot_rd(
    data: RDData,
    path: Path,
    references: Sequence[Tuple[str, float]] = (),
    published: Sequence[PublishedPoint] = PUBLISHED,
) -> None:
    """Decoded PSNR against file size (MB, log scale): a line per series, dashed references, hollow published
    points; saved as a PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    figure, axis = plt.subplots(figsize=(7, 4.8))
    labels = list(dict.fromkeys(p.series for p in data.points))
    for color, label in enumerate(labels):
        group = [p for p in data.points if p.series == label]
        sizes = [p.file_bytes / 1e6 for p in group]
        axis.plot(sizes, [p.decoded_psnr for p in group], "o-", color=f"C{color}", lw=1.5, ms=5, label=label)
        for size, p in zip(sizes, group):
            tag = p.method.partition("@")[2]
            if tag:
                axis.annotate(
                    tag,
                    (size, p.decoded_psnr),
                    xytext=(4, 3),
                    textcoords="offset points",
                    fontsize=6,
                    color=f"C{color}",
                    alpha=0.8,
                )
    for offset, (label, psnr) in enumerate(references):
        axis.axhline(psnr, ls="--", lw=1, color=f"C{len(labels) + offset}", label=f"{label}: {psnr:.2f} dB")
    for index, point in enumerate(published):
        axis.plot(
            point.megabytes,
            point.psnr,
            "D",
            mfc="none",
            mec="0.35",
            mew=1.2,
            ms=6,
            label=PUBLISHED_LABEL if index == 0 else None,
        )
        axis.annotate(
            point.name,
            (point.megabytes, point.psnr),
            xytext=(5, -3),
            textcoords="offset points",
            fontsize=6,
            color="0.35",
        )
    axis.set_xscale("log")
    axis.margins(x=0.1)
    axis.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 3.0, 5.0)))
    axis.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}"))
    axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axis.grid(True, which="major", alpha=0.3)
    axis.grid(True, which="minor", alpha=0.1)
    axis.set_xlabel("file size (MB)")
    axis.set_ylabel("decoded PSNR (dB)")
    axis.set_title(textwrap.fill("Rate-distortion: " + "; ".join(data.runs), 90), fontsize=10)
    if axis.get_legend_handles_labels()[0]:  # below the axes: inside, it hides points wherever it goes
        axis.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=150, bbox_inches="tight")
    plt.close(figure)


def main(config: RDConfig) -> None:
    """Plot the curves, print the rows left out, then the table."""
    if not config.results:
        raise SystemExit("give one or more results.json files")
    data = load_points(config.results, parse_series(config.series))
    references = resolve_references(data, config.reference)
    if not data.points:
        raise SystemExit("no row with a compressed file in any series: nothing to plot")
    plot_rd(data, config.output, references, PUBLISHED if config.published else ())
    print(f"Wrote {config.output}")
    if data.uncompressed:
        print(f"Note: no compressed file, left out: {', '.join(data.uncompressed)}")
    if data.unmatched:
        print(f"Note: in no --series, left out: {', '.join(data.unmatched)}")
    print(rd_table(data))


if __name__ == "__main__":
    main(tyro.cli(RDConfig))
