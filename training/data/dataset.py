"""Training samples from prepared cases (``heart-prepare`` .npz files, :mod:`.case_format`).

One sample = one case, one input mask, one random draw of points:

- encoder input: ``num_input_points`` surface samples of the **input** structures only
  (:func:`HeartCompletionLib.model.encoder_input.select_encoder_points`), as ``xyz_n + one-hot``;
- queries: uniform volume points, near-surface points (all K signed distances) and surface
  samples (distance 0 to their own structure) with a validity mask per (query, structure):
  only annotated structures with finite targets count, and targets of a structure cut by the
  image border are dropped near the cut (``mask.truncated``);
- normalisation exactly as :mod:`HeartCompletionLib.geometry.normalization`: the centre is the mean of
  the input structures' surface samples, points and distances are divided by the same ``S``;
- augmentation about the centre: small rotation, mild scale (distances scale too) and a shift of
  the heart against the centre (a translation *after* re-centring would cancel out, so the shift
  models the centre error of a differently sampled input). Never flips or axis permutations.

Items are addressed by ``(case_index, sample_seed)`` so that a sample depends only on the plan
of :class:`MixingSampler`, never on worker processes: a resumed run draws the same samples.
"""

from __future__ import annotations

import csv
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from heart_training.config import AugmentConfig, DataConfig, DatasetSpec, MaskConfig
from torch.utils.data import Dataset, Sampler

from HeartCompletionLib.geometry.affine import distance_to_image_border_mm as to_border
from HeartCompletionLib.geometry.normalization import Normalization
from HeartCompletionLib.model.encoder_input import encoder_arrays, encoder_centre_mm, select_encoder_points
from HeartCompletionLib.structures.table import StructureTable

from .case_format import CaseFormatError, load_case
from .phase_masks import InputMasker

QUERY_VOLUME, QUERY_NEAR, QUERY_SURFACE = 0, 1, 2
_CASE_KEYS = ("origin_mm", "surface_points", "surface_labels", "volume_points", "volume_sdf",
              "near_points", "near_sdf", "annotated", "truncated")
_LIST_COLUMNS = ("path", "file", "npz", "case", "case_id", "id", "name")


@dataclass(frozen=True)
class CaseRef:
    dataset: str  #: DatasetSpec.name
    path: Path  #: the .npz file
    case_id: str  #: file stem, used in messages and logs


