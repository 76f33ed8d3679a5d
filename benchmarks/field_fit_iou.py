"""A lower bound on learning time: a plain neural field memorising ONE prepared heart (printed).

No encoder, no latents, no second heart: a Fourier-feature MLP (``--octaves`` sin/cos octaves of
the normalised position, as the VecSet query embedding, then ``--layers`` GELU layers of
``--width``) maps a point to the ten signed distances of one case and is fitted directly with the
trainer's L1 terms (volume, near-surface, own-structure surface distance 0), Adam, one-cycle
learning rate. Every VecSet model has to learn at least this much per heart, so the near-surface
IoU this reaches after N steps and T seconds bounds what the learning test can expect::

    python benchmarks/field_fit_iou.py --steps 4000 --lr 0.005     # the reference row of docs/experiments.md

Prints the IoU (inside = sdf < 0) of each structure on 4,000 of the case's near-surface points,
their mean and minimum, at four points of the run. Makes the test fixture's heart (seed 0,
1.5 mm) unless ``--case`` names a prepared ``.npz``.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def fit(case: dict, args) -> None:
    from heart_training.evaluation.near_iou import sign_iou

    from HeartCompletionLib.geometry.normalization import Normalization
    from HeartCompletionLib.model.encoder_input import encoder_centre_mm

    torch.manual_seed(args.seed)
    norm = Normalization()  # x_n = (x_mm - c) / S, d_n = d_mm / S: the one rule of training and completion
    labels = case["surface_labels"].astype(np.int64)
    centre = encoder_centre_mm(case["surface_points"], labels, np.flatnonzero(case["annotated"]))

    def points(key):
        return torch.from_numpy(norm.points_to_network(case[key].astype(np.float64), centre).astype(np.float32))

    def distances(key):
        return torch.from_numpy((case[key] / norm.scale_mm).astype(np.float32))

    vol, vol_d, near, near_d = points("volume_points"), distances("volume_sdf"), points("near_points"), distances("near_sdf")
    surf, surf_label = points("surface_points"), torch.from_numpy(labels)
    k = near_d.shape[1]
    freqs = (2.0 ** torch.arange(args.octaves, dtype=torch.float32)) * math.pi

    def embed(x):
        angles = (x[..., None] * freqs).flatten(-2)
        return torch.cat([angles.sin(), angles.cos(), x], dim=-1)

    layers, width_in = [], 6 * args.octaves + 3
    for _ in range(args.layers):
        layers += [torch.nn.Linear(width_in, args.width), torch.nn.GELU()]
        width_in = args.width
    net = torch.nn.Sequential(*layers, torch.nn.Linear(width_in, k))
    opt = torch.optim.Adam(net.parameters(), args.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.02)
    pick = np.random.default_rng(0).choice(len(near), size=min(4000, len(near)), replace=False)
    names = case["meta"].get("table") or [str(i) for i in range(k)]
    print(f"plain field: {args.octaves} octaves, {args.layers} x {args.width} GELU, "
          f"{sum(p.numel() for p in net.parameters()):,} parameters, {args.queries} queries/step, lr {args.lr}",
          flush=True)
    print(f"{'step':>6} {'train_s':>8} {'loss':>8} " + " ".join(f"{n[:6]:>6}" for n in names) + "   mean    min")
    elapsed = 0.0
    checkpoints = {round(args.steps * f) for f in (0.25, 0.5, 0.75, 1.0)}
    for step in range(1, args.steps + 1):
        start = time.perf_counter()
        iv = torch.randint(0, len(vol), (args.queries // 4,))
        inn = torch.randint(0, len(near), (args.queries // 2,))
        isf = torch.randint(0, len(surf), (args.queries // 4,))
        loss = ((net(embed(vol[iv])) - vol_d[iv]).abs().mean() + (net(embed(near[inn])) - near_d[inn]).abs().mean()
                + net(embed(surf[isf])).gather(1, surf_label[isf, None]).abs().mean())
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        elapsed += time.perf_counter() - start
        if step in checkpoints:
            with torch.no_grad():
                iou = sign_iou(net(embed(near[pick])).numpy(), near_d[pick].numpy())
            print(f"{step:>6} {elapsed:>8.1f} {loss.item():>8.4f} " + " ".join(f"{v:>6.3f}" for v in iou)
                  + f"  {np.nanmean(iou):.3f}  {np.nanmin(iou):.3f}", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", type=Path, default=None, help="a prepared .npz (default: the test's heart, seed 0)")
    parser.add_argument("--steps", type=int, default=2000, help="Adam steps (default 2000)")
    parser.add_argument("--lr", type=float, default=0.003, help="peak learning rate (default 3e-3)")
    parser.add_argument("--octaves", type=int, default=8, help="Fourier octaves per axis (default 8)")
    parser.add_argument("--width", type=int, default=256, help="hidden width (default 256)")
    parser.add_argument("--layers", type=int, default=3, help="hidden layers (default 3)")
    parser.add_argument("--queries", type=int, default=3200, help="queries per step: 1/4 volume, 1/2 near, 1/4 surface")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1, as the test)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.steps < 4 or args.queries < 4:
        parser.error("--steps and --queries must be at least 4")
    torch.set_num_threads(args.threads)
    from heart_training.data.case_format import CaseFormatError, load_case

    with tempfile.TemporaryDirectory(prefix="field_fit_") as tmp:
        path = args.case
        if path is None:
            from overfit_iou import make_hearts

            path = make_hearts(Path(tmp) / "data") / "synthetic_000.npz"
        try:
            case = load_case(path)
        except CaseFormatError as exc:
            parser.error(str(exc))
        fit(case, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
