"""``heart-complete``: complete partially segmented hearts from the command line; also the Slicer
panel's background process (``--protocol lines``).

One label map (``--input case.nii.gz --output done.nii.gz``) or a folder of them (``--input
DIR --output OUTDIR``, same file names, a progress bar over the cases). The output has the
input's format (by the output name's suffix; a folder output keeps the input's name) and exactly
its geometry, unless ``--extend_mm MM`` (grow the grid around the given structures),
``--output_spacing MM`` (another voxel size, e.g. isotropic from a short-axis stack) or
``--reference IMAGE`` (another image's grid) asks for another grid
(:mod:`HeartCompletionLib.inference.output_grid`); ``--crop_output`` writes only the box around the
result's labelled voxels, on the same lattice (the Slicer panel's hand-over). Given structures are kept voxel for voxel (on another
grid: carried over by nearest neighbour) unless ``--replace``; predicted structures fill the rest. ``--meshes DIR`` also writes one surface mesh per structure
(``<case>_<Structure>.stl``, RAS mm, ``SPACE=RAS`` header for 3D Slicer).

``--checkpoint`` takes a checkpoint file or the name of a registered model
(:mod:`HeartCompletionLib.model.registry`, e.g. ``synthetic-demo``, bundled for trying the tools
out); a registered model's warning is printed every time it is used. There is no default
model. An input that already holds every requested structure is written unchanged ("nothing to
complete", exit 0). The options become one :class:`~HeartCompletionLib.inference.completion.CompletionRequest`
passed to :func:`~HeartCompletionLib.inference.completion.complete`.

Output: by default a progress bar and messages on stderr (``heart-complete: error: ...``). With
the hidden option ``--protocol lines`` (what :func:`.completion_process.build_command` writes for
the Slicer panel) it prints the machine-readable lines of :mod:`.completion_process` on stdout
instead: ``HC-PROGRESS <0..1> <message>``, ``HC-RESULT <json>`` once per completed case (output,
completed and given labels, timings), ``HC-ERROR <message>`` (one line each); warnings and
summaries are plain log lines. Nothing else differs: same options, same checks, same exit codes.
With ``--protocol lines --serve`` (hidden too) it is the panel's warm worker: the model is loaded
once, then each line on stdin is one request, a JSON list of a case's options (``--input``,
``--output``, ``--table``, ``--structures``, ...), answered with the same lines and ended by
``HC-DONE <exit status>`` (:class:`.completion_process.CompletionWorker`). It exits at the end of
stdin or after ``--idle_s`` seconds without a request.

Exit codes (:class:`~HeartCompletionLib.errors.ExitCode`): 0 success; 1 some case failed (each
failure printed with its file; the other cases of a folder are still processed) or an unexpected
failure; 2 bad usage (an option out of range, an unknown structure, an unavailable device),
unusable checkpoint or output that would overwrite an input, all reported before any input is
read. The input is never modified.

Example::

    heart-complete --checkpoint model.safetensors --input partial.nii.gz --output completed.nii.gz \\
        --meshes meshes/ --structures LAA PA
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import NoReturn

from HeartCompletionLib.errors import ExitCode, HeartCompletionError

from .completion_process import (
    DECODE_MODES,
    DEFAULT_DECODE,
    DONE_PREFIX,
    ERROR_PREFIX,
    READY_PREFIX,
    RESULT_PREFIX,
    SERVE_OPTION,
    WORKER_IDLE_S,
    format_progress,
)

PROG = "heart-complete"
#: ``--protocol``: ``bar`` (people: progress bar and messages on stderr) or ``lines`` (the panel)
PROTOCOLS = ("bar", "lines")


class CliError(HeartCompletionError):
    """A problem that stops the whole run (message names the file)."""


def _fraction(text: str) -> float:
    """argparse type: a number in [0, 1)."""
    value = _finite(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value:g}")
    return value


def _positive_mm(text: str) -> float:
    """argparse type: a finite length > 0 in mm."""
    value = _finite(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a length > 0 mm, got {value:g}")
    return value


def _positive_seconds(text: str) -> float:
    """argparse type: a finite time > 0 in seconds."""
    value = _finite(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a time > 0 s, got {value:g}")
    return value


def _non_negative_mm(text: str) -> float:
    """argparse type: a finite length >= 0 in mm."""
    value = _finite(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a length >= 0 mm, got {value:g}")
    return value


def _non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = _finite(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _finite(text: str, kind=float):
    """``text`` as a finite ``kind`` (float or int), or an argparse error that quotes it."""
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not {'an integer' if kind is int else 'a number'}: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are ``HC-ERROR`` lines under ``--protocol lines``
    (exit status 2 either way)."""

    lines = False

    def error(self, message: str):
        if not self.lines:
            super().error(message)
        print(f"{ERROR_PREFIX} {_one_line(f'{self.prog}: error: {message}')}", flush=True)
        raise SystemExit(ExitCode.USAGE)


