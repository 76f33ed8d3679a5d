"""Training speed, FLOPs, model FLOP utilisation and memory of the named model configs (printed,
never a unit test).

Runs real optimizer steps of :class:`heart_training.train.engine.Trainer` (forward, losses incl. the
finite-difference eikonal term, backward, AdamW) on two analytic hearts written to a temporary
folder (2.8 MiB each), or with ``--data_dir`` on prepared cases (a 1 mm synthetic heart is about
26 MiB: the loader's samples/s are then those of real training), on the available device (CUDA
with bf16 autocast if present, else CPU)::

    python benchmarks/train_speed.py                       # small and base, batch 2, CPU/GPU
    python benchmarks/train_speed.py --configs small --batch_size 8 --steps 20
    python benchmarks/train_speed.py --configs small base --batch_size 16 --steps 20 --workers 8 \\
        --data both --peak_tflops 989 --max_batch_for_gib 40      # an H100/H200, loader vs device cache

Prints the command first, then per config:

- GFLOP per sample, counted (not estimated) with ``torch.utils.flop_counter.FlopCounterMode`` on
  one phase-1 sample as the trainer runs it (forward with the eikonal stencil queries, losses,
  backward). Attention is counted through PyTorch's math kernel (matrix products), the
  convention of model FLOPs: a fused kernel's recomputation in the backward pass is not counted,
  and PyTorch's counter has no formula for the CPU flash kernel (which would count 0);
- samples/s (after warm-up steps), and of the data path alone (batches drawn, not trained on),
  for each data path (``--data``: the loader with ``--workers``, the device-resident cache
  ``data.device_cache=true``, or both and their ratio), the achieved TFLOP/s and, with
  ``--peak_tflops``, the model FLOP utilisation (MFU) against that peak;
- peak memory: CUDA max allocated, or on CPU the growth of the process's peak resident set size;
- with ``--max_batch_for_gib G``: memory per sample and the largest batch that fits in G GiB. On
  CUDA it is measured (peak allocated of a forward + backward at batch 1 and at the run's batch,
  optimizer state included); on CPU it is estimated from the bytes of the tensors saved for the
  backward pass (counted with ``torch.autograd.graph.saved_tensors_hooks`` under bf16 autocast, as
  on a GPU, at batch 1 and 2) plus 16 bytes per parameter (fp32 weights, gradients, two AdamW
  moments) and a 25 % margin for the transient buffers of the backward pass.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import resource
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

from HeartCompletionLib.model.configs import CONFIG_NAMES

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "Testing"))

#: Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, from the vendors' datasheets (their
#: headline figures "with sparsity" are twice these): A100 SXM/PCIe 312 (NVIDIA A100 datasheet:
#: 624 with sparsity), H100 SXM 989 (H100 datasheet: 1,979 with sparsity; H100 PCIe 756), H200 989
#: (H200 datasheet: 1,979 with sparsity), L40S 362 (L40S datasheet: 733 with sparsity), RTX 4090
#: 165 (Ada Lovelace architecture whitepaper, FP32 accumulate: 330 with sparsity).
PEAKS_BF16_DENSE = {"A100": 312.0, "H100 SXM": 989.0, "H100 PCIe": 756.0, "H200": 989.0, "L40S": 362.0,
                    "RTX 4090": 165.0}
BACKWARD_MARGIN = 1.25  #: CPU memory estimate: transient buffers of the backward pass and allocator slack


def _overrides(config_name: str, batch_size: int, data_dir: Path, out: Path, threads: int, workers: int,
               device_cache: bool, compile_model: bool, extra=()) -> list[str]:
    return [f"data.datasets.0.data_dir={data_dir}", f"run.output_dir={out}", f"model.config={config_name}",
            f"optim.batch_size={batch_size}", f"data.num_workers={workers}", "data.cache_cases=4",
            "run.tensorboard=false", f"run.threads={threads}", f"data.device_cache={str(device_cache).lower()}",
            f"run.compile={str(compile_model).lower()}", *extra]


def make_trainer(config_name: str, batch_size: int, data_dir: Path, out: Path, threads: int = 0, workers: int = 0,
                 device_cache: bool = False, compile_model: bool = False, extra=()):
    from heart_training.config import load_config
    from heart_training.train.distributed import init_distributed
    from heart_training.train.engine import Trainer

    cfg = load_config("phase1", _overrides(config_name, batch_size, data_dir, out, threads, workers, device_cache,
                                           compile_model, extra)).validate()
    if threads > 0:
        torch.set_num_threads(threads)
    return Trainer(cfg, init_distributed(cfg.run.device))


def sample_batch(trainer, size: int) -> dict:
    """A collated loader batch of ``size`` samples on the trainer's device."""
    from heart_training.data.dataset import collate
    from heart_training.train.engine import _to

    plan = trainer.sampler.plan(0)
    return _to(collate([trainer.train_ds[plan[i % len(plan)]] for i in range(size)]), trainer.ctx.device)


