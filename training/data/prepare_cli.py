"""``heart-prepare`` command line: many label maps -> a prepared dataset (DESIGN.md, "Training data").

The per-case conversion lives in :mod:`.prepare` (:func:`~.prepare.prepare_case`); this module is
the batch around it. :func:`prepare_dataset` finds label maps recursively (output mirrors the input
folders), runs cases in parallel worker processes with a progress bar, resumes (a case whose
``.npz`` is valid, from the same input file and options, is kept), writes ``manifest.json`` /
``manifest.csv`` atomically and lists a bad case as failed while the other cases go on.
:func:`main` exits non-zero when a case failed; ``heart-prepare --check OUT`` validates a
prepared dataset instead (:mod:`.dataset_check`).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from HeartCompletionLib.errors import ExitCode
from HeartCompletionLib.io.labelmap_files import case_name, find_label_maps
from HeartCompletionLib.structures.table import StructureTable

from .case_format import CaseFormatError, load_case, manifest_entry, verify_checksums, write_manifest
from .prepare import PrepareError, PrepareOptions, file_sha256, prepare_case


@dataclass
class _CaseContext:
    """What the orchestrator knows about one input file."""

    case_id: str
    source: Path
    output: Path
    notes: list = field(default_factory=list)


# --- many cases -----------------------------------------------------------------------------


def _entry_from_existing(ctx: _CaseContext, options: PrepareOptions) -> dict | None:
    """The manifest entry of an already prepared, still valid case; ``None`` when it must be redone."""
    if not ctx.output.is_file():
        return None
    try:
        meta = load_case(ctx.output, keys=["annotated"])["meta"]
        verify_checksums(ctx.output)  # a file damaged in place reads its meta fine
    except ValueError as exc:
        ctx.notes.append(f"{ctx.output}: existing file is not a valid case ({exc}); prepared again")
        return None
    if meta.get("options_fingerprint") != options.fingerprint() or meta.get("source_sha256") != file_sha256(ctx.source):
        ctx.notes.append(f"{ctx.output}: prepared from another input file or with other options; prepared again")
        return None
    return {**manifest_entry(meta, ctx.output), "source": str(ctx.source), "resumed": True}


def _run_case(ctx: _CaseContext, options: PrepareOptions) -> dict:
    """:func:`prepare_case` that never raises: a failure becomes a ``failed`` entry naming the file."""
    t0 = time.perf_counter()
    try:
        entry = prepare_case(ctx.source, ctx.output, options, case_id=ctx.case_id)
    except OSError as exc:
        # writing failed (read errors of the label map arrive as LabelMapError, a ValueError)
        reason = f"{ctx.output}: cannot write the case: {exc}" if str(ctx.source) not in str(exc) else str(exc)
        entry = _failed(ctx, reason)
    except Exception as exc:  # noqa: BLE001 - any bad case must not stop the others
        message = str(exc) or type(exc).__name__
        entry = _failed(ctx, message if str(ctx.source) in message else f"{ctx.source}: {message}")
    entry["warnings"] = ctx.notes + entry.get("warnings", [])
    entry.setdefault("seconds", round(time.perf_counter() - t0, 3))
    return entry


def _failed(ctx: _CaseContext, reason: str) -> dict:
    return {"case": ctx.case_id, "source": str(ctx.source), "output": str(ctx.output), "status": "failed", "reason": reason}


def _die_with_parent(parent_pid: int) -> None:
    """Worker initializer: the worker ends when ``heart-prepare`` ends, even by ``kill -9``.

    Linux delivers SIGKILL to the worker when its parent dies (``PR_SET_PDEATHSIG``); a watchdog
    thread that polls the parent's pid covers other systems and the race before the call."""
    import os
    import threading

    try:
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass

    def watch() -> None:
        while True:
            if os.getppid() != parent_pid:
                os._exit(1)
            time.sleep(0.5)

    threading.Thread(target=watch, name="die-with-parent", daemon=True).start()


