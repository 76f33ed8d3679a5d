"""Real training runs on CPU: learning, the exported checkpoint, logs, resume, DDP (2 gloo processes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures_training import tiny_overrides, write_analytic_case, write_case_lists
from heart_training.config import load_config
from heart_training.data.case_format import load_case
from heart_training.train.trainer import train

#: near-surface IoU the session's tiny model (1,200 CPU steps of batch 4, 256 latents, QK-norm,
#: lr 6e-3, about two minutes of one shared CPU core) must reach. Measured per heart (seeds fixed,
#: one thread: deterministic): 0.63-0.86 on the eight larger structures, 0.46-0.55 on PV,
#: 0.24-0.32 on the ~3 mm coronaries, mean 0.68-0.70 (before QK-norm and lr 6e-3: mean 0.62-0.65).
#: NOT the issue's 0.9: near-surface points are Gaussian draws 1 mm / 4 mm around the surface, so
#: 0.9 needs the zero level within ~0.2 mm of the label map's (true sdf + N(0, 0.2 mm) noise gives
#: 0.87-0.94), and even a plain neural field memorising one heart is at a mean of 0.86 (coronaries
#: 0.75) after 4,000 steps / 3.5 minutes (benchmarks/field_fit_iou.py; docs/experiments.md).
#: Raise these with HEART_TINY_STEPS / HEART_TINY_IOU_MIN when training longer.
NEAR_IOU_MIN = float(os.environ.get("HEART_TINY_IOU_MIN", "0.55"))
LARGER = ["Myocardium", "LA", "LV", "RA", "RV", "Aorta", "PA", "LAA"]
TABLE_NAMES = ["Myocardium", "LA", "LV", "RA", "RV", "Aorta", "PA", "LAA", "Coronary", "PV"]


def near_surface_iou(checkpoint_path: Path, case_path: Path, num_points: int = 4000) -> np.ndarray:
    """IoU per structure on a case's near-surface points, through the exported inference checkpoint."""
    from heart_training.evaluation.near_iou import near_surface_iou as iou

    from HeartCompletionLib.model.checkpoint import load_inference_checkpoint

    ck = load_inference_checkpoint(checkpoint_path)
    return iou(ck.model, ck.normalization, load_case(case_path), ck.num_input_points, ck.min_per_structure,
               num_points=num_points)


def test_tiny_model_learns_the_synthetic_hearts(tiny_training_run, tiny_checkpoint, prepared_synthetic_dataset):
    run = tiny_training_run
    losses = [loss for _, loss in run.losses]
    assert np.mean(losses[-20:]) < 0.25 * np.mean(losses[:5])
    for case in sorted(prepared_synthetic_dataset.glob("*.npz")):
        iou = near_surface_iou(tiny_checkpoint, case)
        print(case.name, "near-surface IoU", dict(zip(TABLE_NAMES, np.round(iou, 3).tolist())))
        per = dict(zip(TABLE_NAMES, iou))
        assert min(per[n] for n in LARGER) >= NEAR_IOU_MIN, f"{case.name}: near-surface IoU {per}"
        assert per["PV"] >= 0.5 * NEAR_IOU_MIN and per["Coronary"] > 0.1, f"{case.name}: near-surface IoU {per}"
        assert iou.mean() >= NEAR_IOU_MIN + 0.05
    print("validation", {k: round(v, 3) for k, v in run.val_metrics.items()})


#: the session model must tell its two (deliberately different) hearts apart; measured on the
#: 1,200-step run: see the print of the test
OUTPUT_DIFFERENCE_MIN_MM = 2.0
DISAGREEMENT_ACCURACY_MIN = 0.7


def test_tiny_model_uses_its_input(tiny_checkpoint, prepared_synthetic_dataset):
    """Two different hearts in -> different outputs; where the hearts disagree the model is right
    for both far more often than the 0.5 any input-ignoring (mean) field gets. A collapsed encoder
    (the same latents for every heart, simulated below) fails both measures."""
    import copy

    from heart_training.evaluation.input_use import input_dependence, label_lookup

    from HeartCompletionLib.io.labelmap_files import read_label_map
    from HeartCompletionLib.model.checkpoint import load_inference_checkpoint

    ck = load_inference_checkpoint(tiny_checkpoint)
    paths = sorted(prepared_synthetic_dataset.glob("*.npz"))
    cases = [load_case(p) for p in paths]
    lookups = [label_lookup(read_label_map(prepared_synthetic_dataset / "label_maps" / f"{p.stem}.nii.gz"))
               for p in paths]
    args = (ck.normalization, cases[0], cases[1], *lookups, ck.num_input_points, ck.min_per_structure)
    measured = input_dependence(ck.model, *args)
    print("input dependence", measured)
    assert measured["disagreement_points"] > 1000
    assert measured["output_difference_mm"] > OUTPUT_DIFFERENCE_MIN_MM
    assert measured["disagreement_accuracy"] > DISAGREEMENT_ACCURACY_MIN

    collapsed = copy.deepcopy(ck.model)
    first = {}

    def same_latents(points_n, onehot, normals=None):  # every heart gets the first heart's latents
        if "latents" not in first:
            first["latents"] = ck.model.encode(points_n, onehot, normals)
        return first["latents"]

    collapsed.encode = same_latents
    control = input_dependence(collapsed, *args)
    assert control["output_difference_mm"] == 0.0
    assert control["disagreement_accuracy"] == pytest.approx(0.5)


