"""The completion study (benchmarks/completion_study.py) end to end at its smallest size: synthetic
hearts -> prepare -> phases 1-3 -> held-out evaluation against the baseline -> study.md; a rerun
skips every finished stage. Real files, real training steps, real heart-eval."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

STUDY = Path(__file__).resolve().parents[1] / "benchmarks" / "completion_study.py"


def _run(out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(STUDY), "--budget", "smoke", "--output_dir", str(out), "--workers", "2",
                           "--eval_workers", "2", *extra], capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_smoke_study_runs_end_to_end_and_resumes(tmp_path):
    out = tmp_path / "study"
    first = _run(out)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    study = (out / "study.md").read_text(encoding="utf-8")
    assert "## Verdict against the targets" in study and "## Per scenario and structure" in study
    for scenario in ("full", "subset_A", "drop_k", "missing_LAA"):
        assert f"| {scenario} | all scored |" in study
    assert "Git commit:" in study and "Wall time:" in study
    assert "Inference: the latents fitted to the given structures for 30 (250 in `full`" in study  # how it was scored
    hearts = json.loads((out / "hearts" / "hearts.json").read_text())["hearts"]
    train_seeds = {h["seed"] for h in hearts if h["split"] == "train"}
    heldout = [h for h in hearts if h["split"] == "heldout"]
    assert len(train_seeds) == 5 and len(heldout) == 2 and not train_seeds & {h["seed"] for h in heldout}
    assert any(h["oblique"] for h in heldout) and all(h["modes"] for h in hearts)
    for phase in (1, 2, 3):
        assert (out / f"phase{phase}" / "model_best.safetensors").is_file()
    config3 = (out / "phase3" / "config.yaml").read_text()
    assert "phase2/model_best.safetensors" in config3  # each phase starts from the previous best
    # the study's recipe: phase 2 drops 1-5 structures, phase 3 mixes the subsets with random drops
    assert "drop_min: 1" in (out / "phase2" / "config.yaml").read_text()
    assert "random_drop_prob: 0.5" in config3 and "drop_min: 1" in config3
    summary = json.loads((out / "eval" / "summary.json").read_text())
    assert {"model", "baseline"} <= set(summary["scenarios"]["subset_A"]["overall"])
    verdict = json.loads((out / "study.json").read_text())["verdict"]
    assert set(verdict) >= {"subset_A", "drop_k", "missing_X", "full_chambers"}

    started = time.perf_counter()
    again = _run(out)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("skipped") >= 5  # hearts, prepare, three phases, eval
    assert time.perf_counter() - started < 120


def test_steps_fitted_to_a_time_budget_are_kept_for_reruns(tmp_path):
    sys.path.insert(0, str(STUDY.parent))
    import completion_study as cs

    gpu = replace(cs.BUDGETS["gpu"], steps=(1500, 4000, 2500), train_seconds=360.0)
    assert cs.fitted_steps(gpu, 100.0) == (1500, 2400, 1500)  # 15 steps/s x 260 s left, split 8:5
    assert cs.fitted_steps(gpu, 400.0) == (1500, 1, 1)  # no time left: a step each, never zero
    assert cs.planned_budget(tmp_path, gpu).steps == gpu.steps
    (tmp_path / "steps.json").write_text(json.dumps({"steps": [2500, 3000, 2000]}))
    assert cs.planned_budget(tmp_path, gpu).steps == (2500, 3000, 2000)
    assert cs.planned_budget(tmp_path, cs.BUDGETS["cpu"]).steps == cs.BUDGETS["cpu"].steps  # fixed-step budget


def test_bad_arguments_are_usage_errors(tmp_path):
    result = _run(tmp_path / "s", "--steps", "0", "1", "1")
    assert result.returncode == 2 and "--steps must be positive" in result.stderr
    result = _run(tmp_path / "s", "--train_hearts", "1")
    assert result.returncode == 2 and "at least 3" in result.stderr
    result = _run(tmp_path / "s", "--train_seconds", "-5")
    assert result.returncode == 2 and "--train_seconds must be >= 0" in result.stderr
    result = _run(tmp_path / "s", "--fit_steps", "-1")
    assert result.returncode == 2 and "--fit_steps must be >= 0" in result.stderr
    result = _run(tmp_path / "s", "--lr", "1e-3", "0", "1e-4")
    assert result.returncode == 2 and "--lr must be positive" in result.stderr
    result = _run(tmp_path / "s", "--init", str(tmp_path / "missing.safetensors"))
    assert result.returncode == 2 and "no such checkpoint file" in result.stderr


def test_a_second_pass_starts_phase_1_from_the_init_checkpoint(tmp_path):
    sys.path.insert(0, str(STUDY.parent))
    import completion_study as cs

    init = tmp_path / "phase3_best.safetensors"
    second = replace(cs.BUDGETS["gpu"], init=str(init), lr=(1e-3, 5e-4, 2.5e-4))
    first = cs.phase_overrides(second, 1, tmp_path, "cuda")
    assert f"model.init_from={init}" in first and "optim.lr=0.001" in first
    later = cs.phase_overrides(second, 2, tmp_path, "cuda")  # later phases chain from the previous phase
    assert f"model.init_from={tmp_path / 'phase1' / 'model_best.safetensors'}" in later and "optim.lr=0.0005" in later
    assert not any(o.startswith("model.init_from") for o in cs.phase_overrides(cs.BUDGETS["gpu"], 1, tmp_path, "cuda"))
