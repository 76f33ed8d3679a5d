"""benchmarks/real_study.py at its smallest size on the shared real files: prepare by patient,
phase 4 from the bundled model, held-out evaluation, whole hearts from single real structures,
and the report (issue 11). The end-to-end test skips when ../shared/data/real is absent."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "data" / "real"
STUDY = ROOT / "benchmarks" / "real_study.py"

needs_real = pytest.mark.skipif(not (REAL / "acdc_cmr" / "labels.json").is_file(),
                                reason=f"the shared real data is not here ({REAL})")


def _run(*args, timeout=900):
    return subprocess.run([sys.executable, str(STUDY), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


@needs_real
@pytest.mark.slow
def test_smoke_real_study_runs_end_to_end_and_resumes(tmp_path):
    out = tmp_path / "real"
    result = _run("--init", "synthetic-demo", "--budget", "smoke", "--output_dir", out)
    assert result.returncode == 0, result.stderr[-3000:]
    report = (out / "real_study.md").read_text()
    assert "real LA reconstruction" in report and "ACDC missing_RV" in report
    record = json.loads((out / "real_study.json").read_text())
    for name in ("acdc_cmr", "la2018_lgemri"):  # patients, not frames, are split; some are held out
        sizes = record["sizes"][name]
        assert sizes["test"] >= 1 and sizes["train"] >= 1, sizes
    groups = {}
    for split in ("train", "val", "test"):
        for line in (out / "data" / "acdc_cmr" / f"{split}.csv").read_text().splitlines()[1:]:
            groups.setdefault(line.split(",")[-1], set()).add(split)
    assert groups and all(len(s) == 1 for s in groups.values()), groups  # ED and ES on one side
    # phase 4 drew every source, kept no target on an unannotated structure, and used the teacher
    log = [json.loads(x) for x in (out / "phase4" / "log.jsonl").read_text().splitlines()]
    train = [r for r in log if r.get("split") == "train"]
    assert train and all(r["targets_on_unannotated"] == 0 for r in train)
    assert all("teacher" in r for r in train)
    # the whole hearts: two envelope cases and one grown ACDC stack, each with its figure
    whole = {r["case"].split(" ")[0]: r for r in record["whole"]}
    assert set(whole) == {"platipy_rtct", "totalseg_chestct", "acdc_cmr"}
    for row in whole.values():
        assert (out / "whole" / row["figure"]).stat().st_size > 10_000
    for name in ("platipy_rtct", "totalseg_chestct"):
        assert 0.0 <= whole[name]["heart"]["inside_fraction"] <= 1.0
    assert whole["acdc_cmr"]["grid"].endswith("at 1.5x1.5x1.5 mm")  # isotropic, grown around the stack
    for name in ("la_phase4", "acdc_phase4", "la_init", "acdc_init"):
        assert (out / "eval" / name / "summary.json").is_file(), name
    # rerunning skips every finished stage
    again = _run("--init", "synthetic-demo", "--budget", "smoke", "--output_dir", out, timeout=300)
    assert again.returncode == 0 and "done earlier, skipped" in again.stdout


def test_bad_arguments_are_usage_errors(tmp_path):
    result = _run("--init", "no-such-model", "--output_dir", tmp_path / "r", timeout=120)
    assert result.returncode == 2 and "--init" in result.stderr
    result = _run("--init", "synthetic-demo", "--real_dir", tmp_path / "nowhere", timeout=120)
    assert result.returncode == 2 and "no such folder" in result.stderr
    result = _run("--init", "synthetic-demo", "--steps", "0", timeout=120)
    assert result.returncode == 2 and "--steps must be positive" in result.stderr
