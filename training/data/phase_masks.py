"""Input masks of the four training phases: which structures the encoder sees in a sample.

The target is always every *annotated* structure; the mask only decides the encoder's input.

- ``all`` (phase 1): every annotated structure;
- ``drop_random`` (phase 2): drop a random ``drop_min..drop_max`` structures, keep >= ``min_keep``;
- ``subsets`` (phase 3): one of the named subsets (default A = Myocardium, LA, LV, RA, RV and
  B = Aorta, PA, LAA, Coronary, PV) or a union such as ``"A+B"``, intersected with the annotated;
  with ``random_drop_prob`` > 0 that share of the samples is masked as ``drop_random`` instead
  (so the phase keeps what phase 2 learnt while it learns the subsets);
- ``annotated`` (phase 4): the case's own annotated structures, optionally dropping a few more.

>>> from HeartCompletionLib.structures.table import StructureTable
>>> table = StructureTable.default()
>>> masker = InputMasker(MaskConfig(kind="subsets", subset_choices=["A"]), table)
>>> [table[k].name for k in np.flatnonzero(masker.choose(np.ones(10, bool), np.random.default_rng(0)))]
['Myocardium', 'LA', 'LV', 'RA', 'RV']
"""

from __future__ import annotations

import numpy as np
from heart_training.config import MaskConfig

from HeartCompletionLib.structures.table import StructureTable