def _wants_lines(argv) -> bool:
    """Whether ``argv`` asks for ``--protocol lines`` (known before the other options are checked)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return "--protocol=lines" in argv or any(a == "--protocol" and b == "lines" for a, b in zip(argv, argv[1:]))


def _parser(serve: bool = False) -> argparse.ArgumentParser:
    """heart-complete's options; ``serve``: a worker's, whose cases (``--input``, ``--output``) come
    with each request instead."""
    from HeartCompletionLib.io.meshes import MESH_FORMATS

    from .completion import DEFAULT_GRID_SPACING_MM, DEFAULT_MARGIN_MM
    from .islands import DEFAULT_MAX_DETACHED_MM, DEFAULT_MIN_ISLAND_FRACTION
    from .latent_fit import DEFAULT_FIT_STEPS, RECONSTRUCTION_FIT_STEPS

    p = _Parser(
        prog=PROG,
        description="Complete a partially segmented heart label map with a HeartCompletion checkpoint. "
        "Reads and writes .nii, .nii.gz, .nrrd and .seg.nrrd; keeps the input's geometry unless an output grid "
        "option (--extend_mm, --output_spacing, --reference) asks for another.",
        epilog="Example: heart-complete --checkpoint model.safetensors --input partial.nii.gz "
        "--output completed.nii.gz --meshes meshes/",
    )
    p.add_argument("--checkpoint", required=True, metavar="CK",
                   help="inference checkpoint (.safetensors), or the name of a registered model: "
                   f"{_registered_names()} (an existing file of that name wins)")
    p.add_argument("--input", required=not serve, help="label map file, or a folder of label maps (batch mode)")
    p.add_argument("--output", required=not serve,
                   help="output file (format from its suffix: .nii, .nii.gz, .nrrd, .seg.nrrd), or a folder "
                   "(any other name; created; files keep the input names and formats)")
    p.add_argument("--structures", nargs="+", default=None, metavar="NAME",
                   help="structures to produce, by name, synonym or label (default: those missing from the input)")
    p.add_argument("--label_map", default=None, metavar="CONV",
                   help="label numbering of the input: 'mmwhs', 'totalsegmentator' or a JSON file "
                   "(default: the checkpoint's table values)")
    p.add_argument("--table", default=None,
                   help="structure table JSON the checkpoint must have been trained with (refused otherwise)")
    p.add_argument("--replace", action="store_true",
                   help="re-predict given structures listed in --structures instead of keeping them")
    p.add_argument("--meshes", default=None, metavar="DIR", help="also write one surface mesh per structure here")
    p.add_argument("--mesh_format", default="stl", choices=MESH_FORMATS, help="mesh file format (default stl)")
    p.add_argument("--mesh_smoothing", type=int, default=10, metavar="N",
                   help="Taubin smoothing iterations of the meshes (0: raw voxel surface; default 10)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="where the model runs")
    p.add_argument("--threads", type=_non_negative_int, default=0, metavar="N",
                   help="CPU threads for torch (default 0: torch's default)")
    p.add_argument("--grid_spacing_mm", type=_positive_mm, default=DEFAULT_GRID_SPACING_MM,
                   help=f"coarse decoding lattice in mm, > 0 (default {DEFAULT_GRID_SPACING_MM:g})")
    p.add_argument("--decode", default=DEFAULT_DECODE, choices=DECODE_MODES,
                   help="fine-level decoding: fast (interpolate the distances inside cells of <= 4 mm, decode exactly "
                   "where a label could change, leaving each structure at most 0.002 of Dice expected lost against "
                   "exact) or exact (decode every voxel of every cell near a surface; the "
                   f"reference, several times slower at CT resolution); default {DEFAULT_DECODE}")
    p.add_argument("--margin_mm", type=_non_negative_mm, default=DEFAULT_MARGIN_MM,
                   help=f"decoded region around the given structures in mm, >= 0 (default {DEFAULT_MARGIN_MM:g})")
    p.add_argument("--min_island_fraction", type=_fraction, default=DEFAULT_MIN_ISLAND_FRACTION, metavar="F",
                   help="clear predicted pieces smaller than F x the structure's largest piece "
                        f"(default {DEFAULT_MIN_ISLAND_FRACTION:g}; 0 keeps every piece)")
    p.add_argument("--max_detached_mm", type=_non_negative_mm, default=DEFAULT_MAX_DETACHED_MM, metavar="MM",
                   help="clear predicted pieces lying more than MM from every other structure while another piece of "
                        f"the structure is attached (default {DEFAULT_MAX_DETACHED_MM:g}; 0 keeps them)")
    p.add_argument("--fit_steps", type=_non_negative_int, default=None, metavar="N",
                   help="before decoding, fit the encoded latents for N steps so that the model reproduces the given "
                        "structures (their true signed distances); the missing structures follow. Default: "
                        f"{DEFAULT_FIT_STEPS}, or {RECONSTRUCTION_FIT_STEPS} when every structure asked for is given "
                        "(--replace: a reconstruction); 0: the encoder's latents as they are, faster")
    grid = p.add_argument_group("output grid (default: the input's own grid)")
    grid.add_argument("--extend_mm", type=_non_negative_mm, default=None, metavar="MM",
                      help="grow the output grid (the input's axes) to cover the given structures plus MM on every "
                           "side, e.g. 40 for a short-axis stack or a crop around one vessel")
    grid.add_argument("--output_spacing", type=_positive_mm, nargs="+", default=None, metavar="MM",
                      help="voxel size of the output grid in mm: one value (isotropic) or three; given voxels are "
                           "carried over by nearest neighbour and kept")
    grid.add_argument("--reference", default=None, metavar="IMAGE",
                      help="write the result on this image's grid (a NIfTI/NRRD image, e.g. the CT the labels were "
                           "drawn on); not with --extend_mm/--output_spacing")
    grid.add_argument("--crop_output", action="store_true",
                      help="write only the box around the result's labelled voxels, on the same voxel lattice (the "
                           "file's matrix moves with the box, every voxel keeps its place in RAS): a CT-sized result "
                           "in a file a third to a half the size, faster to write and read; for tools that place a "
                           "box on its grid by its offset, as the Slicer panel does")
    p.add_argument("--seed", type=int, default=0, help="seed of the input surface sampling (default 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bar, only errors")
    # internal: the Slicer panel's background process reads HC-PROGRESS/HC-RESULT/HC-ERROR lines on stdout
    p.add_argument("--protocol", default="bar", choices=PROTOCOLS, help=argparse.SUPPRESS)
    # internal: the panel's warm worker (completion_process.CompletionWorker): requests on stdin
    p.add_argument(SERVE_OPTION, action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--idle_s", type=_positive_seconds, default=WORKER_IDLE_S, help=argparse.SUPPRESS)
    return p


def _reference_grid(args, jobs):
    """The grid of ``--reference`` (read before any input), or None; refuses mixing it with the
    grown-grid options or a folder of inputs (each case has its own image)."""
    if args.output_spacing is not None and len(args.output_spacing) not in (1, 3):
        raise CliError(f"--output_spacing: give one value (isotropic) or three, got {len(args.output_spacing)}")
    if args.reference is None:
        return None
    if args.extend_mm is not None or args.output_spacing is not None:
        raise CliError("--reference: the reference image fixes the output grid; drop --extend_mm/--output_spacing")
    if len(jobs) > 1:
        raise CliError("--reference: one reference image fits one input file, not a folder of inputs")
    from HeartCompletionLib.io.labelmap_files import read_image_geometry

    return read_image_geometry(args.reference)


def _registered_names() -> str:
    from HeartCompletionLib.model.registry import RegistryError, load_registry

    try:
        return ", ".join(f"{e.name} ({e.warning})" for e in load_registry()) or "none"
    except RegistryError as exc:
        return f"none readable ({exc})"


def _same_file(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` name one file (spelling, ``..``, symbolic or hard links)."""
    if a.resolve() == b.resolve():
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _jobs(input_path: Path, output_path: Path) -> list[tuple[Path, Path]]:
    """``[(input file, output file)]``; refuses outputs that would overwrite an input."""
    from HeartCompletionLib.io.labelmap_files import SUPPORTED_SUFFIXES, LabelMapError, find_label_maps, suffix_of

    if input_path.is_dir():
        inputs = find_label_maps(input_path, recursive=False)  # this folder only
        if not inputs:
            raise CliError(f"{input_path}: no label maps ({', '.join(SUPPORTED_SUFFIXES)}) in this folder")
        if output_path.exists() and not output_path.is_dir():
            raise CliError(f"{output_path}: the input is a folder, so the output must be a folder too")
        jobs = [(p, output_path / p.name) for p in inputs]
    elif not input_path.exists():
        raise CliError(f"{input_path}: input not found")
    else:
        # an existing folder, or a name without a label-map suffix, is a folder: keep the input's name
        try:
            suffix_of(output_path)
            is_folder = output_path.is_dir()
        except LabelMapError:
            is_folder = True
        jobs = [(input_path, output_path / input_path.name if is_folder else output_path)]
    for src, dst in jobs:
        if _same_file(dst, src):
            raise CliError(f"{dst}: the output would overwrite the input {src}; choose another output")
    return jobs


