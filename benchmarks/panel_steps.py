"""The Slicer panel's own steps around a completion, timed on a real MRML scene (``slicer-core``).

Before and after the background completion the panel works in Slicer's main thread, where the
user waits with the interface frozen: :meth:`HeartCompletionLogic.startCompletion` turns the
segmentation into a label map and writes it for the background process; ``finishCompletion``
reads the result and adds the completed structures as segments (``showSurfaces``: also their
3D surfaces, Slicer's closed-surface conversion), timed three ways: without surfaces, with surfaces
for every segment, and with surfaces when the given segments were already shown in 3D (their
surfaces made before **Apply**, untimed: what a user who looks at the heart in 3D waits for). The heart is ``complete_speed.py``'s (seed 0,
Aorta, PA, LAA, Coronary and PV missing), imported into a segmentation the way Slicer imports a
label map, on the CT grid (``--ct``: 512 x 512 x 300 voxels of 0.4 x 0.4 x 0.5 mm) or at
``--spacing`` mm. The completion itself runs in the panel's warm worker with the bundled model
(its time is printed too). Run::

    python benchmarks/panel_steps.py --ct
    python benchmarks/panel_steps.py --spacing 1
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "HeartCompletion"))

from complete_speed import B_SUBSET, CT_SHAPE, CT_SPACING_MM, partial_heart  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ct", action="store_true", help="CT grid (512 x 512 x 300 voxels of 0.4 x 0.4 x 0.5 mm)")
    p.add_argument("--spacing", type=float, default=1.0, help="voxel size in mm without --ct (default 1)")
    p.add_argument("--checkpoint", default="synthetic-demo", help="model of the completion (default: bundled)")
    args = p.parse_args(argv)
    if args.spacing <= 0:
        p.error(f"--spacing must be a voxel size above 0 mm, got {args.spacing:g}")
    print("command: python benchmarks/panel_steps.py " + " ".join(sys.argv[1:] if argv is None else argv), flush=True)
    try:
        import slicer
    except ImportError:
        raise SystemExit("panel_steps.py needs slicer-core (pip install slicer-core; the test extras have it)") from None
    from HeartCompletionModule import segments
    from HeartCompletionModule.logic import HeartCompletionLogic

    spacing, shape = (CT_SPACING_MM, CT_SHAPE) if args.ct else (args.spacing, None)
    _, source = partial_heart(0, spacing, list(B_SUBSET), shape)
    slicer.mrmlScene = slicer.vtkMRMLScene()
    segments.ensure_segmentation_converters()
    logic = HeartCompletionLogic()
    logic.setCheckpoint(args.checkpoint)
    node, volume = segments.segmentation_from_label_map(source, "heart", logic.table)
    mappings = logic.segmentMappings(node)
    structures = [s.name for s in logic.defaultStructures(mappings)]
    try:
        t = time.perf_counter()
        job = logic.startCompletion(node, mappings, structures, args.checkpoint, "cpu", False, volume)
        start_s = time.perf_counter() - t
        t = time.perf_counter()
        events = job.wait(timeout_s=900)
        job_s = time.perf_counter() - t
        if job.returncode != 0:
            raise SystemExit(f"the completion failed: {[e.message for e in events][-5:]}")
        (result,) = [e.payload for e in events if e.kind == "result"]
        finish = {}
        logic.finishCompletion(node, mappings, result["completed_labels"], False, False)  # imports, untimed
        logic.undoLastCompletion()
        for surfaces in (False, True):
            t = time.perf_counter()
            added = logic.finishCompletion(node, mappings, result["completed_labels"], False, surfaces)
            finish[surfaces] = time.perf_counter() - t
            logic.undoLastCompletion()
        node.CreateClosedSurfaceRepresentation()  # the given segments shown in 3D before Apply
        t = time.perf_counter()
        logic.finishCompletion(node, mappings, result["completed_labels"], False, True)
        finish["shown"] = time.perf_counter() - t
        logic.undoLastCompletion()
    finally:
        logic.shutdown()
    print(f"segmentation -> input file (startCompletion): {start_s:.2f} s")
    print(f"completion in the worker (started by this Apply): {job_s:.2f} s")
    print(f"result -> segments (finishCompletion): {finish[False]:.2f} s; with 3D surfaces: {finish[True]:.2f} s; "
          f"with 3D surfaces, the given segments' shown before: {finish['shown']:.2f} s")
    print(f"\n{'CT grid' if args.ct else f'{args.spacing:g} mm'} {source.shape}, {len(added)} structures added: "
          f"the panel's own steps {start_s + finish[False]:.2f} s ({start_s + finish[True]:.2f} s with surfaces, "
          f"{start_s + finish['shown']:.2f} s with the given ones' shown before)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
