"""Trainer data side: configs, phase masks, samples (normalisation, augmentation, truncation), losses.

Real .npz cases (analytic hearts with exact distances), real tensors; no training here (fast).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from fixtures_training import analytic_heart, write_analytic_case, write_case_lists
from heart_training.config import AugmentConfig, ConfigError, DataConfig, LossConfig, MaskConfig, load_config
from heart_training.data.case_format import load_case, save_case
from heart_training.data.dataset import (
    QUERY_NEAR,
    QUERY_SURFACE,
    QUERY_VOLUME,
    CaseRef,
    HeartCaseDataset,
    MixingSampler,
    collate,
    read_case_list,
)
from heart_training.data.phase_masks import InputMasker, simulate_masks
from heart_training.train.losses import compute_losses

from HeartCompletionLib.geometry.normalization import Normalization
from HeartCompletionLib.structures.table import StructureTable

TABLE = StructureTable.default()
K = len(TABLE)


@pytest.fixture(scope="module")
def case_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("cases")
    write_analytic_case(d / "a.npz", seed=0, num_surface=8000, num_volume=4000, num_near=6000)
    write_analytic_case(d / "b.npz", seed=1, num_surface=8000, num_volume=4000, num_near=6000, annotated=[0, 1, 2, 5])
    write_case_lists(d, ["a", "b"], ["b"])
    return d


def _dataset(case_dir, names=("a",), augment=None, mask=None, **data):
    refs = [CaseRef("t", case_dir / f"{n}.npz", n) for n in names]
    sizes = dict(num_input_points=256, min_points_per_structure=8, num_volume_queries=200, num_near_queries=300,
                 num_surface_queries=100)
    cfg = DataConfig(**{**sizes, **data})
    return HeartCaseDataset(refs, TABLE, Normalization(100.0), cfg, mask or MaskConfig(), augment)


# --- config ----------------------------------------------------------------------------------
def test_bundled_configs_load_and_name_their_phase():
    for phase in (1, 2, 3, 4):
        cfg = load_config(f"phase{phase}")
        assert cfg.phase == phase
        assert cfg.mask.kind == {1: "all", 2: "drop_random", 3: "subsets", 4: "annotated"}[phase]
    assert load_config("phase4").loss.exclusion > 0
    assert load_config("smoke").model.config == "tiny"


def test_config_rejects_unknown_keys_and_bad_values(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*optim.lrr"):
        load_config(bad)
    with pytest.raises(ConfigError, match="must be an integer"):
        load_config("tiny_test", ["optim.batch_size=two"])
    with pytest.raises(ConfigError, match="data_dir"):
        load_config("tiny_test").validate()
    cfg = load_config("tiny_test", [f"data.datasets.0.data_dir={tmp_path}", "optim.lr=1e-4", "mask.kind=subsets"])
    assert cfg.validate().optim.lr == 1e-4 and cfg.data.datasets[0].data_dir == str(tmp_path)


# --- phase masks ---------------------------------------------------------------------------------
def test_phase_masks_produce_the_intended_input_sets():
    rng = np.random.default_rng(0)
    full = np.ones(K, bool)
    assert InputMasker(MaskConfig(kind="all"), TABLE).choose(full, rng).all()

    drop = InputMasker(MaskConfig(kind="drop_random", drop_min=2, drop_max=5), TABLE)
    sizes = {int(drop.choose(full, rng).sum()) for _ in range(400)}
    assert sizes == {5, 6, 7, 8}  # 10 minus 2..5
    few = np.zeros(K, bool)
    few[[2, 4]] = True  # only two annotated: at least one must stay
    for _ in range(50):
        m = drop.choose(few, rng)
        assert m.sum() >= 1 and not (m & ~few).any()

    subsets = InputMasker(MaskConfig(kind="subsets"), TABLE)
    a = set(TABLE.subset(["Myocardium", "LA", "LV", "RA", "RV"]))
    seen = {frozenset(TABLE[i].name for i in np.flatnonzero(subsets.choose(full, rng))) for _ in range(200)}
    assert seen == {frozenset(s.name for s in a), frozenset(TABLE.names) - frozenset(s.name for s in a),
                    frozenset(TABLE.names)}

    # phase 3 mixed with random drops: about half the masks are named subsets, the rest drop 1-5
    mixed = InputMasker(MaskConfig(kind="subsets", subset_choices=["A", "B"], random_drop_prob=0.5, drop_min=1,
                                   drop_max=5), TABLE)
    named = {frozenset(s.name for s in a), frozenset(TABLE.names) - frozenset(s.name for s in a)}
    drawn = [frozenset(TABLE[i].name for i in np.flatnonzero(mixed.choose(full, rng))) for _ in range(1000)]
    share_named = np.mean([d in named for d in drawn])
    assert 0.45 < share_named < 0.6  # 0.5 + the drops of exactly 5 that hit a named subset (2/252 of 1/5)
    assert {len(d) for d in drawn if d not in named} == {5, 6, 7, 8, 9}
    with pytest.raises(ValueError, match="random_drop_prob"):
        InputMasker(MaskConfig(kind="subsets", random_drop_prob=1.5), TABLE)

    partial = np.zeros(K, bool)
    partial[[0, 2, 5]] = True
    annotated = InputMasker(MaskConfig(kind="annotated", extra_drop_prob=0.5, extra_drop_max=2), TABLE)
    masks = [annotated.choose(partial, rng) for _ in range(200)]
    assert all(m.sum() >= 1 and not (m & ~partial).any() for m in masks)
    assert any(m.sum() == 3 for m in masks) and any(m.sum() < 3 for m in masks)

    stats = simulate_masks(drop, [full], draws=500)
    assert 0.4 < stats.frequencies().mean() < 0.8  # 5..8 of 10 kept on average
    assert "input frequency" in stats.summary(TABLE.names)


# --- samples -------------------------------------------------------------------------------------
def test_sample_uses_only_input_structures_and_network_units(case_dir):
    mask = MaskConfig(kind="subsets", subset_choices=["A"])
    ds = _dataset(case_dir, mask=mask)
    s = ds[(0, 3)]
    inputs = s["enc_onehot"].argmax(-1).unique().tolist()
    assert set(inputs) == {0, 1, 2, 3, 4} and s["input_mask"].sum() == 5
    case = load_case(case_dir / "a.npz")
    # centre = mean of the input structures' surface samples (mm, case frame)
    keep = np.isin(case["surface_labels"], [0, 1, 2, 3, 4])
    np.testing.assert_allclose(s["centre_mm"].numpy(), case["surface_points"][keep].mean(0), atol=1e-3)
    # encoder points are those surface samples in network units
    assert s["enc_points"].abs().max() < 1.0  # a heart is ~ +-0.6 units at S = 100 mm
    # exact analytic distances: the target equals the sdf of the de-normalised query, / S
    prims = analytic_heart(0)
    q_mm = s["queries"].numpy().astype(np.float64) * 100.0 + s["centre_mm"].numpy() + case["origin_mm"]
    from fixtures_training import _sdf

    lv = np.array([_sdf(prims[2], q_mm[i:i + 1])[0] for i in range(len(q_mm))]) / 100.0
    ok = s["target_mask"][:, 2].numpy()
    np.testing.assert_allclose(s["target"][:, 2].numpy()[ok], lv[ok], atol=2e-5)
    kinds = s["query_kind"].numpy()
    assert (kinds == QUERY_VOLUME).sum() == 200 and (kinds == QUERY_NEAR).sum() == 300
    assert (kinds == QUERY_SURFACE).sum() == 100
    # surface queries: exactly one valid target (their own structure), value 0
    surf = s["target_mask"][kinds == QUERY_SURFACE]
    assert (surf.sum(-1) == 1).all() and (s["target"][kinds == QUERY_SURFACE][surf] == 0).all()


def test_augmentation_scales_targets_with_the_points_and_never_mirrors(case_dir):
    plain = _dataset(case_dir)[(0, 11)]
    aug = _dataset(case_dir, augment=AugmentConfig(rotation_deg=15, translation_mm=5, scale=0.1))[(0, 11)]
    s = float(aug["scale"])
    assert s != 1.0 and 1 / 1.1 - 1e-6 <= s <= 1.1 + 1e-6
    torch.testing.assert_close(aug["target"], plain["target"] * s, rtol=1e-5, atol=1e-7)
    # pairwise distances scale by s: rotation + scale + shift, a similarity transform
    qa, qp = aug["queries"].double(), plain["queries"].double()
    da = torch.cdist(qa[:50], qa[50:100])
    dp = torch.cdist(qp[:50], qp[50:100])
    torch.testing.assert_close(da, dp * s, rtol=1e-4, atol=1e-6)
    # proper rotation (no flip): the orientation of point triples is preserved
    def orient(q):
        return torch.det(torch.stack([q[1] - q[0], q[2] - q[0], q[3] - q[0]]))
    for i in range(0, 40, 4):
        assert torch.sign(orient(qa[i:i + 4])) == torch.sign(orient(qp[i:i + 4]))


def test_unannotated_and_truncated_targets_are_masked(case_dir, tmp_path):
    ds = _dataset(case_dir, names=("b",))
    s = ds[(0, 0)]
    annotated = np.zeros(K, bool)
    annotated[[0, 1, 2, 5]] = True
    assert not s["target_mask"][:, ~annotated].any()
    assert s["target_mask"][:, annotated].any(0).all()
    assert set(s["enc_onehot"].argmax(-1).unique().tolist()) <= {0, 1, 2, 5}

    # LAA cut by the image box: near_cut keeps its targets only away from the border
    case = load_case(case_dir / "a.npz")
    meta = dict(case.pop("meta"))
    case["truncated"] = np.zeros(K, bool)
    case["truncated"][7] = True
    laa = case["surface_points"][case["surface_labels"] == 7]
    affine = np.asarray(meta["affine"])
    lo = laa.min(0) + case["origin_mm"]  # put the box face through the middle of the LAA (x axis)
    cut_x = lo[0] + 0.5 * (laa.max(0)[0] - laa.min(0)[0])
    shift = cut_x - (affine[0, 3] - 0.5 * affine[0, 0])
    affine[0, 3] += shift
    meta["affine"], meta["shape"] = affine.tolist(), meta["shape"]
    meta.pop("format"), meta.pop("format_version")
    save_case(tmp_path / "cut.npz", case, meta)
    near_cut = _dataset(tmp_path, names=("cut",), mask=MaskConfig(truncated="near_cut"))[(0, 0)]
    whole = _dataset(tmp_path, names=("cut",), mask=MaskConfig(truncated="structure"))[(0, 0)]
    ignore = _dataset(tmp_path, names=("cut",), mask=MaskConfig(truncated="ignore"))[(0, 0)]
    rows = near_cut["query_kind"] != QUERY_SURFACE  # surface rows carry only their own structure
    assert not whole["target_mask"][:, 7].any()
    assert ignore["target_mask"][rows, 7].all()
    kept = near_cut["target_mask"][:, 7]
    assert 0 < kept[rows].sum() < rows.sum()
    q_mm = near_cut["queries"].numpy() * 100 + near_cut["centre_mm"].numpy() + case["origin_mm"]
    assert (q_mm[kept.numpy(), 0] > cut_x).all()  # every kept target lies inside the image box
    assert near_cut["target_mask"][rows][:, [0, 2]].all()  # other structures untouched


def test_case_lists_and_mixing_sampler(case_dir):
    spec = load_config("tiny_test", [f"data.datasets.0.data_dir={case_dir}"]).data.datasets[0]
    assert [r.case_id for r in read_case_list(spec, "train")] == ["a", "b"]
    assert [r.case_id for r in read_case_list(spec, "val")] == ["b"]
    sampler = MixingSampler([2, 3], [1.0, 3.0], num_samples=400, seed=1)
    plan = sampler.plan(0)
    from_second = np.mean([idx >= 2 for idx, _ in plan])
    assert 0.65 < from_second < 0.85  # weight 3:1
    ranks = [list(MixingSampler([2, 3], [1.0, 3.0], 400, r, 2, seed=1)) for r in (0, 1)]
    assert sorted(ranks[0] + ranks[1]) == sorted(plan)
    sampler.set_position(0, 390)
    assert list(sampler) == plan[390:]


def test_cases_are_memory_mapped_and_deflated_files_still_load(case_dir, tmp_path):
    plain = load_case(case_dir / "a.npz")
    mapped = load_case(case_dir / "a.npz", mmap=True)
    assert isinstance(mapped["near_sdf"], np.memmap) and not mapped["near_sdf"].flags.writeable
    for key, value in plain.items():
        if key != "meta":
            np.testing.assert_array_equal(np.asarray(mapped[key]), value)
    # a dataset written deflated (older heart-prepare) reads the same, without maps
    arrays = {k: v for k, v in plain.items() if k != "meta"}
    np.savez_compressed(tmp_path / "old.npz", **arrays, meta=np.array(json.dumps(plain["meta"])))
    old = load_case(tmp_path / "old.npz", mmap=True)
    assert not isinstance(old["near_sdf"], np.memmap)
    np.testing.assert_array_equal(old["near_sdf"], plain["near_sdf"])
    # the training dataset reads through the maps and builds the same sample either way
    ds = _dataset(case_dir)
    assert isinstance(ds.load(0)["volume_sdf"], np.memmap)
    a, b = ds[(0, 5)], ds[(0, 5)]
    assert torch.equal(a["target"], b["target"]) and torch.equal(a["queries"], b["queries"])


def test_structure_balanced_queries_share_near_and_surface_points_equally(case_dir):
    ds = _dataset(case_dir, names=("b",), query_balance="structure", num_near_queries=400)
    s = ds[(0, 1)]
    kinds = s["query_kind"].numpy()
    annotated = [0, 1, 2, 5]
    # surface queries: exactly 25 on each annotated structure (their one valid target is theirs)
    owner = s["target_mask"][kinds == QUERY_SURFACE].numpy().argmax(-1)
    assert np.bincount(owner, minlength=K)[annotated].tolist() == [25, 25, 25, 25]
    # near queries: 100 drawn around each annotated structure (near_labels), where by area
    # the small ones would get far fewer
    from scipy.spatial import cKDTree

    case = load_case(case_dir / "b.npz", optional=("near_labels",))
    tree = cKDTree(case["near_points"])

    def near_owners(sample):
        q = sample["queries"].numpy()[sample["query_kind"].numpy() == QUERY_NEAR].astype(np.float64)
        dist, idx = tree.query(q * 100.0 + sample["centre_mm"].numpy())
        assert dist.max() < 1e-3  # each query is one of the case's near points
        return np.bincount(case["near_labels"][idx], minlength=K)[annotated]

    assert near_owners(s).tolist() == [100, 100, 100, 100]
    by_area = near_owners(_dataset(case_dir, names=("b",), query_balance="area", num_near_queries=400)[(0, 1)])
    assert by_area.min() < 60 < by_area.max()
    with pytest.raises(ConfigError, match="query_balance"):
        load_config("tiny_test", ["data.query_balance=equal"]).validate()


def test_grouped_and_shuffled_owners_give_the_same_groups():
    from heart_training.data.dataset import _groups

    rng = np.random.default_rng(0)
    owners = np.sort(rng.integers(0, K, size=500)).astype(np.int8)
    shuffled = rng.permutation(500)
    base = {"annotated": np.ones(K, bool), "surface_labels": owners}
    grouped = _groups(dict(base), "surface")
    scattered = _groups({**base, "surface_labels": owners[shuffled]}, "surface")
    for s in range(K):
        np.testing.assert_array_equal(grouped[s], np.flatnonzero(owners == s))
        np.testing.assert_array_equal(np.sort(shuffled[scattered[s]]), grouped[s])


def test_bad_case_file_is_named(tmp_path):
    (tmp_path / "broken.npz").write_bytes(b"not a zip")
    ds = HeartCaseDataset([CaseRef("t", tmp_path / "broken.npz", "broken")], TABLE, Normalization(),
                          DataConfig(), MaskConfig(), None)
    with pytest.raises(ValueError, match="broken.npz"):
        ds[(0, 0)]


# --- losses --------------------------------------------------------------------------------------
def test_masked_structures_get_exactly_zero_gradient_from_targets(case_dir):
    batch = collate([_dataset(case_dir, names=("b",))[(0, i)] for i in range(2)])
    # garbage in the masked targets must not matter
    batch["target"] = torch.where(batch["target_mask"], batch["target"], torch.full_like(batch["target"], 1e6))
    pred = torch.randn(batch["target"].shape, requires_grad=True)
    cfg = LossConfig(volume=1, near=1, surface=1, eikonal=0, kl=0, exclusion=0)
    compute_losses(pred, batch, cfg).total.backward()
    annotated = batch["annotated"][0]
    assert torch.count_nonzero(pred.grad[..., ~annotated]) == 0
    assert (pred.grad[..., annotated].abs().sum((0, 1)) > 0).all()


def test_first_loss_equals_mean_abs_target_and_exclusion_hinge(case_dir):
    batch = collate([_dataset(case_dir, names=("b",))[(0, i)] for i in range(2)])
    zero = torch.zeros(batch["target"].shape, requires_grad=True)
    res = compute_losses(zero, batch, LossConfig(exclusion=1.0, kl=0))
    m = batch["target_mask"] & (batch["query_kind"][..., None] == QUERY_NEAR)
    expected = np.mean([batch["target"][i][m[i]].abs().mean() for i in range(2)])
    assert float(res.terms["near"]) == pytest.approx(float(expected), rel=1e-5)
    # exclusion: points inside an annotated structure push the unannotated ones outside
    assert float(res.terms["exclusion"]) > 0
    res.total.backward()
    unannotated = ~batch["annotated"][0]
    assert (zero.grad[..., unannotated] < 0).any()  # gradient descent raises their sdf there
    far_outside = torch.full(batch["target"].shape, 1.0)
    assert float(compute_losses(far_outside, batch, LossConfig(exclusion=1.0)).terms["exclusion"]) == 0.0


def test_iou_counts_match_a_direct_computation(case_dir):
    batch = collate([_dataset(case_dir)[(0, 0)]])
    noisy = batch["target"] + 0.003 * torch.randn(batch["target"].shape, generator=torch.Generator().manual_seed(0))
    res = compute_losses(noisy, batch, LossConfig(kl=0))
    m = batch["target_mask"][0] & (batch["query_kind"][0][:, None] != QUERY_SURFACE)
    p, t = (noisy[0] < 0) & m, (batch["target"][0] < 0) & m
    np.testing.assert_array_equal(res.intersection.numpy(), (p & t).sum(0).numpy())
    np.testing.assert_array_equal(res.union.numpy(), (p | t).sum(0).numpy())
    assert json.dumps({"ok": True})
