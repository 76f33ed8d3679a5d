"""The first decoding lattice: the same completions started from lattices of different spacings.

A completion decodes every node of a coarse lattice over its region first (``heart-complete
--grid_spacing_mm``, default 16 mm since session 19, 8 mm before), then only the cells near a
surface. The refinement test holds for any cell size when the field is 1-Lipschitz, so the first
spacing should change the number of queries and nothing else. This script checks that on the
model at hand: each heart is completed once per spacing of ``--spacings``, and it prints, per heart,
the queries decoded and the decode's seconds per spacing and the voxels whose label differs from
the first spacing's; the last line sums the queries and counts the hearts with any difference.

The hearts: ``complete_speed.py``'s synthetic heart (seed 0; Aorta, PA, LAA, Coronary and PV
missing) at ``--spacing`` mm or, with ``--ct``, on the CT grid (512 x 512 x 300 voxels of
0.4 x 0.4 x 0.5 mm); with ``--real FOLDER ...``, every label map file in those folders instead, read
with the folder's ``labels.json`` when it has one (files holding none of the table's structures
are listed and skipped). Run::

    python benchmarks/first_lattice.py --ct --spacings 8 16
    python benchmarks/first_lattice.py --spacings 8 16 --decode exact
    python benchmarks/first_lattice.py --spacings 8 16 --real ../shared/data/real/acdc_cmr ../shared/data/real/la2018_lgemri
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from complete_speed import B_SUBSET, CT_SHAPE, CT_SPACING_MM, partial_heart  # noqa: E402

#: label map files of a --real folder (segmentation envelopes and other images are not label maps)
_LABEL_MAP_PATTERNS = ("*label*.nii.gz", "*label*.nii", "*_msk.nrrd", "*label*.nrrd")


def _real_files(folders) -> list[tuple[Path, Path | None]]:
    files = []
    for folder in folders:
        convention = folder / "labels.json"
        found = sorted({f for pattern in _LABEL_MAP_PATTERNS for f in folder.glob(pattern)
                        if "envelope" not in f.name})
        files += [(f, convention if convention.is_file() else None) for f in found]
    return files


def _worst_dice(reference: np.ndarray, labels: np.ndarray, completed, table) -> tuple[str, float]:
    """``(name, Dice)`` of the completed structure that agrees least with the reference labels."""
    from HeartCompletionLib.geometry.metrics import dice

    return min(((table.by_label(lab).name, dice(reference == lab, labels == lab)) for lab in completed),
               key=lambda item: item[1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--spacings", type=float, nargs="+", default=[8.0, 16.0], metavar="MM",
                   help="first lattice spacings in mm, > 0; the first is the reference (default 8 16)")
    p.add_argument("--checkpoint", default="synthetic-demo", help="model (file or registered name; default: bundled)")
    p.add_argument("--ct", action="store_true", help="the synthetic heart on the CT grid")
    p.add_argument("--spacing", type=float, default=1.0, help="voxel size in mm of the synthetic heart (default 1)")
    p.add_argument("--real", type=Path, nargs="+", metavar="FOLDER", help="label map files of these folders instead")
    p.add_argument("--decode", choices=("fast", "exact"), default="fast", help="decode mode (default fast)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = p.parse_args(argv)
    if len(args.spacings) < 2 or not all(math.isfinite(mm) and mm > 0 for mm in args.spacings):
        p.error("--spacings needs at least two spacings above 0 mm")
    if args.spacing <= 0:
        p.error(f"--spacing must be a voxel size above 0 mm, got {args.spacing:g}")
    missing = [str(f) for f in args.real or [] if not f.is_dir()]
    if missing:
        p.error(f"--real: no such folder: {', '.join(missing)}")
    print("command: python benchmarks/first_lattice.py " + " ".join(sys.argv[1:] if argv is None else argv), flush=True)

    import torch

    from HeartCompletionLib.errors import HeartCompletionError
    from HeartCompletionLib.inference.completion import NoGivenStructureError, complete_label_map
    from HeartCompletionLib.io.labelmap_files import read_label_map
    from HeartCompletionLib.model.registry import load_model

    torch.set_num_threads(args.threads)
    try:  # a missing file or an unknown name: a usage error naming it
        checkpoint, _ = load_model(args.checkpoint)
    except HeartCompletionError as exc:
        p.error(f"--checkpoint: {exc}")
    if args.real:
        hearts = [(f.name, lambda f=f, c=c: read_label_map(f, table=checkpoint.table, convention=c))
                  for f, c in _real_files(args.real)]
        if not hearts:
            p.error(f"--real: no label map file ({', '.join(_LABEL_MAP_PATTERNS)}) in {', '.join(map(str, args.real))}")
    else:
        spacing, shape = (CT_SPACING_MM, CT_SHAPE) if args.ct else (args.spacing, None)
        hearts = [(f"synthetic heart, {'CT grid' if args.ct else f'{args.spacing:g} mm'}",
                   lambda: partial_heart(0, spacing, list(B_SUBSET), shape)[1])]

    totals = np.zeros(len(args.spacings), dtype=np.int64)
    compared = differing = 0
    for n, (name, load) in enumerate(hearts, 1):
        name = f"[{n}/{len(hearts)}] {name}"  # a line per heart: the progress of a long --real run
        try:
            source = load()
        except HeartCompletionError as exc:
            print(f"{name}: not read ({exc})", flush=True)
            continue
        reference, cells = None, []
        try:
            for i, mm in enumerate(args.spacings):
                result = complete_label_map(source, checkpoint, grid_spacing_mm=mm, decode=args.decode)
                labels = result.label_map.labels
                if reference is None:
                    reference = labels.copy()
                differ = int(np.count_nonzero(labels != reference))
                worst = _worst_dice(reference, labels, result.completed_labels, checkpoint.table) if differ else None
                queries = int(result.grid["queries"])
                totals[i] += queries
                cells.append((mm, queries, result.timings["decode_s"], differ, worst))
        except NoGivenStructureError as exc:
            print(f"{name}: skipped ({exc})", flush=True)
            continue
        compared += 1
        differing += any(c[3] for c in cells)
        print(f"{name} {' x '.join(map(str, source.shape))}: " + "; ".join(
            f"{mm:g} mm {q:,} queries, decode {s:.2f} s, {d:,} voxels differ"
            + (f" (worst Dice {w[1]:.4f}, {w[0]})" if w else "") for mm, q, s, d, w in cells), flush=True)
    if not compared:
        raise SystemExit("no heart was completed")
    change = ", ".join(f"{mm:g} mm {q:,} ({100.0 * (q / totals[0] - 1):+.1f} %)" for mm, q in zip(args.spacings, totals))
    print(f"{compared} hearts, {args.decode} decode: queries {change}; hearts with a differing voxel: {differing}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
