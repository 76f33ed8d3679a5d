"""Device-resident training data (``data.device_cache=true``): every training case is loaded
once into the training device's memory (or pinned host memory), and each micro-batch, its input
masks, encoder points, queries, targets and augmentation are drawn there with torch ops. No
loader workers, no per-sample numpy, no host-to-device copy of the batch in the hot loop.

The sampling distribution is that of :meth:`heart_training.data.dataset.HeartCaseDataset.make_sample`
(checked statistically in ``Testing/test_device_data.py``):

- input masks per phase (``mask.kind`` all / drop_random / subsets / annotated) from the case's
  annotated structures that have surface samples;
- the centre is the mean of all surface samples of the input structures;
- encoder points: per input structure a count proportional to its number of surface samples with
  the floor ``data.min_points_per_structure`` and the rounding remainder to the largest fractional
  parts (:func:`HeartCompletionLib.model.encoder_input.select_encoder_points`), then shuffled;
- queries: uniform volume points, near-surface points and surface samples, shared equally among
  the annotated structures (``query_balance: structure``, remainder to random structures) or as
  stored (``area``); targets NaN/invalid where not annotated; truncated structures masked near the
  image border (``mask.truncated``);
- augmentation about the centre: rotation by at most ``rotation_deg`` about a random axis, scale
  ``exp(U(-log(1+s), log(1+s)))`` (distances scale with it), shift ``U(-t, t)`` per axis;
- targets in network units (mm / S), 0 where invalid.

One deliberate difference: points are drawn **with** replacement inside each pool (volume, each
structure's near and surface points), where the loader draws without replacement when the pool is
large enough. With pools of 10^4-10^5 points and a few hundred to a few thousand draws, the expected
share of repeated points in a sample is about ``n / (2 * pool)`` (< 1 % for the bundled configs).

Randomness: each micro-batch has its own generator, seeded from the plan position of its first
item (:class:`heart_training.data.dataset.MixingSampler`: seed, epoch and position). A batch therefore
depends only on the data position (epoch, items consumed), which the training state already
saves, so ``--resume`` reproduces the uninterrupted run exactly without an extra RNG state, and no
global RNG (python, numpy, torch) is consumed. The samples are not those of the loader for the
same seed (another generator), only drawn from the same distribution.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from heart_training.config import DEVICE_CACHE_MEMORY, DataConfig, MaskConfig

from .case_format import CaseFormatError
from .dataset import QUERY_NEAR, QUERY_SURFACE, QUERY_VOLUME, HeartCaseDataset, _groups
from .phase_masks import InputMasker


class DeviceCaseStore:
    """All cases of a :class:`HeartCaseDataset` as flat tensors on ``device``.

    Surface samples are stored sorted by structure and near-surface points grouped by the
    structure they belong to (as :func:`heart_training.data.dataset._groups` defines it), so a
    structure's pool is one contiguous range ``start[c, s] .. start[c, s] + count[c, s]``.
    """

    def __init__(self, dataset: HeartCaseDataset, device: torch.device | str = "cpu", pin: bool = False):
        self.device = torch.device(device)
        self.refs = dataset.refs
        k = self.num_classes = dataset.num_classes
        c = len(dataset)
        surf, vol, vsdf, near, nsdf = [], [], [], [], []
        self.surf_start = np.zeros((c, k), np.int64)
        self.surf_count = np.zeros((c, k), np.int64)
        self.near_start = np.zeros((c, k), np.int64)
        self.near_count = np.zeros((c, k), np.int64)
        self.vol_start = np.zeros(c, np.int64)
        self.vol_count = np.zeros(c, np.int64)
        surf_sum = np.zeros((c, k, 3), np.float64)
        annotated = np.zeros((c, k), bool)
        truncated = np.zeros((c, k), bool)
        ijk_linear = np.tile(np.eye(3), (c, 1, 1))
        ijk_offset = np.zeros((c, 3))
        shape = np.ones((c, 3))
        spacing = np.ones((c, 3))
        has_border = np.zeros(c, bool)
        n_surf = n_vol = n_near = 0
        for i in range(c):
            case = dataset.load(i)
            ann = case["annotated"].astype(bool)
            annotated[i], truncated[i] = ann, case["truncated"].astype(bool) & ann
            labels = case["surface_labels"].astype(np.int64)
            points = np.asarray(case["surface_points"], np.float32)
            for s, idx in enumerate(_groups(case, "surface")):
                self.surf_start[i, s], self.surf_count[i, s] = n_surf, len(idx)
                surf.append(points[idx])
                surf_sum[i, s] = points[idx].astype(np.float64).sum(axis=0)
                n_surf += len(idx)
            if not (ann & (np.bincount(labels, minlength=k)[:k] > 0)).any():
                raise CaseFormatError(f"{self.refs[i].path}: no annotated structure has surface samples; nothing to encode")
            for s, idx in enumerate(_groups(case, "near")):
                self.near_start[i, s], self.near_count[i, s] = n_near, len(idx)
                near.append(np.asarray(case["near_points"], np.float32)[idx])
                nsdf.append(np.asarray(case["near_sdf"], np.float32)[idx])
                n_near += len(idx)
            if not (ann & (self.near_count[i] > 0)).any():
                raise CaseFormatError(f"{self.refs[i].path}: no annotated structure has near-surface points")
            self.vol_start[i], self.vol_count[i] = n_vol, len(case["volume_points"])
            vol.append(np.asarray(case["volume_points"], np.float32))
            vsdf.append(np.asarray(case["volume_sdf"], np.float32))
            n_vol += len(case["volume_points"])
            affine = case["meta"].get("ijk_to_ras", case["meta"].get("affine"))
            if affine is not None and case["meta"].get("shape") is not None:
                affine = np.asarray(affine, np.float64)
                inv = np.linalg.inv(affine[:3, :3])
                ijk_linear[i] = inv
                ijk_offset[i] = inv @ (np.asarray(case["origin_mm"], np.float64) - affine[:3, 3])
                shape[i] = np.asarray(case["meta"]["shape"], np.float64)[:3]
                spacing[i] = np.linalg.norm(affine[:3, :3], axis=0)
                has_border[i] = True

        def put(array, dtype=None):
            t = torch.from_numpy(np.ascontiguousarray(array))
            if dtype is not None:
                t = t.to(dtype)
            if pin and torch.cuda.is_available():
                t = t.pin_memory()
            return t.to(self.device)

        f32 = torch.float32
        self.surf_xyz = put(np.concatenate(surf) if surf else np.zeros((0, 3), np.float32))
        self.vol_xyz, self.vol_sdf = put(np.concatenate(vol)), put(np.concatenate(vsdf))
        self.near_xyz = put(np.concatenate(near) if near else np.zeros((0, 3), np.float32))
        self.near_sdf = put(np.concatenate(nsdf) if nsdf else np.zeros((0, k), np.float32))
        self.t_surf_start, self.t_surf_count = put(self.surf_start), put(self.surf_count)
        self.t_near_start, self.t_near_count = put(self.near_start), put(self.near_count)
        self.t_vol_start, self.t_vol_count = put(self.vol_start), put(self.vol_count)
        self.surf_sum = put(surf_sum)  # float64: the centre as exact as the loader's
        self.annotated, self.truncated = put(annotated), put(truncated)
        self.ijk_linear, self.ijk_offset = put(ijk_linear, f32), put(ijk_offset, f32)
        self.shape, self.spacing, self.has_border = put(shape, f32), put(spacing, f32), put(has_border)
        self.near_total = put(self.near_count.sum(axis=1))
        self.near_case_start = put(self.near_start[:, 0])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in vars(self).values() if torch.is_tensor(t))

    def memory_line(self) -> str:
        n = len(self.refs)
        return (f"device cache: {n} cases in {self.nbytes / 2**20:.1f} MiB on {self.device} "
                f"({self.nbytes / max(n, 1) / 2**20:.2f} MiB = {self.nbytes / max(n, 1):,.0f} bytes per case; "
                f"points float32, distances float32 (K={self.num_classes}))")


def _uniform(shape, gen, device, low=0.0, high=1.0) -> torch.Tensor:
    return torch.rand(shape, generator=gen, device=device, dtype=torch.float64) * (high - low) + low


def _rank(keys: torch.Tensor) -> torch.Tensor:
    """Rank of each entry along the last axis when sorted ascending (stable)."""
    order = torch.argsort(keys, dim=-1, stable=True)
    return torch.argsort(order, dim=-1, stable=True)


def _slots(counts: torch.Tensor, n: int) -> torch.Tensor:
    """(B, n) structure of each slot when ``counts`` (B, K) (summing to n per row) are laid out
    structure after structure (the loader's concatenation order)."""
    cum = counts.cumsum(dim=1)
    slots = torch.arange(n, device=counts.device).expand(counts.shape[0], n).contiguous()
    return torch.searchsorted(cum, slots, right=True).clamp_max(counts.shape[1] - 1)


def _pick(start: torch.Tensor, count: torch.Tensor, gen) -> torch.Tensor:
    """A uniform index in ``start .. start + count - 1`` for each entry (with replacement)."""
    u = torch.rand(start.shape, generator=gen, device=start.device, dtype=torch.float64)
    return start + (u * count).long().clamp_max((count - 1).clamp_min(0))


class DeviceSampler:
    """Builds training micro-batches from a :class:`DeviceCaseStore` on its device."""

    def __init__(self, store: DeviceCaseStore, data_cfg: DataConfig, mask_cfg: MaskConfig, augment, scale_mm: float,
                 masker: InputMasker, out_device: torch.device | str | None = None):
        self.store, self.cfg, self.mask_cfg, self.augment = store, data_cfg, mask_cfg, augment
        self.scale_mm = float(scale_mm)
        self.device = store.device
        self.out_device = torch.device(out_device) if out_device is not None else store.device
        self.gen = torch.Generator(device=self.device)
        k = store.num_classes
        self.choices = torch.from_numpy(np.stack(masker.choices)).to(self.device) if masker.choices else \
            torch.zeros((0, k), dtype=torch.bool, device=self.device)
        self.choice_p = torch.from_numpy(masker.choice_p).to(self.device) if masker.choices else None

    # --- input masks (phase_masks.InputMasker.choose, batched) ------------------------------
    def input_masks(self, avail: torch.Tensor) -> torch.Tensor:
        kind, cfg, gen = self.mask_cfg.kind, self.mask_cfg, self.gen
        if kind == "all":
            return avail.clone()
        if kind == "drop_random":
            return self._drop(avail, cfg.drop_min, cfg.drop_max)
        if kind == "subsets":
            usable = (self.choices[None] & avail[:, None]).any(-1)  # (B, C)
            p = self.choice_p[None] * usable
            none = ~usable.any(dim=1)
            p = torch.where(none[:, None], torch.ones_like(p), p)
            pick = torch.multinomial(p, 1, generator=gen).squeeze(1)
            out = torch.where(none[:, None], avail, self.choices[pick] & avail)
            if cfg.random_drop_prob > 0:
                mixed = _uniform(avail.shape[:1], gen, self.device) < cfg.random_drop_prob
                out = torch.where(mixed[:, None], self._drop(avail, cfg.drop_min, cfg.drop_max), out)
            return out
        if kind == "annotated":
            out = avail.clone()
            if cfg.extra_drop_prob > 0:
                extra = _uniform(avail.shape[:1], gen, self.device) < cfg.extra_drop_prob
                out = torch.where(extra[:, None], self._drop(avail, 1, cfg.extra_drop_max), out)
            return out
        raise ValueError(f"unknown mask kind {kind!r}")

    def _drop(self, avail: torch.Tensor, low: int, high: int) -> torch.Tensor:
        n_present = avail.sum(dim=1)
        max_drop = (n_present - max(1, int(self.mask_cfg.min_keep))).clamp_min(0)
        hi = max_drop.clamp_max(high)
        lo = hi.clamp_max(low)
        n_drop = lo + (_uniform(hi.shape, self.gen, self.device) * (hi - lo + 1)).long().clamp_max(hi - lo)
        n_drop = torch.where(hi > 0, n_drop, torch.zeros_like(n_drop))
        keys = torch.where(avail, _uniform(avail.shape, self.gen, self.device), torch.full_like(avail, 2.0, dtype=torch.float64))
        return avail & (_rank(keys) >= n_drop[:, None])

    # --- counts --------------------------------------------------------------------------------
    def encoder_counts(self, sizes: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """(B, K) encoder points per structure (select_encoder_points' rule)."""
        n = self.cfg.num_input_points
        sizes = sizes.to(torch.float64) * inputs
        n_in = inputs.sum(dim=1)
        floor = (n // n_in).clamp_max(self.cfg.min_points_per_structure)
        remaining = n - floor * n_in
        share = remaining[:, None] * sizes / sizes.sum(dim=1, keepdim=True)
        whole = torch.floor(share)
        counts = (floor[:, None] + whole.long()) * inputs
        frac = torch.where(inputs, share - whole, torch.full_like(share, -1.0))
        leftover = n - counts.sum(dim=1)
        counts += ((_rank(-frac) < leftover[:, None]) & inputs).long()
        return counts

    def balanced_counts(self, members: torch.Tensor, n: int) -> torch.Tensor:
        """(B, K): ``n`` shared equally among ``members``, the remainder to random members."""
        m = members.sum(dim=1).clamp_min(1)
        base, rem = n // m, n % m
        keys = torch.where(members, _uniform(members.shape, self.gen, self.device),
                           torch.full_like(members, 2.0, dtype=torch.float64))
        extra = _rank(keys) < rem[:, None]
        return (base[:, None] + extra.long()) * members

    # --- one micro-batch ------------------------------------------------------------------------
    @torch.no_grad()
    def batch(self, items: list[tuple[int, int]]) -> dict:
        """A collated micro-batch (the keys of :func:`heart_training.data.dataset.collate`) for the
        plan items ``[(case_index, sample_seed), ...]``; the generator is seeded from the first."""
        st, cfg, dev = self.store, self.cfg, self.device
        self.gen.manual_seed(int(items[0][1]) * 2 + 1 & 0x7FFF_FFFF_FFFF_FFFF)
        ci = torch.tensor([int(i) for i, _ in items], dtype=torch.long)
        if dev.type == "cuda":  # from pinned memory without waiting (a plain copy waits for the GPU's queue)
            ci = ci.pin_memory().to(dev, non_blocking=True)
        b, k = len(items), st.num_classes
        annotated = st.annotated[ci]
        surf_count = st.t_surf_count[ci]
        inputs = self.input_masks(annotated & (surf_count > 0))
        centre = (st.surf_sum[ci] * inputs[..., None]).sum(1) / (surf_count * inputs).sum(1, keepdim=True)
        centre = centre.float()

        # encoder points
        n_enc = cfg.num_input_points
        enc_s = _slots(self.encoder_counts(surf_count, inputs), n_enc)
        enc_idx = _pick(torch.gather(st.t_surf_start[ci], 1, enc_s), torch.gather(surf_count, 1, enc_s), self.gen)
        perm = torch.argsort(torch.rand((b, n_enc), generator=self.gen, device=dev), dim=1)
        enc_idx, enc_s = torch.gather(enc_idx, 1, perm), torch.gather(enc_s, 1, perm)

        # queries
        nv, nn_, ns = cfg.num_volume_queries, cfg.num_near_queries, cfg.num_surface_queries
        vol_idx = _pick(st.t_vol_start[ci, None].expand(b, nv), st.t_vol_count[ci, None].expand(b, nv), self.gen)
        near_count = st.t_near_count[ci]
        if cfg.query_balance == "structure":
            near_s = _slots(self.balanced_counts(annotated & (near_count > 0), nn_), nn_)
            near_idx = _pick(torch.gather(st.t_near_start[ci], 1, near_s), torch.gather(near_count, 1, near_s), self.gen)
            surf_s = _slots(self.balanced_counts(annotated & (surf_count > 0), ns), ns)
        else:
            near_idx = _pick(st.near_case_start[ci, None].expand(b, nn_), st.near_total[ci, None].expand(b, nn_), self.gen)
            weights = (surf_count * annotated).to(torch.float64)
            surf_s = torch.multinomial(weights, ns, replacement=True, generator=self.gen) if ns > 0 else \
                torch.zeros((b, 0), dtype=torch.long, device=dev)
        surf_idx = _pick(torch.gather(st.t_surf_start[ci], 1, surf_s), torch.gather(surf_count, 1, surf_s), self.gen)

        q_mm = torch.cat([st.vol_xyz[vol_idx], st.near_xyz[near_idx], st.surf_xyz[surf_idx]], dim=1)
        surf_target = torch.full((b, ns, k), float("nan"), device=dev)
        surf_target.scatter_(2, surf_s[..., None], 0.0)
        target = torch.cat([st.vol_sdf[vol_idx], st.near_sdf[near_idx], surf_target], dim=1)
        kind = torch.cat([torch.full((nv,), QUERY_VOLUME, device=dev), torch.full((nn_,), QUERY_NEAR, device=dev),
                          torch.full((ns,), QUERY_SURFACE, device=dev)]).expand(b, -1)
        valid = torch.isfinite(target) & annotated[:, None, :]
        valid &= self._truncation_keep(ci, q_mm, target)

        # augmentation about the centre
        rot, scale, shift = self._augmentation(b)
        enc_mm = st.surf_xyz[enc_idx]

        def to_network(points_mm):
            moved = scale[:, None, None] * torch.einsum("bnj,bij->bni", points_mm - centre[:, None], rot)
            return (moved + shift[:, None]) / self.scale_mm

        target_n = torch.where(valid, target, torch.zeros_like(target)) * scale[:, None, None] / self.scale_mm
        out = {
            "enc_points": to_network(enc_mm),
            "enc_onehot": torch.nn.functional.one_hot(enc_s, k).float(),
            "queries": to_network(q_mm),
            "target": target_n,
            "target_mask": valid,
            "query_kind": kind.contiguous(),
            "input_mask": inputs,
            "annotated": annotated,
            "centre_mm": centre,
            "scale": scale,
        }
        if self.out_device != dev:
            out = {key: v.to(self.out_device, non_blocking=True) for key, v in out.items()}
        out["case_id"] = [st.refs[i].case_id for i, _ in items]
        out["dataset"] = [st.refs[i].dataset for i, _ in items]
        return out

    def _augmentation(self, b: int):
        dev, gen, aug = self.device, self.gen, self.augment
        rot = torch.eye(3, device=dev).expand(b, 3, 3)
        scale = torch.ones(b, device=dev)
        shift = torch.zeros((b, 3), device=dev)
        if aug is None:
            return rot, scale, shift
        if aug.rotation_deg > 0:
            axis = torch.randn((b, 3), generator=gen, device=dev)
            axis = axis / axis.norm(dim=1, keepdim=True)
            angle = _uniform((b,), gen, dev, -math.radians(aug.rotation_deg), math.radians(aug.rotation_deg)).float()
            zero = torch.zeros(b, device=dev)
            kx = torch.stack([zero, -axis[:, 2], axis[:, 1], axis[:, 2], zero, -axis[:, 0],
                              -axis[:, 1], axis[:, 0], zero], dim=1).reshape(b, 3, 3)
            rot = rot + torch.sin(angle)[:, None, None] * kx + (1 - torch.cos(angle))[:, None, None] * (kx @ kx)
        if aug.scale > 0:
            lim = math.log1p(aug.scale)
            scale = torch.exp(_uniform((b,), gen, dev, -lim, lim)).float()
        if aug.translation_mm > 0:
            shift = _uniform((b, 3), gen, dev, -aug.translation_mm, aug.translation_mm).float()
        return rot, scale, shift

    def _truncation_keep(self, ci: torch.Tensor, q_mm: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """(B, Q, K): False where a truncated structure's target is unreliable
        (``HeartCaseDataset._truncation_keep``)."""
        st, mode = self.store, self.mask_cfg.truncated
        truncated = st.truncated[ci]  # (B, K)
        if mode == "ignore":
            return torch.ones_like(target, dtype=torch.bool)
        if mode == "structure":
            return ~truncated[:, None, :].expand_as(target)
        ijk = torch.einsum("bnj,bij->bni", q_mm, st.ijk_linear[ci]) + st.ijk_offset[ci][:, None]
        shape = st.shape[ci][:, None]
        border = (torch.minimum(ijk + 0.5, shape - 0.5 - ijk) * st.spacing[ci][:, None]).amin(dim=2)  # (B, Q)
        keep = border[..., None] > target.nan_to_num(0.0).abs() + self.mask_cfg.truncation_margin_mm
        keep &= st.has_border[ci][:, None, None]
        return torch.where(truncated[:, None, :], keep, torch.ones_like(keep))


def build_device_sampler(dataset: HeartCaseDataset, data_cfg: DataConfig, mask_cfg: MaskConfig, augment,
                         scale_mm: float, device: torch.device) -> DeviceSampler:
    """The sampler of ``data.device_cache``: cases on ``device`` (``data.device_cache_memory:
    device``) or in pinned host memory, sampled there and the batch copied to ``device``
    (``pinned``)."""
    place = data_cfg.device_cache_memory
    if place not in DEVICE_CACHE_MEMORY:
        raise ValueError(f"data.device_cache_memory {place!r} is not one of {DEVICE_CACHE_MEMORY}")
    store_device = device if place == "device" else torch.device("cpu")
    store = DeviceCaseStore(dataset, store_device, pin=place == "pinned" and device.type == "cuda")
    return DeviceSampler(store, data_cfg, mask_cfg, augment, scale_mm, dataset.masker, out_device=device)