def _output_grid(label_map, args):
    """``(shape, ijk_to_ras)`` the options ask for, or None (the input's grid)."""
    from .output_grid import grown_grid

    if args.reference_grid is not None:
        return args.reference_grid
    if args.extend_mm is None and args.output_spacing is None:
        return None
    return grown_grid(label_map, args.extend_mm or 0.0, args.output_spacing)


def _request(args, output_grid):
    """The :class:`~HeartCompletionLib.inference.completion.CompletionRequest` of the options."""
    from .completion import CompletionRequest

    return CompletionRequest(
        structures=args.structures, replace=args.replace, device=args.device, seed=args.seed,
        grid_spacing_mm=args.grid_spacing_mm, margin_mm=args.margin_mm, decode=args.decode,
        min_island_fraction=args.min_island_fraction, output_grid=output_grid, max_detached_mm=args.max_detached_mm,
        fit_steps=args.fit_steps,
    )


# --- the two ways of reporting ------------------------------------------------------------------


def _one_line(text: str) -> str:
    """A message on one protocol line (multi-line messages, e.g. two structure lists, joined)."""
    return " | ".join(part.strip() for part in str(text).splitlines() if part.strip())


class _BarOutput:
    """People: a progress bar per case (one over the cases of a folder) and messages on stderr."""

    def __init__(self, quiet: bool) -> None:
        from tqdm import tqdm  # not in Slicer's Python: imported only here

        self.tqdm, self.quiet = tqdm, quiet
        self.bar = None

    def warning(self, text: str) -> None:  # every time, quiet or not
        print(f"{PROG}: warning: {text}", file=sys.stderr)

    def error(self, text: str) -> None:
        self.tqdm.write(f"{PROG}: error: {text}", file=sys.stderr)

    def log(self, text: str) -> None:
        if not self.quiet:
            self.tqdm.write(text, file=sys.stderr)

    def loading(self, checkpoint: str) -> None:
        pass

    def cases(self, jobs):
        return self.tqdm(jobs, desc="cases", unit="case", disable=self.quiet or len(jobs) < 2, file=sys.stderr)

    def start_case(self, index: int, count: int, src: Path) -> None:
        self.bar = None if self.quiet or count > 1 else self.tqdm(
            total=100, desc=src.name, unit="%", file=sys.stderr, bar_format="{l_bar}{bar}| {n:.0f}% {postfix}")

    def progress(self, fraction: float, message: str) -> None:
        if self.bar is not None:
            self.bar.n = round(100 * fraction, 1)
            self.bar.set_postfix_str(message, refresh=False)
            self.bar.refresh()

    def reading(self, src: Path) -> None:
        pass

    def end_case(self, payload: dict | None) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def failures(self, failures: int, count: int) -> None:
        print(f"{PROG}: {failures} of {count} case(s) failed", file=sys.stderr)


