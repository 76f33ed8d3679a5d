"""The device-resident data path (``data.device_cache``, :mod:`heart_training.data.device_data`) draws
from the same distribution as the loader (:meth:`HeartCaseDataset.make_sample`).

Real .npz cases (analytic hearts with exact distances; one with two structures flagged as cut by
the image border, one annotating only some structures), both paths run on the same plan of cases,
and their statistics are compared: input-mask frequencies per phase, encoder points per structure
(exactly), per-structure query counts, distance distributions (two-sample Kolmogorov-Smirnov),
the truncation mask, augmentation ranges. A control shows the comparison catches a wrong sampler.
The resume test with the option on is in test_training_run.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fixtures_training import write_analytic_case, write_case_lists
from heart_training.config import AugmentConfig, DataConfig, MaskConfig
from heart_training.data.case_format import OPTIONAL_KEYS, load_case, save_case
from heart_training.data.dataset import (
    QUERY_NEAR,
    QUERY_SURFACE,
    QUERY_VOLUME,
    CaseRef,
    HeartCaseDataset,
    MixingSampler,
    collate,
)
from heart_training.data.device_data import DeviceCaseStore, DeviceSampler
from heart_training.data.phase_masks import InputMasker, simulate_masks
from scipy.stats import ks_2samp

from HeartCompletionLib.geometry.normalization import Normalization
from HeartCompletionLib.model.encoder_input import select_encoder_points
from HeartCompletionLib.structures.table import StructureTable

TABLE = StructureTable.default()
K = len(TABLE)
S = 100.0
SAMPLES = 400  #: per path; the loader builds them one by one (~3 s)
TRUNCATED = [7, 9]  #: LAA and PV of case "a" are flagged as cut by the image border
PARTIAL = [0, 1, 2, 3, 4, 5, 7, 9]  #: what case "b" annotates
AUGMENT = AugmentConfig(rotation_deg=10.0, translation_mm=5.0, scale=0.05)
SIZES = dict(num_input_points=256, min_points_per_structure=8, num_volume_queries=200, num_near_queries=300,
             num_surface_queries=100)


@pytest.fixture(scope="module")
def case_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("device_cases")
    write_analytic_case(d / "a.npz", seed=0, num_surface=6000, num_volume=3000, num_near=4000)
    write_analytic_case(d / "b.npz", seed=1, num_surface=6000, num_volume=3000, num_near=4000, annotated=PARTIAL)
    case = load_case(d / "a.npz", optional=tuple(OPTIONAL_KEYS))
    meta = case.pop("meta")
    case["truncated"] = case["truncated"].copy()
    case["truncated"][TRUNCATED] = True
    save_case(d / "a.npz", case, {k: v for k, v in meta.items() if k not in ("format", "format_version")})
    write_case_lists(d, ["a", "b"], [])
    return d


def _paths(case_dir, mask: MaskConfig, augment=AUGMENT, names=("a", "b"), **data):
    refs = [CaseRef("t", case_dir / f"{n}.npz", n) for n in names]
    ds = HeartCaseDataset(refs, TABLE, Normalization(S), DataConfig(**{**SIZES, **data}), mask, augment)
    return ds, DeviceSampler(DeviceCaseStore(ds, "cpu"), ds.data_cfg, mask, augment, S, ds.masker)


def _draw(ds, dev, n=SAMPLES, batch=40, seed=3):
    """``n`` samples of each path over the same plan of cases (MixingSampler, as the trainer)."""
    plan = MixingSampler([len(ds)], [1.0], n, seed=seed).plan(0)
    loader = collate([ds[key] for key in plan])
    device = [dev.batch(plan[i: i + batch]) for i in range(0, n, batch)]
    device = {k: torch.cat([b[k] for b in device]) if torch.is_tensor(device[0][k]) else sum((b[k] for b in device), [])
              for k in device[0]}
    return loader, device


def _rows(b, kind):
    return b["query_kind"][0] == kind


def _near_owner_counts(b) -> np.ndarray:
    """(B, K) near queries per structure, the owner taken as the annotated structure nearest to
    the query (the rule of dataset._groups for cases without near_labels)."""
    rows = _rows(b, QUERY_NEAR)
    t = b["target"][:, rows].abs().masked_fill(~b["target_mask"][:, rows], float("inf"))
    owner = t.argmin(dim=2)
    return torch.nn.functional.one_hot(owner, K).sum(1).numpy()


def _surface_counts(b) -> np.ndarray:
    """(B, K) surface queries per structure (the structure whose target is set on the row)."""
    return b["target_mask"][:, _rows(b, QUERY_SURFACE)].sum(1).numpy()


@pytest.fixture(scope="module")
def phase4_draws(case_dir):
    """Phase-4 masks (annotated + extra drops), augmentation, near-cut truncation, balanced queries."""
    mask = MaskConfig(kind="annotated", extra_drop_prob=0.5, extra_drop_max=3, truncated="near_cut")
    ds, dev = _paths(case_dir, mask)
    return (ds, dev, *_draw(ds, dev))


def test_batches_have_the_loaders_keys_shapes_and_dtypes(phase4_draws):
    _, _, loader, device = phase4_draws
    assert loader.keys() == device.keys()
    for key, value in loader.items():
        if torch.is_tensor(value):
            assert device[key].shape == value.shape and device[key].dtype == value.dtype, key
        else:
            assert device[key] == value, key  # same plan: same cases in the same order
    for b in (loader, device):
        assert torch.isfinite(b["queries"]).all() and torch.isfinite(b["target"]).all()
        # case "b" never has a target for the structures it does not annotate
        rows_b = np.array([c == "b" for c in b["case_id"]])
        missing = [s for s in range(K) if s not in PARTIAL]
        assert not b["target_mask"][torch.from_numpy(rows_b)][..., missing].any()
        assert not b["input_mask"][torch.from_numpy(rows_b)][:, missing].any()


def test_input_masks_and_encoder_points_per_structure(phase4_draws):
    ds, _, loader, device = phase4_draws
    freq_l, freq_d = loader["input_mask"].float().mean(0), device["input_mask"].float().mean(0)
    print("input frequency loader", np.round(freq_l.numpy(), 3), "device", np.round(freq_d.numpy(), 3))
    # binomial standard error at 400 samples <= 0.025: 0.1 is 4 of them
    assert (freq_l - freq_d).abs().max() < 0.1
    sizes_l, sizes_d = loader["input_mask"].sum(1).float(), device["input_mask"].sum(1).float()
    assert abs(float(sizes_l.mean() - sizes_d.mean())) < 0.3
    # encoder points per structure: exactly select_encoder_points' counts for the sample's inputs
    labels = {ref.case_id: ds.load(i)["surface_labels"] for i, ref in enumerate(ds.refs)}
    for b in (loader, device):
        got = b["enc_onehot"].sum(1).long().numpy()
        for row in range(0, SAMPLES, 7):
            lab = labels[b["case_id"][row]]
            inputs = np.flatnonzero(b["input_mask"][row].numpy())
            idx = select_encoder_points(lab, inputs, SIZES["num_input_points"], np.random.default_rng(0),
                                        min_per_structure=SIZES["min_points_per_structure"])
            np.testing.assert_array_equal(got[row], np.bincount(lab[idx], minlength=K)[:K])


def _balance_difference(loader, device) -> float:
    """Largest difference of the mean per-structure near/surface query counts, as a share of
    the queries of the kind."""
    near = np.abs(_near_owner_counts(loader).mean(0) - _near_owner_counts(device).mean(0)).max() / SIZES["num_near_queries"]
    surf = np.abs(_surface_counts(loader).mean(0) - _surface_counts(device).mean(0)).max() / SIZES["num_surface_queries"]
    return float(max(near, surf))


def test_query_counts_per_structure_match(phase4_draws):
    _, _, loader, device = phase4_draws
    for b in (loader, device):
        # balanced surface queries: every annotated, uncut structure gets 100 // m or one more
        counts = _surface_counts(b)
        for row in range(SAMPLES):
            annotated = b["annotated"][row].numpy().copy()
            m = annotated.sum()
            if b["case_id"][row] == "a":
                annotated[TRUNCATED] = False  # some of their surface rows are masked near the cut
            got = counts[row][annotated]
            assert set(got.tolist()) <= {100 // m, 100 // m + 1}, (row, got)
    print("near counts loader", _near_owner_counts(loader).mean(0).round(1), "device",
          _near_owner_counts(device).mean(0).round(1))
    difference = _balance_difference(loader, device)
    print("largest per-structure count difference (share of the kind's queries)", round(difference, 4))
    assert difference < 0.01


def test_balance_comparison_catches_a_sampler_with_area_balance(case_dir, phase4_draws):
    """Control: the same comparison flags a device sampler that shares queries by area."""
    _, _, loader, _ = phase4_draws
    mask = MaskConfig(kind="annotated", extra_drop_prob=0.5, extra_drop_max=3, truncated="near_cut")
    ds, dev = _paths(case_dir, mask, query_balance="area")
    plan = MixingSampler([len(ds)], [1.0], 120, seed=3).plan(0)
    area = [dev.batch(plan[i: i + 40]) for i in range(0, 120, 40)]
    area = {k: torch.cat([b[k] for b in area]) for k in ("target", "target_mask", "query_kind")}
    sub = {k: loader[k][:120] for k in ("target", "target_mask", "query_kind")}
    difference = _balance_difference(sub, area)
    print("control: largest per-structure count difference with area balance", round(difference, 4))
    assert difference > 0.05


def test_distances_truncation_and_augmentation_match(phase4_draws):
    _, _, loader, device = phase4_draws
    report = {}
    for name, kind in (("volume", QUERY_VOLUME), ("near", QUERY_NEAR)):
        rows = _rows(loader, kind)
        a = loader["target"][:, rows][loader["target_mask"][:, rows]].numpy()
        b = device["target"][:, rows][device["target_mask"][:, rows]].numpy()
        report[name] = ks_2samp(a, b).statistic
        # network units (S = 100 mm): the analytic hearts' padded boxes are ~200 mm across, so
        # distances stay under 3 units; in mm they would reach the hundreds
        assert 0.5 < np.abs(a).max() < 3.0 and 0.5 < np.abs(b).max() < 3.0
    # the truncation mask: share of valid volume/near targets of the cut structures of case "a"
    for name, kind in (("volume", QUERY_VOLUME), ("near", QUERY_NEAR)):
        shares = []
        for b in (loader, device):
            rows_a = torch.tensor([c == "a" for c in b["case_id"]])
            valid = b["target_mask"][rows_a][:, _rows(b, kind)]
            shares.append(valid[..., TRUNCATED].float().mean().item())
            assert valid[..., 0].float().mean() > 0.99  # an uncut structure keeps its targets
        report[f"truncated valid share {name}"] = shares
        assert 0.02 < shares[0] < 0.95 and abs(shares[0] - shares[1]) < 0.03, shares
    # augmentation: scale in [1/1.05, 1.05], log-uniform
    for b in (loader, device):
        assert 1 / 1.05 - 1e-6 <= b["scale"].min() and b["scale"].max() <= 1.05 + 1e-6
        assert b["scale"].min() < 0.96 and b["scale"].max() > 1.04
    report["scale"] = ks_2samp(loader["scale"].numpy(), device["scale"].numpy()).statistic
    print("KS statistics and shares", {k: np.round(v, 4) for k, v in report.items()})
    # 400 samples a path: the 0.1 % critical value of the two-sample KS statistic is 0.14 for
    # per-sample values; pooled query values are more numerous but correlated within a sample
    assert report["volume"] < 0.05 and report["near"] < 0.05
    assert report["scale"] < 0.14


def _structure_centroids(b) -> tuple[np.ndarray, np.ndarray]:
    """(B, K, 3) mean encoder point of each structure (mm) and (B, K) counts."""
    onehot = b["enc_onehot"]
    counts = onehot.sum(1)
    sums = torch.einsum("bnk,bni->bki", onehot, b["enc_points"])
    return (sums / counts.clamp_min(1)[..., None]).numpy() * S, counts.numpy()


def _fit_similarity(ref: np.ndarray, moved: np.ndarray, weights: np.ndarray):
    """Weighted Kabsch/Umeyama: ``moved ~ s R ref + t``; returns (angle in degrees, s, t)."""
    w = weights / weights.sum()
    p0, q0 = w @ ref, w @ moved
    p, q = ref - p0, moved - q0
    u, sigma, vt = np.linalg.svd((q * w[:, None]).T @ p)
    d = np.diag([1, 1, np.sign(np.linalg.det(u @ vt))])
    rot = u @ d @ vt
    scale = float(np.trace(np.diag(sigma) @ d) / (w @ (p ** 2).sum(1)))
    angle = np.degrees(np.arccos(np.clip((np.trace(rot) - 1) / 2, -1, 1)))
    return angle, scale, q0 - scale * rot @ p0


@pytest.mark.slow  # ~14 s on one loaded CPU thread; the 20,000-draw test below covers the fast tier
def test_rotation_scale_and_shift_ranges_match(case_dir):
    """Mask "all" on the fully annotated case: the mean encoder point of each structure is
    ``s R (m - c) + t`` of its unaugmented position, so a weighted similarity fit over the ten
    structures recovers each sample's rotation angle, scale and shift (mm)."""
    mask = MaskConfig(kind="all", truncated="ignore")
    ds0, dev0 = _paths(case_dir, mask, augment=None, names=("a",))
    ds, dev = _paths(case_dir, mask, names=("a",))
    fits = {}
    for name, path in (("loader", 0), ("device", 1)):
        ref = _draw(ds0, dev0, n=40)[path]
        ref_c = _structure_centroids(ref)[0].mean(0)
        b = _draw(ds, dev, n=SAMPLES)[path]
        cents, counts = _structure_centroids(b)
        fit = np.array([np.hstack(_fit_similarity(ref_c, c, n)) for c, n in zip(cents, counts)])
        fits[name] = fit
        scale = b["scale"].numpy()
        print(name, "scale fit error median/max", np.round(np.percentile(np.abs(fit[:, 1] - scale), [50, 100]), 4))
        assert np.median(np.abs(fit[:, 1] - scale)) < 0.015  # the fit recovers the applied scale
    print({name: {"angle p50/p95/max": np.percentile(f[:, 0], [50, 95, 100]).round(2),
                  "shift min": f[:, 2:].min(0).round(2), "shift max": f[:, 2:].max(0).round(2)}
           for name, f in fits.items()})
    ks = [ks_2samp(fits["loader"][:, col], fits["device"][:, col]).statistic for col in (0, 2, 3, 4)]
    print("KS angle, shift x/y/z", np.round(ks, 3))
    # rotation by at most 10 degrees, shift within 5 mm per axis, plus the fit's noise (~1-2 mm,
    # from the structures' centroids of 8-50 encoder points; the exact ranges: next test)
    for f in fits.values():
        assert f[:, 0].max() < 13 and 4 < np.median(f[:, 0]) < 7
        assert np.abs(f[:, 2:]).max() < 7 and (np.abs(f[:, 2:]).max(0) > 4).all()
    # 400 samples a path: 0.138 is the 0.1 % critical value of the two-sample KS statistic
    assert max(ks) < 0.138


