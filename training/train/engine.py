"""The training engine of ``heart-train``: model, optimizer, data plan, one step, validation,
checkpoints. :mod:`.trainer` drives it (:func:`heart_training.train.trainer.train`).

Output folder layout: ``config.yaml`` (resolved), ``log.jsonl``, ``tensorboard/``,
``state_last.pt`` (resumable, :mod:`.state`), ``model_best.safetensors`` (best validation
IoU) and ``model_final.safetensors`` (inference checkpoints, :mod:`HeartCompletionLib.model.checkpoint`).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from heart_training.config import ConfigError, TrainConfig, config_to_yaml
from heart_training.data.dataset import HeartCaseDataset, MixingSampler, case_summary, collate, read_case_list
from heart_training.data.phase_masks import MaskStatistics
from torch.utils.data import DataLoader

from HeartCompletionLib.atomic_io import remove_stale_temporaries
from HeartCompletionLib.errors import HeartCompletionError
from HeartCompletionLib.geometry.normalization import Normalization
from HeartCompletionLib.structures.table import StructureTable

from .distributed import DistContext, all_reduce_sum, barrier
from .logs import RunLogger
from .losses import compute_losses, eikonal_queries, iou_from_counts
from .state import STATE_NAME, TrainStateError, load_state, rng_state, save_state, set_rng_state


class NonFiniteLossError(HeartCompletionError, RuntimeError):
    """The loss became NaN/inf; the message names the step and the cases of the batch."""


@dataclass
class TrainResult:
    output_dir: Path
    step: int
    final_checkpoint: Path | None = None
    best_checkpoint: Path | None = None
    state_path: Path | None = None
    train_metrics: dict = field(default_factory=dict)
    val_metrics: dict = field(default_factory=dict)
    losses: list = field(default_factory=list)  #: (step, loss) of every optimizer step of this call
    replica_difference: float = 0.0  #: DDP: max |parameter difference| between ranks at the end


@dataclass
class StepStats:
    """What one optimizer step measured, left on the training device: reading a value back waits
    for the GPU to finish everything queued, so the trainer reads them only when it logs
    (:class:`heart_training.train.trainer._Window`)."""

    step: int  #: the optimizer step these belong to (``Trainer.step`` after it)
    terms: dict  #: name -> 0-d tensor: the loss terms (mean over micro-batches) and ``grad_norm``
    intersection: torch.Tensor  #: (K,) float64 inside-counts over volume + near queries
    union: torch.Tensor  #: (K,)
    mask_counts: torch.Tensor  #: int64 sum of :meth:`MaskStatistics.batch_counts` of the micro-batches
    datasets: list  #: dataset name of every sample (host)


@dataclass
class _PendingCheck:
    """A step's loss finiteness, still on the device (:meth:`Trainer.raise_if_nonfinite`)."""

    step: int
    bad: torch.Tensor  #: (micro-batches,) float: 1 where this rank's loss was not finite
    bad_anywhere: torch.Tensor  #: 0-d: the sum of ``bad`` over every rank
    cases: list  #: the case ids of each micro-batch
    terms: list  #: the loss terms of each micro-batch (device tensors)


#: ``model.config`` value that takes the architecture from the ``model.init_from`` checkpoint
MODEL_CONFIG_FROM_INIT = "from_init"


def model_config_of(cfg: TrainConfig, table: StructureTable):
    """The run's :class:`ModelConfig`: a named config with ``model.overrides``, or (``model.config:
    from_init``) the architecture stored in the ``model.init_from`` inference checkpoint, so a
    fine-tuning run need not repeat it (overrides still apply on top)."""
    from HeartCompletionLib.model.configs import ModelConfig, get_config

    if cfg.model.config != MODEL_CONFIG_FROM_INIT:
        return get_config(cfg.model.config, len(table), **cfg.model.overrides)
    path = Path(cfg.model.init_from) if cfg.model.init_from else None
    if path is None or path.suffix != ".safetensors":
        raise ConfigError(f"model.config={MODEL_CONFIG_FROM_INIT} needs model.init_from=<an inference checkpoint "
                          f".safetensors>, got {cfg.model.init_from or 'none'!r}")
    from HeartCompletionLib.model.checkpoint import CheckpointError, read_checkpoint_metadata

    try:
        config = ModelConfig.from_dict(read_checkpoint_metadata(path)["model_config"])
    except (CheckpointError, OSError, KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{path}: model.config={MODEL_CONFIG_FROM_INIT}: cannot read its model config: {exc}") from exc
    try:
        return replace(config, num_classes=len(table), **cfg.model.overrides)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"model.overrides {cfg.model.overrides} on the config of {path}: {exc}") from exc