class _LineOutput:
    """The Slicer panel: ``HC-PROGRESS``/``HC-RESULT``/``HC-ERROR`` lines on stdout
    (:mod:`.completion_process`); other lines are log text. Fractions of case ``i`` of ``n`` lie in
    ``[i/n, (i+1)/n]``: 0.04 reading it, 0.05-0.95 completing it, 1.0 done."""

    def __init__(self) -> None:
        self.index, self.count = 0, 1

    @staticmethod
    def _emit(line: str) -> None:
        print(line, flush=True)

    def warning(self, text: str) -> None:
        self._emit(_one_line(f"warning: {text}"))

    def error(self, text: str) -> None:
        self._emit(f"{ERROR_PREFIX} {_one_line(text)}")

    def log(self, text: str) -> None:
        for line in str(text).splitlines():
            if line.strip():
                self._emit(line)

    def loading(self, checkpoint: str) -> None:
        self._emit(format_progress(0.01, f"loading {Path(str(checkpoint)).name}"))

    def cases(self, jobs):
        return jobs

    def start_case(self, index: int, count: int, src: Path) -> None:
        self.index, self.count = index, count

    def _overall(self, fraction: float) -> float:
        return (self.index + fraction) / self.count

    def reading(self, src: Path) -> None:
        self._emit(format_progress(self._overall(0.04), f"reading {src}"))

    def progress(self, fraction: float, message: str) -> None:
        self._emit(format_progress(self._overall(0.05 + 0.9 * fraction), message))

    def end_case(self, payload: dict | None) -> None:
        if payload is not None:
            self._emit(format_progress(self._overall(1.0), "done"))
            self._emit(f"{RESULT_PREFIX} {json.dumps(payload)}")

    def failures(self, failures: int, count: int) -> None:
        if count > 1:
            self._emit(f"{failures} of {count} case(s) failed")

    def ready(self) -> None:
        self._emit(READY_PREFIX)

    def done(self, code: int) -> None:
        self._emit(f"{DONE_PREFIX} {int(code)}")


