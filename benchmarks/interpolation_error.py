"""How well a lattice of decoded nodes predicts the voxels between them: trilinear vs cubic.

The fast decode interpolates the competing structures' signed distances from a lattice of
decoded nodes and decodes exactly where the interpolation leaves a label in doubt, so the error
of that interpolation sets how many voxels it must decode. This measures the error on the model's
own field: one completion of the synthetic heart of ``benchmarks/complete_speed.py`` (``--ct``:
the CT grid), then ``--boxes`` boxes of (6 x ``--stride`` + 1)^3 voxels centred on random boundary
voxels of the completed structures are decoded at every voxel. From the nodes every ``--stride``
voxels, the inner voxels (with a full 4 x 4 x 4 node neighbourhood) are interpolated trilinearly
and with Catmull-Rom cubics; the error is the one the decode measures (the larger of the errors
of the two smallest competing distances), reported as median / 90th / 99th percentile over the
voxels within ``--band`` mm of a label change and over all::

    python benchmarks/interpolation_error.py --ct --checkpoint runs/device_s8/small_best.safetensors --boxes 8

A cubic that is much better than trilinear would let the bands shrink; about the same means the
field's roughness is below the lattice spacing.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _interpolate(nodes: np.ndarray, stride: int, kind: str) -> np.ndarray:
    """Values at the voxels between nodes 1 and 5 per axis of ``nodes`` (7, 7, 7, C)."""
    index = np.arange(stride, 5 * stride)
    cell, t = index // stride, (index % stride) / stride

    def along(a, axis):
        shape = [1] * a.ndim
        shape[axis] = len(index)
        x = t.reshape(shape)
        if kind == "trilinear":
            return np.take(a, cell, axis=axis) * (1 - x) + np.take(a, cell + 1, axis=axis) * x
        p = [np.take(a, cell + o, axis=axis) for o in (-1, 0, 1, 2)]
        w = [(-x**3 + 2 * x**2 - x) / 2, (3 * x**3 - 5 * x**2 + 2) / 2, (-3 * x**3 + 4 * x**2 + x) / 2, (x**3 - x**2) / 2]
        return sum(wi * pi for wi, pi in zip(w, p))

    return along(along(along(nodes, 0), 1), 2)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="inference checkpoint (.safetensors)")
    p.add_argument("--ct", action="store_true", help="the CT grid (default: 1 mm)")
    p.add_argument("--stride", type=int, default=2, help="node spacing in voxels (default 2: the finest level)")
    p.add_argument("--boxes", type=int, default=8, help="boxes decoded at every voxel (default 8)")
    p.add_argument("--band", type=float, default=0.3, help="voxels within this many mm of a label change (default 0.3)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--seed", type=int, default=1, help="seed of the box centres")
    args = p.parse_args(argv)
    if not Path(args.checkpoint).is_file():
        p.error(f"--checkpoint {args.checkpoint}: no such file")
    print("command: python benchmarks/interpolation_error.py " + " ".join(sys.argv[1:] if argv is None else argv),
          flush=True)
    import torch
    from complete_speed import complete_with_decode_hook

    from HeartCompletionLib.geometry.affine import ijk_to_ras_points
    from HeartCompletionLib.inference.decode_grid import interpolation_error, label_margin_ambiguity

    torch.set_num_threads(args.threads)
    captured = {}

    def capturing(original):
        def fast_hierarchical_labels(decode, write, lo, hi, ijk_to_ras, *rest, **kwargs):
            captured.update(decode=decode, write=np.asarray(write), ijk_to_ras=ijk_to_ras)
            return original(decode, write, lo, hi, ijk_to_ras, *rest, **kwargs)

        return fast_hierarchical_labels

    result = complete_with_decode_hook(args.checkpoint, args.ct, capturing)
    labels = result.label_map.labels
    boundary = np.zeros(labels.shape, dtype=bool)
    for value in result.completed_labels:
        inside = labels == value
        interior = inside.copy()
        for axis in range(3):
            interior &= np.roll(inside, 1, axis) & np.roll(inside, -1, axis)
        boundary |= inside & ~interior
    centres = np.argwhere(boundary)
    if len(centres) == 0:
        raise SystemExit("the model completed no voxel: nothing to measure")
    rng = np.random.default_rng(args.seed)
    s, n = args.stride, 6 * args.stride + 1
    errors = {"trilinear": [], "Catmull-Rom": []}
    near = []
    t = time.perf_counter()
    for _ in range(args.boxes):
        corner = (centres[rng.integers(len(centres))] // s) * s - 3 * s
        ijk = np.stack(np.meshgrid(*[np.arange(n) + corner[a] for a in range(3)], indexing="ij"), -1).reshape(-1, 3)
        with torch.inference_mode():
            exact = captured["decode"](ijk_to_ras_points(ijk, captured["ijk_to_ras"]), lambda f: None)
        exact = exact.reshape(n, n, n, -1)
        inner = exact[s:5 * s, s:5 * s, s:5 * s]
        near.append(label_margin_ambiguity(inner, captured["write"])[2].ravel() < args.band)
        for kind in errors:
            approx = _interpolate(exact[::s, ::s, ::s], s, "trilinear" if kind == "trilinear" else "cubic")
            errors[kind].append(interpolation_error(inner.reshape(-1, inner.shape[-1]),
                                                    approx.reshape(-1, approx.shape[-1])))
    near = np.concatenate(near)
    print(f"{args.boxes} boxes of {n}^3 voxels decoded in {time.perf_counter() - t:.1f} s; nodes every {s} voxels; "
          f"{int(near.sum())} of {len(near)} inner voxels within {args.band} mm of a label change")
    for kind, values in errors.items():
        values = np.concatenate(values)
        for name, sel in ((f"within {args.band} mm", near), ("all", np.ones_like(near))):
            if sel.any():
                q = np.quantile(values[sel], [0.5, 0.9, 0.99])
                print(f"{kind:12s} {name:14s} error (mm) median {q[0]:.4f}  90th {q[1]:.4f}  99th {q[2]:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