def read_case_list(spec: DatasetSpec, split: str) -> list[CaseRef]:
    """Cases of one dataset for ``split`` ("train" or "val").

    Reads ``train_list``/``val_list`` (CSV from ``heart-split``; the first of the columns
    path/file/npz/case/case_id/id/name, or the first column; entries relative to the CSV's folder). Without a
    train list every ``*.npz`` of the folder is a training case and there is no validation set.
    """
    data_dir = Path(spec.data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"{data_dir}: dataset folder does not exist (dataset {spec.name!r})")
    list_name = spec.train_list if split == "train" else spec.val_list
    list_path = data_dir / list_name if list_name else None
    if list_path is None or not list_path.is_file():
        if split == "train":
            paths = sorted(data_dir.glob("*.npz"))
            if not paths:
                raise FileNotFoundError(f"{data_dir}: no .npz cases (run heart-prepare first)")
            return [CaseRef(spec.name, p, p.stem) for p in paths]
        return []
    with open(list_path, newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    if not rows:
        return []
    header = [h.strip().lower() for h in rows[0]]
    column = next((header.index(c) for c in _LIST_COLUMNS if c in header), None)
    body = rows[1:] if column is not None else rows
    column = column or 0
    refs = []
    for row in body:
        if not row or not row[column].strip():
            continue
        entry = row[column].strip()
        path = Path(entry)
        if not path.is_absolute():
            # heart-split writes paths relative to the CSV's folder
            path = list_path.parent / (entry if entry.endswith(".npz") else f"{entry}.npz")
        if not path.is_file():
            raise FileNotFoundError(f"{list_path}: lists {entry!r} but {path} does not exist")
        refs.append(CaseRef(spec.name, path, path.name[: -len(".npz")] if path.name.endswith(".npz") else path.stem))
    return refs


def random_rotation(max_deg: float, rng: np.random.Generator) -> np.ndarray:
    """A proper rotation (det +1) by at most ``max_deg`` about a random axis (Rodrigues)."""
    if max_deg <= 0:
        return np.eye(3)
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    angle = np.deg2rad(rng.uniform(-max_deg, max_deg))
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * (k @ k)


def distance_to_image_border_mm(points_mm: np.ndarray, meta: dict, origin_mm: np.ndarray) -> np.ndarray | None:
    """Distance (mm) from each point (relative to ``origin_mm``) to the nearest face of the image
    box (negative outside), from ``meta`` "affine"/"ijk_to_ras" and "shape"; ``None`` if absent."""
    affine = meta.get("ijk_to_ras", meta.get("affine"))
    shape = meta.get("shape")
    if affine is None or shape is None:
        return None
    return to_border(np.asarray(points_mm, np.float64) + origin_mm, shape, np.asarray(affine, dtype=np.float64))


class HeartCaseDataset(Dataset):
    """Map-style dataset over prepared cases; ``dataset[(index, seed)]`` -> one sample dict.

    ``augment=None`` disables augmentation (validation). Sample tensors (Q = volume + near +
    surface queries, N = input points, K structures):

    ``enc_points (N,3)``, ``enc_onehot (N,K)``, ``queries (Q,3)``, ``target (Q,K)`` (network
    units, 0 where invalid), ``target_mask (Q,K)`` bool, ``query_kind (Q,)`` (0 volume, 1 near,
    2 surface), ``input_mask (K,)``, ``annotated (K,)``, ``centre_mm (3,)`` (in the case frame),
    ``scale`` (augmentation factor), ``case_id`` str, ``dataset`` str.
    """

    def __init__(
        self,
        refs: list[CaseRef],
        table: StructureTable,
        normalization: Normalization,
        data_cfg: DataConfig,
        mask_cfg: MaskConfig,
        augment: AugmentConfig | None,
    ):
        if not refs:
            raise ValueError("dataset has no cases")
        self.refs = list(refs)
        self.table = table
        self.num_classes = len(table)
        self.norm = normalization
        self.data_cfg = data_cfg
        self.mask_cfg = mask_cfg
        self.augment = augment
        self.masker = InputMasker(mask_cfg, table)
        self._cache: OrderedDict = OrderedDict()

    def __len__(self) -> int:
        return len(self.refs)

    def load(self, index: int) -> dict:
        """The arrays of case ``index`` (kept in a small per-worker LRU cache if configured)."""
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        ref = self.refs[index]
        case = load_case(ref.path, keys=_CASE_KEYS, optional=("near_labels",), mmap=True)
        k = case["annotated"].shape[0]
        if k != self.num_classes or case["volume_sdf"].shape[1] != k or case["near_sdf"].shape[1] != k:
            raise CaseFormatError(
                f"{ref.path}: case has {k} structures, the structure table {self.table.name!r} has {self.num_classes}"
            )
        if self.data_cfg.cache_cases > 0:
            self._cache[index] = case
            while len(self._cache) > self.data_cfg.cache_cases:
                self._cache.popitem(last=False)
        return case

    def __getitem__(self, key) -> dict:
        index, seed = key if isinstance(key, (tuple, list)) else (int(key), int(key))
        rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(index)])
        ref = self.refs[int(index)]
        try:
            return self.make_sample(self.load(int(index)), rng, ref)
        except (ValueError, KeyError) as exc:
            if str(ref.path) in str(exc):
                raise
            raise CaseFormatError(f"{ref.path}: cannot build a training sample: {exc}") from exc

    # ------------------------------------------------------------------------------------
    def make_sample(self, case: dict, rng: np.random.Generator, ref: CaseRef) -> dict:
        cfg, k = self.data_cfg, self.num_classes
        annotated = case["annotated"].astype(bool)
        truncated = case["truncated"].astype(bool) & annotated
        surface_labels = case["surface_labels"].astype(np.int64)
        # a structure without surface samples cannot be an input (e.g. empty after cropping)
        has_surface = np.bincount(surface_labels, minlength=k)[:k] > 0
        input_mask = self.masker.choose(annotated & has_surface, rng)
        inputs = np.flatnonzero(input_mask)

        surface_mm = case["surface_points"].astype(np.float64)
        centre = encoder_centre_mm(surface_mm, surface_labels, inputs)
        enc_idx = select_encoder_points(surface_labels, inputs, cfg.num_input_points, rng,
                                        min_per_structure=cfg.min_points_per_structure)

        vol_idx = _draw(len(case["volume_points"]), cfg.num_volume_queries, rng)
        if cfg.query_balance == "structure":
            near_idx = _draw_balanced(_groups(case, "near"), annotated, cfg.num_near_queries, rng)
            surf_idx = _draw_balanced(_groups(case, "surface"), annotated, cfg.num_surface_queries, rng)
        else:
            near_idx = _draw(len(case["near_points"]), cfg.num_near_queries, rng)
            target_surface = np.flatnonzero(annotated[surface_labels])
            surf_idx = target_surface[_draw(len(target_surface), cfg.num_surface_queries, rng)] \
                if len(target_surface) else np.zeros(0, dtype=np.int64)

        q_mm = np.concatenate([case["volume_points"][vol_idx], case["near_points"][near_idx],
                               surface_mm[surf_idx]]).astype(np.float64)
        target_mm = np.full((len(q_mm), k), np.nan, dtype=np.float64)
        target_mm[: len(vol_idx)] = case["volume_sdf"][vol_idx]
        target_mm[len(vol_idx): len(vol_idx) + len(near_idx)] = case["near_sdf"][near_idx]
        surf_rows = np.arange(len(vol_idx) + len(near_idx), len(q_mm))
        target_mm[surf_rows, surface_labels[surf_idx]] = 0.0
        kind = np.concatenate([np.full(len(vol_idx), QUERY_VOLUME), np.full(len(near_idx), QUERY_NEAR),
                               np.full(len(surf_idx), QUERY_SURFACE)]).astype(np.int64)

        valid = np.isfinite(target_mm) & annotated[None, :]
        valid &= self._truncation_keep(q_mm, target_mm, truncated, case)

        # augmentation about the centre (rotation R, scale s, shift t of the heart vs the centre)
        rot, scale, shift = np.eye(3), 1.0, np.zeros(3)
        if self.augment is not None:
            rot = random_rotation(self.augment.rotation_deg, rng)
            if self.augment.scale > 0:
                scale = float(np.exp(rng.uniform(-np.log1p(self.augment.scale), np.log1p(self.augment.scale))))
            shift = rng.uniform(-self.augment.translation_mm, self.augment.translation_mm, size=3)

        def to_network(points_mm: np.ndarray) -> np.ndarray:
            moved = scale * (points_mm - centre) @ rot.T + centre + shift
            return self.norm.points_to_network(moved, centre).astype(np.float32)

        enc_xyz_mm = surface_mm[enc_idx]
        _, onehot = encoder_arrays(enc_xyz_mm, surface_labels[enc_idx], centre, self.norm, k)
        target_n = self.norm.distance_to_network(np.where(valid, target_mm, 0.0) * scale).astype(np.float32)
        return {
            "enc_points": torch.from_numpy(to_network(enc_xyz_mm)),
            "enc_onehot": torch.from_numpy(onehot),
            "queries": torch.from_numpy(to_network(q_mm)),
            "target": torch.from_numpy(target_n),
            "target_mask": torch.from_numpy(valid),
            "query_kind": torch.from_numpy(kind),
            "input_mask": torch.from_numpy(input_mask),
            "annotated": torch.from_numpy(annotated),
            "centre_mm": torch.from_numpy(centre.astype(np.float32)),
            "scale": torch.tensor(scale, dtype=torch.float32),
            "case_id": ref.case_id,
            "dataset": ref.dataset,
        }

    def _truncation_keep(self, q_mm: np.ndarray, target_mm: np.ndarray, truncated: np.ndarray, case: dict) -> np.ndarray:
        """(Q,K) bool: False where a truncated structure's target is unreliable.

        ``near_cut``: the label map's distance near a cut structure is measured to the flat
        wall of the image border, so a target counts only where the point is farther from the
        border than from the structure (plus a margin): then the nearest surface point is a
        real surface point. ``structure``: drop the truncated structure's targets entirely.
        """
        keep = np.ones_like(target_mm, dtype=bool)
        mode = self.mask_cfg.truncated
        if mode == "ignore" or not truncated.any():
            return keep
        border = distance_to_image_border_mm(q_mm, case["meta"], case["origin_mm"]) if mode == "near_cut" else None
        for s in np.flatnonzero(truncated):
            if border is None:
                keep[:, s] = False
            else:
                keep[:, s] = border > np.abs(np.nan_to_num(target_mm[:, s])) + self.mask_cfg.truncation_margin_mm
        return keep