# --- the run -------------------------------------------------------------------------------------


def _complete_one(src: Path, dst: Path, checkpoint, args, output) -> tuple[str, dict]:
    """Complete one file; returns ``(message for the user, HC-RESULT payload)``."""
    from HeartCompletionLib.io.labelmap import crop_to_labels
    from HeartCompletionLib.io.labelmap_files import case_name, read_label_map, write_label_map

    from .completion import NoGivenStructureError, complete

    table = checkpoint.table
    output.reading(src)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        label_map = read_label_map(src, table=table, convention=args.label_map)
    notes = [f"{src}: {w.message}" if str(src) not in str(w.message) else str(w.message) for w in caught]
    try:  # the structures present are counted once, by the completion (a CT map: 0.17 s a count)
        result = complete(label_map, checkpoint, _request(args, _output_grid(label_map, args)), progress=output.progress)
    except NoGivenStructureError:
        hint = "" if args.label_map else " (use --label_map if it uses another numbering)"
        raise CliError(f"{src}: no recognised structure of {table.names} in this label map{hint}") from None
    write_label_map(crop_to_labels(result.label_map) if args.crop_output else result.label_map, dst, table=table)
    if args.meshes:
        from HeartCompletionLib.io.meshes import write_structure_meshes

        write_structure_meshes(result.label_map, args.meshes, case_name(dst), table=table, fmt=args.mesh_format,
                               smoothing_iterations=args.mesh_smoothing)
    names = [table.by_label(lab).name for lab in result.completed_labels]
    seconds = result.timings.get("total_s", 0.0)
    if names:
        summary = f"{src.name} -> {dst}: completed {', '.join(names)} in {seconds:.1f} s"
    else:
        summary = f"{src.name} -> {dst}: nothing to complete (every requested structure is given); written unchanged"
        result.messages = [m for m in result.messages if "nothing to complete" not in m]
    notes += result.messages
    payload = {
        "input": str(src.resolve()),
        "output": str(dst.resolve()),
        "completed_labels": [int(v) for v in result.completed_labels],
        "given_labels": [int(v) for v in result.given_labels],
        "timings": {k: float(v) for k, v in dict(result.timings).items()},
    }
    return "\n".join([summary, *notes]), payload


