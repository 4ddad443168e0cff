"""Where the bytes of a compressed file go: per chunk, per level of detail, and against references.

References: the indices bit-packed at b bits (``IDXR``) next to range-coded (``IDXE``), and the
same model with its coded part stored as plain floats: an fp16 feature vector per vertex instead of
codebook indices for VQAD (what the ``vqad-float`` twin stores for the same topology), per index
entry for vqad-hash, and the fp32 planes tensorf stores for tensorf-compressed.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

from rich.console import Console
from rich.table import Table

from vqad_nerfstudio.codec import describe, read_container
from vqad_nerfstudio.export.formats import method_format
from vqad_nerfstudio.export.vqad_codec import TAG_TOPO, EncodedModel

__all__ = ["size_report", "print_size_report"]


def size_report(encoded: EncodedModel, data: bytes) -> Dict[str, Any]:
    """A JSON-ready size report of ``data``, the file written from ``encoded``."""
    chunks = describe(read_container(data))
    header_bytes = chunks[0]["end"] - chunks[0]["chunk_bytes"]
    decoder_tags = method_format(encoded.header["method"]).decoder_tags
    decoder_bytes = sum(row["chunk_bytes"] for row in chunks if row["tag"] in decoder_tags) if decoder_tags else None
    levels = []
    for stats in encoded.levels:
        rows = [row for row in chunks if row["lod"] == stats.lod]
        grid_rows = [row for row in rows if row["tag"] != TAG_TOPO]
        levels.append(
            {
                "lod": stats.lod,
                "resolution": stats.resolution,
                "cells": stats.cells,
                "vertices": stats.vertices,
                "topology_bytes": sum(row["payload_bytes"] for row in rows if row["tag"] == TAG_TOPO),
                "grid_bytes": sum(row["payload_bytes"] for row in grid_rows),
                "index_bytes_raw": stats.raw_index_bytes,
                "index_bytes_entropy": stats.entropy_index_bytes,
                "float_grid_bytes": stats.float_grid_bytes,
                "level_bytes": sum(row["chunk_bytes"] for row in rows),
                "cumulative_bytes": rows[-1]["end"],
            }
        )
    file_bytes = len(data)
    grid_bytes = sum(level["grid_bytes"] for level in levels)
    float_grid_bytes = sum(level["float_grid_bytes"] for level in levels)
    float_reference_bytes = file_bytes - grid_bytes + float_grid_bytes
    return {
        "method": encoded.header["method"],
        "reference": method_format(encoded.header["method"]).float_reference,
        "file_bytes": file_bytes,
        "header_bytes": header_bytes,
        "decoder_bytes": decoder_bytes,
        "chunks": chunks,
        "levels": levels,
        "index_bytes_raw": _total(levels, "index_bytes_raw"),
        "index_bytes_entropy": _total(levels, "index_bytes_entropy"),
        "grid_bytes": grid_bytes,
        "float_grid_bytes": float_grid_bytes,
        "grid_ratio": float_grid_bytes / grid_bytes if grid_bytes else None,
        "float_reference_bytes": float_reference_bytes,
        "file_ratio": float_reference_bytes / file_bytes if grid_bytes else None,
    }


def _total(levels: List[Dict[str, Any]], key: str) -> Optional[int]:
    values = [level[key] for level in levels]
    return None if None in values else sum(values)


def _kib(value: Optional[int]) -> str:
    return "-" if value is None else f"{value / 1024:,.1f}"


def print_size_report(report: Dict[str, Any], console: Optional[Console] = None) -> None:
    """Chunk and level-of-detail tables and the reference sizes, as rich tables."""
    console = console or Console()
    chunks = Table(title="Chunks (KiB)", title_justify="left")
    for name in ("#", "tag", "lod", "payload", "chunk", "file so far"):
        chunks.add_column(name, justify="left" if name == "tag" else "right")
    for row in report["chunks"]:
        lod = "-" if row["lod"] is None else str(row["lod"])
        chunks.add_row(
            str(row["index"]), row["tag"], lod, _kib(row["payload_bytes"]), _kib(row["chunk_bytes"]), _kib(row["end"])
        )
    console.print(chunks)

    levels = Table(
        title="Levels of detail (KiB; 'file so far' is the prefix that renders levels 0..lod)", title_justify="left"
    )
    columns = ("lod", "res", "cells", "vertices", "topology", "grid", "idx raw", "idx coded", "bits/idx", "level")
    for name in columns + ("file so far",):
        levels.add_column(name, justify="right")
    for level in report["levels"]:
        coded = level["index_bytes_entropy"]
        bits = "-" if coded is None or not level["vertices"] else f"{8 * coded / level['vertices']:.2f}"
        levels.add_row(
            str(level["lod"]),
            f"{level['resolution']}³",
            f"{level['cells']:,}",
            f"{level['vertices']:,}",
            _kib(level["topology_bytes"]),
            _kib(level["grid_bytes"]),
            _kib(level["index_bytes_raw"]),
            _kib(coded),
            bits,
            _kib(level["level_bytes"]),
            _kib(level["cumulative_bytes"]),
        )
    console.print(levels)

    console.print(f"File: {_kib(report['file_bytes'])} KiB ({report['file_bytes']:,} bytes), method {report['method']}")
    raw, coded = report["index_bytes_raw"], report["index_bytes_entropy"]
    if raw is not None and coded is not None:
        console.print(
            f"Indices: {_kib(raw)} KiB bit-packed, {_kib(coded)} KiB range-coded "
            f"({100 * (1 - coded / raw):.1f}% smaller)"
        )
    if report["grid_ratio"] is None:
        return
    console.print(
        f"Float reference ({report['reference']}): {_kib(report['float_grid_bytes'])} KiB "
        f"vs {_kib(report['grid_bytes'])} KiB stored ({report['grid_ratio']:.1f}x); whole file "
        f"{_kib(report['float_reference_bytes'])} KiB vs {_kib(report['file_bytes'])} KiB ({report['file_ratio']:.1f}x)"
    )