def remove_stale_temporaries(output_dir: Path) -> list[Path]:
    """Delete ``*.tmp`` files a killed run left behind (``save_case``/manifest temporaries)."""
    stale = [p for p in output_dir.rglob("*.tmp") if p.is_file() and (".npz." in p.name or p.name.startswith("manifest."))]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def prepare_dataset(
    input_dir, output_dir, options: PrepareOptions | None = None, workers: int = 1, overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Prepare every label map under ``input_dir`` into ``output_dir``; returns the manifest dict.

    Output mirrors the input folders (``IN/a/case.nii.gz`` -> ``OUT/a/case.npz``). Never raises for
    a bad case (it is listed as failed); raises ``PrepareError`` for a bad input/output folder.
    """
    from tqdm import tqdm

    options = options or PrepareOptions()
    input_dir, output_dir = Path(input_dir).resolve(), Path(output_dir).resolve()
    if not input_dir.is_dir():
        raise PrepareError(f"{input_dir}: input folder does not exist")
    StructureTable.from_spec(options.table)  # fail early on a bad table, not once per case
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PrepareError(f"{output_dir}: cannot create the output folder ({exc})") from exc
    remove_stale_temporaries(output_dir)

    contexts, entries, seen = [], {}, {}
    for source in find_label_maps(input_dir, exclude=output_dir):  # recursive, hidden files skipped
        rel = source.relative_to(input_dir)
        case_id = (rel.parent / case_name(source)).as_posix()
        ctx = _CaseContext(case_id, source, output_dir / f"{case_id}.npz")
        if case_id in seen:
            entries[str(source)] = _failed(ctx, f"{source}: same case name {case_id!r} as {seen[case_id]}; rename one")
            continue
        seen[case_id] = source
        contexts.append(ctx)

    pending = []
    for ctx in contexts:
        existing = None if overwrite else _entry_from_existing(ctx, options)
        if existing is None:
            pending.append(ctx)
        else:
            entries[str(ctx.source)] = existing

    last_write = [0.0]

    def finish(ctx: _CaseContext, entry: dict) -> None:
        entries[str(ctx.source)] = {**entry, "source": str(ctx.source)}
        if entry["status"] != "ok":
            bar.write(f"FAILED {entry['case']}: {entry['reason']}", file=sys.stderr)
        bar.update()
        if time.monotonic() - last_write[0] > 5.0:  # progress survives a kill; not rewritten per case
            last_write[0] = time.monotonic()
            try:
                write_manifest(output_dir, input_dir, options, entries.values())
            except CaseFormatError as exc:  # the cases go on; the final write reports it
                bar.write(f"warning: {exc}", file=sys.stderr)

    with tqdm(total=len(contexts), initial=len(contexts) - len(pending), desc="heart-prepare", unit="case",
              disable=not progress) as bar:
        if workers <= 1 or len(pending) <= 1:
            for ctx in pending:
                finish(ctx, _run_case(ctx, options))
        else:
            _run_parallel(pending, options, workers, finish)
    return write_manifest(output_dir, input_dir, options, entries.values())


def _run_parallel(pending: list, options: PrepareOptions, workers: int, on_done) -> None:
    import os
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    with ProcessPoolExecutor(max_workers=workers, initializer=_die_with_parent, initargs=(os.getpid(),)) as pool:
        futures = {pool.submit(_run_case, ctx, options): ctx for ctx in pending}
        for future in as_completed(futures):
            ctx = futures[future]
            try:
                entry = future.result()
            except BrokenProcessPool as exc:  # a worker died (e.g. killed for memory)
                entry = _failed(ctx, f"{ctx.source}: worker process died ({exc}); try fewer --workers")
            on_done(ctx, entry)


# --- command line ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    defaults = PrepareOptions()
    parser = argparse.ArgumentParser(
        prog="heart-prepare",
        description="Convert label maps (.nii/.nii.gz/.nrrd/.seg.nrrd, searched recursively) into training .npz "
        "files (points and signed distances in RAS mm), or validate a prepared folder with --check.",
        epilog="Examples:\n  heart-prepare --input_dir labelmaps --output_dir prepared --workers 4\n"
        "  heart-prepare --check prepared",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--input_dir", type=Path, help="folder of label maps (searched recursively)")
    parser.add_argument("--output_dir", type=Path, help="where the .npz files, manifest.json and manifest.csv go")
    parser.add_argument("--check", type=Path, metavar="DIR", help="validate the prepared folder DIR instead of converting")
    parser.add_argument("--workers", type=int, default=None, help="parallel cases (default: half the CPU cores)")
    parser.add_argument("--label_map", dest="convention", default=None, metavar="CONV",
                        help="label numbering of the inputs: 'mmwhs', 'totalsegmentator' or a JSON file "
                        "{value: structure name} (default: the table's values 1..K)")
    parser.add_argument("--table", default=None, help="structure table JSON (default: the ten structures)")
    parser.add_argument("--structures", nargs="+", default=None, metavar="NAME",
                        help="process only these structures (the others are stored as not annotated)")
    parser.add_argument("--annotated", nargs="+", default=None, metavar="NAME",
                        help="structures the label maps annotate (default: those the --label_map convention "
                        "names, else all; a <case>.json sidecar {\"annotated\": [...]} overrides it per case)")
    parser.add_argument("--num_surface", type=int, default=defaults.num_surface, help="surface samples per case")
    parser.add_argument("--num_volume", type=int, default=defaults.num_volume, help="uniform points in the padded box")
    parser.add_argument("--num_near", type=int, default=defaults.num_near, help="near-surface points per case")
    parser.add_argument("--min_surface_per_structure", type=int, default=defaults.min_surface_per_structure,
                        help="floor of surface samples per structure")
    parser.add_argument("--near_sigma_mm", type=float, nargs="+", default=list(defaults.near_sigmas_mm),
                        help="Gaussian offsets (mm) of near-surface points, used in turn")
    parser.add_argument("--padding_fraction", type=float, default=defaults.padding_fraction,
                        help="box padding as a fraction of the structures' extent per axis")
    parser.add_argument("--min_padding_mm", type=float, default=defaults.min_padding_mm, help="minimum box padding (mm)")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="dataset seed (each case derives its own)")
    parser.add_argument("--max_voxels", type=float, default=None,
                        help="refuse label maps of more voxels (default 1.5e9, or $HEARTCOMPLETION_MAX_VOXELS); "
                        "a header promising more than its file holds is always refused")
    parser.add_argument("--overwrite", action="store_true", help="prepare every case again (default: resume)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    from .dataset_check import add_check_arguments

    add_check_arguments(parser)
    return parser


def options_from_args(args: argparse.Namespace) -> PrepareOptions:
    for name in ("num_surface", "num_volume", "num_near"):
        if getattr(args, name) < 1:
            raise PrepareError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if any(s <= 0 for s in args.near_sigma_mm):
        raise PrepareError(f"--near_sigma_mm must be positive millimetres, got {args.near_sigma_mm}")
    options = PrepareOptions(
        table=None if args.table is None else str(Path(args.table).resolve()),
        convention=args.convention if args.convention is None or not Path(args.convention).is_file()
        else str(Path(args.convention).resolve()),
        structures=None if args.structures is None else tuple(args.structures),
        annotated=None if args.annotated is None else tuple(args.annotated),
        num_surface=args.num_surface, num_volume=args.num_volume, num_near=args.num_near,
        min_surface_per_structure=args.min_surface_per_structure, near_sigmas_mm=tuple(args.near_sigma_mm),
        padding_fraction=args.padding_fraction, min_padding_mm=args.min_padding_mm, seed=args.seed,
        max_voxels=None if args.max_voxels is None else int(args.max_voxels),
    )
    if options.max_voxels is not None and options.max_voxels < 1:
        raise PrepareError(f"--max_voxels must be a positive number of voxels, got {args.max_voxels:g}")
    # unknown names fail here, once, instead of in every case
    table = StructureTable.from_spec(options.table)
    for names in (options.structures, options.annotated):
        if names is not None:
            table.subset(names)
    from HeartCompletionLib.structures.conventions import load_convention

    load_convention(options.convention, table)  # a bad --label_map file fails once, up front
    return options


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.check is not None:
        from .dataset_check import run_check_cli

        return run_check_cli(args)
    if args.input_dir is None or args.output_dir is None:
        parser.error("--input_dir and --output_dir are required (or use --check DIR)")
    import os

    workers = args.workers if args.workers is not None else max(1, (os.cpu_count() or 2) // 2)
    try:
        options = options_from_args(args)
        manifest = prepare_dataset(args.input_dir, args.output_dir, options, workers=workers,
                                   overwrite=args.overwrite, progress=not args.quiet)
    except (PrepareError, KeyError, ValueError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc  # KeyError quotes its str()
        print(f"heart-prepare: error: {message}", file=sys.stderr)
        return ExitCode.USAGE
    summary = manifest["summary"]
    print(f"heart-prepare: {summary['ok']} of {summary['cases']} cases ok, {summary['failed']} failed, "
          f"{summary['with_warnings']} with warnings -> {Path(args.output_dir) / 'manifest.json'}")
    for entry in manifest["cases"]:
        if entry["status"] != "ok":
            print(f"  FAILED {entry['case']}: {entry['reason']}", file=sys.stderr)
    if summary["cases"] == 0:
        print(f"heart-prepare: error: no label maps (.nii/.nii.gz/.nrrd/.seg.nrrd) under {args.input_dir}", file=sys.stderr)
        return ExitCode.USAGE
    return ExitCode.FAILED if summary["failed"] else ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