def _check_mesh_format(args) -> None:
    if args.meshes:  # e.g. GLB without trimesh: refused before a completion is spent on it
        from HeartCompletionLib.io.meshes import check_mesh_format

        try:
            check_mesh_format(args.mesh_format)
        except ImportError as exc:
            raise CliError(f"--mesh_format {args.mesh_format}: {exc}") from None


def _load(args, output, warn: bool = True):
    """``(checkpoint, registry entry or None)`` of ``--checkpoint`` (checked against ``--table``),
    torch's threads set; a registered model's warning printed (``warn``; a worker prints it with
    each request instead)."""
    from HeartCompletionLib.model.registry import load_model
    from HeartCompletionLib.structures.table import StructureTable

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    output.loading(args.checkpoint)
    expected = StructureTable.from_spec(args.table) if args.table else None
    checkpoint, entry = load_model(args.checkpoint, expected_table=expected, device="cpu")
    if entry is not None and warn:  # every time a registered model is used, quiet or not
        output.warning(f"model {entry.name!r} ({entry.path}): {entry.warning}")
    return checkpoint, entry


def _check_cases(args, jobs, checkpoint) -> None:
    """What is checked of the cases once the model is known: the reference grid, the structures."""
    from .completion import resolve_structures

    args.reference_grid = _reference_grid(args, jobs)
    if args.structures:  # an unknown name is refused before the input is read
        try:
            resolve_structures(checkpoint.table, args.structures)
        except KeyError as exc:
            raise CliError(f"--structures: {exc.args[0]}") from None


def _prepare(args, output):
    """Everything checked before any input is read: ``(jobs, checkpoint)``; raises on refusal."""
    from .completion import check_device

    jobs = _jobs(Path(args.input), Path(args.output))
    check_device(args.device)  # an unavailable CUDA is refused before anything is read
    _check_mesh_format(args)
    checkpoint, _entry = _load(args, output)
    _check_cases(args, jobs, checkpoint)
    return jobs, checkpoint


def _refusal(exc: BaseException) -> tuple[int, str]:
    """``(exit status, message)`` of a failure before any input is read."""
    if isinstance(exc, ImportError):  # torch or a reader is missing in this Python
        return ExitCode.FAILED, f"cannot import the completion code: {exc}"
    if isinstance(exc, (HeartCompletionError, ValueError, KeyError, OSError)):  # options, checkpoint, table, files
        return ExitCode.USAGE, str(exc)
    return ExitCode.FAILED, f"unexpected {type(exc).__name__}: {exc}"


