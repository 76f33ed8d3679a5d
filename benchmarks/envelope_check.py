"""Completions of real single structures against real whole-heart envelopes (issue 11).

For each envelope case of ``../shared/data/real`` (the platipy radiotherapy CT: the LAD alone,
``04D1_label``, with ``04D1_heart_envelope`` on the same grid; the TotalSegmentator chest CT: the PA
alone, ``chestct_label``, with ``chestct_heart_envelope`` on another grid of the same patient) it
completes the heart with a checkpoint through the public API
(:func:`HeartCompletionLib.inference.completion.complete_label_map`) on the input's own grid, and reports
(:func:`HeartCompletionLib.inference.envelope.envelope_fit`):

- ``inside``: fraction of the completed heart inside the envelope;
- ``fill``: fraction of the envelope the completed heart fills;
- ``in view``: fraction of the envelope inside the input's grid (``fill`` cannot exceed it: the
  completion is written on the input's grid, so a field of view that cuts the heart cuts the
  completion too; growing the grid is separate work);
- the structures of the completion that touch the grid's border (cut by the field of view).

"heart" = Myocardium, LA, LV, RA, RV and LAA (what a whole-heart contour encloses), "all" = every
structure of the completion, the given one included. The default checkpoint is the bundled
``synthetic-demo`` model, trained on synthetic hearts only (no patient data): these figures say how
far it is from real anatomy, not what a model trained on patients would do.

    python benchmarks/envelope_check.py
    python benchmarks/envelope_check.py --checkpoint runs/phase4_real/model_best.safetensors --json out.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from HeartCompletionLib.model.registry import BUNDLED_MODELS_DIR

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_REAL = ROOT.parent / "shared" / "data" / "real"
DEFAULT_CHECKPOINT = BUNDLED_MODELS_DIR / "synthetic_demo.safetensors"
#: (name, folder, input label map, envelope)
CASES = (
    ("platipy_rtct", "platipy_rtct", "04D1_label.nii.gz", "04D1_heart_envelope.nii.gz"),
    ("totalseg_chestct", "totalseg_chestct", "chestct_label.nii.gz", "chestct_heart_envelope.nii.gz"),
)


def grid_text(label_map) -> str:
    """``I x J x K at si x sj x sk mm`` of a label map's grid."""
    return f"{'x'.join(map(str, label_map.shape))} at {'x'.join(f'{s:.3g}' for s in label_map.spacing_mm)} mm"


def check_case(name: str, input_path: Path, envelope_path: Path, checkpoint, device: str, seed: int) -> dict:
    from HeartCompletionLib.inference.completion import complete_label_map
    from HeartCompletionLib.inference.envelope import ENVELOPE_STRUCTURES, envelope_fit, read_envelope
    from HeartCompletionLib.io.labelmap_files import read_label_map

    table = checkpoint.table
    given = read_label_map(input_path, table=table)
    mask, mask_affine = read_envelope(envelope_path)
    started = time.perf_counter()
    result = complete_label_map(given, checkpoint, device=device, seed=seed)
    seconds = time.perf_counter() - started
    completed = result.label_map
    heart_labels = [table.by_name(n).label for n in ENVELOPE_STRUCTURES if table.match_name(n) is not None]
    row = {
        "case": name,
        "input": [table.by_label(v).name for v in given.present_labels()],
        "grid": grid_text(given),
        "seconds": round(seconds, 1),
        "heart": envelope_fit(completed, mask, mask_affine, heart_labels),
        "all": envelope_fit(completed, mask, mask_affine, table.labels),
        "given_only": envelope_fit(given, mask, mask_affine, given.present_labels()),
        "cut_by_view": [table.by_label(v).name for v in completed.border_labels()],
    }
    return row


