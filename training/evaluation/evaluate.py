"""``heart-eval``: score a checkpoint on held-out label maps, next to the nearest-case baseline.

For every case, scenario (:mod:`.scenarios`) and scored structure it writes Dice, HD95 and ASSD
(mm) and the volume error (%) of the model's completion AND of the nearest-case baseline
(:mod:`.baseline`), all computed on the case's original image grid
(:mod:`HeartCompletionLib.geometry.metrics`). Outputs in ``--output_dir``:

- ``metrics.csv``: one row per case, scenario, structure and method;
- ``summary.json``: mean, median and IQR per scenario and structure, model and baseline side by side;
- ``plots/*.png``: per-structure box plots, model vs baseline, one per scenario;
- ``figures/*.png``: slice overlays of a few cases;
- ``report.html``: one self-contained page with the tables and every image embedded.

Where the cases come from (``--data_dir``)
    a folder of label maps (``.nii``, ``.nii.gz``, ``.nrrd``, ``.seg.nrrd``; all of them are
    used; what each annotates follows ``heart-prepare``'s rule: sidecar, ``--annotated``, the
    structures ``--convention`` names, else all), a ``heart-split`` CSV, or a folder holding ``train.csv``/``val.csv``/``test.csv`` (the
    one named by ``--split``; ``all`` = every CSV). CSV rows name the label map in ``source``; when
    the label maps have moved, ``--label_dir`` is searched by file name / case id.
Training cases for the baseline (``--train_dir``)
    a folder of label maps or a split CSV / folder with ``train.csv``; default: ``train.csv``
    beside the evaluated CSV. The evaluated case itself is never a baseline candidate.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from HeartCompletionLib.errors import ExitCode, HeartCompletionError
from HeartCompletionLib.geometry.metrics import structure_metrics
from HeartCompletionLib.inference.completion import CompletionError
from HeartCompletionLib.inference.latent_fit import (
    DEFAULT_FIT_ANCHOR,
    DEFAULT_FIT_BATCH,
    DEFAULT_FIT_LR,
    DEFAULT_FIT_STEPS,
    RECONSTRUCTION_FIT_BATCH,
    RECONSTRUCTION_FIT_STEPS,
)
from HeartCompletionLib.io.labelmap import LabelMap
from HeartCompletionLib.io.labelmap_files import case_name, find_label_maps

from .baseline import BaselineError, NearestCaseBaseline
from .scenarios import DEFAULT_SCENARIOS, case_scenario, resolve_scenarios

SPLIT_CHOICES = ("test", "val", "train", "all")
METHODS = ("model", "baseline")


class EvaluationError(HeartCompletionError, ValueError):
    """Bad evaluation input (message names the file or folder and the problem)."""


@dataclass
class EvalCase:
    """One label map to score. ``annotated``: structure names the dataset says are annotated
    (``None`` = whatever the label map holds); ``truncated``: names cut by the field of view."""

    case_id: str
    path: Path
    annotated: list | None = None
    truncated: list = field(default_factory=list)
    convention: str | None = None  #: the label convention heart-prepare read it with (a split CSV's case)
    prepared_missing: str | None = None  #: the split CSV's prepared file, when it cannot be read


# --- finding cases ---------------------------------------------------------------------------
def _names(text: str | None) -> list[str]:
    return [n for n in (text or "").split(";") if n]


def _find_in_label_dir(label_dir: Path, row: dict) -> Path | None:
    wanted = {Path(row.get(key) or "").name for key in ("source", "case_id", "case")}
    stems = {case_name(n) for n in wanted if n}
    for path in find_label_maps(label_dir):
        if path.name in wanted or case_name(path.name) in stems:
            return path
    return None


def _prepared_meta(npz_path: Path) -> dict:
    """The ``meta`` of a prepared case (the label map it was made from, the options it was
    prepared with), or {} if unreadable."""
    from heart_training.data.case_format import CaseFormatError, load_case

    npz_path = npz_path if npz_path.suffix == ".npz" else npz_path.with_suffix(".npz")
    try:
        return dict(load_case(npz_path, keys=[])["meta"])
    except (CaseFormatError, OSError):
        return {}


def cases_from_csv(csv_path: Path, label_dir: Path | None = None) -> list[EvalCase]:
    """Cases of a ``heart-split`` CSV (columns ``case``, ``case_id``, ``source``, ``annotated``, ``truncated``)."""
    try:
        with open(csv_path, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise EvaluationError(f"{csv_path}: cannot read the case list: {exc}") from exc
    cases = []
    for number, row in enumerate(rows, start=2):  # line 1 is the header
        meta = _prepared_meta(csv_path.parent / row["case"]) if row.get("case") else {}
        if not row.get("source"):
            row["source"] = str(meta.get("source", ""))
        source = Path(row["source"]) if row.get("source") else None
        if source is not None and not source.is_absolute():
            source = csv_path.parent / source
        if label_dir is not None:
            found = _find_in_label_dir(label_dir, row)
            source = found or source
        if source is None or not source.is_file():
            raise EvaluationError(
                f"{csv_path}, line {number}: label map {str(source) if source else '(no source column)'} not found; "
                "point --label_dir at the folder of label maps"
            )
        case_id = row.get("case_id") or Path(row.get("case") or "").stem or case_name(source.name)
        annotated = _names(row.get("annotated")) if row.get("annotated") else None
        convention = (meta.get("options") or {}).get("convention")
        missing = str(csv_path.parent / row["case"]) if row.get("case") and not meta else None
        cases.append(EvalCase(case_id, source, annotated, _names(row.get("truncated")), convention or None, missing))
    return cases


def resolve_conventions(cases: list[EvalCase], convention=None) -> dict:
    """``{label map path: convention}`` to read each case with: ``--convention`` if given, else the
    one ``heart-prepare`` read the case with (recorded in its prepared ``.npz``), else none. A split
    folder prepared with ``--label_map`` is thus read the same way without repeating it; a
    ``--convention`` that differs from the recorded one is used, with a warning."""
    recorded = sorted({str(c.convention) for c in cases if c.convention})
    if convention is not None and recorded and recorded != [str(convention)]:
        print(f"heart-eval: warning: the cases were prepared with the label convention {', '.join(recorded)}; "
              f"reading them with --convention {convention} as asked", file=sys.stderr)
    elif convention is None and recorded:
        print(f"heart-eval: reading the label maps with the convention heart-prepare used: {', '.join(recorded)}",
              file=sys.stderr)
    unknown = [c.prepared_missing for c in cases if c.prepared_missing and not c.convention]
    if convention is None and unknown:
        print(f"heart-eval: warning: {len(unknown)} prepared case file(s) of the split cannot be read (e.g. "
              f"{unknown[0]}), so the label convention heart-prepare read those label maps with is unknown: they are "
              "read with the table's values; pass --convention if they use another numbering", file=sys.stderr)
    return _conventions_by_path(cases, convention)


def _conventions_by_path(cases: list[EvalCase], convention=None) -> dict:
    return {c.path.resolve(): convention if convention is not None else c.convention for c in cases}


def find_cases(data: Path, split: str = "test", label_dir: Path | None = None) -> list[EvalCase]:
    """Cases to evaluate from a folder of label maps, a split CSV, or a folder of split CSVs."""
    data = Path(data)
    if not data.exists():
        raise EvaluationError(f"{data}: no such file or folder")
    if data.is_file():
        if data.suffix.lower() != ".csv":
            raise EvaluationError(f"{data}: expected a folder of label maps or a heart-split CSV")
        cases = cases_from_csv(data, label_dir)
    else:
        csvs = [data / f"{s}.csv" for s in (("train", "val", "test") if split == "all" else (split,))]
        if any(p.is_file() for p in csvs):
            cases = [c for p in csvs if p.is_file() for c in cases_from_csv(p, label_dir)]
        elif any((data / f"{s}.csv").is_file() for s in ("train", "val", "test")):
            raise EvaluationError(f"{data}: has split CSVs but no {split}.csv (choose --split, e.g. val)")
        else:
            cases = [EvalCase(case_name(p.name), p) for p in find_label_maps(data)]
    if not cases:
        raise EvaluationError(f"{data}: no label maps to evaluate (.nii/.nii.gz/.nrrd/.seg.nrrd or a split CSV)")
    return cases


def find_training_cases(train: Path | None, data: Path, label_dir: Path | None) -> list[EvalCase]:
    """Baseline training cases: ``--train_dir`` (label maps or split CSVs) or ``train.csv`` beside the data."""
    if train is not None:
        return find_cases(train, split="train", label_dir=label_dir)
    folder = data if data.is_dir() else data.parent
    if (folder / "train.csv").is_file():
        return cases_from_csv(folder / "train.csv", label_dir)
    raise EvaluationError(
        f"{data}: no train.csv for the nearest-case baseline; give --train_dir (label maps or a split CSV), "
        "or --no_baseline"
    )


def resolve_annotated(cases: list[EvalCase], table, convention=None, annotated=None) -> None:
    """Fill in ``annotated`` of the cases that lack it, by ``heart-prepare``'s rule: the sidecar
    ``<case>.json`` beside the label map, then ``annotated`` (``--annotated``), then the structures
    the convention names, else every structure. A split CSV's ``annotated`` column already holds
    that rule's answer (from ``heart-prepare``) and is kept. A structure outside a case's annotated
    set is never hidden from the input nor scored."""
    from heart_training.data.prepare import read_sidecar

    from HeartCompletionLib.structures.conventions import default_annotated

    if annotated is not None:
        table.subset(annotated)  # an unknown name fails once, up front
    for case in cases:
        if case.annotated is None:
            case.annotated = default_annotated(table, convention, annotated, read_sidecar(case.path, table))


# --- scoring ---------------------------------------------------------------------------------
def keep_only(label_map: LabelMap, labels) -> LabelMap:
    """A copy holding only ``labels`` (the scenario's input); never modifies ``label_map``."""
    values = np.where(np.isin(label_map.labels, list(labels)), label_map.labels, 0).astype(label_map.labels.dtype)
    return LabelMap(values, label_map.ijk_to_ras.copy(), source=label_map.source)


def score(prediction: LabelMap, reference: LabelMap, labels, table, base_row: dict) -> list[dict]:
    """Metric rows for ``labels`` of a prediction on the reference's grid."""
    if not prediction.same_geometry(reference):
        raise EvaluationError(f"{reference.source}: prediction is not on the reference grid")
    rows = []
    for label in labels:
        metrics = structure_metrics(prediction.labels == label, reference.labels == label, reference.ijk_to_ras)
        rows.append({**base_row, "structure": table.by_label(label).name, "label": int(label), **metrics})
    return rows


def evaluate_case(case: EvalCase, reference: LabelMap, scenarios, table, model_fn, baseline, seed: int):
    """Yield ``(name, CaseScenario or None when skipped, {method: prediction}, rows)`` for one case.

    ``model_fn(input_label_map, case_scenario) -> LabelMap``; ``baseline`` may be ``None``.
    """
    def labels_of(names) -> set:
        # names from the split CSV; one the checkpoint's table does not know cannot be scored anyway
        return {s.label for s in map(table.match_name, names) if s is not None}

    present = reference.present_labels()
    if case.annotated is not None:
        annotated = labels_of(case.annotated)
        present = [v for v in present if v in annotated]
    truncated = labels_of(case.truncated)
    for name in scenarios:
        scenario = case_scenario(name, table, present, case.case_id, seed)
        if scenario is None:
            yield name, None, {}, []
            continue
        given = keep_only(reference, scenario.input_labels)
        predictions, rows = {}, []
        for method in METHODS:
            base = {"case": case.case_id, "scenario": name, "method": method,
                    "inputs": ";".join(table.by_label(v).name for v in scenario.input_labels)}
            started = time.perf_counter()
            try:
                if method == "model":
                    predicted = model_fn(given, scenario)
                elif baseline is None:
                    continue
                else:
                    pasted = baseline.complete(given, scenario.input_labels, scenario.scored_labels,
                                               replace=scenario.replace, exclude=[str(case.path.resolve())],
                                               case_id=case.case_id)
                    predicted, base["baseline_case"] = pasted.label_map, pasted.case_id
            except (BaselineError, CompletionError) as exc:
                # no usable training case / an input the model cannot complete: the structures count
                # as not produced (Dice 0, distances undefined) and the run goes on
                print(f"heart-eval: warning: {case.case_id} {name} {method}: {exc}", file=sys.stderr)
                predicted = keep_only(given, [])
            seconds = time.perf_counter() - started
            predictions[method] = predicted
            for row in score(predicted, reference, scenario.scored_labels, table, base):
                row["truncated"] = row["label"] in truncated
                row["seconds"] = seconds
                rows.append(row)
        yield name, scenario, predictions, rows


def load_baseline(train_cases: list[EvalCase], table, progress: bool, cache_path: Path | None = None,
                  convention=None):
    """The nearest-case baseline over ``train_cases``, each read with ``convention`` or, if that is
    None, with the convention it was prepared with (:func:`resolve_conventions`)."""
    from HeartCompletionLib.io.labelmap_files import read_label_map

    conventions = _conventions_by_path(train_cases, convention)
    return NearestCaseBaseline.from_paths(
        [c.path.resolve() for c in train_cases],
        loader=lambda p: read_label_map(p, table=table, convention=conventions.get(Path(p).resolve(), convention)),
        case_ids=[c.case_id for c in train_cases], progress=progress, cache_path=cache_path,
    )


def run_evaluation(args) -> dict:
    """The whole ``heart-eval`` run; returns the summary dict (also written to disk)."""
    from tqdm import tqdm

    from HeartCompletionLib.inference.completion import CompletionRequest, complete_label_map
    from HeartCompletionLib.io.labelmap_files import LabelMapError, read_label_map
    from HeartCompletionLib.model.checkpoint import load_inference_checkpoint

    from . import report

    fit = {"fit_steps": args.fit_steps, "fit_lr": args.fit_lr, "fit_anchor": args.fit_anchor, "fit_batch": args.fit_batch}
    CompletionRequest(**fit)  # bad fitting options: refused before anything is read
    checkpoint = load_inference_checkpoint(args.checkpoint, device=args.device)
    table = checkpoint.table
    scenarios = resolve_scenarios(args.scenarios, table)
    cases = find_cases(args.data_dir, args.split, args.label_dir)[: args.max_cases or None]
    resolve_annotated(cases, table, args.convention, args.annotated)
    conventions = resolve_conventions(cases, args.convention)
    baseline = None
    if not args.no_baseline:
        cache = args.baseline_cache or Path(args.output_dir) / "baseline_index.npz"
        baseline = load_baseline(find_training_cases(args.train_dir, args.data_dir, args.label_dir), table,
                                 progress=not args.quiet, cache_path=cache, convention=args.convention)

    def model_fn(given: LabelMap, scenario) -> LabelMap:
        return complete_label_map(given, checkpoint, structures=scenario.scored_labels, replace=scenario.replace,
                                  device=args.device, seed=args.seed, **fit).label_map

    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    # figures of the chosen scenarios that run, else of the first one (a report always shows a case)
    figure_scenarios = [s for s in resolve_scenarios(args.figure_scenarios, table) if s in scenarios] or scenarios[:1]
    rows, skipped, failed, figures = [], {s: 0 for s in scenarios}, [], []
    bar = tqdm(total=len(cases) * len(scenarios), desc="heart-eval", unit="scenario", disable=args.quiet)
    for index, case in enumerate(cases):
        try:
            reference = read_label_map(case.path, table=table, convention=conventions[case.path.resolve()])
        except (LabelMapError, OSError) as exc:
            failed.append({"case": case.case_id, "error": str(exc)})
            print(f"heart-eval: skipping {case.path}: {exc}", file=sys.stderr)
            bar.update(len(scenarios))
            continue
        for name, scenario, predictions, case_rows in evaluate_case(
                case, reference, scenarios, table, model_fn, baseline, args.seed):
            skipped[name] += int(scenario is None)
            rows += case_rows
            if scenario is not None and index < args.figure_cases and name in figure_scenarios:
                stem = output_dir / "figures" / f"{case.case_id.replace('/', '_')}_{name}"
                figures.append(report.case_overlay_figure(stem.with_name(stem.name + ".png"), reference, predictions,
                                                          scenario, table, title=f"{case.case_id}: {name}"))
                if args.mesh_figures:
                    figures.append(report.case_mesh_figure(stem.with_name(stem.name + "_3d.png"), reference,
                                                           predictions, scenario, table, title=f"{case.case_id}: {name}"))
            bar.set_postfix_str(f"{case.case_id} {name}")
            bar.update(1)
    bar.close()
    if not rows:
        raise EvaluationError(f"{args.data_dir}: nothing was scored (every case failed or every scenario was skipped)")
    meta = {
        "checkpoint": str(Path(args.checkpoint).resolve()), "phase": checkpoint.metadata.get("phase"),
        "data": str(Path(args.data_dir).resolve()), "split": args.split, "num_cases": len(cases) - len(failed),
        "scenarios": scenarios, "seed": args.seed, "skipped": skipped, "failed": failed,
        "baseline": "nearest training case, centroid-aligned" if baseline else None,
        "num_training_cases": len(baseline.cases) if baseline else 0,
        "structures": table.names, "command": " ".join(sys.argv), "latent_fit": fit,
    }
    return report.write_outputs(output_dir, rows, meta, table, figures)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="heart-eval",
        description="Score a HeartCompletion checkpoint on held-out label maps under named scenarios "
        "(Dice, HD95/ASSD in mm, volume error, on the original image grid), next to a nearest-case baseline. "
        "Writes metrics.csv, summary.json, box plots and report.html.",
        epilog="Exit status: 0 every case scored; 1 some label maps could not be read (the outputs cover the "
        "others, summary.json lists them under 'failed'); 2 refused (bad checkpoint, options or data folder).",
    )
    parser.add_argument("--checkpoint", type=Path, required=True, help="inference checkpoint (.safetensors)")
    parser.add_argument("--data_dir", type=Path, required=True,
                        help="folder of label maps, a heart-split CSV, or a folder with train/val/test.csv")
    parser.add_argument("--split", choices=SPLIT_CHOICES, default="test",
                        help="which CSV of a split folder to score (default: test; ignored for a folder of label maps)")
    parser.add_argument("--label_dir", type=Path, default=None,
                        help="where the label maps of the CSV rows are, when they moved since heart-prepare")
    parser.add_argument("--train_dir", type=Path, default=None,
                        help="baseline training cases: folder of label maps or split CSV/folder (default: train.csv "
                        "beside --data_dir)")
    parser.add_argument("--convention", default=None,
                        help="label numbering of the files when it is not the table's: mmwhs, totalsegmentator or a "
                        "JSON file (see label_conventions)")
    parser.add_argument("--annotated", nargs="+", default=None, metavar="NAME",
                        help="structures the label maps annotate, for a folder of label maps (default: a "
                        "<case>.json sidecar, else those the --convention names, else all; a split CSV's "
                        "annotated column wins). Only annotated structures are hidden and scored")
    parser.add_argument("--no_baseline", action="store_true", help="score the model only")
    parser.add_argument("--baseline_cache", type=Path, default=None,
                        help="descriptor cache of the training cases, reused across runs while the files are "
                        "unchanged (default: OUTPUT_DIR/baseline_index.npz)")
    parser.add_argument("--scenarios", nargs="+", default=list(DEFAULT_SCENARIOS),
                        help="scenario names: full, annotated, drop_k, subset_A, subset_B, missing_<Structure>, "
                        "missing_*, default, all (default: %(default)s)")
    parser.add_argument("--output_dir", type=Path, default=Path("heart_eval"), help="default: ./heart_eval")
    parser.add_argument("--max_cases", type=int, default=0, help="score only the first N cases (0 = all)")
    parser.add_argument("--seed", type=int, default=0, help="drop_k draws and encoder point sampling (default 0)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    parser.add_argument("--figure_cases", type=int, default=2, help="cases shown as slice overlays (default 2)")
    parser.add_argument("--figure_scenarios", nargs="+", default=["subset_A", "drop_k", "missing_LAA"],
                        help="scenarios shown as slice overlays and 3-D snapshots (default: %(default)s; the "
                        "first scenario run when none of them is)")
    parser.add_argument("--no_mesh_figures", dest="mesh_figures", action="store_false",
                        help="skip the 3-D surface snapshots next to the slice overlays")
    parser.add_argument("--fit_steps", type=int, default=None, metavar="N",
                        help=f"fit the encoded latents to the given structures for N Adam steps before decoding "
                        f"(default: as heart-complete, {DEFAULT_FIT_STEPS}, or {RECONSTRUCTION_FIT_STEPS} in scenarios "
                        "that re-predict only given structures, e.g. full; 0: off)")
    parser.add_argument("--fit_lr", type=float, default=DEFAULT_FIT_LR,
                        help="fitting step size relative to the latents' RMS (default %(default)s)")
    parser.add_argument("--fit_anchor", type=float, default=DEFAULT_FIT_ANCHOR,
                        help="weight of the pull back to the encoder's latents (default %(default)s)")
    parser.add_argument("--fit_batch", type=int, default=None, metavar="N",
                        help=f"fitting points decoded per Adam step (default: as heart-complete, {DEFAULT_FIT_BATCH}, "
                        f"or {RECONSTRUCTION_FIT_BATCH} in scenarios that re-predict only given structures)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from HeartCompletionLib.io.labelmap_files import LabelMapError
    from HeartCompletionLib.model.checkpoint import CheckpointError

    try:
        summary = run_evaluation(args)
    except (EvaluationError, CheckpointError, LabelMapError, BaselineError, KeyError, ValueError) as exc:
        print(f"heart-eval: error: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    print(f"heart-eval: {summary['meta']['num_cases']} cases, {len(summary['scenarios'])} scenarios -> "
          f"{Path(args.output_dir) / 'report.html'}")
    for line in summary.get("headline", []):
        print("  " + line)
    failed = summary["meta"].get("failed") or []
    if failed:  # the report covers only the readable cases: not a success
        print(f"heart-eval: error: {len(failed)} case(s) could not be read and are missing from every figure:",
              file=sys.stderr)
        for entry in failed:
            print(f"  {entry['error']}", file=sys.stderr)
        return ExitCode.FAILED
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