def _run_cases(jobs, checkpoint, args, output, started: float) -> int:
    """Complete every ``(input, output)`` of ``jobs``; one case's failure never stops the others."""
    from HeartCompletionLib.io.labelmap_files import LabelMapError

    from .completion import CompletionError

    failures = 0
    for index, (src, dst) in enumerate(output.cases(jobs)):
        output.start_case(index, len(jobs), src)
        payload = None
        try:
            message, payload = _complete_one(src, dst, checkpoint, args, output)
            payload["total_seconds"] = time.perf_counter() - started
            output.log(message)
        except (CliError, CompletionError, LabelMapError, OSError, ValueError) as exc:
            failures += 1
            output.error(str(exc) if str(src) in str(exc) else f"{src}: {exc}")
        except Exception as exc:  # noqa: BLE001 - one case's failure must never stop the later cases
            failures += 1
            output.error(f"{src}: unexpected {type(exc).__name__}: {exc}")
        finally:
            output.end_case(payload)
    if failures:
        output.failures(failures, len(jobs))
        return ExitCode.FAILED
    return ExitCode.OK


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser(serve=SERVE_OPTION in argv)
    parser.lines = _wants_lines(argv)
    args = parser.parse_args(argv)
    if args.serve:
        if args.protocol != "lines":
            parser.error(f"{SERVE_OPTION} needs --protocol lines")
        return _serve(args, _LineOutput(), sys.stdin)
    started = time.perf_counter()
    output = _LineOutput() if args.protocol == "lines" else _BarOutput(args.quiet)
    try:
        jobs, checkpoint = _prepare(args, output)
    except Exception as exc:  # noqa: BLE001 - reported as one message, never a traceback
        code, message = _refusal(exc)
        output.error(message)
        return code
    return _run_cases(jobs, checkpoint, args, output, started)


# --- the panel's warm worker (--serve) -----------------------------------------------------------

#: options a worker fixes when it starts: a request may not change them
_WORKER_OPTIONS = ("checkpoint", "device", "threads", "protocol", "serve", "idle_s")


def _serve(args, output, stdin) -> int:
    """Load the model once, then complete the requests on ``stdin`` one by one (module docstring)
    until it ends; exits by itself after ``args.idle_s`` seconds without a request."""
    from .completion import check_device

    try:
        check_device(args.device)
        checkpoint, entry = _load(args, output, warn=False)
    except Exception as exc:  # noqa: BLE001 - reported as one message, never a traceback
        code, message = _refusal(exc)
        output.error(message)
        return code
    parser = _parser()  # a request's options: --input and --output required
    parser.lines = True
    if not _request_waiting(stdin):  # started ahead of its first request (the panel's warm-up)
        _warm_up(checkpoint, args.device, output)
    idle = _IdleExit(args.idle_s, output)
    output.ready()
    try:
        while True:
            line = stdin.readline()
            if not line:  # the parent closed our stdin, or ended
                return ExitCode.OK
            if not line.strip():
                continue
            idle.busy()
            try:
                code = _serve_request(line, args, parser, checkpoint, entry, output)
            finally:
                _release_memory()
                idle.idle()
            output.done(code)
    finally:
        idle.stop()


def _serve_request(line: str, worker_args, parser, checkpoint, entry, output) -> int:
    """One request of a worker: its options parsed and checked as on the command line, then its cases."""
    started = time.perf_counter()
    try:
        request = json.loads(line)
        if not isinstance(request, list) or not all(isinstance(a, str) for a in request):
            raise ValueError("not a JSON list of strings")
    except ValueError as exc:
        output.error(f"{PROG}: error: a request must be one line holding a JSON list of options ({exc}): {line.strip()[:200]}")
        return ExitCode.USAGE
    fixed = ["--protocol", "lines", SERVE_OPTION, "--checkpoint", worker_args.checkpoint, "--device", worker_args.device,
             "--threads", str(worker_args.threads), "--idle_s", repr(worker_args.idle_s)]
    try:
        args = parser.parse_args([*fixed, *request])
    except SystemExit as exc:  # the parser printed the HC-ERROR line
        return int(exc.code or ExitCode.USAGE)
    changed = [f"--{name}" for name in _WORKER_OPTIONS if getattr(args, name) != getattr(worker_args, name)]
    if changed:
        output.error(f"{PROG}: error: a worker serves one model on one device: a request may not set {', '.join(changed)}")
        return ExitCode.USAGE
    try:
        from HeartCompletionLib.model.checkpoint import check_expected_table
        from HeartCompletionLib.structures.table import StructureTable

        jobs = _jobs(Path(args.input), Path(args.output))
        _check_mesh_format(args)
        if args.table:
            check_expected_table(checkpoint.path, checkpoint.table, StructureTable.from_spec(args.table))
        if entry is not None:  # every time a registered model is used
            output.warning(f"model {entry.name!r} ({entry.path}): {entry.warning}")
        _check_cases(args, jobs, checkpoint)
    except Exception as exc:  # noqa: BLE001 - reported as one message, never a traceback
        code, message = _refusal(exc)
        output.error(message)
        return code
    return _run_cases(jobs, checkpoint, args, output, started)


