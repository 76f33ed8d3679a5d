"""Phase 4 on real partial labels (issue 11, item 3).

- the samples and the loss of a partially annotated case touch only its annotated structures (plus
  the exclusion term, which pushes the others *outside* where an annotated one is inside);
- the mixing sampler draws each source at its weight;
- a tiny real run: 2 ACDC + 2 LA cases (real files; skipped when ``../shared/data/real`` is absent)
  and 2 full synthetic hearts, phase 4 (``phase4_real``) for a few steps from a tiny phase-1
  checkpoint; its log shows the draw shares, the targets per structure and zero targets on
  structures a case does not annotate.

Everything is real: heart-prepare's files, the dataset, the loss, the trainer.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real"
ACDC_CONVENTION = {"1": "RV", "2": "Myocardium", "3": "LV"}
WEIGHTS = {"synthetic": 0.5, "acdc_cmr": 0.3, "la2018_lgemri": 0.2}


def _options(convention=None):
    from heart_training.data.prepare import PrepareOptions

    # the default surface count: the data gate's unit check (|sdf| vs the distance to the nearest
    # surface sample) needs dense samples; at 30k an ACDC stack's median ratio is 0.59-0.64 (< 0.75)
    return PrepareOptions(convention=convention, num_surface=120_000, num_volume=3000, num_near=3000,
                          min_surface_per_structure=200)


def _prepare(raw: Path, out: Path, convention=None) -> Path:
    from heart_training.data.prepare_cli import prepare_dataset

    manifest = prepare_dataset(raw, out, _options(convention), workers=1, progress=False)
    assert manifest["summary"]["failed"] == 0, [c.get("reason") for c in manifest["cases"]]
    return out


def _synthetic_full(tmp: Path, seeds=(0, 1)) -> Path:
    from HeartCompletionLib.io.labelmap_files import write_label_map
    from HeartCompletionLib.io.synthetic import synthetic_label_map

    raw = tmp / "synthetic_raw"
    raw.mkdir()
    for seed in seeds:
        write_label_map(synthetic_label_map(seed=seed, spacing_mm=2.5), raw / f"synthetic_{seed:03d}.nii.gz")
    return _prepare(raw, tmp / "synthetic")


def _synthetic_partial(tmp: Path) -> tuple[Path, Path]:
    """Partial label maps cut from synthetic hearts in the real sources' numberings: ACDC-like
    (1 RV, 2 Myocardium, 3 LV) and LA-only (1 LA), prepared with their conventions."""
    from HeartCompletionLib.io.labelmap import LabelMap
    from HeartCompletionLib.io.labelmap_files import write_label_map
    from HeartCompletionLib.io.synthetic import synthetic_label_map

    acdc_raw, la_raw = tmp / "acdc_like_raw", tmp / "la_like_raw"
    acdc_raw.mkdir()
    la_raw.mkdir()
    for seed in (2, 3):
        lm = synthetic_label_map(seed=seed, spacing_mm=2.5)
        acdc = np.zeros_like(lm.labels)
        acdc[lm.labels == 5], acdc[lm.labels == 1], acdc[lm.labels == 3] = 1, 2, 3
        write_label_map(LabelMap(acdc, lm.ijk_to_ras), acdc_raw / f"patient{seed:03d}_ED_label.nii.gz")
        write_label_map(LabelMap((lm.labels == 2).astype(np.int16), lm.ijk_to_ras), la_raw / f"la{seed}_LA_label.nii.gz")
    (tmp / "acdc.json").write_text(json.dumps(ACDC_CONVENTION))
    (tmp / "la.json").write_text(json.dumps({"1": "LA"}))
    return (_prepare(acdc_raw, tmp / "acdc_cmr", str(tmp / "acdc.json")),
            _prepare(la_raw, tmp / "la2018_lgemri", str(tmp / "la.json")))


def _real_partial(tmp: Path) -> tuple[Path, Path]:
    if not REAL.is_dir():
        pytest.skip(f"no real label maps: {REAL} is absent (see ../shared/data/real/README.md)")
    folders = []
    for source, count in (("acdc_cmr", 2), ("la2018_lgemri", 2)):
        raw = tmp / f"{source}_raw"
        raw.mkdir()
        for path in sorted((REAL / source).glob("*.nii.gz"))[:count]:
            shutil.copy(path, raw / path.name)
        folders.append(_prepare(raw, tmp / source, str(REAL / source / "labels.json")))
    return folders[0], folders[1]


@pytest.fixture(scope="module")
def synthetic_mix(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("phase4_synthetic")
    acdc, la = _synthetic_partial(tmp)
    return {"synthetic": _synthetic_full(tmp), "acdc_cmr": acdc, "la2018_lgemri": la}


@pytest.fixture(scope="module")
def real_mix(tmp_path_factory, synthetic_mix) -> dict:
    tmp = tmp_path_factory.mktemp("phase4_real")
    acdc, la = _real_partial(tmp)
    return {"synthetic": synthetic_mix["synthetic"], "acdc_cmr": acdc, "la2018_lgemri": la}


def _dataset(mix: dict, exclusion: float = 1.0):
    from heart_training.config import load_config
    from heart_training.train.engine import build_datasets

    from HeartCompletionLib.geometry.normalization import Normalization
    from HeartCompletionLib.structures.table import StructureTable

    overrides = [f"data.datasets.{i}.data_dir={mix[name]}" for i, name in enumerate(WEIGHTS)]
    overrides += ["data.num_input_points=256", "data.num_volume_queries=256", "data.num_near_queries=256",
                  "data.num_surface_queries=64", f"loss.exclusion={exclusion}", "loss.eikonal=0", "loss.teacher=0"]
    cfg = load_config("phase4_real", overrides)
    table = StructureTable.from_spec(cfg.structures)
    train_ds, _, sizes, weights = build_datasets(cfg, table, Normalization(cfg.scale_mm))
    return cfg, table, train_ds, sizes, weights


def _check_annotated_only(mix: dict):
    from heart_training.data.dataset import QUERY_SURFACE, collate
    from heart_training.train.losses import compute_losses

    cfg, table, ds, _, _ = _dataset(mix)
    expected = {"synthetic": set(table.names), "acdc_cmr": {"RV", "Myocardium", "LV"}, "la2018_lgemri": {"LA"}}
    seen = set()
    for index in range(len(ds)):
        for seed in range(4):
            sample = ds[(index, seed)]
            annotated = sample["annotated"].numpy()
            names = {n for n, a in zip(table.names, annotated) if a}
            assert names == expected[sample["dataset"]], (sample["case_id"], names)
            seen.add(sample["dataset"])
            mask = sample["target_mask"].numpy()
            assert not mask[:, ~annotated].any()  # no target on a structure the case does not annotate
            assert mask[:, annotated].any(axis=0).all()  # and targets on each annotated one
            assert set(np.flatnonzero(sample["input_mask"].numpy())) <= set(np.flatnonzero(annotated))
    assert seen == set(WEIGHTS)

    # the loss: gradients reach an unannotated structure only through the exclusion hinge, i.e. only
    # at queries inside an annotated structure (and never without the exclusion term)
    partial = [i for i, r in enumerate(ds.refs) if r.dataset != "synthetic"]
    batch = collate([ds[(i, 11)] for i in partial])
    unannotated = ~batch["annotated"][:, None, :].expand_as(batch["target_mask"])
    inside_annotated = (batch["target_mask"] & (batch["target"] < 0)).any(dim=-1, keepdim=True)
    for exclusion in (0.0, 1.0):
        cfg.loss.exclusion = exclusion
        pred = (torch.randn(batch["target"].shape) * 0.05).requires_grad_(True)
        compute_losses(pred, batch, cfg.loss).total.backward()
        grad = pred.grad.abs()
        if exclusion == 0:
            assert float(grad[unannotated].max()) == 0.0
        else:
            stray = unannotated & ~inside_annotated.expand_as(unannotated)
            assert float(grad[stray].max()) == 0.0
            assert float(grad[unannotated & inside_annotated.expand_as(unannotated)].max()) > 0  # the hinge acts

    # the teacher term reaches exactly the unannotated structures (not at surface samples), and leaves
    # the annotated ones' gradients as they were
    cfg.loss.exclusion = 0.0
    pred = (torch.randn(batch["target"].shape) * 0.05).requires_grad_(True)
    teacher = torch.randn(batch["target"].shape) * 0.05
    compute_losses(pred, batch, cfg.loss).total.backward()
    without = pred.grad.clone()
    pred.grad = None
    cfg.loss.teacher = 0.5
    out = compute_losses(pred, batch, cfg.loss, teacher_pred=teacher)
    out.total.backward()
    assert float(out.terms["teacher"]) > 0
    not_surface = (batch["query_kind"] != QUERY_SURFACE)[..., None].expand_as(unannotated)
    assert torch.equal(pred.grad[~unannotated], without[~unannotated])
    assert float(pred.grad[unannotated & ~not_surface].abs().max()) == 0.0
    assert bool((pred.grad[unannotated & not_surface] != 0).float().mean() > 0.99)
    cfg.loss.teacher = 0.0


def test_samples_and_loss_use_only_annotated_structures_synthetic(synthetic_mix):
    _check_annotated_only(synthetic_mix)


def test_samples_and_loss_use_only_annotated_structures_real(real_mix):
    _check_annotated_only(real_mix)


def test_each_source_is_drawn_at_its_weight(synthetic_mix):
    from heart_training.data.dataset import MixingSampler

    _, _, ds, sizes, weights = _dataset(synthetic_mix)
    assert weights == list(WEIGHTS.values())
    sampler = MixingSampler(sizes, weights, num_samples=20_000, seed=3)
    drawn = [ds.refs[index].dataset for index, _ in sampler.plan(0)]
    for name, weight in WEIGHTS.items():
        share = drawn.count(name) / len(drawn)
        assert abs(share - weight / sum(WEIGHTS.values())) < 0.015, (name, share)
    # unequal sizes do not change the shares (a 2-case source is drawn as often as its weight says)
    sampler = MixingSampler([2, 40, 70], weights, num_samples=20_000, seed=1)
    offsets = np.cumsum([0, 2, 40])
    which = np.searchsorted(offsets, [i for i, _ in sampler.plan(0)], side="right") - 1
    assert np.allclose(np.bincount(which, minlength=3) / 20_000, np.array(weights) / sum(weights), atol=0.015)


def _tiny_phase1_checkpoint(synthetic: Path, out: Path) -> Path:
    from heart_training.config import load_config
    from heart_training.train.trainer import train

    cfg = load_config("tiny_test", [f"data.datasets.0.data_dir={synthetic}", "optim.max_steps=5",
                                    f"run.output_dir={out}", "run.data_gate=false"])
    result = train(cfg)
    assert result.final_checkpoint is not None and result.final_checkpoint.is_file()
    return result.final_checkpoint


@pytest.mark.slow
def test_tiny_real_phase4_run_logs_the_mix(real_mix, tmp_path):
    """2 ACDC + 2 LA real cases and 2 synthetic hearts, phase 4 from a tiny phase-1 checkpoint."""
    from heart_training.train.trainer import main as train_main

    from HeartCompletionLib.model.checkpoint import load_inference_checkpoint

    init = _tiny_phase1_checkpoint(real_mix["synthetic"], tmp_path / "phase1")
    out = tmp_path / "phase4"
    steps, batch = 40, 4
    overrides = [f"data.datasets.{i}.data_dir={real_mix[name]}" for i, name in enumerate(WEIGHTS)]
    overrides += [f"model.init_from={init}", "model.config=from_init", "data.num_input_points=384",
                  "data.min_points_per_structure=16", "data.num_volume_queries=128", "data.num_near_queries=256",
                  "data.num_surface_queries=64", "data.num_workers=0", "data.cache_cases=6", "loss.eikonal_queries=32",
                  f"optim.batch_size={batch}", f"optim.max_steps={steps}", "optim.warmup_steps=5", "run.device=cpu",
                  "run.threads=1", "run.tensorboard=false", "run.progress=false", "run.val_every=0",
                  "run.checkpoint_every=0", "run.log_every=10"]
    assert train_main(["--config", "phase4_real", "--output_dir", str(out), *overrides]) == 0
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    train = [r for r in records if r.get("split") == "train"]
    assert len(train) == steps // 10
    drawn = {name: 0.0 for name in WEIGHTS}
    for r in train:
        assert r["targets_on_unannotated"] == 0
        assert np.isfinite(r["loss"]) and r["exclusion"] >= 0 and r["teacher"] >= 0
        # RA, RV, LA: annotated by synthetic hearts; RV also by ACDC; LA also by the LA source
        assert r["target_freq/RA"] == pytest.approx(r["draw_freq/synthetic"])
        assert r["target_freq/PV"] == pytest.approx(r["draw_freq/synthetic"])
        assert r["target_freq/RV"] == pytest.approx(r["draw_freq/synthetic"] + r["draw_freq/acdc_cmr"])
        assert r["target_freq/LA"] == pytest.approx(r["draw_freq/synthetic"] + r["draw_freq/la2018_lgemri"])
        assert r["input_freq/RA"] <= r["draw_freq/synthetic"] + 1e-9  # nobody else can give it as input
        assert sum(r[f"draw_freq/{n}"] for n in WEIGHTS) == pytest.approx(1.0)
        for name in WEIGHTS:
            drawn[name] += r[f"draw_freq/{name}"] / len(train)
    assert max(r["teacher"] for r in train) > 0  # real samples: their unannotated structures follow the teacher
    n = steps * batch  # 160 draws: binomial standard deviation <= 0.04
    for name, weight in WEIGHTS.items():
        assert abs(drawn[name] - weight) < 4 * np.sqrt(weight * (1 - weight) / n), (name, drawn[name])
    checkpoint = load_inference_checkpoint(out / "model_final.safetensors")
    assert checkpoint.metadata.get("phase") == 4
    assert checkpoint.model.config == load_inference_checkpoint(init).model.config  # from_init: the tiny architecture
    assert checkpoint.metadata["data_summary"]["per_dataset"] == {"synthetic": 2, "acdc_cmr": 2, "la2018_lgemri": 2}


def test_model_config_from_init_takes_the_checkpoints_architecture(tmp_path):
    from dataclasses import replace

    from heart_training.config import ConfigError, load_config
    from heart_training.train.engine import build_model, model_config_of

    from HeartCompletionLib.model.checkpoint import load_inference_checkpoint
    from HeartCompletionLib.model.registry import resolve_checkpoint
    from HeartCompletionLib.structures.table import StructureTable

    bundled, _ = resolve_checkpoint("synthetic-demo")
    cfg = load_config("phase4_real", [f"model.init_from={bundled}"])
    assert cfg.model.config == "from_init"
    table = StructureTable.default()
    config = model_config_of(cfg, table)
    assert (config.width, config.depth, config.latent_queries) == (128, 4, "fps")  # not phase4_real's old `base`
    model = build_model(cfg, table)
    reference = load_inference_checkpoint(bundled).model.state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in model.state_dict().items())
    cfg.model.overrides = {"qk_norm": True}  # overrides still apply on top
    assert model_config_of(cfg, table) == replace(config, qk_norm=True)
    with pytest.raises(ConfigError, match="needs model.init_from"):  # phase 4 without a model to start from
        load_config("phase4_real").validate()
    cfg = load_config("phase4_real", [f"model.init_from={tmp_path / 'state.pt'}"])
    with pytest.raises(ConfigError, match="from_init needs model.init_from"):
        model_config_of(cfg, table)
    (tmp_path / "bad.safetensors").write_bytes(b"not a checkpoint")
    cfg = load_config("phase4_real", [f"model.init_from={tmp_path / 'bad.safetensors'}"])
    with pytest.raises(ConfigError, match="bad.safetensors.*cannot read its model config"):
        model_config_of(cfg, table)
