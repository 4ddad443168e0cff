"""benchmarks/rate_distortion.py: curves and table from results.json files, rows left out, one-line errors."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import tyro

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "rate_distortion.py"
_spec = importlib.util.spec_from_file_location("rate_distortion", SCRIPT)
rd = importlib.util.module_from_spec(_spec)
sys.modules["rate_distortion"] = rd  # dataclasses look their module up by name
_spec.loader.exec_module(rd)


def _row(method: str, psnr: float, steps: int, file_bytes: int = 0, decoded: float = 0.0) -> dict:
    row = {"method": method, "psnr": psnr, "ssim": 0.9, "steps": steps}
    if file_bytes:
        row["compressed"] = {"file_bytes": file_bytes, "decoded_psnr": decoded, "decoder_bytes": 1000}
    return row


@pytest.fixture
def results(tmp_path):
    """Two results.json files: vqad points out of size order over both, a float twin without a file."""
    first = tmp_path / "a" / "results.json"
    second = tmp_path / "b" / "results.json"
    first.parent.mkdir()
    second.parent.mkdir()
    rows_a = [
        _row("vqad-float", 33.5, 3000),
        _row("vqad", 31.0, 3000, 900_000, 30.9),
        _row("vqad@b8w1e-4", 30.1, 3100, 400_000, 30.0),
        _row("vqad-float>vq@b8r2", 32.0, 2900, 1_200_000, 31.8),
    ]
    rows_b = [_row("vqad@b6", 29.0, 3200, 250_000, 28.7), _row("tensorf", 32.5, 2000)]
    first.write_text(json.dumps({"device": "GPU-A", "budget_s": 120.0, "max_steps": 0, "results": rows_a}))
    second.write_text(json.dumps({"device": "GPU-B", "budget_s": 60.0, "max_steps": 5000, "results": rows_b}))
    return first, second


def _table_rows(table: str) -> list:
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in table.splitlines()[2:]]


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 20_000  # a drawn figure, not an empty image


def test_default_series_by_base_method_sorted_by_size(results):
    first, second = results
    data = rd.load_points([first, second])
    table = _table_rows(rd.rd_table(data))
    assert table == [
        ["vqad", "vqad@b6", "0.250", "28.70", "29.00", "3200", str(second)],
        ["vqad", "vqad@b8w1e-4", "0.400", "30.00", "30.10", "3100", str(first)],
        ["vqad", "vqad", "0.900", "30.90", "31.00", "3000", str(first)],
        ["vqad-float>vq", "vqad-float>vq@b8r2", "1.200", "31.80", "32.00", "2900", str(first)],
    ]
    assert data.uncompressed == (f"vqad-float ({first})", f"tensorf ({second})")
    assert data.unmatched == ()
    assert data.runs == ("GPU-A, 120 s budget", "GPU-B, 60 s budget or 5000 steps")


def test_series_patterns_and_unmatched_rows(results):
    first, second = results
    series = rd.parse_series(["tagged=vqad@.*", "float then VQ=vqad-float>vq@b8r\\d"])
    data = rd.load_points([first, second], series)
    assert [(p.series, p.method, p.file_bytes) for p in data.points] == [
        ("tagged", "vqad@b6", 250_000),
        ("tagged", "vqad@b8w1e-4", 400_000),
        ("float then VQ", "vqad-float>vq@b8r2", 1_200_000),
    ]
    assert data.unmatched == (f"vqad ({first})",)  # "vqad@.*" must match in full, not a prefix of "vqad"
    assert rd.resolve_references(data, ["float twin=vqad-float"]) == [("float twin", 33.5)]


def test_series_can_name_the_results_file(results, tmp_path):
    first, second = results
    renamed = tmp_path / "long-run.json"
    renamed.write_text(first.read_text())
    series = rd.parse_series(["long run=long-run/vqad", "short runs=vqad(@.*)?"])
    data = rd.load_points([first, renamed], series)
    assert [(p.series, p.method, p.source) for p in data.points if p.method == "vqad"] == [
        ("long run", "vqad", str(renamed)),  # curves in the order of --series
        ("short runs", "vqad", str(first)),
    ]


def test_plot_writes_a_png(results, tmp_path):
    data = rd.load_points(list(results))
    output = tmp_path / "plots" / "rd.png"
    rd.plot_rd(data, output, [("float", 33.5)])
    _assert_png(output)
    bare = tmp_path / "bare.png"
    rd.plot_rd(data, bare, published=())
    _assert_png(bare)
    assert bare.read_bytes() != output.read_bytes()


def test_published_points():
    names = {p.name for p in rd.PUBLISHED}
    assert names == {"BiRF", "CNC", "Masked Wavelet", "VQRF (VQ-DVGO)", "compact-NGP", "Neural NeRF Compression"}
    assert (0.5, 32.0) in {(p.megabytes, p.psnr) for p in rd.PUBLISHED if p.name == "BiRF"}
    assert sorted((p.megabytes, p.psnr) for p in rd.PUBLISHED if p.name == "CNC") == [(0.61, 31.7), (0.99, 33.2)]
    assert len(rd.PUBLISHED) == 8 and all(p.source for p in rd.PUBLISHED)


def test_main_prints_notes_then_table(results, tmp_path, capsys):
    output = tmp_path / "rd.png"
    args = [str(p) for p in results] + ["--output", str(output), "--series", "all vqad=vqad.*", "--no-published"]
    args += ["--reference", "float=vqad-float"]
    config = tyro.cli(rd.RDConfig, args=args)
    assert config.published is False and config.series == ("all vqad=vqad.*",)
    rd.main(config)
    _assert_png(output)
    lines = capsys.readouterr().out.splitlines()
    first, second = results
    assert lines[1] == f"Note: no compressed file, left out: vqad-float ({first}), tensorf ({second})"
    assert lines[2] == "| series | method | file MB | decoded PSNR | trained PSNR | steps | source |"
    sizes = [float(row[2]) for row in _table_rows("\n".join(lines[2:]))]
    assert sizes == [0.25, 0.4, 0.9, 1.2]  # one series, sorted by size; the table is printed last


def test_command_line(results, tmp_path):
    output = tmp_path / "rd.png"
    run = subprocess.run(
        [sys.executable, str(SCRIPT), str(results[0]), "--output", str(output)], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    assert "| vqad | vqad@b8w1e-4 | 0.400 | 30.00 | 30.10 | 3100 |" in run.stdout
    _assert_png(output)
    missing = tmp_path / "missing.json"
    run = subprocess.run([sys.executable, str(SCRIPT), str(missing)], capture_output=True, text=True)
    assert run.returncode == 1 and run.stderr.strip() == f"{missing}: no such file"


def test_bad_inputs(results, tmp_path):
    first, _ = results
    with pytest.raises(SystemExit, match="missing.json: no such file"):
        rd.load_points([tmp_path / "missing.json"])
    no_results = tmp_path / "no_results.json"
    no_results.write_text(json.dumps({"device": "GPU", "rows": []}))
    with pytest.raises(SystemExit, match='no_results.json: no "results" list'):
        rd.load_points([no_results])
    not_json = tmp_path / "not.json"
    not_json.write_text("{results: ")
    with pytest.raises(SystemExit, match="not.json: not JSON"):
        rd.load_points([not_json])
    for spec in ("vqad", "=vqad.*", "label="):
        with pytest.raises(SystemExit, match=f'--series "{spec}": expected LABEL=REGEX'):
            rd.parse_series([spec])
    with pytest.raises(SystemExit, match=r'--series "x=vqad\(": bad regular expression'):
        rd.parse_series(["x=vqad("])
    data = rd.load_points([first])
    with pytest.raises(SystemExit, match='--reference "float": expected LABEL=METHOD'):
        rd.resolve_references(data, ["float"])
    with pytest.raises(SystemExit, match='--reference "t=tensorf": no row of method tensorf'):
        rd.resolve_references(data, ["t=tensorf"])
    with pytest.raises(SystemExit, match="nothing to plot"):
        rd.main(rd.RDConfig(results=(first,), output=tmp_path / "none.png", series=("x=nothing",)))
    assert not (tmp_path / "none.png").exists()
    with pytest.raises(SystemExit, match="give one or more results.json files"):
        rd.main(tyro.cli(rd.RDConfig, args=[]))