def test_augmentation_draws_match_the_loaders_exactly_in_distribution():
    """The rotation angle, scale and shift of 20,000 device draws against the loader's formulas
    (dataset.random_rotation, the log-uniform scale, the uniform shift)."""
    from heart_training.data.dataset import random_rotation

    n = 20_000
    rng = np.random.default_rng(0)
    angles_np = np.array([np.degrees(np.arccos(np.clip((np.trace(random_rotation(10.0, rng)) - 1) / 2, -1, 1)))
                          for _ in range(n)])
    scales_np = np.exp(rng.uniform(-np.log1p(0.05), np.log1p(0.05), n))
    dev = DeviceSampler(_EmptyStore(), DataConfig(), MaskConfig(), AUGMENT, S, InputMasker(MaskConfig(), TABLE))
    dev.gen.manual_seed(0)
    rot, scale, shift = dev._augmentation(n)
    assert torch.allclose(rot @ rot.transpose(1, 2), torch.eye(3).expand(n, 3, 3), atol=1e-5)
    assert torch.allclose(torch.linalg.det(rot), torch.ones(n), atol=1e-5)  # proper rotations: no flips
    angles = np.degrees(np.arccos(np.clip((rot.diagonal(dim1=1, dim2=2).sum(-1).numpy() - 1) / 2, -1, 1)))
    assert angles.max() <= 10.0 + 1e-3 and scale.min() >= 1 / 1.05 - 1e-6 and scale.max() <= 1.05 + 1e-6
    assert shift.abs().max() <= 5.0 and shift.abs().max() > 4.99
    ks = ks_2samp(angles_np, angles).statistic, ks_2samp(scales_np, scale.numpy()).statistic
    print("KS angle, scale (20,000 draws)", np.round(ks, 4))
    assert max(ks) < 0.0195  # 20,000 draws: the 0.1 % critical value of the two-sample KS statistic