def test_run_folder_has_logs_config_and_loadable_checkpoints(tiny_training_run, tiny_checkpoint):
    from HeartCompletionLib.model.checkpoint import read_checkpoint_metadata

    out = tiny_training_run.output_dir
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["split"] == "train"]
    assert train_records and all(np.isfinite(r["loss"]) for r in train_records)
    assert "iou/Coronary" in train_records[-1] and "input_freq/LV" in train_records[-1]
    assert any(r["split"] == "val" for r in records)
    assert any("data gate" in r.get("message", "") and "OK" in r["message"] for r in records)
    assert load_config(out / "config.yaml").model.config == "tiny"
    meta = read_checkpoint_metadata(tiny_checkpoint)
    assert meta["phase"] == 1 and meta["data_summary"]["cases"] == 2
    assert meta["normalization"]["scale_mm"] == 100.0
    assert tiny_training_run.best_checkpoint is not None and Path(tiny_training_run.best_checkpoint).is_file()


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    d = tmp_path_factory.mktemp("run_data")
    for seed in (0, 1):
        write_analytic_case(d / f"h{seed}.npz", seed=seed, num_surface=6000, num_volume=3000, num_near=4000)
    write_case_lists(d, ["h0", "h1"], ["h1"])
    return d


def _quick(data, out, *extra):
    return load_config("tiny_test", [*tiny_overrides(data, out, steps=8), "run.log_every=1", "optim.batch_size=1",
                                     "loss.eikonal=0.05", "loss.eikonal_queries=16", "augment.rotation_deg=10",
                                     "augment.scale=0.05", "augment.translation_mm=3", *extra])