class InputMasker:
    """Draws a boolean input mask ``(K,)`` for one sample from the case's ``annotated`` mask."""

    def __init__(self, cfg: MaskConfig, table: StructureTable):
        self.cfg = cfg
        self.table = table
        self.num_classes = len(table)
        self.choices: list[np.ndarray] = []
        if cfg.kind == "subsets":
            for choice in cfg.subset_choices:
                mask = np.zeros(self.num_classes, dtype=bool)
                for part in str(choice).split("+"):
                    part = part.strip()
                    if part not in cfg.subsets:
                        raise ValueError(f"mask.subset_choices: {part!r} is not a named subset {sorted(cfg.subsets)}")
                    try:
                        mask[[s.index for s in table.subset(cfg.subsets[part])]] = True
                    except KeyError as exc:
                        raise ValueError(f"mask.subsets.{part}: {exc}") from exc
                self.choices.append(mask)
            weights = np.asarray(cfg.subset_weights or [1.0] * len(self.choices), dtype=np.float64)
            if len(weights) != len(self.choices) or np.any(weights < 0) or weights.sum() <= 0:
                raise ValueError("mask.subset_weights must be non-negative, one per subset choice")
            self.choice_p = weights / weights.sum()
        if not 0.0 <= float(cfg.random_drop_prob) <= 1.0:
            raise ValueError(f"mask.random_drop_prob must lie in [0, 1], got {cfg.random_drop_prob}")

    def choose(self, annotated: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Input mask (K,) bool, a non-empty subset of ``annotated`` (a case with nothing
        annotated is a data error and raises)."""
        annotated = np.asarray(annotated, dtype=bool)
        present = np.flatnonzero(annotated)
        if len(present) == 0:
            raise ValueError("case annotates no structure: nothing to encode")
        kind = self.cfg.kind
        if kind == "all":
            return annotated.copy()
        if kind == "drop_random":
            return self._drop(present, self.cfg.drop_min, self.cfg.drop_max, rng)
        if kind == "subsets":
            if self.cfg.random_drop_prob > 0 and rng.random() < self.cfg.random_drop_prob:
                return self._drop(present, self.cfg.drop_min, self.cfg.drop_max, rng)
            # Draw among the choices that keep at least one annotated structure.
            usable = [i for i, m in enumerate(self.choices) if np.any(m & annotated)]
            if not usable:
                return annotated.copy()
            p = self.choice_p[usable]
            pick = usable[int(rng.choice(len(usable), p=p / p.sum()))]
            return self.choices[pick] & annotated
        if kind == "annotated":
            if self.cfg.extra_drop_prob > 0 and rng.random() < self.cfg.extra_drop_prob:
                return self._drop(present, 1, self.cfg.extra_drop_max, rng)
            return annotated.copy()
        raise ValueError(f"unknown mask kind {kind!r}")

    def _drop(self, present: np.ndarray, low: int, high: int, rng: np.random.Generator) -> np.ndarray:
        keep_at_least = max(1, int(self.cfg.min_keep))
        max_drop = max(0, len(present) - keep_at_least)
        high = min(high, max_drop)
        low = min(low, high)
        n_drop = int(rng.integers(low, high + 1)) if high > 0 else 0
        mask = np.zeros(self.num_classes, dtype=bool)
        mask[present] = True
        if n_drop:
            mask[rng.choice(present, size=n_drop, replace=False)] = False
        return mask


class MaskStatistics:
    """Counts of input structures and input-set sizes (logged so a phase's masks can be checked).

    With ``datasets`` (names, the config's order) it also counts what the log needs to show a
    phase-4 mix is right (:meth:`batch_counts`, :meth:`add_counts`): samples drawn from each
    dataset, samples with a loss target on each structure, and target entries on structures a
    sample does not annotate (always 0: the dataset masks them; logged so that a run proves it)."""

    def __init__(self, num_classes: int, datasets=()):
        self.num_classes = num_classes
        self.per_structure = np.zeros(num_classes, dtype=np.int64)
        self.sizes = np.zeros(num_classes + 1, dtype=np.int64)
        self.count = 0
        self.datasets = list(datasets)
        self.per_dataset = np.zeros(len(self.datasets), dtype=np.int64)
        self.target_samples = np.zeros(num_classes, dtype=np.int64)
        self.unannotated_targets = 0

    def add(self, masks: np.ndarray) -> None:
        masks = np.atleast_2d(np.asarray(masks, dtype=bool))
        self.per_structure += masks.sum(axis=0)
        np.add.at(self.sizes, masks.sum(axis=1), 1)
        self.count += len(masks)

    @staticmethod
    def batch_counts(batch: dict):
        """The counts of one collated batch as one int64 tensor on the batch's device, computed there
        without reading anything back (a training step sums them; :meth:`add_counts` takes the sum):
        input structures (K), input-set sizes (K + 1), samples with a target on each structure (K),
        target entries on structures a sample does not annotate (1) and samples (1)."""
        import torch

        inputs = batch["input_mask"].bool()  # (B, K)
        target = batch["target_mask"].bool()  # (B, Q, K)
        annotated = batch["annotated"].bool()  # (B, K)
        b, k = inputs.shape
        sizes = torch.zeros(k + 1, dtype=torch.int64, device=inputs.device)
        sizes.scatter_add_(0, inputs.sum(dim=1), torch.ones(b, dtype=torch.int64, device=inputs.device))
        stray = (target & ~annotated[:, None, :]).sum().reshape(1)
        return torch.cat([inputs.sum(dim=0), sizes, target.any(dim=1).sum(dim=0), stray,
                          torch.full((1,), b, dtype=torch.int64, device=inputs.device)])

    def add_counts(self, counts: np.ndarray, datasets=()) -> None:
        """Add a (sum of) :meth:`batch_counts`, read back to the host, and the samples' dataset names."""
        k = self.num_classes
        counts = np.asarray(counts, dtype=np.int64)
        if counts.shape != (3 * k + 3,):
            raise ValueError(f"mask counts of {k} structures have {3 * k + 3} entries, got shape {counts.shape}")
        self.per_structure += counts[:k]
        self.sizes += counts[k: 2 * k + 1]
        self.target_samples += counts[2 * k + 1: 3 * k + 1]
        self.unannotated_targets += int(counts[3 * k + 1])
        self.count += int(counts[3 * k + 2])
        for name in datasets:
            if name in self.datasets:
                self.per_dataset[self.datasets.index(name)] += 1

    def frequencies(self) -> np.ndarray:
        """Fraction of samples in which each structure is an input."""
        return self.per_structure / max(self.count, 1)

    def summary(self, names: list[str]) -> str:
        freq = self.frequencies()
        per = ", ".join(f"{n} {f:.0%}" for n, f in zip(names, freq))
        mean_size = float((self.sizes * np.arange(len(self.sizes))).sum() / max(self.count, 1))
        return f"input structures per sample: mean {mean_size:.2f} of {self.num_classes}; input frequency: {per}"


def simulate_masks(masker: InputMasker, annotated_masks: list, draws: int = 1000, seed: int = 0) -> MaskStatistics:
    """Statistics of ``draws`` masks over the given cases' annotated masks (cycled)."""
    rng = np.random.default_rng(seed)
    stats = MaskStatistics(masker.num_classes)
    for i in range(draws):
        stats.add(masker.choose(annotated_masks[i % len(annotated_masks)], rng))
    return stats
