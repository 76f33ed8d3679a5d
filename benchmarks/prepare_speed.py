"""Seconds and peak memory of data preparation per case: surface sampling + signed distances.

Cases:

(a) a synthetic heart (``HeartCompletionLib.io.synthetic.synthetic_label_map``) on a 160^3 grid of
    1 mm voxels with all ten structures: >= 100k surface samples, 250k volume points uniform in
    the padded box and 250k near-surface points, all K distances each (target: <= 5 s on 2 cores);
(b) every real label map under ``../shared/data/real/`` (skipped with a message when absent);
(c) with ``--ct``: a synthetic heart at CT-like spacing 0.4 x 0.4 x 0.5 mm (the ImageCAS kind).

Each case is timed stage by stage (surfaces, sampling, distances) in this process, then through
the full ``heart-prepare`` path (``heart_training.data.prepare.prepare_case``: read the file, sample,
distances, write the ``.npz``) when that module is importable. Peak memory: the Python/numpy
peak from ``tracemalloc`` over the staged run, and the process' maximum resident set size.

    python benchmarks/prepare_speed.py            # (a) and (b)
    python benchmarks/prepare_speed.py --ct --threads 1
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
REAL_DIR = REPO.parent / "shared" / "data" / "real"
SUFFIXES = (".nii", ".nii.gz", ".nrrd")


def staged_run(label_map, labels, args, rng) -> dict:
    """The preparation pipeline of one case, stage by stage (same counts and rules as heart-prepare)."""
    from HeartCompletionLib.geometry.signed_distance import signed_distances_mm
    from HeartCompletionLib.geometry.surface import sample_structure_surfaces, structure_surfaces

    times = {}
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    meshes = structure_surfaces(label_map, labels)
    times["surfaces_s"] = time.perf_counter() - t0
    t = time.perf_counter()
    surf, _, _ = sample_structure_surfaces(label_map, labels, args.num_surface, rng, min_per_structure=1000, meshes=meshes)
    times["sampling_s"] = time.perf_counter() - t
    surf = surf.astype(np.float64)
    lo, hi = surf.min(axis=0), surf.max(axis=0)
    pad = np.maximum(0.1 * (hi - lo), 10.0)  # heart-prepare's padded box
    volume = rng.uniform(lo - pad, hi + pad, size=(args.num_volume, 3))
    sigma = np.where(np.arange(args.num_near) % 2 == 0, 1.0, 4.0)[:, None]
    near = surf[rng.integers(0, len(surf), args.num_near)] + rng.normal(size=(args.num_near, 3)) * sigma
    t = time.perf_counter()
    sdf = signed_distances_mm(label_map, np.concatenate([volume, near]), labels, meshes=meshes, threads=args.threads)
    times["distances_s"] = time.perf_counter() - t
    times["total_s"] = time.perf_counter() - t0
    times["total_cpu_s"] = time.process_time() - cpu0  # all threads; robust to other users' load
    assert sdf.shape == (args.num_volume + args.num_near, len(labels)) and np.all(np.isfinite(sdf))
    return times


def prepare_run(label_map, path: Path | None, args) -> float | None:
    """Seconds of the full ``prepare_case`` path (file read + write included), or None."""
    try:
        from heart_training.data.prepare import PrepareOptions, prepare_case
    except ImportError as exc:
        print(f"   (heart_training.data.prepare not importable: {exc}; full path not timed)")
        return None
    from HeartCompletionLib.io.labelmap_files import write_label_map

    options = PrepareOptions(num_surface=args.num_surface, num_volume=args.num_volume, num_near=args.num_near)
    with tempfile.TemporaryDirectory() as tmp:
        if path is None:
            path = write_label_map(label_map, Path(tmp) / "case.nii.gz")
        t = time.perf_counter()
        prepare_case(path, Path(tmp) / "case.npz", options)
        seconds = time.perf_counter() - t
        try:  # the stages as prepare_case itself timed them (stored in the case's meta)
            from heart_training.data.case_format import load_case

            stages = load_case(Path(tmp) / "case.npz", keys=["meta"])["meta"].get("timings", {})
            print("   prepare_case stages: " + ", ".join(f"{k} {v:.2f}" for k, v in stages.items()))
        except (ImportError, OSError, ValueError, KeyError) as exc:  # informative only
            print(f"   (prepare_case stage timings unavailable: {exc})")
        return seconds


def report(name: str, label_map, args, path: Path | None = None) -> None:
    labels = label_map.present_labels()
    print(f"== {name} (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores): shape {label_map.shape}, spacing {np.round(label_map.spacing_mm, 3).tolist()} mm, "
          f"{len(labels)} structures")
    staged_run(label_map, labels, args, np.random.default_rng(0))  # warm-up (imports, caches)
    runs = [staged_run(label_map, labels, args, np.random.default_rng(r + 1)) for r in range(args.repeats)]
    best = min(runs, key=lambda r: r["total_s"])
    print(f"   staged (best of {args.repeats}): " + ", ".join(f"{k} {v:.2f}" for k, v in best.items()))
    tracemalloc.start()
    staged_run(label_map, labels, args, np.random.default_rng(99))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    print(f"   peak traced (numpy/python) memory {peak / 2**20:.0f} MiB")
    if not args.skip_prepare:
        seconds = prepare_run(label_map, path, args)
        if seconds is not None:
            print(f"   full prepare_case (read + sample + distances + write .npz): {seconds:.2f} s")
    print(f"   process max RSS so far {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_surface", type=int, default=120_000, help="surface samples per case")
    parser.add_argument("--num_volume", type=int, default=250_000, help="volume points per case")
    parser.add_argument("--num_near", type=int, default=250_000, help="near-surface points per case")
    parser.add_argument("--threads", type=int, default=2, help="threads for distance transforms and KD-trees")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per case (best reported)")
    parser.add_argument("--ct", action="store_true", help="also a CT-like 0.4 x 0.4 x 0.5 mm synthetic heart")
    parser.add_argument("--skip_prepare", action="store_true", help="do not time the full prepare_case path")
    parser.add_argument("--real_dir", type=Path, default=REAL_DIR, help="folder of real label maps (recursive)")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(REPO))
    from HeartCompletionLib.io.synthetic import synthetic_label_map

    report("(a) synthetic heart 160^3, 1 mm", synthetic_label_map(seed=0, spacing_mm=1.0, shape=(160, 160, 160)), args)
    cases = sorted(p for p in args.real_dir.rglob("*") if p.is_file() and p.name.lower().endswith(SUFFIXES)) \
        if args.real_dir.is_dir() else []
    if not cases:
        print(f"== (b) real label maps: none under {args.real_dir}, skipped")
    from tqdm import tqdm

    from HeartCompletionLib.io.labelmap_files import read_label_map

    for path in tqdm(cases, desc="real cases", disable=not cases):
        report(f"(b) {path.name}", read_label_map(path), args, path=path)
    if args.ct:
        report("(c) synthetic heart, CT-like 0.4 x 0.4 x 0.5 mm", synthetic_label_map(seed=0, spacing_mm=(0.4, 0.4, 0.5)), args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
