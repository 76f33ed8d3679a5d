"""How much the other nine structures of a synthetic heart say about the tenth.

Builds ``--hearts`` synthetic hearts with the latent modes (``synthetic_heart(seed, modes=True)``)
and, for contrast, as many without them (the original, independently jittered population),
rasterises each on a coarse grid (``--spacing`` mm, RAS-aligned) and measures every structure's
volume (mL) and centroid (RAS mm). Then, per structure, it fits a linear model (least squares with
a tiny ridge on standardised features) from the other nine structures' volumes and centroids
(36 features) to this structure's volume, and to its centroid, and reports the k-fold
cross-validated R^2 of each (centroid: pooled over x, y, z). R^2 near 1: the other nine predict it;
near 0 (or below): they say nothing beyond the population mean.

    python benchmarks/population_stats.py                      # 200 + 200 hearts at 1.5 mm, ~2 min on 1 core
    python benchmarks/population_stats.py --hearts 12 --spacing 3   # a few seconds (the test)

Runs on one thread (``--threads``); prints the command first, then progress, then the tables.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="population_stats.py",
        description="Volume ranges of the synthetic heart population, and how well the other nine structures "
                    "predict each structure's volume and centroid (k-fold cross-validated R^2), with and without "
                    "the latent modes.")
    parser.add_argument("--hearts", type=int, default=200, help="hearts per population (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="population seed (default: %(default)s)")
    parser.add_argument("--spacing", type=float, default=1.5, help="voxel size in mm (default: %(default)s)")
    parser.add_argument("--folds", type=int, default=5, help="cross-validation folds (default: %(default)s)")
    parser.add_argument("--alpha", type=float, default=1e-3,
                        help="ridge penalty on standardised features, relative to the sample count "
                             "(default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="BLAS/OpenMP threads (default: %(default)s)")
    parser.add_argument("--no_contrast", action="store_true", help="skip the population without modes")
    args = parser.parse_args(argv)
    if args.hearts < 4:
        parser.error(f"--hearts must be at least 4, got {args.hearts}")
    if not 2 <= args.folds <= args.hearts:
        parser.error(f"--folds must be in 2..--hearts, got {args.folds}")
    if args.spacing <= 0.3:
        parser.error(f"--spacing {args.spacing} mm is finer than this benchmark needs (> 0.3 mm)")
    return args


def heart_seed(seed: int, index: int) -> int:
    """Same rule as ``heart-synth``'s case seeds: heart ``index`` of population ``seed``."""
    import numpy as np

    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0])


def measure(seed: int, spacing: float, modes: bool, labels: int):
    """(volumes mL (K,), centroids RAS mm (K, 3), modes dict or None) of one heart."""
    import numpy as np

    from HeartCompletionLib.io.synthetic import synthetic_label_map

    lm = synthetic_label_map(seed, spacing_mm=spacing, modes=modes)
    flat = lm.labels.ravel()
    counts = np.bincount(flat, minlength=labels + 1)[1:labels + 1].astype(np.float64)
    ijk = np.indices(lm.shape, dtype=np.float64).reshape(3, -1)
    sums = np.stack([np.bincount(flat, weights=ijk[a], minlength=labels + 1)[1:labels + 1] for a in range(3)], axis=1)
    mean_ijk = sums / np.maximum(counts, 1.0)[:, None]
    centroids = mean_ijk @ lm.ijk_to_ras[:3, :3].T + lm.ijk_to_ras[:3, 3]
    centroids[counts == 0] = np.nan
    return counts * lm.voxel_volume_mm3 / 1000.0, centroids, lm.metadata["synthetic"].get("modes")


def cv_r2(features, targets, folds: int, alpha: float, seed: int) -> float:
    """k-fold cross-validated R^2 (pooled over target columns) of ridge regression with an intercept.

    Features are standardised on each training fold; the penalty ``alpha * n_train`` is tiny
    (a numerical safeguard for more features than samples, not a prior).
    """
    import numpy as np

    x, y = np.asarray(features, dtype=np.float64), np.asarray(targets, dtype=np.float64).reshape(len(features), -1)
    order = np.random.default_rng(seed).permutation(len(x))
    pred = np.empty_like(y)
    for fold in np.array_split(order, folds):
        train = np.setdiff1d(order, fold)
        mu, sd = x[train].mean(axis=0), x[train].std(axis=0)
        sd[sd == 0] = 1.0
        xt = (x[train] - mu) / sd
        ym = y[train].mean(axis=0)
        gram = xt.T @ xt + alpha * len(train) * np.eye(xt.shape[1])
        coef = np.linalg.solve(gram, xt.T @ (y[train] - ym))
        pred[fold] = ((x[fold] - mu) / sd) @ coef + ym
    ss_res = float(((y - pred) ** 2).sum())
    ss_tot = float(((y - y.mean(axis=0)) ** 2).sum())
    return 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan")