def synthetic_control(checkpoint, device: str, seed: int) -> dict:
    """The metric where the model is in its element: synthetic heart seed 1000 completed from its
    Myocardium, LV and RV (an ACDC-like input), against its own chambers + myocardium + LAA as the
    envelope (same grid). Whether that seed was among the demo model's training hearts is not
    checked: the row calibrates the metric, it does not score the model."""
    from HeartCompletionLib.inference.completion import complete_label_map
    from HeartCompletionLib.inference.envelope import ENVELOPE_STRUCTURES, envelope_fit
    from HeartCompletionLib.io.labelmap import LabelMap
    from HeartCompletionLib.io.synthetic import synthetic_label_map

    table = checkpoint.table
    truth = synthetic_label_map(seed=1000, spacing_mm=1.5)
    given_labels = [table.by_name(n).label for n in ("Myocardium", "LV", "RV")]
    given = LabelMap(np.where(np.isin(truth.labels, given_labels), truth.labels, 0).astype(truth.labels.dtype),
                     truth.ijk_to_ras, source="synthetic heart 1000")
    heart_labels = [table.by_name(n).label for n in ENVELOPE_STRUCTURES]
    envelope = np.isin(truth.labels, heart_labels)
    started = time.perf_counter()
    completed = complete_label_map(given, checkpoint, device=device, seed=seed).label_map
    return {
        "case": "synthetic control", "input": ["Myocardium", "LV", "RV"],
        "grid": f"{'x'.join(map(str, given.shape))} at 1.5 mm", "seconds": round(time.perf_counter() - started, 1),
        "heart": envelope_fit(completed, envelope, truth.ijk_to_ras, heart_labels),
        "all": envelope_fit(completed, envelope, truth.ijk_to_ras, table.labels),
        "given_only": envelope_fit(given, envelope, truth.ijk_to_ras, given_labels),
        "cut_by_view": [table.by_label(v).name for v in completed.border_labels()],
    }


def format_rows(rows: list[dict]) -> str:
    lines = ["| case | input | grid | heart: inside | heart: fill | all ten: inside | all ten: fill | envelope in view "
             "| completed heart / envelope ml | completion cut by the view | s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        h, a = r["heart"], r["all"]
        lines.append(
            f"| {r['case']} | {', '.join(r['input'])} | {r['grid']} | {h['inside_fraction']:.2f} | {h['fill_fraction']:.2f} "
            f"| {a['inside_fraction']:.2f} | {a['fill_fraction']:.2f} | {h['envelope_in_view_fraction']:.2f} "
            f"| {h['heart_ml']:.0f} / {h['envelope_ml']:.0f} | {', '.join(r['cut_by_view']) or '-'} | {r['seconds']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="Complete real single-structure label maps and measure the completed heart against real "
        "whole-heart envelopes: the fraction inside the envelope and the fraction of the envelope filled.")
    parser.add_argument("--real_dir", type=Path, default=DEFAULT_REAL, help="the shared real data (default: %(default)s)")
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT,
                        help="inference checkpoint (default: the bundled synthetic-demo model, trained on synthetic "
                        "hearts only)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")
    parser.add_argument("--seed", type=int, default=0, help="encoder point sampling (default 0)")
    parser.add_argument("--cases", nargs="+", default=[c[0] for c in CASES], choices=[c[0] for c in CASES])
    parser.add_argument("--no_control", dest="control", action="store_false",
                        help="skip the synthetic control row (a synthetic heart from its Myocardium, LV, RV)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    args = parser.parse_args(argv)

    from HeartCompletionLib.model.checkpoint import load_inference_checkpoint

    if not args.real_dir.is_dir():
        print(f"envelope_check: error: {args.real_dir}: no real data folder", file=sys.stderr)
        return 2
    checkpoint = load_inference_checkpoint(args.checkpoint, device=args.device)
    print("$ python benchmarks/envelope_check.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])))
    print(f"checkpoint: {args.checkpoint} (phase {checkpoint.metadata.get('phase')}); "
          + ("the bundled synthetic-demo model: trained on synthetic hearts only, no patient data"
             if args.checkpoint.resolve() == DEFAULT_CHECKPOINT.resolve() else ""))
    rows = []
    for name, folder, input_name, envelope_name in CASES:
        if name not in args.cases:
            continue
        rows.append(check_case(name, args.real_dir / folder / input_name, args.real_dir / folder / envelope_name,
                               checkpoint, args.device, args.seed))
    if args.control:
        rows.append(synthetic_control(checkpoint, args.device, args.seed))
    print(format_rows(rows))
    for r in rows:
        g = r["given_only"]
        print(f"{r['case']}: the given {', '.join(r['input'])} alone: {g['heart_ml']:.1f} ml, inside "
              f"{g['inside_fraction']:.2f}, fills {g['fill_fraction']:.3f} of the envelope")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1, default=float) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