def _draw(n_available: int, n: int, rng: np.random.Generator) -> np.ndarray:
    if n <= 0 or n_available == 0:
        return np.zeros(0, dtype=np.int64)
    return rng.choice(n_available, size=n, replace=n_available < n)


def _groups(case: dict, which: str) -> list[np.ndarray]:
    """Indices of the near-surface (``which="near"``) or surface points of each structure, cached
    in the case dict. A near point belongs to the structure it was drawn around (``near_labels``),
    or else to the annotated structure whose surface is closest. Owners already grouped on disk
    (heart-prepare writes them so) need no sort, only a binary search per structure."""
    key = f"_{which}_groups"
    if key not in case:
        k = case["annotated"].shape[0]
        if which == "near" and "near_labels" in case:  # written by heart-prepare
            owner = case["near_labels"].astype(np.int64)
        elif which == "near":
            dist = np.abs(case["near_sdf"]).astype(np.float32)
            dist[:, ~case["annotated"].astype(bool)] = np.inf
            owner = np.argmin(np.nan_to_num(dist, nan=np.inf), axis=1)
        else:
            owner = case["surface_labels"].astype(np.int64)
        if owner.size < 2 or bool(np.all(owner[1:] >= owner[:-1])):  # grouped on disk (heart-prepare)
            order = np.arange(owner.size)
        else:
            order = np.argsort(owner, kind="stable")
        bounds = np.searchsorted(owner[order], np.arange(k + 1))
        case[key] = [order[bounds[s]: bounds[s + 1]] for s in range(k)]
    return case[key]