def _request_waiting(stdin) -> bool:
    """Whether a request is already waiting on ``stdin`` (POSIX pipes; False where that cannot be
    asked, e.g. on Windows)."""
    import select

    try:
        return bool(select.select([stdin], [], [], 0)[0])
    except (OSError, ValueError, TypeError, io.UnsupportedOperation):
        return False


def _warm_up(checkpoint, device, output) -> None:
    """One small completion while no request is waiting: the modules a completion imports on first
    use, the allocator and the kernels get warm, so that the first request of a worker started
    ahead is about as fast as the later ones (docs/benchmarks.md, session 14). A failure here is
    only logged: the requests report real problems."""
    import numpy as np

    from HeartCompletionLib.io import labelmap_files  # noqa: F401 - the readers and writers, imported now
    from HeartCompletionLib.io.labelmap import LabelMap

    from .completion import complete_label_map

    try:
        table = checkpoint.table
        radius = np.linalg.norm(np.indices((24, 24, 24)) - 11.5, axis=0)
        labels = np.zeros(radius.shape, dtype=np.int16)
        labels[radius < 9] = table.structures[0].label  # a ball in a shell of another structure
        labels[radius < 6] = table.structures[-1].label
        ijk_to_ras = np.diag([3.0, 3.0, 3.0, 1.0])
        complete_label_map(LabelMap(labels, ijk_to_ras, source="<warm-up>"), checkpoint, device=device, fit_steps=2)
    except Exception as exc:  # noqa: BLE001 - a head start only
        output.log(f"warm-up completion failed (requests are not affected): {type(exc).__name__}: {exc}")


class _IdleExit:
    """Ends the worker process after ``seconds`` without a request (a watchdog thread; the main
    thread waits on stdin, which no timeout interrupts on every platform) unless :meth:`stop` ped."""

    def __init__(self, seconds: float, output) -> None:
        import threading

        self.seconds, self.output = float(seconds), output
        self._busy, self._since = False, time.monotonic()
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        threading.Thread(target=self._watch, daemon=True).start()

    def stop(self) -> None:
        self._stopped.set()

    def busy(self) -> None:
        with self._lock:
            self._busy = True

    def idle(self) -> None:
        with self._lock:
            self._busy, self._since = False, time.monotonic()

    def _watch(self) -> None:
        while not self._stopped.is_set():
            with self._lock:
                left = self.seconds - (time.monotonic() - self._since)
                if not self._busy and left <= 0:
                    self.output.log(f"no request for {self.seconds:g} s: the worker exits")
                    os._exit(ExitCode.OK)
            self._stopped.wait(min(max(left, 0.05), 1.0))


def _release_memory() -> None:
    """Give the memory of the last request back to the system (a worker waits between requests)."""
    import gc

    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)  # glibc keeps freed heap pages otherwise
    except (OSError, AttributeError):
        pass


def run() -> NoReturn:
    """The process entry point (the ``heart-complete`` script, ``python -m``): :func:`main`, then
    the exit without Python's teardown (:mod:`.process_exit`: 0.7-0.9 s per process once torch is
    imported)."""
    from .process_exit import exit_after

    exit_after(main)


if __name__ == "__main__":
    run()
