"""``heart-synth``: write a synthetic heart dataset (label maps + ``dataset.json``).

No patient data is needed to try the pipeline on a fresh clone::

    heart-synth --output_dir data/synth --cases 20 --seed 0
    heart-prepare --input_dir data/synth --output_dir data/synth_npz

Each case is an independent random heart (:mod:`HeartCompletionLib.io.synthetic`) with the table's
label values. ``--truncate_fraction`` of the cases have their field of view cut through one
structure (the LAA by default, as in 313 of the 998 ImageCAS cases); ``--drop`` removes
structures from every case, like a partially annotated dataset. ``--modes`` draws hearts whose
structures covary through named latent modes (body size, LV dilation, ...; recorded per case in
``dataset.json``; docs/synthetic_population.md). A grid above ``--max_voxels`` is refused before
anything is allocated.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from HeartCompletionLib.atomic_io import atomic_write_text
from HeartCompletionLib.errors import ExitCode
from HeartCompletionLib.io.labelmap_files import DEFAULT_MAX_VOXELS, SUPPORTED_SUFFIXES, LabelMapError, write_label_map
from HeartCompletionLib.io.synthetic import check_grid_size, synthetic_grid, synthetic_heart, synthetic_label_map
from HeartCompletionLib.structures.table import StructureTable

DATASET_JSON = "dataset.json"
CT_LIKE_SPACING_MM = (0.4, 0.4, 0.5)
CT_LIKE_SHAPE = (512, 512, None)  # None: as many 0.5 mm slices as the heart needs
#: Largest grid (voxels) heart-synth rasterises: the readers' limit (1.5e9 int16 voxels are 3 GB per
#: case; the CT-like grid is ~80M), so what heart-synth writes the tools can read;
#: ``--spacing 0.1 0.1 0.1`` (~4e9 voxels) is refused before it allocates anything.
MAX_VOXELS = DEFAULT_MAX_VOXELS


def case_seed(seed: int, index: int) -> int:
    """Independent seed of case ``index`` in a dataset of seed ``seed`` (datasets never share hearts)."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0])


