"""How many points each step of the latent fit needs: completion accuracy and time per batch size.

The fit (``HeartCompletionLib/inference/latent_fit.py``) decodes ``fit_batch`` of its ~7,000 target
points forward and backward at each of its 30 Adam steps; its cost is proportional to that batch.
This script scores the same hearts with ``heart-eval --fit_batch B`` for each batch asked for and
prints, against the first batch, the mean paired difference of Dice and ASSD per scenario group
(with its standard error: the hearts, scenarios and structures are the same in every run) and the
mean seconds per completion.

Hearts (``--hearts``): ``tuning``, 8 hearts of the completion study's population from a seed range
of their own (9137; 3 on oblique, anisotropic grids), where settings are chosen; ``heldout``, the
completion study's 24 held-out hearts (seed 0), where a choice is confirmed, never made. Each run
is one ``heart-eval`` process with one torch thread; ``--workers`` of them run side by side.

    python benchmarks/fit_batch_study.py --hearts tuning --batches 2048 1024 512 256
    python benchmarks/fit_batch_study.py --hearts heldout --batches 2048 512
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

#: population seed and count of each set of hearts (``completion_study.heart_plan``'s held-out draw)
HEARTS = {"tuning": (9137, 8), "heldout": (0, 24)}
DEFAULT_SCENARIOS = ("subset_A", "subset_B", "drop_k", "missing_*")
GROUPS = ("subset_A", "subset_B", "drop_k", "missing_X", "full")


def write_hearts(folder: Path, name: str, count: int | None) -> list[Path]:
    """The ``name`` set's hearts as ``.nii.gz`` in ``folder`` (kept and reused when already there)."""
    import completion_study as study

    seed, default_count = HEARTS[name]
    budget = dataclasses.replace(study.BUDGETS["gpu"], heldout_hearts=default_count)
    plan = [p for p in study.heart_plan(budget, seed) if p["split"] == "heldout"][: count or default_count]
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for record in plan:
        record = {**record, "file": Path(record["file"]).name}
        path = folder / record["file"]
        if not path.exists():
            study._write_heart((record, folder))
        paths.append(path)
    return paths