def build_model(cfg: TrainConfig, table: StructureTable) -> torch.nn.Module:
    from HeartCompletionLib.model.vecset import HeartVecSet

    model = HeartVecSet(model_config_of(cfg, table))
    if cfg.model.init_from:
        path = Path(cfg.model.init_from)
        if path.suffix == ".safetensors":
            from HeartCompletionLib.model.checkpoint import load_inference_checkpoint

            weights = load_inference_checkpoint(path, expected_table=table).model.state_dict()
        else:
            weights = load_state(path)["model"]
        try:
            model.load_state_dict(weights)
        except RuntimeError as exc:
            raise ConfigError(f"{path}: model.init_from does not fit model.config={cfg.model.config!r}: {exc}") from exc
    return model


def build_datasets(cfg: TrainConfig, table: StructureTable, norm: Normalization):
    train_refs, val_refs, sizes, weights = [], [], [], []
    for spec in cfg.data.datasets:
        refs = read_case_list(spec, "train")
        train_refs += refs
        sizes.append(len(refs))
        weights.append(spec.weight)
        val_refs += read_case_list(spec, "val")
    if cfg.data.max_val_cases > 0:
        val_refs = val_refs[: cfg.data.max_val_cases]
    train_ds = HeartCaseDataset(train_refs, table, norm, cfg.data, cfg.mask, cfg.augment)
    val_ds = HeartCaseDataset(val_refs, table, norm, cfg.data, cfg.mask, None) if val_refs else None
    return train_ds, val_ds, sizes, weights


