"""Training speed and peak memory of the named model configs (printed, never a unit test).

Runs real optimizer steps of :class:`heart_training.engine.Trainer` (forward, losses incl. the
finite-difference eikonal term, backward, AdamW) on analytic hearts written to a temporary
folder, on the available device (CUDA with bf16 autocast if present, else CPU)::

    python benchmarks/train_speed.py                       # small and base, batch 2, CPU/GPU
    python benchmarks/train_speed.py --configs small --batch_size 8 --steps 20

Reports samples/s (after warm-up steps) and peak memory: CUDA max allocated, or on CPU the
growth of the process's peak resident set size (ru_maxrss) during the run.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "Testing"))


def measure(config_name: str, batch_size: int, steps: int, warmup: int, data_dir: Path, out: Path, threads: int,
            workers: int = 0) -> dict:
    from heart_training.config import load_config
    from heart_training.distributed import init_distributed
    from heart_training.engine import Trainer

    cfg = load_config("phase1", [f"data.datasets.0.data_dir={data_dir}", f"run.output_dir={out}",
                                 f"model.config={config_name}", f"optim.batch_size={batch_size}", f"data.num_workers={workers}",
                                 "data.cache_cases=4", "run.tensorboard=false", f"run.threads={threads}"]).validate()
    if threads > 0:
        torch.set_num_threads(threads)
    trainer = Trainer(cfg, init_distributed(cfg.run.device))
    device = trainer.ctx.device
    batches = trainer.batches()
    for _ in range(warmup):
        trainer.train_step(batches)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(batches)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    if device.type == "cuda":
        peak = f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB (CUDA max allocated)"
    else:
        peak = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB process peak RSS " \
               f"(+{(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 2**10:.0f} MiB in the timed steps)"
    n_params = sum(p.numel() for p in trainer.model.parameters())
    return {"config": config_name, "params": n_params, "device": str(device), "batch": batch_size,
            "samples_per_s": steps * batch_size / elapsed, "step_s": elapsed / steps, "peak": peak,
            "queries": cfg.data.num_volume_queries + cfg.data.num_near_queries + cfg.data.num_surface_queries,
            "input_points": cfg.data.num_input_points, "amp": "bf16" if device.type == "cuda" else "fp32"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Training samples/s and peak memory per model config.")
    parser.add_argument("--configs", nargs="+", default=["small", "base"], help="named model configs")
    parser.add_argument("--batch_size", type=int, default=2, help="samples per step (default 2)")
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps (default 5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    parser.add_argument("--workers", type=int, default=0,
                        help="data-loader workers (default 0: samples built in the training process)")
    args = parser.parse_args(argv)
    from fixtures_training import write_analytic_case, write_case_lists

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        data.mkdir()
        for seed in (0, 1):
            write_analytic_case(data / f"h{seed}.npz", seed=seed)
        write_case_lists(data, ["h0", "h1"], [])
        print(f"torch {torch.__version__}; phase1 sample sizes; threads {torch.get_num_threads() if not args.threads else args.threads}")
        for name in args.configs:
            r = measure(name, args.batch_size, args.steps, args.warmup, data, Path(tmp) / name, args.threads, args.workers)
            print(f"{r['config']:<6} {r['params']:>11,d} params  {r['device']} {r['amp']}  batch {r['batch']} "
                  f"({r['input_points']} input points, {r['queries']} queries + eikonal, {args.workers} workers)  "
                  f"{r['samples_per_s']:.2f} samples/s ({r['step_s']:.2f} s/step)  peak {r['peak']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
