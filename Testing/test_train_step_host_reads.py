"""A training step reads nothing back from the device: on a GPU every ``.item()``, ``float(t)``,
``.cpu()`` or ``nonzero`` waits until the GPU has run everything queued, so the CPU stops queueing
the next kernels and the GPU idles while it catches up (``benchmarks/train_speed.py --profile``
counts them on CUDA). A blocking copy from the host to the GPU (a constant moved with ``.to``, a
tensor made from a list on the device) waits the same way, so the step makes none either. The
step keeps its statistics on the device; the trainer reads them when it logs, and reads each
step's finiteness flag at the start of the next step, when that step's backward pass is already
queued (:meth:`heart_training.train.engine.Trainer.raise_if_nonfinite`).

On the CPU there is no queue to drain, so these tests count the reads themselves (a
``TorchFunctionMode`` that sees every tensor call): the same code path runs on a GPU.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from fixtures_training import write_analytic_case, write_case_lists
from heart_training.config import load_config
from heart_training.data.dataset import collate
from heart_training.data.phase_masks import MaskStatistics
from heart_training.train.distributed import init_distributed
from heart_training.train.engine import Trainer, _to
from heart_training.train.losses import _first_near, eikonal_queries
from torch.overrides import TorchFunctionMode

#: tensor calls that copy a value to the host (a synchronisation on a GPU)
HOST_READS = {"item", "tolist", "numpy", "cpu", "__float__", "__int__", "__bool__", "__index__", "nonzero",
              "argwhere", "masked_select", "unique", "repeat_interleave"}


class HostReads(TorchFunctionMode):
    """Records, with where it was made, every call inside the ``with`` block that would wait for a
    GPU: a tensor call in :data:`HOST_READS` (except on ``host_tensors``, which live on the host on a
    GPU too), and a blocking copy of host data to the device: a tensor made from host data with a
    ``device``, or ``.to(device)`` / ``.cuda()`` without ``non_blocking=True`` of a tensor that is on
    the host. On the CPU nothing is copied, so the host is tracked: tensors made inside the block by
    a factory without ``device`` (and whatever is computed only from them), and tensors from before
    the block that are not in ``device_tensors`` (constants of a module)."""

    FACTORIES = {"tensor", "as_tensor", "from_numpy", "zeros", "ones", "full", "empty", "arange", "eye", "linspace",
                 "rand", "randn", "randint", "randperm"}

    def __init__(self, host_tensors=(), device_tensors=()):
        super().__init__()
        self.seen: list[str] = []
        self.host = {id(t) for t in host_tensors}
        self.device = {id(t) for t in device_tensors}
        self.made_on_host: set[int] = set()
        self.made: set[int] = set()
        self.alive: list = []  # the tensors made inside, kept alive so that their ids stay theirs

    def _on_host(self, t) -> bool:
        return id(t) in self.made_on_host or not (id(t) in self.device or id(t) in self.made)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        kwargs = kwargs or {}
        wait = name in HOST_READS and not (args and id(args[0]) in self.host)
        if name in ("tensor", "as_tensor", "from_numpy"):
            wait = wait or kwargs.get("device") is not None
        elif name in ("to", "cuda") and args and isinstance(args[0], torch.Tensor) and _names_a_device(name, args, kwargs):
            wait = wait or (self._on_host(args[0]) and not kwargs.get("non_blocking"))
        if wait:
            caller = sys._getframe(1)
            self.seen.append(f"{name} at {Path(caller.f_code.co_filename).name}:{caller.f_lineno}")
        out = func(*args, **kwargs)
        flat = [b for a in (*args, *kwargs.values()) for b in (a if isinstance(a, (tuple, list)) else (a,))]
        inputs = [a for a in flat if isinstance(a, torch.Tensor)]
        host = (name in self.FACTORIES and kwargs.get("device") is None) or (
            name not in ("to", "cuda") and bool(inputs) and all(id(t) in self.made_on_host for t in inputs))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.made.add(id(t))
                self.alive.append(t)
                (self.made_on_host.add if host else self.made_on_host.discard)(id(t))
        return out


def _names_a_device(name: str, args, kwargs) -> bool:
    """``.cuda()``, or ``.to`` with a device, a device name or a tensor (its device) as target."""
    return name == "cuda" or "device" in kwargs or any(isinstance(a, (torch.Tensor, torch.device, str)) for a in args[1:2])


def _device_tensors(trainer, batches=()) -> list:
    """What lives on the training device before a step: weights, gradients, optimizer state, the
    device cache, the trainer's own index tensors and batches already moved there."""
    out = [*trainer.model.parameters(), *trainer.model.buffers(), trainer.eikonal_near]
    out += [p.grad for p in trainer.model.parameters() if p.grad is not None]
    out += [v for state in trainer.optimizer.state.values() for k, v in state.items() if torch.is_tensor(v) and k != "step"]
    if trainer.device_sampler is not None:
        for holder in (trainer.device_sampler, trainer.device_sampler.store):
            out += [v for v in vars(holder).values() if torch.is_tensor(v)]
    out += [v for batch in batches for v in batch.values() if torch.is_tensor(v)]
    return out


