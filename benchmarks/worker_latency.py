"""What the Slicer panel's user waits for per Apply: a fresh ``heart-complete`` process against the
panel's warm worker (``--serve``), from handing over the input file to the written result.

The panel writes the segmentation as ``.nrrd``, hands it to a background process and reads the
result back. A fresh process pays each time for starting Python, importing torch and loading the
model; the warm worker pays for that once, so from the second Apply on only the completion and the
files remain. The panel also starts the worker ahead, when the module is shown (``warmUp``): the
last figure is a first request to a worker that had finished loading. The heart is ``complete_speed.py``'s (seed 0, Aorta, PA, LAA, Coronary and PV
removed), at ``--spacing`` mm (default 1) or, with ``--ct``, on the CT grid (512 x 512 x 300, 0.4 x 0.4 x 0.5 mm). Every
output is checked to be the same, voxel for voxel, as the first fresh process's. Run::

    python benchmarks/worker_latency.py --repeats 3          # 1 mm
    python benchmarks/worker_latency.py --repeats 3 --ct     # CT grid
    python benchmarks/worker_latency.py --repeats 3 --ct --panel_files   # files as the panel hands them over
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


def _timed(run) -> float:
    t = time.perf_counter()
    events = run.wait(timeout_s=900)
    if run.returncode != 0:
        raise SystemExit(f"the completion failed (status {run.returncode}): {[e.message for e in events][-5:]}")
    return time.perf_counter() - t


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default="synthetic-demo", help="checkpoint file or registered model (default: bundled)")
    p.add_argument("--spacing", type=float, default=1.0, help="voxel size in mm of the heart (default 1)")
    p.add_argument("--ct", action="store_true", help="CT grid (512 x 512 x 300 voxels of 0.4 x 0.4 x 0.5 mm) instead of 1 mm")
    p.add_argument("--repeats", type=int, default=3, help="completions of each kind (default 3)")
    p.add_argument("--threads", type=int, default=2, help="torch threads of the child (default 2)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"), help="device of the completions (default cpu)")
    p.add_argument("--panel_files", action="store_true",
                   help="the files as the panel hands them over: the input as the box around its labels with its grid "
                        "(write_label_map box_only), the results as the box around theirs (--crop_output)")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.threads < 1 or args.spacing <= 0:
        p.error("--repeats and --threads must be at least 1 and --spacing above 0")
    print("command: python benchmarks/worker_latency.py " + " ".join(sys.argv[1:] if argv is None else argv), flush=True)

    from HeartCompletionLib.inference import completion_process as cp
    from HeartCompletionLib.io.labelmap_files import read_label_map, write_label_map

    folder = Path(tempfile.mkdtemp(prefix="worker_latency_"))
    spacing, shape = (CT_SPACING_MM, CT_SHAPE) if args.ct else (args.spacing, None)
    _, source = partial_heart(0, spacing, list(B_SUBSET), shape)
    source_path = write_label_map(source, folder / "input.nrrd", box_only=args.panel_files)
    threads = ["--threads", str(args.threads)]

    fresh = []
    for i in range(args.repeats):
        command = cp.build_command(args.checkpoint, source_path, folder / f"fresh{i}.nrrd", device=args.device,
                                   crop_output=args.panel_files) + threads
        fresh.append(_timed(cp.CompletionProcess(command)))
        print(f"fresh process {i + 1}: {fresh[-1]:.2f} s", flush=True)
    worker = cp.CompletionWorker(cp.build_worker_command(args.checkpoint, args.device) + threads)
    warm = []
    try:
        for i in range(args.repeats + 1):
            warm.append(_timed(worker.submit(cp.build_request(source_path, folder / f"warm{i}.nrrd", crop_output=args.panel_files))))
            print(f"worker request {i + 1}{' (starts the worker)' if i == 0 else ''}: {warm[-1]:.2f} s", flush=True)
    finally:
        worker.close()
    ahead = cp.CompletionWorker(cp.build_worker_command(args.checkpoint, args.device) + threads)
    try:
        deadline = time.monotonic() + 300
        while not ahead.ready and ahead.alive and time.monotonic() < deadline:
            time.sleep(0.05)
        warmed = _timed(ahead.submit(cp.build_request(source_path, folder / "ahead.nrrd", crop_output=args.panel_files)))
        print(f"first request to a worker started ahead: {warmed:.2f} s", flush=True)
    finally:
        ahead.close()
    reference = read_label_map(folder / "fresh0.nrrd").labels
    outputs = [folder / f"fresh{i}.nrrd" for i in range(args.repeats)] + [folder / f"warm{i}.nrrd" for i in range(args.repeats + 1)] + [folder / "ahead.nrrd"]
    same = all(np.array_equal(read_label_map(path).labels, reference) for path in outputs)
    print(f"\n{'CT grid' if args.ct else f'{args.spacing:g} mm'} {source.shape}, {args.checkpoint}, {args.device}, "
          f"{args.threads} threads{', files as the panel hands them over' if args.panel_files else ''}: "
          f"fresh process {min(fresh):.2f} s (best of {args.repeats}), warm worker {min(warm[1:]):.2f} s "
          f"(best of {args.repeats}; its first request {warm[0]:.2f} s, {warmed:.2f} s when started ahead); "
          f"outputs identical: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
