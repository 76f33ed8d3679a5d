"""Seconds of the fast decode's own work (the NumPy bookkeeping between the network calls), alone.

One completion of the synthetic heart of ``benchmarks/complete_speed.py`` (seed 0, Aorta, PA,
LAA, Coronary and PV completed from the other five; ``--ct``: the 512 x 512 x 300 grid of 0.4 x
0.4 x 0.5 mm) records every query point the fast decode asks for and the network's answer. Then
``fast_hierarchical_labels`` runs again ``--repeats`` times on the same arguments with the network
replaced by a lookup in those recordings: its seconds minus the lookups' are the bookkeeping, the
part of the decode that stays on the host on a GPU. The replay must ask for exactly the recorded
points and give the recorded labels voxel for voxel (printed; exit 1 otherwise)::

    python benchmarks/decode_bookkeeping.py --ct --checkpoint HeartCompletionLib/model/bundled/synthetic_demo.safetensors
    python benchmarks/decode_bookkeeping.py --ct --checkpoint small_best.safetensors --repeats 5

``--module FILE`` replays another version of ``decode_grid.py`` (e.g. one saved from an older
commit) for an A/B on the same recordings.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def record(checkpoint: str, ct: bool, threads: int) -> dict:
    """The arguments, the query points and answers, and the labels of one fast decode."""
    import torch
    from complete_speed import complete_with_decode_hook

    torch.set_num_threads(threads)
    recorded: dict = {}

    def recording(original):
        def fast_hierarchical_labels(decode, *args, **kwargs):
            points, values = [], []

            def network(p, report):
                v = decode(p, report)
                points.append(p.copy())
                values.append(v.copy())
                return v

            labels, stats = original(network, *args, **kwargs)
            recorded.update(args=args, kwargs=kwargs, points=np.concatenate(points),
                            values=np.concatenate(values), labels=labels, stats=stats)
            return labels, stats

        return fast_hierarchical_labels

    complete_with_decode_hook(checkpoint, ct, recording)
    return recorded


def replay(recorded: dict, fast_hierarchical_labels, repeats: int):
    """``(best bookkeeping seconds, queries asked, labels)`` with the network replaced by a lookup."""
    ijk_to_ras = np.asarray(recorded["args"][3], dtype=np.float64)
    ras_to_ijk = np.linalg.inv(ijk_to_ras)

    def voxel(points):
        return np.rint(points @ ras_to_ijk[:3, :3].T + ras_to_ijk[:3, 3]).astype(np.int64)

    every = voxel(recorded["points"])
    low, span = every.min(axis=0), np.ptp(every, axis=0) + 1

    def key(points):
        ijk = voxel(points) - low
        if ((ijk < 0) | (ijk >= span)).any():
            raise SystemExit("the replay asked for a point the recorded decode did not")
        return np.ravel_multi_index(ijk.T, span)

    keys = key(recorded["points"])
    order = np.argsort(keys)
    sorted_keys, sorted_values = keys[order], recorded["values"][order]
    best, lookup_s, asked = np.inf, [0.0], [0]

    def network(points, report):
        t = time.perf_counter()
        k = key(points)
        at = np.searchsorted(sorted_keys, k).clip(max=len(sorted_keys) - 1)
        if not np.array_equal(sorted_keys[at], k):
            raise SystemExit("the replay asked for a point the recorded decode did not")
        asked[0] += len(points)
        lookup_s[0] += time.perf_counter() - t
        return sorted_values[at]

    for _ in range(repeats):
        lookup_s[0], asked[0] = 0.0, 0
        t = time.perf_counter()
        labels, _ = fast_hierarchical_labels(network, *recorded["args"], **recorded["kwargs"])
        best = min(best, time.perf_counter() - t - lookup_s[0])
    return best, asked[0], labels


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="inference checkpoint (.safetensors)")
    p.add_argument("--ct", action="store_true", help="the CT grid (default: 1 mm)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads of the recorded completion (default 2)")
    p.add_argument("--repeats", type=int, default=3, help="replays (the best is reported; default 3)")
    p.add_argument("--module", default=None, help="another decode_grid.py to replay (default: the library's)")
    args = p.parse_args(argv)
    if not Path(args.checkpoint).is_file():
        p.error(f"--checkpoint {args.checkpoint}: no such file")
    print("command: python benchmarks/decode_bookkeeping.py " + " ".join(sys.argv[1:] if argv is None else argv),
          flush=True)
    if args.module:
        spec = importlib.util.spec_from_file_location("decode_grid_under_test", args.module)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        from HeartCompletionLib.inference import decode_grid as module
    recorded = record(args.checkpoint, args.ct, args.threads)
    recorded_s = sum(level["seconds"] for level in recorded["stats"]["levels"])
    seconds, asked, labels = replay(recorded, module.fast_hierarchical_labels, args.repeats)
    same = asked == len(recorded["points"]) and np.array_equal(labels, recorded["labels"])
    print(f"recorded decode: {len(recorded['points']):,} queries, {recorded_s:.2f} s with the network")
    print(f"bookkeeping alone: {seconds:.3f} s (best of {args.repeats}), {asked:,} queries asked, "
          f"labels {'identical' if same else 'DIFFERENT'} to the recorded decode")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