def compile_model(model: torch.nn.Module, scope: str = "blocks", mode: str = "default") -> list[str]:
    """``run.compile``: ``torch.compile`` in place (``Module.compile``: the state-dict keys do not
    change, checkpoints stay interchangeable with eager runs) either the attention blocks
    (``scope="blocks"``) or the whole model (``"model"``: embeddings, norms and the output layer
    fused with the blocks). The farthest-point sampling of the latent queries (a Python loop over
    the latents) always stays eager: compiling it would unroll that loop (a graph break, one graph
    each side of it). ``mode`` is torch.compile's (``reduce-overhead`` replays CUDA graphs).
    Returns the names of the compiled modules."""
    if scope not in ("blocks", "model"):
        raise ValueError(f"unknown compile scope {scope!r} (blocks | model)")
    kwargs = {} if mode == "default" else {"mode": mode}
    if scope == "model":
        model.compile(**kwargs)
        return ["model"]
    names = []
    for name, module in model.named_modules():
        if name == "encoder" or name == "decoder" or (name.startswith("trunk.") and name.count(".") == 1):
            module.compile(**kwargs)
            names.append(name)
    return names


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio`` at ``max_steps``."""
    o = cfg.optim
    if step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    progress = min(1.0, (step - o.warmup_steps) / max(1, o.max_steps - o.warmup_steps))
    return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


class Trainer:
    """The state of one run; :func:`train` drives it."""

    def __init__(self, cfg: TrainConfig, ctx: DistContext):
        self.cfg, self.ctx = cfg, ctx
        self.out = Path(cfg.run.output_dir)
        if ctx.is_main:  # what a killed run (kill -9) left half-written: our own temporaries only
            remove_stale_temporaries(self.out, (STATE_NAME, "*.safetensors", "*.yaml", "*.json", "*.csv"))
        self.table = StructureTable.from_spec(cfg.structures)
        self.norm = Normalization(scale_mm=cfg.scale_mm)
        self.log = RunLogger(self.out, ctx.is_main, cfg.run.tensorboard)
        self.train_ds, self.val_ds, sizes, weights = build_datasets(cfg, self.table, self.norm)
        o = cfg.optim
        per_step = o.batch_size * ctx.world_size * o.grad_accum
        # an epoch is at least 500 steps (cases repeat with new random draws): each epoch start
        # drains and refills the loader pipeline, which cost ~40 % of the samples/s of 50-step
        # epochs on an H200 (phase-1 run of benchmarks/gpu_check.sh)
        wanted = cfg.data.samples_per_epoch or max(len(self.train_ds), per_step * 500)
        self.samples_per_epoch = int(math.ceil(wanted / per_step) * per_step)
        self.sampler = MixingSampler(sizes, weights, self.samples_per_epoch, ctx.rank, ctx.world_size, cfg.seed)
        self.device_sampler = None
        if cfg.data.device_cache:  # cases in device (or pinned) memory, samples drawn there
            from heart_training.data.device_data import build_device_sampler

            self.device_sampler = build_device_sampler(self.train_ds, cfg.data, cfg.mask, cfg.augment, cfg.scale_mm,
                                                       ctx.device)
            self.log.info(self.device_sampler.store.memory_line())
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        self.model = build_model(cfg, self.table).to(ctx.device)
        self.teacher = None
        if cfg.loss.teacher > 0:  # the model as it starts (init_from), frozen: its distances stand in for missing labels
            self.teacher = build_model(cfg, self.table).to(ctx.device).eval().requires_grad_(False)
        if cfg.run.compile:
            names = compile_model(self.model, cfg.run.compile_scope, cfg.run.compile_mode)
            self.log.info(f"torch.compile ({cfg.run.compile_mode}): {', '.join(names)}")
        self.ddp = self.model
        if ctx.distributed:
            self.ddp = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
        # the fused kernel: one launch for every parameter instead of a few per tensor group
        fused = {"fused": True} if o.fused and ctx.device.type == "cuda" else {}
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=o.lr, weight_decay=o.weight_decay,
                                           betas=tuple(o.betas), **fused)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, cfg))
        use_bf16 = cfg.run.amp == "bf16" or (cfg.run.amp == "auto" and ctx.device.type == "cuda")
        self.autocast = (lambda: torch.autocast(ctx.device.type, dtype=torch.bfloat16)) if use_bf16 else \
            contextlib.nullcontext
        self.step, self.epoch, self.consumed, self.best = 0, 0, 0, -math.inf
        self.step_n = self.norm.distance_to_network(cfg.loss.eikonal_step_mm)
        # the eikonal stencil's centres: the first near queries, after the volume ones (both data
        # paths lay queries out as volume, near, surface); named here, not found per step
        d = cfg.data
        self.eikonal_near = torch.arange(d.num_volume_queries, d.num_volume_queries + cfg.loss.eikonal_queries,
                                         device=ctx.device)
        self.stop_requested = False
        self._pending: _PendingCheck | None = None

    # --- data -------------------------------------------------------------------------------
    def loader(self, dataset, sampler) -> DataLoader:
        workers = self.cfg.data.num_workers
        return DataLoader(dataset, batch_size=self.cfg.optim.batch_size, sampler=sampler, num_workers=workers,
                          collate_fn=collate, pin_memory=self.ctx.device.type == "cuda",
                          persistent_workers=workers > 0, generator=torch.Generator().manual_seed(self.cfg.seed),
                          prefetch_factor=2 if workers > 0 else None)

    def batches(self):
        """Micro-batches forever, tracking (epoch, items consumed) for exact resumption."""
        if self.device_sampler is not None:
            yield from self._device_batches()
            return
        loader = None  # one loader: its workers live across epochs (the sampler runs in this process)
        while True:
            self.sampler.set_position(self.epoch, self.consumed)
            if loader is None:
                loader = self.loader(self.train_ds, self.sampler)
            for batch in loader:
                self.consumed += self.cfg.optim.batch_size
                yield batch
            self.epoch, self.consumed = self.epoch + 1, 0

    def _device_batches(self):
        """``data.device_cache``: the same plan (cases, positions) as the loader path; each
        micro-batch is drawn on the device by :class:`heart_training.data.device_data.DeviceSampler`
        with a generator seeded from its plan position, so (epoch, consumed) resumes exactly."""
        bs = self.cfg.optim.batch_size
        while True:
            local = self.sampler.plan(self.epoch)[self.ctx.rank:: self.ctx.world_size]
            while self.consumed < len(local):
                items = local[self.consumed: self.consumed + bs]
                self.consumed += bs
                yield self.device_sampler.batch(items)
            self.epoch, self.consumed = self.epoch + 1, 0

    # --- one forward ------------------------------------------------------------------------
    def forward_loss(self, batch: dict, model=None):
        model = model or self.ddp
        queries = batch["queries"]
        q = queries.shape[1]
        use_eik = self.cfg.loss.eikonal > 0 and model.training
        if use_eik:
            queries = torch.cat([queries, eikonal_queries(queries, batch["query_kind"], self.cfg.loss.eikonal_queries,
                                                          self.step_n, near=self.eikonal_near)], dim=1)
        with self.autocast():
            out = model(batch["enc_points"], batch["enc_onehot"], queries)
        teacher_pred = None
        if self.teacher is not None and model.training:
            with torch.no_grad(), self.autocast():
                teacher_pred = self.teacher(batch["enc_points"], batch["enc_onehot"], batch["queries"])["sdf"].float()
        sdf = out["sdf"].float()
        return compute_losses(sdf[:, :q], batch, self.cfg.loss, kl=out.get("kl"),
                              eikonal_pred=sdf[:, q:] if use_eik else None, step_n=self.step_n,
                              clamp_n=self.norm.distance_to_network(self.cfg.loss.clamp_mm), teacher_pred=teacher_pred)

    def train_step(self, micro_batches) -> StepStats:
        """One optimizer step over ``grad_accum`` micro-batches. Nothing is read back from the
        device (a read would wait for the GPU to drain its queue): the statistics stay there
        (:class:`StepStats`), and whether the loss was finite is checked at the start of the next
        step (or at :meth:`raise_if_nonfinite` before anything is logged or saved)."""
        self.raise_if_nonfinite()
        self.ddp.train()
        accum = self.cfg.optim.grad_accum
        terms: dict = {}
        inter = union = counts = 0
        bad, cases, micro_terms, datasets = [], [], [], []
        for i in range(accum):
            batch = _to(next(micro_batches), self.ctx.device)
            sync = i == accum - 1 or not self.ctx.distributed
            with contextlib.nullcontext() if sync else self.ddp.no_sync():
                res = self.forward_loss(batch)
                (res.total / accum).backward()
            bad.append(~torch.isfinite(res.total.detach()))
            cases.append(batch["case_id"])
            micro_terms.append(res.terms)
            for k, v in res.terms.items():
                terms[k] = terms.get(k, 0.0) + v / accum
            inter, union = inter + res.intersection, union + res.union
            counts = counts + MaskStatistics.batch_counts(batch)
            datasets += list(batch.get("dataset", []))
        if self.cfg.optim.grad_clip > 0:
            terms["grad_norm"] = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip).detach()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        flags = torch.stack(bad).float()
        self._pending = _PendingCheck(self.step, flags, all_reduce_sum(flags.sum(), self.ctx), cases, micro_terms)
        self.step += 1
        return StepStats(self.step, terms, inter, union, counts, datasets)

    def raise_if_nonfinite(self) -> None:
        """Raise :class:`NonFiniteLossError` if the last step's loss was NaN/inf on any rank (every
        rank raises alike). Called at the start of each step and before anything is logged,
        validated or saved, so no non-finite weights are ever written."""
        pending, self._pending = self._pending, None
        if pending is None or not bool(pending.bad_anywhere > 0):
            return
        local = pending.bad.cpu().tolist()
        where = [c for flag, c in zip(local, pending.cases) if flag]
        where = f"cases {[c for group in where for c in group]}" if where else "a batch on another rank"
        terms = next((t for flag, t in zip(local, pending.terms) if flag), pending.terms[0])
        raise NonFiniteLossError(
            f"non-finite loss at step {pending.step} (rank {self.ctx.rank}): {where}; terms "
            f"{ {k: float(v) for k, v in terms.items()} }. Check these cases with heart-prepare --check")

    # --- validation ---------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self) -> dict:
        if self.val_ds is None:
            return {}
        self.ddp.eval()
        idx = list(range(self.ctx.rank, len(self.val_ds), self.ctx.world_size))
        keys = [(i, 12345 + i) for i in idx]  # fixed masks and points: comparable across steps
        loader = DataLoader(_Keyed(self.val_ds, keys), batch_size=self.cfg.optim.batch_size, collate_fn=collate)
        totals = torch.zeros(2, dtype=torch.float64)
        inter = torch.zeros(len(self.table), dtype=torch.float64)
        union = torch.zeros_like(inter)
        for batch in loader:
            batch = _to(batch, self.ctx.device)
            res = self.forward_loss(batch, model=self.model)
            n = len(batch["case_id"])
            totals += torch.tensor([float(res.terms["volume"] + res.terms["near"]) * n, n], dtype=torch.float64)
            inter, union = inter + res.intersection.cpu(), union + res.union.cpu()
        totals, inter, union = (all_reduce_sum(t, self.ctx) for t in (totals, inter, union))
        return self.metrics({"l1": float(totals[0] / max(totals[1], 1))}, inter, union)

    def metrics(self, values: dict, inter, union) -> dict:
        iou = iou_from_counts(torch.as_tensor(inter).cpu(), torch.as_tensor(union).cpu()).numpy()
        out = dict(values)
        out.update({f"iou/{name}": float(v) for name, v in zip(self.table.names, iou)})
        out["iou_mean"] = float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")
        return out

    # --- checkpoints -------------------------------------------------------------------------
    def state_path(self) -> Path:
        return self.out / STATE_NAME

    def save_state(self) -> None:
        rngs = [rng_state()]
        if self.ctx.distributed:
            import torch.distributed as dist

            gathered = [None] * self.ctx.world_size
            dist.all_gather_object(gathered, rngs[0])
            rngs = gathered
        if self.ctx.is_main:
            save_state(self.state_path(), {
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "step": self.step, "epoch": self.epoch,
                "consumed": self.consumed, "best": self.best, "rng": rngs, "world_size": self.ctx.world_size,
                "config": config_to_yaml(self.cfg)})
        barrier(self.ctx)

    def resume(self) -> bool:
        path = self.state_path()
        if not path.is_file():
            self.log.info(f"--resume: no {path}, starting from step 0")
            return False
        state = load_state(path)
        if state["world_size"] != self.ctx.world_size:
            raise RuntimeError(f"{path}: written by {state['world_size']} processes, resumed with "
                               f"{self.ctx.world_size}; the data plan differs (use the same process count)")
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.step, self.epoch, self.consumed = int(state["step"]), int(state["epoch"]), int(state["consumed"])
            self.best = state["best"]
            set_rng_state(state["rng"][self.ctx.rank])
        except (RuntimeError, ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise TrainStateError(f"{path}: the training state does not fit this run ({reason}); it was written "
                                  "by another model or config") from exc
        self.log.info(f"resumed from {path} at step {self.step} (epoch {self.epoch}, item {self.consumed})")
        return True

    def export(self, name: str, val: dict) -> Path | None:
        if not self.ctx.is_main:
            return None
        from HeartCompletionLib.model.checkpoint import save_inference_checkpoint

        summary = {**case_summary(self.train_ds.refs), "val_cases": len(self.val_ds) if self.val_ds else 0,
                   "datasets": [s.name for s in self.cfg.data.datasets]}
        return save_inference_checkpoint(
            self.out / name, self.model, self.table, self.norm, phase=self.cfg.phase, data_summary=summary,
            extra={"step": self.step, "run_name": self.cfg.name, "val": val},
            num_input_points=self.cfg.data.num_input_points, min_per_structure=self.cfg.data.min_points_per_structure)


class _Keyed(torch.utils.data.Dataset):
    def __init__(self, dataset, keys):
        self.dataset, self.keys = dataset, keys

    def __len__(self):
        return len(self.keys)

    def __getitem__(self, i):
        return self.dataset[self.keys[i]]
