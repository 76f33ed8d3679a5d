"""``heart-complete``: complete partially segmented hearts from the command line.

One label map (``--input case.nii.gz --output done.nii.gz``) or a folder of them (``--input
DIR --output OUTDIR``, same file names, a progress bar over the cases). The output has the
input's format (by the output name's suffix; a folder output keeps the input's name) and exactly
its geometry, unless ``--extend_mm MM`` (grow the grid around the given structures),
``--output_spacing MM`` (another voxel size, e.g. isotropic from a short-axis stack) or
``--reference IMAGE`` (another image's grid) asks for another grid
(:mod:`HeartCompletionLib.output_grid`). Given structures are kept voxel for voxel (on another
grid: carried over by nearest neighbour) unless ``--replace``; predicted structures fill the rest. ``--meshes DIR`` also writes one surface mesh per structure
(``<case>_<Structure>.stl``, RAS mm, ``SPACE=RAS`` header for 3D Slicer).

``--checkpoint`` takes a checkpoint file or the name of a registered model
(:mod:`HeartCompletionLib.model_registry`, e.g. ``synthetic-demo``, bundled for trying the tools
out); a registered model's warning is printed on stderr every time it is used. There is no default
model. An input that already holds every requested structure is written unchanged ("nothing to
complete", exit 0).

Exit codes: 0 success; 1 some case failed (each failure printed with its file; the other cases of
a folder are still processed); 2 bad usage (an option out of range, an unknown structure, an
unavailable device), unusable checkpoint or output that would overwrite an input, all reported
before any input is read. The input is never modified.

Example::

    heart-complete --checkpoint model.safetensors --input partial.nii.gz --output completed.nii.gz \\
        --meshes meshes/ --structures LAA PA
"""

from __future__ import annotations

import argparse
import math
import sys
import warnings
from pathlib import Path

from HeartCompletionLib.errors import ExitCode, HeartCompletionError


class CliError(HeartCompletionError):
    """A problem that stops the whole run (message names the file)."""