def _assert_same_run(full, resumed, full_dir: Path, cut_dir: Path) -> None:
    """The resumed run's last losses and final weights equal the uninterrupted run's."""
    np.testing.assert_allclose([v for _, v in resumed.losses], [v for _, v in full.losses[5:]], rtol=1e-6)
    a = torch.load(full_dir / "state_last.pt", weights_only=True)["model"]
    b = torch.load(cut_dir / "state_last.pt", weights_only=True)["model"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_resume_reproduces_the_uninterrupted_run(small_dataset, tmp_path):
    full = train(_quick(small_dataset, tmp_path / "full"))
    assert [s for s, _ in full.losses] == list(range(1, 9))
    # interrupted after 5 steps (mid-epoch: 2 cases, batch 1), then resumed with a data worker
    first = train(_quick(small_dataset, tmp_path / "cut", "run.stop_after=5"))
    assert first.step == 5 and first.final_checkpoint is None and first.state_path.is_file()
    second = train(_quick(small_dataset, tmp_path / "cut", "data.num_workers=1"), resume=True)
    assert [s for s, _ in second.losses] == [6, 7, 8]
    _assert_same_run(full, second, tmp_path / "full", tmp_path / "cut")


@pytest.mark.slow
def test_resume_reproduces_the_uninterrupted_run_with_the_device_cache(small_dataset, tmp_path):
    """data.device_cache: samples drawn in memory with a generator seeded from the plan position,
    so the saved (epoch, items consumed) resumes the same batches; the memory estimate is logged."""
    cache = "data.device_cache=true"
    full = train(_quick(small_dataset, tmp_path / "full", cache))
    assert [s for s, _ in full.losses] == list(range(1, 9)) and all(np.isfinite(v) for _, v in full.losses)
    first = train(_quick(small_dataset, tmp_path / "cut", cache, "run.stop_after=5"))
    assert first.step == 5 and first.state_path.is_file()
    second = train(_quick(small_dataset, tmp_path / "cut", cache), resume=True)
    assert [s for s, _ in second.losses] == [6, 7, 8]
    _assert_same_run(full, second, tmp_path / "full", tmp_path / "cut")
    messages = [json.loads(line).get("message", "") for line in (tmp_path / "full" / "log.jsonl").read_text().splitlines()]
    assert any(m.startswith("device cache: 2 cases in") and "bytes per case" in m for m in messages)


@pytest.mark.slow
def test_a_stop_signal_saves_the_state_and_the_run_resumes(small_dataset, tmp_path):
    """SIGUSR1 (Slurm's pre-emption warning; SIGTERM alike) mid-run: the state is saved after the
    current step, the run returns, the caller's own handler is back, and --resume finishes the run."""
    import signal
    import threading
    import time

    out = tmp_path / "run"
    caught = []
    before = signal.signal(signal.SIGUSR1, lambda *_: caught.append(1))

    def signal_after_two_steps():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            log = out / "log.jsonl"
            if log.is_file() and log.read_text().count('"split": "train"') >= 2:
                os.kill(os.getpid(), signal.SIGUSR1)
                return
            time.sleep(0.01)

    try:
        sender = threading.Thread(target=signal_after_two_steps)
        sender.start()
        first = train(_quick(small_dataset, out, "optim.max_steps=400"))
        sender.join()
        assert 2 <= first.step < 400 and first.final_checkpoint is None and first.state_path.is_file()
        assert f"stopping: state saved at step {first.step}" in (out / "log.jsonl").read_text()
        os.kill(os.getpid(), signal.SIGUSR1)  # the caller's handler again, not the finished run's
        assert caught == [1]
    finally:
        signal.signal(signal.SIGUSR1, before)
    second = train(_quick(small_dataset, out, "optim.max_steps=400", "run.val_every=0"), resume=True)
    assert second.losses[0][0] == first.step + 1 and second.step == 400 and second.final_checkpoint.is_file()


def _train_records(out: Path) -> list[dict]:
    return [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if r["split"] == "train"]


@pytest.mark.slow
def test_ddp_two_cpu_processes_match_one_process(small_dataset, tmp_path):
    """torchrun with 2 gloo processes (batch 1 each) == 1 process with batch 2."""
    steps = 4
    common = [f"data.datasets.0.data_dir={small_dataset}", f"optim.max_steps={steps}", "run.log_every=1",
              "run.threads=1", "run.val_every=0", "optim.warmup_steps=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "heart_training.train.trainer", "--config", "tiny_test", "--output_dir", str(tmp_path / "ddp"),
           *common, "optim.batch_size=1"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = train(load_config("tiny_test", [*common, f"run.output_dir={tmp_path / 'one'}", "optim.batch_size=2"]))

    records = [json.loads(line) for line in (tmp_path / "ddp" / "log.jsonl").read_text().splitlines()]
    diffs = [r["replica_max_difference"] for r in records if "replica_max_difference" in r]
    assert diffs == [0.0]  # replicas bit-identical after training
    ddp_losses = [r["loss"] for r in _train_records(tmp_path / "ddp")]
    np.testing.assert_allclose(ddp_losses, [v for _, v in single.losses], rtol=1e-4)
    from safetensors.torch import load_file

    a = load_file(tmp_path / "ddp" / "model_final.safetensors")
    b = load_file(single.final_checkpoint)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=2e-5)


@pytest.mark.slow
def test_phases_2_to_4_fine_tune_from_a_checkpoint(small_dataset, tmp_path):
    """Each phase's masks drive real steps; phase 4 trains on a partially annotated case with the
    exclusion term and starts from the previous phase's inference checkpoint."""
    write_analytic_case(tmp_path / "partial.npz", seed=2, num_surface=6000, num_volume=3000, num_near=4000,
                        annotated=[0, 2, 5, 6])
    write_case_lists(tmp_path, ["partial"], [])
    previous = None
    for phase, kind, data in ((1, "all", small_dataset), (2, "drop_random", small_dataset),
                              (3, "subsets", small_dataset), (4, "annotated", tmp_path)):
        extra = [f"phase={phase}", f"mask.kind={kind}", "optim.max_steps=3", "loss.exclusion=1.0"]
        if previous is not None:
            extra.append(f"model.init_from={previous}")
        result = train(load_config("tiny_test", [*tiny_overrides(data, tmp_path / f"p{phase}", steps=3), *extra]))
        assert result.final_checkpoint.is_file() and all(np.isfinite(v) for _, v in result.losses)
        freq = result.train_metrics
        if kind == "annotated":  # only annotated structures are ever inputs
            assert freq["input_freq/LA"] == 0 and freq["input_freq/Myocardium"] == 1
            assert freq["exclusion"] >= 0
        previous = result.final_checkpoint
    from HeartCompletionLib.model.checkpoint import read_checkpoint_metadata

    assert read_checkpoint_metadata(previous)["phase"] == 4


def test_two_datasets_mix_by_weight(small_dataset, tmp_path):
    from HeartCompletionLib.model.checkpoint import read_checkpoint_metadata

    other = tmp_path / "other"
    other.mkdir()
    write_analytic_case(other / "x.npz", seed=3, num_surface=6000, num_volume=3000, num_near=4000)
    cfg = load_config("tiny_test", [*tiny_overrides(small_dataset, tmp_path / "run", steps=2),
                                    "data.datasets.0.name=first", "data.datasets.0.weight=1.0",
                                    f"data.datasets.1.data_dir={other}", "data.datasets.1.name=second",
                                    "data.datasets.1.weight=3.0"])
    result = train(cfg)
    meta = read_checkpoint_metadata(result.final_checkpoint)
    assert meta["data_summary"]["per_dataset"] == {"first": 2, "second": 1}
    assert meta["data_summary"]["datasets"] == ["first", "second"]
