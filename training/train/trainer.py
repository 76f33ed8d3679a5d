"""``heart-train``: one trainer for the four phases, on CPU, one GPU or ``torchrun`` (DDP).

    heart-train --config phase1 data.datasets.0.data_dir=/data/imagecas_npz --output_dir runs/p1
    torchrun --nproc_per_node=4 -m heart_training.train.trainer --config phase2 --resume ...

Before the first step the data gate (:mod:`heart_training.data.data_gate`) checks a sample of the data and the first
loss; a non-finite loss stops the run naming the cases of the batch; SIGTERM/SIGUSR1 (Slurm
pre-emption) saves the state after the current step. The engine (model, data plan, step,
validation, checkpoints) is :mod:`.engine`.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
from heart_training.config import TrainConfig, config_to_yaml, load_config
from heart_training.data import data_gate
from heart_training.data.dataset import collate
from heart_training.data.phase_masks import MaskStatistics, simulate_masks

from HeartCompletionLib.atomic_io import atomic_write_text
from HeartCompletionLib.errors import ExitCode, HeartCompletionError

from .distributed import (
    all_reduce_sum,
    broadcast_object,
    init_distributed,
    replica_max_difference,
    shutdown,
)
from .engine import NonFiniteLossError, Trainer, TrainResult, _to

__all__ = ["train", "run_data_gate", "main", "NonFiniteLossError", "TrainResult"]


def train(cfg: TrainConfig, resume: bool = False) -> TrainResult:
    """Train one phase as configured; returns where the checkpoints are and the last metrics.

    Works alone or as one rank of a process group (``torchrun`` environment variables).
    ``resume``: continue from ``run.output_dir/state_last.pt`` when it exists.
    """
    cfg.validate()
    ctx = init_distributed(cfg.run.device)
    trainer = None
    threads_before = torch.get_num_threads()
    handlers_before: dict = {}
    try:
        if cfg.run.threads > 0:
            # one thread per process is much faster than oversubscribed cores (shared CI machines)
            torch.set_num_threads(cfg.run.threads)
        trainer = Trainer(cfg, ctx)
        if ctx.is_main:
            atomic_write_text(trainer.out / "config.yaml", config_to_yaml(cfg))
        resumed = resume and trainer.resume()
        o = cfg.optim
        n_params = sum(p.numel() for p in trainer.model.parameters())
        trainer.log.info(
            f"phase {cfg.phase}: {len(trainer.train_ds)} training / {len(trainer.val_ds) if trainer.val_ds else 0} "
            f"validation cases; model {cfg.model.config} ({n_params:,} parameters) on {ctx.device} x "
            f"{ctx.world_size}; global batch {o.batch_size * ctx.world_size * o.grad_accum}; "
            f"{trainer.samples_per_epoch} samples per epoch; output {trainer.out}")
        if not resumed and cfg.run.data_gate:
            run_data_gate(trainer)
        if ctx.is_main:
            annotated = [trainer.train_ds.load(i)["annotated"] for i in range(min(len(trainer.train_ds), 16))]
            trainer.log.info("planned " + simulate_masks(trainer.train_ds.masker, annotated, 1000, cfg.seed)
                             .summary(trainer.table.names))
        handlers_before = _install_stop_handler(trainer)
        return _loop(trainer)
    finally:
        for sig, handler in handlers_before.items():  # the caller's own handlers again (a library call)
            signal.signal(sig, handler)
        if trainer is not None:
            trainer.log.close()
        torch.set_num_threads(threads_before)
        shutdown(ctx)


def run_data_gate(trainer: Trainer) -> None:
    """Rank 0 checks the data and the first loss; every rank raises the same DataGateError."""
    problems: list[str] = []
    if trainer.ctx.is_main:
        cfg = trainer.cfg
        cache = Path(cfg.run.gate_cache_dir) if cfg.run.gate_cache_dir else data_gate.default_cache_dir()
        problems = data_gate.run_case_checks(trainer.train_ds.refs, cfg.seed, cfg.run.gate_workers, cache)
        if not problems:
            keys = trainer.sampler.plan(0)[: cfg.optim.batch_size]
            batch = _to(collate([trainer.train_ds[k] for k in keys]), trainer.ctx.device)
            zero = data_gate.model_is_zero_output(trainer.model, batch, trainer.ctx.device)
            trainer.model.eval()
            with torch.no_grad():
                res = trainer.forward_loss(batch, model=trainer.model)
            problems = data_gate.check_first_loss(res.terms, batch, zero_init=zero)
            trainer.log.info(
                f"data gate: all {len(trainer.train_ds)} cases checked; first loss "
                f"volume {float(res.terms['volume']):.4f} near {float(res.terms['near']):.4f} network units "
                f"({'zero-initialised output: equals mean |target|' if zero else 'fine-tuning: magnitude checked'})"
                + (": OK" if not problems else ": FAILED"))
    problems = broadcast_object(problems, trainer.ctx)
    data_gate.raise_if_problems(problems)


def _loop(trainer: Trainer) -> TrainResult:
    from tqdm import tqdm

    cfg, ctx = trainer.cfg, trainer.ctx
    result = TrainResult(output_dir=trainer.out, step=trainer.step)
    micro = trainer.batches()
    bar = tqdm(total=cfg.optim.max_steps, initial=trainer.step, disable=not (ctx.is_main and cfg.run.progress),
               desc=f"phase {cfg.phase}", dynamic_ncols=True, file=sys.stderr)
    window = _Window(trainer)
    val: dict = {}
    samples_per_step = cfg.optim.batch_size * cfg.optim.grad_accum * ctx.world_size
    stop_at = trainer.step + cfg.run.stop_after if cfg.run.stop_after > 0 else None
    pending_stop = None  # DDP: the stop requests at the last step, summed over ranks on the device
    while trainer.step < cfg.optim.max_steps:
        window.add(trainer.train_step(micro))
        bar.update(1)
        step, last = trainer.step, trainer.step >= cfg.optim.max_steps
        if ctx.distributed:  # every rank must agree; read a step late (now it would wait for this step)
            requested = pending_stop is not None and bool(pending_stop.item() > 0)
            pending_stop = all_reduce_sum(torch.full((1,), float(trainer.stop_requested), device=ctx.device), ctx)
        else:
            requested = trainer.stop_requested
        stop = requested or (stop_at is not None and step >= stop_at and not last)
        validate = (cfg.run.val_every > 0 and step % cfg.run.val_every == 0) or last
        save = (cfg.run.checkpoint_every > 0 and step % cfg.run.checkpoint_every == 0) or last or stop
        log = step % cfg.run.log_every == 0 or last or stop
        if log or validate or save:  # nothing non-finite is logged, validated or saved
            trainer.raise_if_nonfinite()
        if log:
            metrics = window.reduce(trainer, samples_per_step)
            result.losses += window.losses
            trainer.log.log("train", step, metrics)
            result.train_metrics = metrics
            postfix = {"loss": f"{metrics['loss']:.4f}", "iou": f"{metrics['iou_mean']:.3f}",
                       "samples/s": f"{metrics['samples_per_s']:.1f}"}
            if ctx.device.type == "cuda":
                postfix["mem"] = f"{torch.cuda.max_memory_allocated(ctx.device) / 2**30:.1f}G"
            bar.set_postfix(postfix)
            window = _Window(trainer)
        if validate:
            val = trainer.validate()
            if val:
                trainer.log.log("val", step, val)
                result.val_metrics = val
                if cfg.run.keep_best and np.isfinite(val["iou_mean"]) and val["iou_mean"] > trainer.best:
                    trainer.best = val["iou_mean"]
                    result.best_checkpoint = trainer.export("model_best.safetensors", val) or result.best_checkpoint
        if save:
            trainer.save_state()
            result.state_path = trainer.state_path()
        if stop:
            trainer.log.info(f"stopping: state saved at step {step}; continue with --resume")
            break
    bar.close()
    result.step = trainer.step
    if ctx.distributed:
        result.replica_difference = replica_max_difference(trainer.model, ctx)
        trainer.log.info(f"DDP replicas after step {trainer.step}: max |parameter difference| "
                         f"{result.replica_difference:.3g} over {ctx.world_size} processes")
        trainer.log.log("info", trainer.step, {"replica_max_difference": result.replica_difference})
    if trainer.step >= cfg.optim.max_steps:
        result.final_checkpoint = trainer.export("model_final.safetensors", val)
        if result.best_checkpoint is None and ctx.is_main and (trainer.out / "model_best.safetensors").is_file():
            result.best_checkpoint = trainer.out / "model_best.safetensors"
    return result


class _Window:
    """Training metrics accumulated between two log lines: summed on the training device step by
    step (no reads back, see :class:`~heart_training.train.engine.StepStats`), read once and reduced
    over ranks when logged."""

    def __init__(self, trainer: Trainer):
        num_classes = len(trainer.table)
        self.sums: dict = {}
        self.steps = 0
        self.step_losses: list = []  # (step, 0-d device tensor)
        self.losses: list = []  # (step, float), filled by reduce()
        self.inter = self.union = self.counts = 0
        self.masks = MaskStatistics(num_classes, [spec.name for spec in trainer.cfg.data.datasets])
        self.datasets: list = []
        self.start = time.perf_counter()

    def add(self, stats) -> None:
        for k, v in stats.terms.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.steps += 1
        self.step_losses.append((stats.step, stats.terms["loss"]))
        self.inter, self.union = self.inter + stats.intersection, self.union + stats.union
        self.counts = self.counts + stats.mask_counts
        self.datasets += stats.datasets

    def reduce(self, trainer: Trainer, samples_per_step: int) -> dict:
        """The window's metrics (every rank's); its per-step losses in :attr:`losses`."""
        ctx = trainer.ctx
        names = sorted(self.sums)
        # the window's one read back from the device (it holds at least one step)
        losses = torch.stack([v.double() for _, v in self.step_losses]).cpu().tolist()
        self.losses = [(step, loss) for (step, _), loss in zip(self.step_losses, losses)]
        packed = torch.stack([self.sums[k].double() for k in names]).cpu() / self.steps
        self.inter, self.union = self.inter.double().cpu(), self.union.double().cpu()
        self.masks.add_counts(self.counts.cpu().numpy(), self.datasets)
        packed = all_reduce_sum(packed, ctx) / ctx.world_size
        inter, union = all_reduce_sum(self.inter, ctx), all_reduce_sum(self.union, ctx)
        counts = all_reduce_sum(torch.from_numpy(self.masks.per_structure.astype(np.float64)), ctx)
        n_masks = all_reduce_sum(torch.tensor([float(self.masks.count)]), ctx)
        values = dict(zip(names, packed.tolist()))
        values["lr"] = trainer.scheduler.get_last_lr()[0]
        values["samples_per_s"] = self.steps * samples_per_step / max(time.perf_counter() - self.start, 1e-9)
        freq = (counts / n_masks.clamp_min(1)).tolist()
        values.update({f"input_freq/{n}": f for n, f in zip(trainer.table.names, freq)})
        values["input_structures_mean"] = float(sum(freq))
        # what the mix really drew: each dataset's share of the samples (compare with its weight),
        # the share of samples with a loss target on each structure, and target entries on
        # structures a sample does not annotate (must stay 0)
        drawn = all_reduce_sum(torch.from_numpy(self.masks.per_dataset.astype(np.float64)), ctx)
        targets = all_reduce_sum(torch.from_numpy(self.masks.target_samples.astype(np.float64)), ctx)
        stray = all_reduce_sum(torch.tensor([float(self.masks.unannotated_targets)], dtype=torch.float64), ctx)
        n = float(n_masks.clamp_min(1))
        values.update({f"draw_freq/{d}": float(c) / n for d, c in zip(self.masks.datasets, drawn.tolist())})
        values.update({f"target_freq/{name}": float(c) / n for name, c in zip(trainer.table.names, targets.tolist())})
        values["targets_on_unannotated"] = float(stray.item())
        if ctx.device.type == "cuda":
            values["gpu_mem_gb"] = torch.cuda.max_memory_allocated(ctx.device) / 2**30
        return trainer.metrics(values, inter, union)


def _install_stop_handler(trainer: Trainer) -> dict:
    """SIGTERM/SIGUSR1 (Slurm pre-emption) -> save the state after the current step and exit.
    Returns the handlers it replaced, for :func:`train` to put back when it returns."""
    def handler(signum, frame):  # noqa: ARG001
        trainer.stop_requested = True

    before = {}
    for sig in (signal.SIGTERM, getattr(signal, "SIGUSR1", None)):
        if sig is not None:
            try:
                before[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread (e.g. inside a test runner thread)
                pass
    return before


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="heart-train",
        description="Train the HeartVecSet completion model for one phase (CPU, one GPU, or under torchrun).",
        epilog="Overrides use dotted keys with YAML values, e.g. optim.lr=1e-4 data.datasets.0.data_dir=/data/npz "
               "optim.max_steps=20000. Bundled configs: phase1..phase4, smoke, tiny_test.")
    parser.add_argument("--config", required=True, help="YAML file or bundled config name (phase1, smoke, ...)")
    parser.add_argument("--output_dir", help="run folder (default: run.output_dir of the config)")
    parser.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/state_last.pt if present")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    args = parser.parse_intermixed_args(argv)  # overrides may come before or after the options
    try:
        overrides = list(args.overrides) + ([f"run.output_dir={args.output_dir}"] if args.output_dir else [])
        cfg = load_config(args.config, overrides)
        result = train(cfg, resume=args.resume)
    except (HeartCompletionError, NonFiniteLossError, FileNotFoundError, ValueError) as exc:
        print(f"heart-train: error: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    except OSError as exc:  # a full disk or a read-only folder while writing logs, checkpoints
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        print(f"heart-train: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return ExitCode.USAGE
    if result.final_checkpoint:
        print(f"heart-train: finished at step {result.step}; inference checkpoint {result.final_checkpoint}")
    return ExitCode.OK


if __name__ == "__main__":
    raise SystemExit(main())