def count_flops(trainer) -> tuple[float, float]:
    """(forward, backward) FLOPs of one training sample: ``forward_loss`` in training mode (the
    eikonal stencil included when ``loss.eikonal > 0``), then the backward of its total."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    batch = sample_batch(trainer, 1)
    trainer.ddp.train()
    with sdpa_kernel(SDPBackend.MATH):
        forward = FlopCounterMode(display=False)
        with forward:
            res = trainer.forward_loss(batch)
        backward = FlopCounterMode(display=False)
        with backward:
            res.total.backward()
    trainer.optimizer.zero_grad(set_to_none=True)
    return float(forward.get_total_flops()), float(backward.get_total_flops())


def _saved_bytes(trainer, batch) -> int:
    """Bytes of the distinct non-parameter storages saved for backward by one forward."""
    params = {p.untyped_storage().data_ptr() for p in trainer.model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        res = trainer.forward_loss(batch)
    del res
    return sum(seen.values())


def memory_per_sample(trainer) -> dict:
    """``{"per_sample", "fixed", "method"}`` in bytes: measured on CUDA, estimated on CPU."""
    device = trainer.ctx.device
    trainer.ddp.train()
    n_params = sum(p.numel() for p in trainer.model.parameters())
    if device.type == "cuda":
        big = max(2, trainer.cfg.optim.batch_size)
        peaks = []
        for size in (1, big):
            batch = sample_batch(trainer, size)
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            trainer.forward_loss(batch).total.backward()
            torch.cuda.synchronize(device)
            peaks.append(torch.cuda.max_memory_allocated(device))
            trainer.optimizer.zero_grad(set_to_none=False)  # keep the gradient buffers, as in training
            del batch
        slope = (peaks[1] - peaks[0]) / (big - 1)
        return {"per_sample": slope, "fixed": peaks[0] - slope,
                "method": f"measured: CUDA peak allocated of forward + backward at batch 1 and {big}, "
                          "weights, gradients and AdamW state included"}
    before = trainer.autocast
    trainer.autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    try:
        saved = [_saved_bytes(trainer, sample_batch(trainer, size)) for size in (1, 2)]
    finally:
        trainer.autocast = before
    slope = saved[1] - saved[0]
    return {"per_sample": slope * BACKWARD_MARGIN, "fixed": 16 * n_params + max(saved[0] - slope, 0),
            "method": f"estimated on CPU: tensors saved for backward under bf16 autocast {slope / 2**20:.1f} MiB per "
                      f"sample x {BACKWARD_MARGIN} margin; fixed: 16 bytes per parameter (weights, gradients, AdamW "
                      "moments) + batch-independent saved tensors"}


def fps_seconds(trainer, batch) -> float:
    """Seconds of the latent queries' farthest-point sampling for one forward of ``batch``."""
    from HeartCompletionLib.model.vecset import farthest_point_indices

    cfg = trainer.model.config
    if cfg.latent_queries != "fps":
        return 0.0
    device = trainer.ctx.device
    farthest_point_indices(batch["enc_points"], cfg.num_latents)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    farthest_point_indices(batch["enc_points"], cfg.num_latents)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def host_syncs_per_step(trainer, batches) -> int | None:
    """Host-device synchronisations in one training step on CUDA (``torch.cuda.set_sync_debug_mode``
    warns at each: ``.item()``, ``float()``, ``.cpu()``, ``nonzero`` ...); None on other devices."""
    import warnings

    if trainer.ctx.device.type != "cuda":
        return None
    torch.cuda.synchronize(trainer.ctx.device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            trainer.train_step(batches)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def profile_steps(trainer, batches, steps: int, step_s: float, top: int = 12) -> list[str]:
    """Where a training step's time goes (``torch.profiler`` over ``steps`` steps): on CUDA the GPU's
    busy time per step against the measured ``step_s``, kernels launched per step, host syncs per
    step, the kernels with the most GPU time and the host's ops with the most CPU time; on the CPU
    the ops with the most CPU time."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    device = trainer.ctx.device
    cuda = device.type == "cuda"
    syncs = host_syncs_per_step(trainer, batches)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            trainer.train_step(batches)
        if cuda:
            torch.cuda.synchronize(device)
    events = prof.key_averages()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    lines = []
    if cuda:
        kernels = [e for e in events if e.device_type == DeviceType.CUDA]
        busy_ms = sum(e.self_device_time_total for e in kernels) / 1000 / steps
        launches = sum(e.count for e in kernels) / steps
        lines.append(f"GPU busy {busy_ms:.1f} ms of the {1000 * step_s:.1f} ms step ({100 * busy_ms / (1000 * step_s):.0f} %); "
                     f"{launches:.0f} kernels per step; {syncs} host-device syncs per step")
        ranked = sorted(kernels, key=lambda e: -e.self_device_time_total)
    else:
        ranked = sorted((e for e in events if e.self_cpu_time_total > 0), key=lambda e: -e.self_cpu_time_total)
    tables = [(key, "GPU" if cuda else "CPU", ranked, top)]
    if cuda:  # where the host's time goes too: launches, Python, waits (cudaStreamSynchronize ...)
        tables.append(("self_cpu_time_total", "CPU", sorted((e for e in events if e.self_cpu_time_total > 0),
                                                          key=lambda e: -e.self_cpu_time_total), top // 2))
    for attr, where, rows, n in tables:
        total = sum(getattr(e, attr) for e in rows) or 1.0
        lines.append(f"top {n} by self {where} time per step (ms, share, calls per step):")
        for e in rows[:n]:
            name = e.key if len(e.key) <= 70 else e.key[:67] + "..."
            lines.append(f"  {getattr(e, attr) / 1000 / steps:8.2f} ms {100 * getattr(e, attr) / total:5.1f} %  "
                         f"{e.count / steps:6.0f}x  {name}")
    return lines


def measure(config_name: str, batch_size: int, steps: int, warmup: int, data_dir: Path, out: Path, threads: int,
            workers: int = 0, device_cache: bool = False, compile_model: bool = False, trainer=None,
            data_batches: int = 5, extra=()) -> dict:
    trainer = trainer or make_trainer(config_name, batch_size, data_dir, out, threads, workers, device_cache,
                                      compile_model, extra)
    cfg = trainer.cfg
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
    data_start = time.perf_counter()  # the data path alone: batches drawn without training on them
    for _ in range(data_batches):
        next(batches)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    data_rate = data_batches * batch_size / max(time.perf_counter() - data_start, 1e-9) if data_batches else 0.0
    n_params = sum(p.numel() for p in trainer.model.parameters())
    return {"config": config_name, "data_samples_per_s": data_rate, "params": n_params, "device": str(device), "batch": batch_size,
            "samples_per_s": steps * batch_size / elapsed, "step_s": elapsed / steps, "peak": peak,
            "queries": cfg.data.num_volume_queries + cfg.data.num_near_queries + cfg.data.num_surface_queries,
            "eikonal_queries": 6 * cfg.loss.eikonal_queries if cfg.loss.eikonal > 0 else 0,
            "input_points": cfg.data.num_input_points,
            "amp": "bf16" if trainer.autocast is not contextlib.nullcontext else "fp32",
            "data": ("device cache" if device_cache else f"loader, {workers} workers")
            + (f", compiled ({cfg.run.compile_scope}, {cfg.run.compile_mode})" if compile_model else "")
            + "".join(f", {o}" for o in extra if not o.startswith("run.compile")),
            "trainer": trainer, "batches": batches}


def _peaks_help() -> str:
    return ", ".join(f"{name} {value:g}" for name, value in PEAKS_BF16_DENSE.items())


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description="Training samples/s, GFLOP per sample, MFU and memory per model config.")
    parser.add_argument("--configs", nargs="+", default=["small", "base"], choices=CONFIG_NAMES, metavar="NAME",
                        help=f"named model configs ({', '.join(CONFIG_NAMES)}; default small base)")
    parser.add_argument("--batch_size", type=int, default=2, help="samples per step (default 2)")
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps (default 5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    parser.add_argument("--workers", type=int, default=0,
                        help="data-loader workers (default 0: samples built in the training process)")
    parser.add_argument("--data", choices=("loader", "device", "both"), default="loader",
                        help="data path: the DataLoader (default), the device-resident cache (data.device_cache=true), "
                             "or both, with the ratio of their samples/s")
    parser.add_argument("--data_dir", type=Path, default=None,
                        help="prepared cases (heart-prepare + heart-split; train.csv is read) instead of the two small "
                             "analytic hearts")
    parser.add_argument("--compile", action="store_true",
                        help="run.compile=true: torch.compile the attention blocks (run.compile_scope=model: the "
                             "whole model; run.compile_mode=reduce-overhead: with CUDA graphs; pass them in --overrides)")
    parser.add_argument("--overrides", nargs="*", default=[], metavar="KEY=VALUE",
                        help="further training-config overrides, e.g. run.compile_scope=model optim.fused=false")
    parser.add_argument("--peak_tflops", type=float, default=0.0,
                        help="the card's dense bf16 peak in TFLOP/s for the model FLOP utilisation (MFU); datasheet "
                             f"figures without sparsity: {_peaks_help()}")
    parser.add_argument("--max_batch_for_gib", type=float, default=0.0,
                        help="also print the memory per sample and the largest batch fitting in this many GiB "
                             "(e.g. 40 for an A100 40 GB); measured on CUDA, estimated on CPU")
    parser.add_argument("--no_flops", action="store_true", help="skip the FLOP count")
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                        help="also profile this many steps (torch.profiler): on CUDA the GPU's busy share of a step, "
                             "kernels and host-device syncs per step and the kernels with the most time; on the CPU "
                             "the ops with the most time")
    args = parser.parse_args(argv)
    from heart_training.config import ConfigError, load_config

    try:  # bad overrides: refused before any data is written or model built
        for name in args.configs:
            load_config("phase1", _overrides(name, args.batch_size, Path("."), Path("."), args.threads, args.workers,
                                             False, args.compile, args.overrides)).validate()
    except ConfigError as exc:
        parser.error(str(exc))
    from fixtures_training import write_analytic_case, write_case_lists

    if args.data_dir is not None and not (args.data_dir / "train.csv").is_file():
        parser.error(f"--data_dir {args.data_dir}: no train.csv there (prepare with heart-prepare, then heart-split)")
    print("command: " + shlex.join(["python", "benchmarks/train_speed.py", *argv]), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data_dir
        if data is None:
            data = Path(tmp) / "data"
            data.mkdir()
            for seed in (0, 1):
                write_analytic_case(data / f"h{seed}.npz", seed=seed)
            write_case_lists(data, ["h0", "h1"], [])
        print(f"data: {args.data_dir or 'two analytic hearts'}", flush=True)
        cuda = f"; CUDA {torch.version.cuda}, {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
        print(f"torch {torch.__version__}{cuda}; phase1 sample sizes; threads "
              f"{torch.get_num_threads() if not args.threads else args.threads}", flush=True)
        paths = {"loader": [False], "device": [True], "both": [False, True]}[args.data]
        for name in args.configs:
            rows = []
            for cache in paths:
                rows.append(measure(name, args.batch_size, args.steps, args.warmup, data,
                                    Path(tmp) / f"{name}_{int(cache)}", args.threads, args.workers, cache, args.compile,
                                    extra=args.overrides))
            trainer = rows[0]["trainer"]
            flops = None
            if not args.no_flops:
                fwd, bwd = count_flops(trainer)
                flops = fwd + bwd
                print(f"{name:<6} {flops / 1e9:.2f} GFLOP per sample (forward {fwd / 1e9:.2f} + backward {bwd / 1e9:.2f}; "
                      f"FlopCounterMode, attention via the math kernel; one sample of {rows[0]['input_points']} input "
                      f"points, {rows[0]['queries']} queries + {rows[0]['eikonal_queries']} eikonal)", flush=True)
            for r in rows:
                line = (f"{r['config']:<6} {r['params']:>11,d} params  {r['device']} {r['amp']}  batch {r['batch']} "
                        f"({r['input_points']} input points, {r['queries']} queries + eikonal, {r['data']})  "
                        f"{r['samples_per_s']:.2f} samples/s ({r['step_s']:.2f} s/step; data path alone "
                        f"{r['data_samples_per_s']:.1f} samples/s)  peak {r['peak']}")
                if flops is not None:
                    achieved = r["samples_per_s"] * flops / 1e12
                    line += f"  {achieved:.3g} TFLOP/s"
                    if args.peak_tflops > 0:
                        line += f"  MFU {100 * achieved / args.peak_tflops:.3g} % of {args.peak_tflops:g} TFLOP/s"
                print(line, flush=True)
            for r in rows if args.profile > 0 else ():
                print(f"{name:<6} profile of {args.profile} steps ({r['data']}, batch {r['batch']}):", flush=True)
                for line in profile_steps(r["trainer"], r["batches"], args.profile, r["step_s"]):
                    print(f"{name:<6} {line}", flush=True)
            for r in rows:
                if r["trainer"].device_sampler is not None:
                    print(f"{name:<6} {r['trainer'].device_sampler.store.memory_line()}", flush=True)
            if len(rows) == 2:
                print(f"{name:<6} device cache / loader: {rows[1]['samples_per_s'] / rows[0]['samples_per_s']:.2f} x "
                      "samples/s", flush=True)
            first = rows[0]["trainer"]
            batch = sample_batch(first, args.batch_size)
            print(f"{name:<6} farthest-point sampling of the latent queries: {1000 * fps_seconds(first, batch):.1f} ms "
                  f"per forward at batch {args.batch_size} (the step: {1000 * rows[0]['step_s']:.1f} ms)", flush=True)
            if args.max_batch_for_gib > 0:
                mem = memory_per_sample(first)
                budget = args.max_batch_for_gib * 2**30
                largest = max(0, math.floor((budget - mem["fixed"]) / mem["per_sample"]))
                print(f"{name:<6} memory: {mem['per_sample'] / 2**20:.1f} MiB per sample + {mem['fixed'] / 2**20:.0f} MiB "
                      f"fixed -> largest batch for {args.max_batch_for_gib:g} GiB: {largest} ({mem['method']})", flush=True)
            for r in rows:
                r["trainer"].log.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