def _optimizer_step_counters(optimizer) -> list:
    """AdamW's step counters: host tensors unless the optimizer is fused or capturable (then on the
    device, read by the fused kernel), so the ``.item()`` AdamW does on them is no device sync."""
    steps = [state["step"] for state in optimizer.state.values() if "step" in state]
    assert steps and all(not t.is_cuda for t in steps)
    return steps


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    data = tmp_path_factory.mktemp("host_reads")
    for seed in (0, 1):
        write_analytic_case(data / f"h{seed}.npz", seed=seed, num_surface=6000, num_volume=3000, num_near=4000)
    write_case_lists(data, ["h0", "h1"], [])
    return data


def _trainer(data_dir, tmp_path, *overrides) -> Trainer:
    cfg = load_config("tiny_test", [f"data.datasets.0.data_dir={data_dir}", f"run.output_dir={tmp_path / 'run'}",
                                    "loss.eikonal=0.1", "optim.grad_clip=1.0", *overrides])
    torch.set_num_threads(1)
    return Trainer(cfg, init_distributed("cpu"))


@pytest.mark.parametrize("device_cache", [False, True], ids=["loader", "device_cache"])
def test_a_training_step_reads_nothing_back(data_dir, tmp_path, device_cache):
    trainer = _trainer(data_dir, tmp_path, f"data.device_cache={str(device_cache).lower()}", "optim.grad_accum=2")
    try:
        drawn = []
        if device_cache:  # drawn on the device: the draw itself is part of the step
            batches = trainer.batches()
        else:  # the loader's workers build batches on the CPU: what reaches the step is on the device
            loader = trainer.batches()
            drawn = [_to(next(loader), trainer.ctx.device) for _ in range(6)]
            batches = iter(drawn)
        trainer.train_step(batches)  # the first step may build its caches
        trainer.raise_if_nonfinite()  # the one deliberate read: the previous step's flag, read late
        with HostReads(_optimizer_step_counters(trainer.optimizer), _device_tensors(trainer, drawn)) as reads:
            stats = trainer.train_step(batches)
        assert reads.seen == [], f"calls inside a training step that would wait for a GPU: {reads.seen}"
        # what the step measured is all there, still on the device, and right when read
        assert set(stats.terms) >= {"loss", "volume", "near", "surface", "eikonal", "grad_norm"}
        assert all(torch.is_tensor(v) and v.ndim == 0 for v in stats.terms.values())
        assert torch.isfinite(torch.stack(list(stats.terms.values()))).all()
        counts = MaskStatistics(len(trainer.table), [s.name for s in trainer.cfg.data.datasets])
        counts.add_counts(stats.mask_counts.cpu().numpy(), stats.datasets)
        assert counts.count == 2 * trainer.cfg.optim.batch_size == len(stats.datasets)
        assert counts.sizes.sum() == counts.count and counts.unannotated_targets == 0
        assert (stats.union >= stats.intersection).all() and stats.union.sum() > 0
    finally:
        trainer.log.close()


def test_mask_counts_on_the_device_equal_the_host_statistics(data_dir, tmp_path):
    trainer = _trainer(data_dir, tmp_path, "mask.kind=drop_random")
    try:
        plan = trainer.sampler.plan(0)
        batch = collate([trainer.train_ds[plan[i]] for i in range(6)])
        batch["annotated"][1, 3] = False  # a sample that does not annotate the RA: no targets there ...
        batch["target_mask"][1, :, 3] = False
        batch["target_mask"][1, :5, 3] = True  # ... but for five entries, counted as stray
        host = MaskStatistics(len(trainer.table), ["d"])
        host.add(batch["input_mask"].numpy())
        target = batch["target_mask"].numpy()
        host.target_samples += target.any(axis=1).sum(axis=0)
        host.unannotated_targets += int((target & ~batch["annotated"].numpy()[:, None, :]).sum())
        device = MaskStatistics(len(trainer.table), ["d"])
        device.add_counts(MaskStatistics.batch_counts(batch).numpy(), ["d"] * 6)
        assert device.unannotated_targets == 5 and device.per_dataset.tolist() == [6]
        for name in ("per_structure", "sizes", "target_samples"):
            assert getattr(device, name).tolist() == getattr(host, name).tolist(), name
        assert device.count == host.count == 6
    finally:
        trainer.log.close()


def test_the_eikonal_stencil_centres_are_the_first_near_queries(data_dir, tmp_path):
    """The trainer names them from the config (no ``nonzero`` per step); they must be the ones the
    batches' query kinds say, on both data paths."""
    for cache in (False, True):
        trainer = _trainer(data_dir, tmp_path / str(cache), f"data.device_cache={str(cache).lower()}")
        try:
            batch = _to(next(trainer.batches()), trainer.ctx.device)
            count = trainer.cfg.loss.eikonal_queries
            assert torch.equal(trainer.eikonal_near[None].expand(batch["queries"].shape[0], -1),
                               _first_near(batch["query_kind"], count))
            step = trainer.step_n
            torch.testing.assert_close(
                eikonal_queries(batch["queries"], batch["query_kind"], count, step, near=trainer.eikonal_near),
                eikonal_queries(batch["queries"], batch["query_kind"], count, step), rtol=0, atol=0)
        finally:
            trainer.log.close()
