"""The four file steps of a Slicer panel completion, the whole grid against the boxes.

The panel writes its input label map, the background process reads it, writes its result and the
panel reads that back. Each is timed both ways, alternating: the whole grid, and what the panel
does now (the input as the box around its labels with the grid it belongs to,
``write_label_map(box_only=True)``; the result as the box around its labels, ``heart-complete
--crop_output``). Both inputs read back to the same label map (checked, exit 1 if not). The heart
is ``complete_speed.py``'s (seed 0, Aorta, PA, LAA, Coronary and PV removed; the result: the whole
synthetic heart), at 1 mm or, with ``--ct``, on the CT grid. Run::

    python benchmarks/handover_files.py --ct --repeats 3
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from complete_speed import B_SUBSET, CT_SHAPE, CT_SPACING_MM, partial_heart  # noqa: E402


def _timed(fn, *args, **kwargs):
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ct", action="store_true", help="CT grid (512 x 512 x 300 voxels of 0.4 x 0.4 x 0.5 mm) instead of 1 mm")
    p.add_argument("--repeats", type=int, default=3, help="rounds of each way (default 3)")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    print("command: python benchmarks/handover_files.py " + " ".join(sys.argv[1:] if argv is None else argv), flush=True)

    from HeartCompletionLib.io.labelmap import crop_to_labels
    from HeartCompletionLib.io.labelmap_files import read_label_map, write_label_map

    spacing, shape = (CT_SPACING_MM, CT_SHAPE) if args.ct else (1.0, None)
    result, source = partial_heart(0, spacing, list(B_SUBSET), shape)
    folder = Path(tempfile.mkdtemp(prefix="handover_"))
    steps = ("panel writes the input", "process reads it", "process writes the result", "panel reads it")
    times = {way: [] for way in ("whole grid", "boxes")}
    same = True
    for _ in range(args.repeats):
        for way, boxed in (("whole grid", False), ("boxes", True)):
            path_in, path_out = folder / f"in_{boxed}.nrrd", folder / f"out_{boxed}.nrrd"
            _, t_write_in = _timed(write_label_map, source, path_in, box_only=boxed)
            read_in, t_read_in = _timed(read_label_map, path_in)
            same &= bool(np.array_equal(read_in.labels, source.labels) and np.allclose(read_in.ijk_to_ras, source.ijk_to_ras))
            _, t_write_out = _timed(write_label_map, crop_to_labels(result) if boxed else result, path_out)
            _, t_read_out = _timed(read_label_map, path_out)
            times[way].append((t_write_in, t_read_in, t_write_out, t_read_out))
            print(f"{way}: " + ", ".join(f"{s} {t:.2f} s" for s, t in zip(steps, times[way][-1])), flush=True)
    box = crop_to_labels(result)
    print(f"\n{'CT grid' if args.ct else '1 mm'} {source.shape}: the result's box {box.shape} "
          f"({100 * np.prod(box.shape) / np.prod(source.shape):.0f} % of the voxels); all four steps, best of "
          f"{args.repeats}: whole grid {min(map(sum, times['whole grid'])):.2f} s, boxes {min(map(sum, times['boxes'])):.2f} s; "
          f"inputs read back the same: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
