"""How fast the pipeline learns: near-surface IoU per structure of a model fitting two synthetic
hearts, against optimizer steps and wall time (printed, never a unit test).

The same setting as the trainer's learning test (``Testing/test_training_run.py``): the two
prepared synthetic hearts of the test fixture (seeds 0 and 1, 1.5 mm label maps through the
real ``heart-prepare`` pipeline), the ``tiny_test`` config with the test's run overrides, phase 1
(all structures in). Extra ``key=value`` overrides try other recipes::

    python benchmarks/overfit_iou.py --steps 1200                       # the test's run
    python benchmarks/overfit_iou.py --steps 3000 --eval_every 500 data.query_balance=structure
    python benchmarks/overfit_iou.py --device cuda --steps 4000 model.config=small

Prints, at every evaluation, the IoU (inside = sdf < 0) of each structure on 4,000 near-surface
points of each heart (mean of the two hearts), their mean and minimum, the step and the seconds
spent training so far (evaluation excluded).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "Testing"))


def make_hearts(data_dir: Path, spacing_mm: float = 1.5) -> Path:
    """The test fixture's two prepared synthetic hearts in ``data_dir`` (kept if already there),
    rasterised at ``spacing_mm`` (the fixture's 1.5 mm unless told)."""
    from fixtures_training import prepare_synthetic_hearts, write_case_lists

    if not (data_dir / "train.csv").exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        ids = prepare_synthetic_hearts(data_dir, seeds=(0, 1), spacing_mm=spacing_mm)
        write_case_lists(data_dir, ids, ids)
    return data_dir


def run(args, data_dir: Path, out: Path) -> list[dict]:
    from fixtures_training import TINY_RUN_EXTRA, tiny_overrides
    from heart_training.config import load_config
    from heart_training.data.case_format import load_case
    from heart_training.evaluation.near_iou import near_surface_iou
    from heart_training.train.distributed import init_distributed
    from heart_training.train.engine import Trainer

    overrides = [*tiny_overrides(data_dir, out, steps=args.steps), *TINY_RUN_EXTRA, f"run.device={args.device}",
                 "run.val_every=0", "run.data_gate=false", *args.overrides]
    cfg = load_config("tiny_test", overrides).validate()
    torch.set_num_threads(args.threads)
    trainer = Trainer(cfg, init_distributed(cfg.run.device))
    cases = [load_case(p) for p in sorted(data_dir.glob("*.npz"))]
    names = trainer.table.names
    n_params = sum(p.numel() for p in trainer.model.parameters())
    print(f"model {cfg.model.config} ({n_params:,} parameters) on {trainer.ctx.device}, batch {cfg.optim.batch_size}, "
          f"{args.steps} steps; overrides: {' '.join(args.overrides) or '(none)'}", flush=True)
    print(f"{'step':>6} {'train_s':>8} {'loss':>8} " + " ".join(f"{n[:6]:>6}" for n in names) + "   mean    min",
          flush=True)
    batches = trainer.batches()
    records, elapsed, losses = [], 0.0, []
    while trainer.step < args.steps:
        start = time.perf_counter()
        stats = trainer.train_step(batches)
        if trainer.ctx.device.type == "cuda":
            torch.cuda.synchronize()
        elapsed += time.perf_counter() - start
        losses.append(float(stats.terms["loss"]))
        if trainer.step % args.eval_every == 0 or trainer.step == args.steps:
            iou = np.nanmean([near_surface_iou(trainer.model, trainer.norm, c, cfg.data.num_input_points,
                                               cfg.data.min_points_per_structure) for c in cases], axis=0)
            rec = {"step": trainer.step, "train_s": round(elapsed, 1), "loss": float(np.mean(losses[-20:])),
                   "iou": dict(zip(names, np.round(iou, 3).tolist())), "mean": float(np.nanmean(iou)),
                   "min": float(np.nanmin(iou))}
            records.append(rec)
            print(f"{rec['step']:>6} {rec['train_s']:>8.1f} {rec['loss']:>8.4f} "
                  + " ".join(f"{v:>6.3f}" for v in iou) + f"  {rec['mean']:.3f}  {rec['min']:.3f}", flush=True)
    trainer.log.close()
    return records


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="extra config overrides key=value")
    parser.add_argument("--steps", type=int, default=1200, help="optimizer steps (default 1200, as the test)")
    parser.add_argument("--eval_every", type=int, default=300, help="steps between evaluations (default 300)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | auto (default cpu, as the test)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1, as the test)")
    parser.add_argument("--data_dir", type=Path, default=None, help="prepared hearts (made here if missing)")
    parser.add_argument("--spacing_mm", type=float, default=1.5,
                        help="voxel size of the synthetic label maps made here (default 1.5, as the test)")
    parser.add_argument("--json", type=Path, default=None, help="also write the records to this JSON file")
    args = parser.parse_args(argv)
    from heart_training.config import ConfigError, load_config

    try:  # a bad override is a usage error, before any data is made
        load_config("tiny_test", ["data.datasets.0.data_dir=.", *args.overrides]).validate()
    except ConfigError as exc:
        parser.error(str(exc))
    with tempfile.TemporaryDirectory(prefix="overfit_iou_") as tmp:
        data_dir = make_hearts(args.data_dir or Path(tmp) / "data", args.spacing_mm)
        records = run(args, data_dir, Path(tmp) / "run")
    if args.json:
        args.json.write_text(json.dumps({"overrides": args.overrides, "device": args.device, "records": records},
                                        indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