def run_eval(checkpoint: Path, hearts: Path, batch: int, scenarios, out: Path) -> Path:
    """One ``heart-eval`` run with ``--fit_batch batch`` (one torch thread); its ``metrics.csv``."""
    metrics = out / "metrics.csv"
    if metrics.exists():
        print(f"fit_batch {batch}: reusing {out.name}", flush=True)
        return metrics
    start = time.perf_counter()
    print(f"fit_batch {batch}: heart-eval running ({out.name})", flush=True)
    command = [sys.executable, "-m", "heart_training.evaluation.evaluate", "--checkpoint", str(checkpoint),
               "--data_dir", str(hearts), "--no_baseline", "--scenarios", *scenarios, "--output_dir", str(out),
               "--device", "cpu", "--quiet", "--figure_cases", "0", "--no_mesh_figures", "--fit_batch", str(batch)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"heart-eval --fit_batch {batch} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    print(f"fit_batch {batch}: done in {time.perf_counter() - start:.0f} s", flush=True)
    return metrics


def read_model_rows(path: Path) -> dict:
    """``{(case, scenario, structure): row}`` of the model's rows of a ``metrics.csv``."""
    with open(path, newline="", encoding="utf-8") as handle:
        return {(r["case"], r["scenario"], r["structure"]): r for r in csv.DictReader(handle) if r["method"] == "model"}


def _group(scenario: str) -> str:
    return "missing_X" if scenario.startswith("missing_") else scenario


def _value(row, metric) -> float:
    try:
        return float(row[metric])
    except (TypeError, ValueError):
        return float("nan")


def paired(reference: dict, other: dict, metric: str, group: str | None = None) -> tuple:
    """``(reference mean, other mean, mean paired difference, its standard error, n)`` of ``metric``
    over the rows both runs scored (finite in both), optionally one scenario group only."""
    keys = [k for k in sorted(set(reference) & set(other)) if group is None or _group(k[1]) == group]
    a = np.array([_value(reference[k], metric) for k in keys])
    b = np.array([_value(other[k], metric) for k in keys])
    ok = np.isfinite(a) & np.isfinite(b)
    if not ok.any():
        return float("nan"), float("nan"), float("nan"), float("nan"), 0
    d = b[ok] - a[ok]
    se = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")
    return float(a[ok].mean()), float(b[ok].mean()), float(d.mean()), se, int(ok.sum())


def mean_seconds(rows: dict) -> float:
    values = [_value(r, "seconds") for r in rows.values()]
    values = [v for v in values if np.isfinite(v)]
    return float(np.mean(values)) if values else float("nan")


def report(batches, runs: dict) -> str:
    first = batches[0]
    lines = [f"{'batch':<6} {'s/completion':>13}  (one torch thread)"]
    lines += [f"{b:<6} {mean_seconds(runs[b]):>13.2f}" for b in batches]
    groups = [g for g in GROUPS if any(_group(k[1]) == g for k in runs[first])]
    for b in batches[1:]:
        lines.append(f"\nfit_batch {b} against {first}: mean of the paired differences +- standard error (n)")
        for group in [None, *groups]:
            cells = []
            for metric in ("dice", "assd_mm"):
                ref, new, diff, se, n = paired(runs[first], runs[b], metric, group)
                cells.append(f"{metric} {ref:.4f} -> {new:.4f} ({diff:+.4f} +- {se:.4f}, n={n})")
            lines.append(f"  {group or 'all':<10} " + "; ".join(cells))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hearts", choices=sorted(HEARTS), default="tuning",
                        help="tuning (8 hearts, where settings are chosen) or heldout (the study's 24)")
    parser.add_argument("--count", type=int, default=0, help="only the first N hearts of the set (0: all)")
    parser.add_argument("--batches", type=int, nargs="+", default=[2048, 512],
                        help="fit batches to compare; the first is the reference (default 2048 512)")
    parser.add_argument("--scenarios", nargs="+", default=list(DEFAULT_SCENARIOS),
                        help="heart-eval scenarios (default: %(default)s)")
    parser.add_argument("--checkpoint", type=Path,
                        default=ROOT / "HeartCompletionLib" / "model" / "bundled" / "synthetic_demo.safetensors",
                        help="model to score (default: the bundled synthetic-demo)")
    parser.add_argument("--output_dir", type=Path, default=ROOT / "runs" / "fit_batch_study",
                        help="hearts and heart-eval outputs; a finished run of the same hearts, checkpoint and "
                        "scenarios is reused (default %(default)s)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="heart-eval processes side by side (default: the CPU cores)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if any(b < 1 for b in args.batches) or len(set(args.batches)) != len(args.batches):
        build_parser().error(f"--batches must be distinct whole numbers >= 1, got {args.batches}")
    if args.count < 0 or args.workers < 1:
        build_parser().error("--count must be >= 0 and --workers >= 1")
    if not args.checkpoint.is_file():
        build_parser().error(f"--checkpoint {args.checkpoint}: no such file")
    print("command: python benchmarks/fit_batch_study.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    label = f"{args.hearts}{'_' + str(args.count) if args.count else ''}"
    hearts = args.output_dir / f"hearts_{label}"
    paths = write_hearts(hearts, args.hearts, args.count)
    print(f"{len(paths)} {args.hearts} hearts in {hearts}; checkpoint {args.checkpoint.name}", flush=True)
    start = time.perf_counter()
    # a finished run is reused only for the same hearts, checkpoint and scenarios
    key = json.dumps([str(args.checkpoint.resolve()), args.checkpoint.stat().st_size, sorted(args.scenarios)])
    tag = hashlib.sha1(key.encode()).hexdigest()[:10]
    with ThreadPoolExecutor(max_workers=args.workers) as pool:
        futures = {b: pool.submit(run_eval, args.checkpoint, hearts, b, args.scenarios,
                                  args.output_dir / f"eval_{label}_{tag}_batch{b}") for b in args.batches}
        runs = {b: read_model_rows(f.result()) for b, f in futures.items()}
    print(f"heart-eval runs done in {time.perf_counter() - start:.0f} s\n")
    print(report(args.batches, runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
