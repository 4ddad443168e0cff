"""``ns-export`` with a ``vqad-compressed`` subcommand, and ``vqad-export`` with this package's subcommands.

nerfstudio 1.1.5's ``ns-export`` subcommands are a fixed union in ``nerfstudio.scripts.exporter``
with no plugin hook. :func:`main` rebuilds that union with ``vqad-compressed`` added, so it can be
installed as ``ns-export``. :func:`vqad_export_main` offers ``vqad-compressed`` and ``decode`` (a
compressed file into a run that ``ns-eval``, ``ns-render`` and ``ns-viewer`` open) under a name of
its own, which keeps working when nerfstudio's ``ns-export`` script is installed over ours.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, NoReturn, Optional, Sequence, Union, get_args

import tyro

FILE_NAME = "model.vqnf"
REPORT_NAME = "model.size.json"


def _fail(command: str, message: str) -> NoReturn:
    print(f"{command}: error: {message}", file=sys.stderr)
    raise SystemExit(1)


@dataclass
class ExportVQADCompressed:
    """Write a trained run of this package (vqad, vqad-float, vqad-hash, vqad-hash-random, tensorf-compressed) as
    one compressed, streamable file (model.vqnf), print where its bytes go and save that report as model.size.json."""

    load_config: Path
    """Path to the run's config.yml, as written by ns-train."""
    output_dir: Path
    """Directory to write model.vqnf and model.size.json into (created if missing)."""
    index_coding: Literal["entropy", "raw"] = "entropy"
    """Codebook indices range-coded (entropy), or bit-packed at b bits each (raw, the reference); tensorf-compressed
    latents are always range-coded."""
    network_bits: Optional[Literal[16, 8, 7, 6, 5, 4]] = None
    """Bits per decoder-MLP weight of vqad and vqad-float files: 16 (fp16), or 8..4 (quantised per output row and
    range-coded: 6 takes under half the fp16 bytes, for the smallest coarse levels of detail). None: the run's
    --pipeline.model.network-bits, at which it trained its decoders (the decoded file then renders as trained)."""
    codebook_bits: Optional[Literal[16, 8, 7, 6, 5, 4]] = None
    """Bits per codebook value of vqad files: 16 (fp16), or 8..4 (rounded per feature channel and range-coded; with
    8-bit indices 6 takes about a third of the fp16 codebooks' bytes). None: the run's
    --pipeline.model.codebook-bits, at which it trained its codebooks (the decoded file then renders as trained)."""
    overwrite: bool = False
    """Replace an existing model.vqnf."""

    def main(self) -> None:
        """Load the run, encode it, write the file and its size report."""
        command = "vqad-compressed"
        path = self.output_dir / FILE_NAME
        if path.exists() and not self.overwrite:
            _fail(command, f"{path} already exists; pass --overwrite to replace it")
        if not self.load_config.is_file():
            _fail(command, f"{self.load_config} is not a file; pass the config.yml of an ns-train run")
        if self.output_dir.exists() and not self.output_dir.is_dir():
            _fail(command, f"{self.output_dir} is not a directory")

        from nerfstudio.utils.eval_utils import eval_setup
        from nerfstudio.utils.rich_utils import CONSOLE

        from vqad_nerfstudio.codec import write_container_file
        from vqad_nerfstudio.export.formats import encode_any
        from vqad_nerfstudio.export.methods import UnsupportedMethodError, vqad_method_names
        from vqad_nerfstudio.export.run_dir import load_run_config
        from vqad_nerfstudio.export.size_report import print_size_report, size_report

        try:
            method = load_run_config(self.load_config).method_name
        except ValueError as error:
            _fail(command, str(error))
        if method not in vqad_method_names():
            names = ", ".join(vqad_method_names())
            _fail(command, f"{self.load_config} is a {method} run; vqad-compressed writes runs of {names}")
        config, pipeline, checkpoint, _ = eval_setup(self.load_config, test_mode="inference")
        try:
            encoded = encode_any(
                pipeline.model, config.method_name, self.index_coding, self.network_bits, self.codebook_bits
            )
        except (UnsupportedMethodError, ValueError) as error:
            _fail(command, str(error))
        try:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            write_container_file(path, encoded.header, encoded.chunks, overwrite=self.overwrite)
            report = {"file": str(path), "checkpoint": str(checkpoint), **size_report(encoded, path.read_bytes())}
            (self.output_dir / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
        except FileExistsError:
            _fail(command, f"{path} already exists; pass --overwrite to replace it")
        except OSError as error:
            _fail(command, f"cannot write into {self.output_dir}: {error.strerror or error}")
        print_size_report(report, CONSOLE)
        CONSOLE.print(f"Wrote {path} and {self.output_dir / REPORT_NAME}")


@dataclass
class DecodeVQADCompressed:
    """Decode a compressed file into a nerfstudio run (config.yml and a checkpoint) that ns-eval, ns-render
    and ns-viewer open with --load-config. A truncated file decodes to the levels of detail it holds."""

    file: Path
    """The compressed file (model.vqnf)."""
    output_dir: Path
    """Like ns-train's --output-dir: the run goes to OUTPUT_DIR/EXPERIMENT_NAME/METHOD/lodN/."""
    data: Optional[Path] = None
    """The scene the model was trained on, in nerfstudio's data format (cameras and images for eval and viewer)."""
    load_config: Optional[Path] = None
    """Or: the original run's config.yml, whose data and dataparser settings the decoded run reuses (a relative
    data path in it is taken from the current directory, as nerfstudio's tools do)."""
    max_lod: Optional[int] = None
    """Keep only levels of detail 0..MAX_LOD; None keeps every level the file holds."""
    experiment_name: Optional[str] = None
    """Experiment name of the decoded run (one directory name); None uses the file name without its extension and
    leading dots ('decoded' if nothing is left)."""
    overwrite: bool = False
    """Replace the files of an existing decoded run."""

    def main(self) -> None:
        """Decode the file and write the run."""
        command = "decode"
        if (self.data is None) == (self.load_config is None):
            _fail(command, "pass --data SCENE_DIR (nerfstudio data format) or --load-config ORIGINAL_RUN/config.yml")
        source = self.data if self.data is not None else self.load_config
        if not source.exists():
            _fail(command, f"{source} does not exist")

        from nerfstudio.utils.rich_utils import CONSOLE

        from vqad_nerfstudio.codec import CodecError
        from vqad_nerfstudio.export.formats import load_any
        from vqad_nerfstudio.export.run_dir import decoded_run_config, write_run_dir
        from vqad_nerfstudio.export.vqad_codec import IncompleteFileWarning

        start = time.perf_counter()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", IncompleteFileWarning)
                model, info = load_any(self.file, max_lod=self.max_lod)
        except (CodecError, OSError, ValueError) as error:
            _fail(command, f"cannot decode {self.file}: {error}")
        seconds = time.perf_counter() - start
        name = self.experiment_name or self.file.stem.lstrip(".") or "decoded"
        try:
            config = decoded_run_config(model, info, self.output_dir, name, self.data, self.load_config)
            config_path = write_run_dir(config, model, overwrite=self.overwrite)
        except (FileExistsError, ValueError) as error:
            _fail(command, str(error))
        except OSError as error:
            _fail(command, f"cannot write the run into {self.output_dir}: {error.strerror or error}")
        state = "complete file" if info.complete else f"truncated file, {info.bytes_read:,} bytes of complete chunks"
        CONSOLE.print(
            f"Decoded levels of detail 0..{info.levels_decoded - 1} of {info.levels_stored} ({state}) "
            f"in {seconds:.2f} s into {config_path.parent}"
        )
        CONSOLE.print("Open it with nerfstudio's tools, e.g.:")
        paths = (config_path, config_path.parent / "eval.json", config_path.parent / "renders")
        run, eval_json, renders = (shlex.quote(str(path)) for path in paths)
        for command_line in (
            f"ns-viewer --load-config {run}",
            f"ns-eval --load-config {run} --output-path {eval_json}",
            f"ns-render dataset --load-config {run} --output-path {renders}",
        ):
            CONSOLE.print(f"  {command_line}", soft_wrap=True, highlight=False)


_EXPORT = Annotated[ExportVQADCompressed, tyro.conf.subcommand(name="vqad-compressed")]
_DECODE = Annotated[DecodeVQADCompressed, tyro.conf.subcommand(name="decode")]


def _with_nerfstudio_exporters(*ours: Any) -> Any:
    """nerfstudio's own ``ns-export`` subcommands, with the markers nerfstudio gives them, and ``ours``."""
    try:
        from nerfstudio.scripts.exporter import Commands
    except ImportError as error:
        _fail(
            "ns-export", f"nerfstudio's own export subcommands cannot be loaded ({error}); vqad-compressed still works"
        )
    union, *markers = get_args(Commands)  # FlagConversionOff[Union[...]]
    theirs = tuple(Annotated[(member, *markers)] for member in get_args(union))
    return Union[theirs + ours]


def main(args: Optional[Sequence[str]] = None) -> None:
    """``ns-export``: nerfstudio's export subcommands plus ``vqad-compressed``."""
    args = list(sys.argv[1:] if args is None else args)
    tyro.extras.set_accent_color("bright_yellow")
    if args[:1] == ["vqad-compressed"]:  # nerfstudio's exporters import open3d and splatfacto: slow, not needed
        tyro.cli(ExportVQADCompressed, args=args[1:], prog="ns-export vqad-compressed").main()
        return
    tyro.cli(_with_nerfstudio_exporters(_EXPORT), args=args, prog="ns-export").main()


def vqad_export_main(args: Optional[Sequence[str]] = None) -> None:
    """``vqad-export``: ``vqad-compressed`` and ``decode``."""
    tyro.cli(Union[_EXPORT, _DECODE], args=args, prog="vqad-export").main()  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