def _fraction(text: str) -> float:
    """argparse type: a number in [0, 1)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value:g}")
    return value


def _positive_mm(text: str) -> float:
    """argparse type: a finite length > 0 in mm."""
    value = _finite(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a length > 0 mm, got {value:g}")
    return value


def _non_negative_mm(text: str) -> float:
    """argparse type: a finite length >= 0 in mm."""
    value = _finite(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a length >= 0 mm, got {value:g}")
    return value


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    from HeartCompletionLib.completion import DECODE_MODES, DEFAULT_DECODE, DEFAULT_GRID_SPACING_MM, DEFAULT_MARGIN_MM
    from HeartCompletionLib.islands import DEFAULT_MIN_ISLAND_FRACTION
    from HeartCompletionLib.meshes import MESH_FORMATS

    p = argparse.ArgumentParser(
        prog="heart-complete",
        description="Complete a partially segmented heart label map with a HeartCompletion checkpoint. "
        "Reads and writes .nii, .nii.gz, .nrrd and .seg.nrrd; keeps the input's geometry unless an output grid "
        "option (--extend_mm, --output_spacing, --reference) asks for another.",
        epilog="Example: heart-complete --checkpoint model.safetensors --input partial.nii.gz "
        "--output completed.nii.gz --meshes meshes/",
    )
    p.add_argument("--checkpoint", required=True, metavar="CK",
                   help="inference checkpoint (.safetensors), or the name of a registered model: "
                   f"{_registered_names()} (an existing file of that name wins)")
    p.add_argument("--input", required=True, help="label map file, or a folder of label maps (batch mode)")
    p.add_argument("--output", required=True,
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
    p.add_argument("--grid_spacing_mm", type=_positive_mm, default=DEFAULT_GRID_SPACING_MM,
                   help=f"coarse decoding lattice in mm, > 0 (default {DEFAULT_GRID_SPACING_MM:g})")
    p.add_argument("--decode", default=DEFAULT_DECODE, choices=DECODE_MODES,
                   help="fine-level decoding: fast (interpolate the distances inside cells of <= 4 mm, decode exactly "
                   "where a label could change) or exact (decode every voxel of every cell near a surface; the "
                   f"reference, several times slower at CT resolution); default {DEFAULT_DECODE}")
    p.add_argument("--margin_mm", type=_non_negative_mm, default=DEFAULT_MARGIN_MM,
                   help=f"decoded region around the given structures in mm, >= 0 (default {DEFAULT_MARGIN_MM:g})")
    p.add_argument("--min_island_fraction", type=_fraction, default=DEFAULT_MIN_ISLAND_FRACTION, metavar="F",
                   help="clear predicted pieces smaller than F x the structure's largest piece "
                        f"(default {DEFAULT_MIN_ISLAND_FRACTION:g}; 0 keeps every piece)")
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
    p.add_argument("--seed", type=int, default=0, help="seed of the input surface sampling (default 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bar, only errors")
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
    from HeartCompletionLib.labelmap_io import read_image_geometry

    return read_image_geometry(args.reference)


def _registered_names() -> str:
    from HeartCompletionLib.model_registry import RegistryError, load_registry

    try:
        return ", ".join(f"{e.name} ({e.warning})" for e in load_registry()) or "none"
    except RegistryError as exc:
        return f"none readable ({exc})"


def _jobs(input_path: Path, output_path: Path) -> list[tuple[Path, Path]]:
    """``[(input file, output file)]``; refuses outputs that would overwrite an input."""
    from HeartCompletionLib.labelmap_io import SUPPORTED_SUFFIXES, LabelMapError, find_label_maps, suffix_of

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
        if dst.resolve() == src.resolve():
            raise CliError(f"{dst}: the output would overwrite the input {src}; choose another output")
    return jobs


def _output_grid(label_map, args):
    """``(shape, ijk_to_ras)`` the options ask for, or None (the input's grid)."""
    from HeartCompletionLib.output_grid import grown_grid

    if args.reference_grid is not None:
        return args.reference_grid
    if args.extend_mm is None and args.output_spacing is None:
        return None
    return grown_grid(label_map, args.extend_mm or 0.0, args.output_spacing)


def _complete_one(src: Path, dst: Path, checkpoint, args, bar) -> str:
    from HeartCompletionLib.completion import complete_label_map
    from HeartCompletionLib.labelmap_io import case_name, read_label_map, write_label_map
    from HeartCompletionLib.meshes import write_structure_meshes

    table = checkpoint.table
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        label_map = read_label_map(src, table=table, convention=args.label_map)
    notes = [f"{src}: {w.message}" if str(src) not in str(w.message) else str(w.message) for w in caught]
    if not label_map.present_labels():
        hint = "" if args.label_map else " (use --label_map if it uses another numbering)"
        raise CliError(f"{src}: no recognised structure of {table.names} in this label map{hint}")

    def progress(fraction: float, message: str) -> None:
        if bar is not None:
            bar.n = round(100 * fraction, 1)
            bar.set_postfix_str(message, refresh=False)
            bar.refresh()

    result = complete_label_map(
        label_map, checkpoint, structures=args.structures, replace=args.replace, device=args.device,
        progress=progress, seed=args.seed, grid_spacing_mm=args.grid_spacing_mm, margin_mm=args.margin_mm,
        min_island_fraction=args.min_island_fraction, decode=args.decode, output_grid=_output_grid(label_map, args),
    )
    write_label_map(result.label_map, dst, table=table)
    if args.meshes:
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
    return "\n".join([summary, *notes])


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    from tqdm import tqdm

    from HeartCompletionLib.checkpoint import CheckpointError
    from HeartCompletionLib.completion import CompletionError, check_device, resolve_structures
    from HeartCompletionLib.labelmap_io import LabelMapError
    from HeartCompletionLib.model_registry import load_model
    from HeartCompletionLib.structures import StructureTable

    try:
        jobs = _jobs(Path(args.input), Path(args.output))
        check_device(args.device)
        expected = StructureTable.from_spec(args.table) if args.table else None
        checkpoint, entry = load_model(args.checkpoint, expected_table=expected, device="cpu")
        if entry is not None:  # every time a registered model is used, quiet or not
            print(f"heart-complete: warning: model {entry.name!r} ({entry.path}): {entry.warning}", file=sys.stderr)
        args.reference_grid = _reference_grid(args, jobs)
        if args.structures:
            try:
                resolve_structures(checkpoint.table, args.structures)
            except KeyError as exc:
                raise CliError(f"--structures: {exc.args[0]}") from None
    except (CliError, CheckpointError, ValueError) as exc:  # RegistryError and CompletionError are ValueErrors
        print(f"heart-complete: error: {exc}", file=sys.stderr)
        return ExitCode.USAGE

    failures = 0
    batch = len(jobs) > 1
    outer = tqdm(jobs, desc="cases", unit="case", disable=args.quiet or not batch, file=sys.stderr)
    for src, dst in outer:
        bar = None if args.quiet or batch else tqdm(total=100, desc=src.name, unit="%", file=sys.stderr,
                                                    bar_format="{l_bar}{bar}| {n:.0f}% {postfix}")
        try:
            message = _complete_one(src, dst, checkpoint, args, bar)
            if not args.quiet:
                tqdm.write(message, file=sys.stderr)
        except (CliError, CompletionError, LabelMapError, OSError, ValueError) as exc:
            failures += 1
            text = str(exc) if str(src) in str(exc) else f"{src}: {exc}"
            tqdm.write(f"heart-complete: error: {text}", file=sys.stderr)
        except Exception as exc:  # noqa: BLE001 - one case's failure must never stop the later cases
            failures += 1
            tqdm.write(f"heart-complete: error: {src}: unexpected {type(exc).__name__}: {exc}", file=sys.stderr)
        finally:
            if bar is not None:
                bar.close()
    if failures:
        print(f"heart-complete: {failures} of {len(jobs)} case(s) failed", file=sys.stderr)
        return ExitCode.FAILED
    return ExitCode.OK


if __name__ == "__main__":
    raise SystemExit(main())