@pytest.mark.parametrize("mask", [
    MaskConfig(kind="drop_random", drop_min=2, drop_max=5),
    MaskConfig(kind="subsets", subset_choices=["A", "B", "A+B"], subset_weights=[2, 1, 1]),
    MaskConfig(kind="subsets", subset_choices=["A", "B"], random_drop_prob=0.5, drop_min=1, drop_max=5),
    MaskConfig(kind="annotated", extra_drop_prob=0.3, extra_drop_max=2),
], ids=["phase2", "phase3", "phase3_mixed", "phase4"])
def test_input_mask_frequencies_per_phase(mask):
    """The batched torch masks against InputMasker.choose over the same annotated masks."""
    full = np.ones(K, bool)
    partial = np.zeros(K, bool)
    partial[PARTIAL] = True
    draws = 4000
    masker = InputMasker(mask, TABLE)
    expected = simulate_masks(masker, [full, partial], draws, seed=0)
    ds = DeviceSampler(_EmptyStore(), DataConfig(), mask, None, S, masker)  # only the masks: no cases needed
    ds.gen.manual_seed(0)
    avail = torch.from_numpy(np.stack([full, partial] * (draws // 2)))
    got = ds.input_masks(avail).numpy()
    assert (got <= avail.numpy()).all() and got.any(1).all()
    freq = got.mean(0)
    sizes = np.bincount(got.sum(1), minlength=K + 1) / draws
    print(mask.kind, "frequency expected", expected.frequencies().round(3), "device", freq.round(3))
    np.testing.assert_allclose(freq, expected.frequencies(), atol=0.04)  # 4000 draws: s.e. <= 0.008
    np.testing.assert_allclose(sizes, expected.sizes / expected.count, atol=0.04)


class _EmptyStore:
    device = torch.device("cpu")
    num_classes = K


def test_config_fields_and_a_wrong_memory_place(case_dir):
    from heart_training.config import ConfigError, load_config

    cfg = load_config("tiny_test", [f"data.datasets.0.data_dir={case_dir}", "data.device_cache=true",
                                    "data.device_cache_memory=pinned", "run.compile=true"])
    assert cfg.data.device_cache and cfg.data.device_cache_memory == "pinned" and cfg.run.compile
    assert not load_config("phase1").data.device_cache and not load_config("phase1").run.compile  # off by default
    with pytest.raises(ConfigError, match="device_cache_memory 'gpu' is not one of"):
        load_config("tiny_test", [f"data.datasets.0.data_dir={case_dir}", "data.device_cache_memory=gpu"]).validate()