def population(args, modes: bool, names):
    import numpy as np

    k = len(names)
    volumes, centroids, mode_rows = np.zeros((args.hearts, k)), np.zeros((args.hearts, k, 3)), []
    label = "with modes" if modes else "without modes"
    t0 = time.perf_counter()
    step = max(1, args.hearts // 10)
    for i in range(args.hearts):
        volumes[i], centroids[i], m = measure(heart_seed(args.seed, i), args.spacing, modes, k)
        if m is not None:
            mode_rows.append(m)
        if (i + 1) % step == 0 or i + 1 == args.hearts:
            print(f"  {label}: {i + 1}/{args.hearts} hearts, {time.perf_counter() - t0:.1f} s", flush=True)
    missing = np.isnan(centroids).any(axis=(1, 2))
    if missing.any():
        print(f"  note: {int(missing.sum())} hearts miss a structure at this spacing; they are left out", flush=True)
        volumes, centroids = volumes[~missing], centroids[~missing]
    r2 = []
    for t in range(k):
        others = [o for o in range(k) if o != t]
        feats = np.concatenate([volumes[:, others], centroids[:, others].reshape(len(volumes), -1)], axis=1)
        folds = min(args.folds, len(volumes))
        r2.append((cv_r2(feats, volumes[:, t], folds, args.alpha, args.seed),
                   cv_r2(feats, centroids[:, t], folds, args.alpha, args.seed)))
    return volumes, r2, mode_rows


def main(argv=None) -> int:
    args = parse_args(argv)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    sys.path.insert(0, str(REPO))
    import numpy as np

    from HeartCompletionLib.io.synthetic import MODE_NAMES, VOLUME_RANGES_ML
    from HeartCompletionLib.structures.table import StructureTable

    shown = sys.argv[1:] if argv is None else list(argv)
    print("command: " + shlex.join(["python", "benchmarks/population_stats.py", *shown]))
    print(f"hearts per population: {args.hearts}, seed {args.seed}, spacing {args.spacing} mm, "
          f"{args.folds}-fold CV, ridge alpha {args.alpha:g} (standardised features), {args.threads} thread(s)")
    names = StructureTable.default().names
    t0 = time.perf_counter()
    runs = [("modes", True)] + ([] if args.no_contrast else [("independent", False)])
    results = {}
    for key, modes in runs:
        results[key] = population(args, modes, names)
    print(f"measured in {time.perf_counter() - t0:.1f} s\n")

    for key, _ in runs:
        volumes, r2, _ = results[key]
        print(f"population '{key}' ({len(volumes)} hearts): volume mL (min / p5 / median / p95 / max) "
              f"and CV R^2 from the other nine")
        print(f"| {'structure':<10} | {'min':>6} | {'p5':>6} | {'median':>6} | {'p95':>6} | {'max':>6} "
              f"| {'R2 volume':>9} | {'R2 centroid':>11} |")
        print(f"|{'-' * 12}|{'-' * 8}|{'-' * 8}|{'-' * 8}|{'-' * 8}|{'-' * 8}|{'-' * 11}|{'-' * 13}|")
        for t, name in enumerate(names):
            v = np.percentile(volumes[:, t], [0, 5, 50, 95, 100])
            print(f"| {name:<10} | " + " | ".join(f"{x:6.1f}" for x in v)
                  + f" | {r2[t][0]:9.3f} | {r2[t][1]:11.3f} |")
        mean_v, mean_c = np.nanmean([r[0] for r in r2]), np.nanmean([r[1] for r in r2])
        print(f"| {'mean':<10} | {'':>6} | {'':>6} | {'':>6} | {'':>6} | {'':>6} | {mean_v:9.3f} | {mean_c:11.3f} |")
        if key == "modes":
            out = [f"{n} {v.min():.0f}-{v.max():.0f} (allowed {VOLUME_RANGES_ML[n][0]}-{VOLUME_RANGES_ML[n][1]})"
                   for n, v in zip(names, volumes.T)
                   if n in VOLUME_RANGES_ML and not VOLUME_RANGES_ML[n][0] <= v.min() <= v.max() <= VOLUME_RANGES_ML[n][1]]
            print("volumes outside the documented ranges: " + ("; ".join(out) if out else "none"))
            modes = np.array([[m[n] for n in MODE_NAMES] for m in results[key][2]])
            print("mode z-scores drawn (mean +- sd): " + ", ".join(
                f"{n} {modes[:, i].mean():+.2f}+-{modes[:, i].std():.2f}" for i, n in enumerate(MODE_NAMES)))
        print()
    if len(runs) == 2:
        print("R^2 with and without modes (k-fold CV, from the other nine structures' volumes and centroids)")
        print(f"| {'structure':<10} | {'volume, modes':>13} | {'volume, indep.':>14} | {'centroid, modes':>15} "
              f"| {'centroid, indep.':>16} |")
        print(f"|{'-' * 12}|{'-' * 15}|{'-' * 16}|{'-' * 17}|{'-' * 18}|")
        for t, name in enumerate(names):
            a, b = results["modes"][1][t], results["independent"][1][t]
            print(f"| {name:<10} | {a[0]:13.3f} | {b[0]:14.3f} | {a[1]:15.3f} | {b[1]:16.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