def _draw_balanced(groups: list[np.ndarray], annotated: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` indices shared equally among the annotated structures that have points (the
    remainder goes to randomly chosen structures)."""
    members = [g for s, g in enumerate(groups) if annotated[s] and len(g)]
    if n <= 0 or not members:
        return np.zeros(0, dtype=np.int64)
    counts = np.full(len(members), n // len(members))
    counts[rng.choice(len(members), size=n % len(members), replace=False)] += 1
    return np.concatenate([g[_draw(len(g), c, rng)] for g, c in zip(members, counts)])


class MixingSampler(Sampler):
    """Distributed, weighted, resumable sampler yielding ``(case_index, sample_seed)``.

    Each epoch draws a plan of ``num_samples`` items: the dataset of each item by the datasets'
    weights, the case by a per-dataset permutation (cycled). With one dataset this is a
    shuffled pass like ``DistributedSampler``. Rank ``r`` of ``W`` takes ``plan[r::W]``, so a
    one-process run with the global batch sees the same samples as ``W`` processes. The
    ``sample_seed`` depends only on (seed, epoch, position): augmentation and masks do not
    depend on the number of processes or workers. ``set_position(epoch, start)`` resumes.
    """

    def __init__(self, dataset_sizes: list[int], weights: list[float], num_samples: int,
                 rank: int = 0, world_size: int = 1, seed: int = 0):
        if num_samples % world_size:
            raise ValueError("num_samples must be a multiple of the world size")
        self.offsets = np.cumsum([0, *dataset_sizes])[:-1]
        self.sizes = list(dataset_sizes)
        w = np.asarray(weights, dtype=np.float64)
        self.p = w / w.sum()
        self.num_samples = num_samples
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.epoch, self.start = 0, 0

    def set_position(self, epoch: int, start: int = 0) -> None:
        """Next iteration yields epoch ``epoch`` from this rank's ``start``-th item on."""
        self.epoch, self.start = int(epoch), int(start)

    def plan(self, epoch: int) -> list[tuple[int, int]]:
        rng = np.random.default_rng([self.seed, epoch, 7919])
        which = rng.choice(len(self.sizes), size=self.num_samples, p=self.p)
        perms = [rng.permutation(n) for n in self.sizes]
        used = [0] * len(self.sizes)
        out = []
        for pos, d in enumerate(which):
            case = perms[d][used[d] % self.sizes[d]]
            used[d] += 1
            out.append((int(self.offsets[d] + case), int(self.seed * 1_000_003 + epoch * 10_000_019 + pos)))
        return out

    def __iter__(self):
        local = self.plan(self.epoch)[self.rank:: self.world_size]
        return iter(local[self.start:])

    def __len__(self) -> int:
        return self.num_samples // self.world_size - self.start


def collate(samples: list[dict]) -> dict:
    out = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        out[key] = torch.stack(values) if torch.is_tensor(values[0]) else values
    return out


def case_summary(refs: list[CaseRef]) -> dict:
    """Per-dataset case counts (stored in the inference checkpoint's data summary)."""
    counts: dict[str, int] = {}
    for r in refs:
        counts[r.dataset] = counts.get(r.dataset, 0) + 1
    return {"cases": len(refs), "per_dataset": counts}