def write_synthetic_dataset(output_dir, cases: int, seed: int = 0, spacing_mm=(1.0, 1.0, 1.0), fmt: str = ".nii.gz",
                            truncate_fraction: float = 0.3, truncate_structure: str = "LAA", drop=(), shape=None,
                            table=None, progress: bool = True, modes: bool = False,
                            max_voxels: float | None = MAX_VOXELS) -> dict:
    """Write ``cases`` synthetic label maps and ``dataset.json`` into ``output_dir``; returns the JSON dict.

    Files are ``heart_0000<fmt>`` ...; every file is written atomically, ``dataset.json`` last.
    ``modes``: hearts with correlated latent modes (``synthetic_heart(seed, modes=True)``); each
    case's mode z-scores go into its record (``"modes": {...}``) and ``"modes": true`` at the top.
    ``max_voxels``: every case's grid is sized first and a grid above it is refused
    (``ValueError`` naming the grid) before anything is allocated or written.
    """
    from tqdm import tqdm

    if fmt not in SUPPORTED_SUFFIXES:
        raise ValueError(f"format {fmt!r} is not one of {SUPPORTED_SUFFIXES}")
    if cases < 1:
        raise ValueError(f"--cases must be at least 1, got {cases}")
    if not 0.0 <= truncate_fraction <= 1.0:
        raise ValueError(f"--truncate_fraction must be in [0, 1], got {truncate_fraction}")
    table = StructureTable.from_spec(table)
    dropped = [s.name for s in table.subset(drop)]
    truncated_name = table.by_name(truncate_structure).name
    if max_voxels is not None and not max_voxels > 0:
        raise ValueError(f"--max_voxels must be positive, got {max_voxels}")
    seeds = [case_seed(seed, index) for index in range(cases)]
    if max_voxels is not None:  # analytic bounds only: nothing is rasterised here
        for index, s in enumerate(seeds):
            grid_shape, _ = synthetic_grid(synthetic_heart(s, table=table, modes=modes), spacing_mm, shape)
            try:
                check_grid_size(grid_shape, max_voxels)
            except ValueError as exc:
                raise ValueError(f"case {index}: {exc}") from None
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n_truncated = int(round(truncate_fraction * cases))
    truncated_cases = set(rng.permutation(cases)[:n_truncated].tolist())
    records = []
    for index in tqdm(range(cases), desc="heart-synth", unit="case", disable=not progress):
        truncate = truncated_name if index in truncated_cases else None
        label_map = synthetic_label_map(seeds[index], spacing_mm=spacing_mm, shape=shape,
                                        truncate=truncate, table=table, modes=modes, max_voxels=max_voxels)
        for name in dropped:
            label_map.labels[label_map.labels == table.by_name(name).label] = 0
        path = write_label_map(label_map, output_dir / f"heart_{index:04d}{fmt}", table=table)
        info = label_map.metadata["synthetic"]
        record = {
            "file": path.name,
            "seed": info["seed"],
            "shape": list(label_map.shape),
            "truncated_structure": info.get("truncated_structure"),
            "touching_border": [n for n in info["touching_border"] if n not in dropped],
            "present": [table.by_label(v).name for v in label_map.present_labels()],
        }
        if "modes" in info:
            record["modes"] = info["modes"]
        records.append(record)
    dataset = {
        "name": "HeartCompletionSynthetic",
        "description": "Synthetic hearts from HeartCompletionLib.io.synthetic (analytic shapes, RAS mm).",
        "labels": {"background": 0, **{s.name: s.label for s in table}},
        "numCases": cases,
        "numTraining": cases,
        "file_ending": fmt,
        "spacing_mm": [float(v) for v in np.broadcast_to(np.asarray(spacing_mm, dtype=float), (3,))],
        "seed": int(seed),
        "truncate_fraction": float(truncate_fraction),
        "modes": bool(modes),
        "dropped": dropped,
        "table": table.name,
        "cases": records,
    }
    atomic_write_text(output_dir / DATASET_JSON, json.dumps(dataset, indent=2))
    return dataset


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="heart-synth",
        description="Write a folder of synthetic heart label maps (table label values) plus an nnU-Net-like "
                    "dataset.json. No patient data needed.",
    )
    parser.add_argument("--output_dir", required=True, type=Path, help="folder to write the cases into")
    parser.add_argument("--cases", type=int, default=10, help="number of cases (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="dataset seed; same seed, same dataset (default: %(default)s)")
    parser.add_argument("--spacing", type=float, nargs=3, default=(1.0, 1.0, 1.0), metavar=("I", "J", "K"),
                        help="voxel spacing in mm (default: 1 1 1)")
    parser.add_argument("--shape", type=int, nargs=3, default=None, metavar=("I", "J", "K"),
                        help="grid size in voxels (default: the heart plus a 10 mm margin)")
    parser.add_argument("--ct_like", action="store_true",
                        help="CT-like grid: 0.4 x 0.4 x 0.5 mm voxels, 512 x 512 pixels per slice, slices covering the "
                             "heart (~300; slow, ~70M voxels per case)")
    parser.add_argument("--format", dest="fmt", default=".nii.gz", choices=SUPPORTED_SUFFIXES,
                        help="file type (default: %(default)s)")
    parser.add_argument("--truncate_fraction", type=float, default=0.3,
                        help="fraction of cases whose field of view cuts --truncate_structure (default: %(default)s)")
    parser.add_argument("--truncate_structure", default="LAA", help="structure cut by the field of view (default: %(default)s)")
    parser.add_argument("--drop", nargs="*", default=[], metavar="STRUCT",
                        help="structures removed from every case (names or synonyms)")
    parser.add_argument("--table", default=None, help="structure table JSON (default: the ten structures)")
    parser.add_argument("--modes", action="store_true",
                        help="hearts whose structures covary through named latent modes (body size, LV dilation, "
                             "hypertrophy, right-heart load, atrial enlargement, aortic ageing, orientation, coronary "
                             "dominance; z-scores recorded per case in dataset.json); see docs/synthetic_population.md")
    parser.add_argument("--max_voxels", type=float, default=MAX_VOXELS,
                        help="refuse a case grid of more voxels, before allocating it (default: %(default).3g)")
    parser.add_argument("--overwrite", action="store_true", help="write into a folder that has a dataset.json")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if (args.output_dir / DATASET_JSON).exists() and not args.overwrite:
        print(f"heart-synth: {args.output_dir / DATASET_JSON} exists; pass --overwrite to replace the dataset",
              file=sys.stderr)
        return ExitCode.USAGE
    spacing, shape = (CT_LIKE_SPACING_MM, CT_LIKE_SHAPE) if args.ct_like else (args.spacing, args.shape)
    try:
        dataset = write_synthetic_dataset(args.output_dir, args.cases, args.seed, spacing, args.fmt,
                                          args.truncate_fraction, args.truncate_structure, args.drop, shape,
                                          args.table, modes=args.modes, max_voxels=args.max_voxels)
    except (KeyError, ValueError, LabelMapError) as exc:
        print(f"heart-synth: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    n_cut = sum(1 for c in dataset["cases"] if c["truncated_structure"])
    print(f"heart-synth: wrote {dataset['numCases']} cases ({n_cut} with a truncated {args.truncate_structure}) "
          f"to {args.output_dir}")
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
