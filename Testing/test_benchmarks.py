"""The benchmark scripts still run (smallest sizes): a benchmark nobody can start measures nothing.

Each script runs as a user runs it (``python benchmarks/NAME.py ...`` in a subprocess) with sizes
small enough for a few seconds; the tests check the figures they print, never their values' speed
(speed targets live in the benchmarks themselves, see docs/benchmarks.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from HeartCompletionLib.model.registry import BUNDLED_MODELS_DIR

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def run_benchmark(name: str, *args: str, timeout: int = 300) -> str:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, str(BENCH / name), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"{name} {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.mark.slow
def test_overfit_iou_runs_and_writes_its_records(prepared_synthetic_dataset, tmp_path):
    out = tmp_path / "records.json"
    text = run_benchmark("overfit_iou.py", "--steps", "2", "--eval_every", "1", "--data_dir",
                         str(prepared_synthetic_dataset), "--json", str(out), "model.overrides.width=32")
    records = json.loads(out.read_text())["records"]
    assert [r["step"] for r in records] == [1, 2]
    assert len(records[-1]["iou"]) == 10 and all(0.0 <= r["mean"] <= 1.0 for r in records)
    assert "model tiny" in text and "overrides: model.overrides.width=32" in text


@pytest.mark.slow
def test_overfit_iou_refuses_a_bad_override_before_making_data(tmp_path):
    proc = subprocess.run([sys.executable, str(BENCH / "overfit_iou.py"), "optim.no_such_key=1", "--data_dir",
                           str(tmp_path / "never")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no_such_key" in proc.stderr
    assert not (tmp_path / "never").exists()


@pytest.mark.slow
def test_field_fit_iou_fits_a_prepared_case(prepared_synthetic_dataset):
    case = sorted(prepared_synthetic_dataset.glob("*.npz"))[0]
    text = run_benchmark("field_fit_iou.py", "--case", str(case), "--steps", "8", "--queries", "64", "--width", "16")
    rows = [line.split() for line in text.splitlines() if line.strip() and line.split()[0].isdigit()]
    assert [int(r[0]) for r in rows] == [2, 4, 6, 8]
    assert all(len(r) == 3 + 10 + 2 and 0.0 <= float(r[-2]) <= 1.0 for r in rows)


@pytest.mark.slow
def test_field_fit_iou_names_a_bad_case_file(tmp_path):
    bad = tmp_path / "not_a_case.npz"
    bad.write_bytes(b"garbage")
    proc = subprocess.run([sys.executable, str(BENCH / "field_fit_iou.py"), "--case", str(bad)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "not_a_case.npz" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_train_speed_prints_samples_per_second_and_memory():
    args = ("--configs", "tiny", "--steps", "1", "--warmup", "0", "--batch_size", "1", "--threads", "1",
            "--data", "both", "--peak_tflops", "989", "--max_batch_for_gib", "40", "--profile", "1")
    text = run_benchmark("train_speed.py", *args)
    lines = text.splitlines()
    assert lines[0] == "command: python benchmarks/train_speed.py " + " ".join(args)
    rows = [line for line in lines if line.startswith("tiny") and "samples/s (" in line]
    assert len(rows) == 2 and "loader, 0 workers" in rows[0] and "device cache" in rows[1]
    for line in rows:
        assert "GiB" in line and "params" in line and "MFU" in line
    # counted FLOPs of one sample; the MFU printed is samples/s x FLOPs / peak
    flops = next(line for line in lines if "GFLOP per sample" in line)
    gflop = float(flops.split()[1])
    forward, backward = (float(flops.split(f"{w} ")[1].split()[0].rstrip(";")) for w in ("forward", "backward"))
    assert abs(forward + backward - gflop) < 0.02 and 1.5 < backward / forward < 2.5  # backward ~ 2 x forward
    # tiny: ~0.2 M parameters, 3,840 decoder queries (3,072 + 768 eikonal) through 128-wide layers
    assert 0.3 < gflop < 5
    for line in rows:
        samples_per_s = float(line.split(" samples/s (")[0].split()[-1])
        mfu = float(line.split("MFU ")[1].split()[0])
        assert mfu == pytest.approx(100 * samples_per_s * gflop / 1e3 / 989, rel=0.05)
    assert any("device cache / loader:" in line for line in lines)
    memory = next(line for line in lines if "largest batch for 40 GiB" in line)
    assert int(memory.split("largest batch for 40 GiB: ")[1].split()[0]) > 100  # tiny: MiB per sample
    assert any(line.startswith("tiny   device cache: 2 cases in") and "bytes per case" in line for line in lines)
    # --profile: for each data path, the ops with the most time, matrix products among them
    assert sum(line.startswith("tiny   profile of 1 steps") for line in lines) == 2
    tables = [i for i, line in enumerate(lines) if "by self CPU time per step" in line]
    assert len(tables) == 2
    for i in tables:
        shares = [float(line.split(" ms ")[1].split("%")[0]) for line in lines[i + 1: i + 13]]
        assert len(shares) == 12 and shares == sorted(shares, reverse=True) and sum(shares) <= 100.5
    assert any("aten::mm" in line or "aten::addmm" in line for line in lines)


@pytest.mark.slow
def test_train_speed_runs_on_prepared_cases(tmp_path):
    from fixtures_training import write_analytic_case, write_case_lists

    for seed in (3, 4, 5):
        write_analytic_case(tmp_path / f"case{seed}.npz", seed=seed)
    write_case_lists(tmp_path, ["case3", "case4", "case5"], [])
    text = run_benchmark("train_speed.py", "--configs", "tiny", "--steps", "1", "--warmup", "0", "--batch_size", "2",
                         "--threads", "1", "--no_flops", "--data", "device", "--data_dir", str(tmp_path))
    assert f"data: {tmp_path}" in text
    assert "device cache: 3 cases in" in text  # the three cases given, not the two analytic ones
    assert sum(line.startswith("tiny") and "samples/s (" in line for line in text.splitlines()) == 1


def test_train_speed_refuses_bad_options_before_any_work(tmp_path):
    for args, message in ((("--configs", "tiny", "--overrides", "run.compile_scope=trunk"), "compile_scope 'trunk'"),
                          (("--configs", "nosuch"), "invalid choice: 'nosuch'"),
                          (("--configs", "tiny", "--overrides", "optim.lrr=1"), "optim.lrr"),
                          (("--configs", "tiny", "--data_dir", str(tmp_path)), f"--data_dir {tmp_path}: no train.csv")):
        proc = subprocess.run([sys.executable, str(BENCH / "train_speed.py"), *args], cwd=ROOT, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 2 and message in proc.stderr, (args, proc.stderr[-500:])
        assert "samples/s" not in proc.stdout


@pytest.mark.slow
def test_prepare_speed_times_the_stages_and_the_whole_case():
    text = run_benchmark("prepare_speed.py", "--num_surface", "2000", "--num_volume", "2000", "--num_near", "2000",
                         "--repeats", "1", "--threads", "1", "--real_dir", str(ROOT / "no_such_folder"))
    assert "staged (best of 1)" in text and "full prepare_case" in text and "skipped" in text


@pytest.mark.slow
def test_complete_speed_times_stages_and_checks_fast_against_exact():
    """The bundled model (realistic fields, no training needed) at 2 mm: stage times, peak memory
    and the fast-vs-exact accuracy check are printed; an exact run prints no check."""
    demo = BUNDLED_MODELS_DIR / "synthetic_demo.safetensors"
    text = run_benchmark("complete_speed.py", "--checkpoint", str(demo), "--spacing", "2.0", "--threads", "1")
    lines = text.strip().splitlines()
    assert lines[0].startswith("command: python benchmarks/complete_speed.py --checkpoint"), lines[0]
    last = lines[-1]
    assert "peak RSS" in last and "output voxels" in last and "refined queries" in last and "fast decode" in last, last
    assert "accuracy vs exact" in last and ("PASS" in last or "FAIL" in last), last
    stages = next(line for line in lines if line.startswith("stages (s):"))
    for stage in ("surfaces", "encode", "decode", "fusion", "islands", "writing"):
        assert stage in stages, stages
    check = next(line for line in lines if line.startswith("accuracy fast vs exact:"))
    assert check.count("Dice") == 5 and check.count("ASSD") == 5, check
    assert '"dice_vs_truth"' in text
    exact = run_benchmark("complete_speed.py", "--checkpoint", str(demo), "--spacing", "3.0", "--threads", "1",
                          "--decode", "exact")
    assert "(exact decode)" in exact.strip().splitlines()[-1] and "accuracy" not in exact


def test_fit_batch_study_compares_batches_on_the_same_hearts(tmp_path):
    """One tuning heart, one scenario, two batches: both heart-eval runs finish, the report pairs
    the same rows (n = the heart's scored structures) and prints the time per completion."""
    text = run_benchmark("fit_batch_study.py", "--count", "1", "--scenarios", "missing_LAA", "--batches", "2048",
                         "64", "--output_dir", str(tmp_path), timeout=600)
    lines = text.strip().splitlines()
    assert lines[0].startswith("command: python benchmarks/fit_batch_study.py --count 1"), lines[0]
    assert "fit_batch 64 against 2048" in text
    rows = {line.split()[0]: line for line in lines if line.startswith("  ")}
    assert set(rows) == {"all", "missing_X"} and "n=1)" in rows["all"] and "dice" in rows["all"], rows
    seconds = [line.split() for line in lines if line.split()[:1] in (["2048"], ["64"])]
    assert len(seconds) == 2 and all(float(row[1]) > 0 for row in seconds), seconds
    assert len(list((tmp_path / "hearts_tuning_1").glob("*.nii.gz"))) == 1
    again = run_benchmark("fit_batch_study.py", "--count", "1", "--scenarios", "missing_LAA", "--batches", "2048",
                          "64", "--output_dir", str(tmp_path))  # finished runs are reused: the same report
    def report(output):  # what follows the runs
        rows = output.strip().splitlines()
        return rows[next(i for i, row in enumerate(rows) if row.startswith("heart-eval runs done")) + 1:]

    assert text.count(": done in") == 2 and again.count(": reusing") == 2
    assert report(again) == report(text) and len(list(tmp_path.glob("eval_*"))) == 2
    other = run_benchmark("fit_batch_study.py", "--count", "1", "--scenarios", "missing_PV", "--batches", "64",
                          "--output_dir", str(tmp_path))  # other scenarios: a run of their own, not the old one
    assert len(list(tmp_path.glob("eval_*"))) == 3 and "batch" in other


@pytest.mark.parametrize("args", [["--batches", "0"], ["--batches", "512", "512"], ["--workers", "0"],
                                  ["--checkpoint", "no_such.safetensors"]])
def test_fit_batch_study_refuses_bad_options_before_any_work(args, tmp_path):
    proc = subprocess.run([sys.executable, str(BENCH / "fit_batch_study.py"), *args, "--output_dir",
                           str(tmp_path / "never")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "error:" in proc.stderr
    assert not (tmp_path / "never").exists()


def test_handover_files_times_the_panels_four_file_steps_both_ways():
    text = run_benchmark("handover_files.py", "--repeats", "1")
    lines = text.strip().splitlines()
    assert lines[0] == "command: python benchmarks/handover_files.py --repeats 1"
    assert [line.split(":")[0] for line in lines[1:3]] == ["whole grid", "boxes"]
    assert all("panel writes the input" in line and "panel reads it" in line for line in lines[1:3])
    assert lines[-1].startswith("1 mm (163, 158, 174): the result's box (")
    assert lines[-1].endswith("inputs read back the same: True")


def test_worker_latency_compares_fresh_processes_with_the_warm_worker():
    text = run_benchmark("worker_latency.py", "--spacing", "3", "--repeats", "1", "--threads", "1", "--panel_files")
    lines = text.strip().splitlines()
    assert lines[0] == "command: python benchmarks/worker_latency.py --spacing 3 --repeats 1 --threads 1 --panel_files"
    assert [line.split(":")[0] for line in lines[1:4]] == ["fresh process 1", "worker request 1 (starts the worker)",
                                                           "worker request 2"]
    assert any(line.startswith("first request to a worker started ahead: ") for line in lines)
    assert lines[-1].startswith("3 mm (") and "fresh process" in lines[-1] and "warm worker" in lines[-1]
    assert "when started ahead" in lines[-1] and "files as the panel hands them over" in lines[-1]
    assert lines[-1].endswith("outputs identical: True")


@pytest.mark.parametrize("name, args, message", [
    ("worker_latency.py", ["--repeats", "0"], "--repeats and --threads must be at least 1"),
    ("handover_files.py", ["--repeats", "0"], "--repeats must be at least 1"),
    ("panel_steps.py", ["--spacing", "0"], "--spacing must be a voxel size above 0 mm"),
    ("first_lattice.py", ["--spacings", "8"], "--spacings needs at least two spacings above 0 mm"),
    ("first_lattice.py", ["--spacings", "8", "nan"], "--spacings needs at least two spacings above 0 mm"),
    ("first_lattice.py", ["--real", "no/such/folder"], "--real: no such folder: no/such/folder"),
    ("first_lattice.py", ["--checkpoint", "no-such-model"], "--checkpoint: 'no-such-model' is neither a checkpoint"),
])
def test_panel_benchmarks_refuse_bad_options_before_any_work(name, args, message):
    proc = subprocess.run([sys.executable, str(BENCH / name), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


def test_panel_steps_times_the_panels_own_work_around_a_completion():
    pytest.importorskip("slicer", reason="slicer-core is not installed")
    text = run_benchmark("panel_steps.py", "--spacing", "3")
    lines = text.strip().splitlines()
    assert lines[0] == "command: python benchmarks/panel_steps.py --spacing 3"
    for start in ("segmentation -> input file (startCompletion): ", "completion in the worker",
                  "result -> segments (finishCompletion): "):
        assert any(line.startswith(start) for line in lines), start
    assert lines[-1].startswith("3 mm (") and "5 structures added" in lines[-1] and "with surfaces" in lines[-1]
    assert "with the given ones' shown before" in lines[-1]


def test_first_lattice_completes_each_heart_from_each_first_spacing(tmp_path, monkeypatch):
    """Per label map file: queries, decode seconds and differing voxels per first lattice, the
    first spacing's labels as the reference; a file with no structure of the table is skipped."""
    monkeypatch.syspath_prepend(str(BENCH))
    from complete_speed import B_SUBSET, partial_heart

    from HeartCompletionLib.io.labelmap import LabelMap
    from HeartCompletionLib.io.labelmap_files import write_label_map

    folder = tmp_path / "real"
    folder.mkdir()
    _, heart = partial_heart(0, 3.0, list(B_SUBSET))
    write_label_map(heart, folder / "heart_label.nii.gz")
    write_label_map(LabelMap(np.zeros((6, 6, 6), dtype=np.int16), heart.ijk_to_ras), folder / "empty_label.nii.gz")
    (folder / "heart_envelope.nii.gz").write_bytes(b"not a label map: never read")
    text = run_benchmark("first_lattice.py", "--real", str(folder), "--spacings", "8", "16", "--threads", "1")
    lines = text.strip().splitlines()
    assert lines[0] == f"command: python benchmarks/first_lattice.py --real {folder} --spacings 8 16 --threads 1"
    assert any(line.startswith("[1/2] empty_label.nii.gz: skipped (") for line in lines), lines
    row = next(line for line in lines if line.startswith("[2/2] heart_label.nii.gz "))
    assert row.count("voxels differ") == 2 and "8 mm " in row and "16 mm " in row, row
    first = int(row.split("8 mm ")[1].split(" queries")[0].replace(",", ""))
    assert first > 0 and row.split("8 mm ")[1].split(";")[0].endswith(", 0 voxels differ"), row
    assert lines[-1].startswith("1 hearts, fast decode: queries 8 mm ") and "hearts with a differing voxel: " in lines[-1]
    assert not any("heart_envelope" in line for line in lines)


def test_complete_speed_completes_a_label_map_file_in_its_own_numbering(tmp_path):
    """``--input`` with ``--label_map``: a file whose values are not the table's (ventricles as 1-3,
    like the ACDC files) is read in that numbering and completed, with the same stage times and
    accuracy check and no truth; ``--input`` without a checkpoint is refused."""
    from HeartCompletionLib.io.labelmap import LabelMap
    from HeartCompletionLib.io.labelmap_files import write_label_map
    from HeartCompletionLib.io.synthetic import synthetic_label_map
    from HeartCompletionLib.structures.table import StructureTable

    table = StructureTable.default()
    heart = synthetic_label_map(seed=1, spacing_mm=3.0)
    own = {table.by_name("RV").label: 1, table.by_name("Myocardium").label: 2, table.by_name("LV").label: 3}
    labels = np.zeros_like(heart.labels)
    for value, mine in own.items():
        labels[heart.labels == value] = mine
    path, convention = tmp_path / "ventricles.nii.gz", tmp_path / "labels.json"
    write_label_map(LabelMap(labels, heart.ijk_to_ras), path)
    convention.write_text(json.dumps({"1": "RV", "2": "Myocardium", "3": "LV"}))
    demo = BUNDLED_MODELS_DIR / "synthetic_demo.safetensors"
    text = run_benchmark("complete_speed.py", "--checkpoint", str(demo), "--input", str(path), "--label_map",
                         str(convention), "--threads", "1")
    report = json.loads(text[text.index("{"):text.rindex("}") + 1])
    assert report["input"] == str(path) and report["dice_vs_truth"] is None
    assert report["completed"] == [s.name for s in table if s.name not in ("RV", "Myocardium", "LV")]
    check = next(line for line in text.splitlines() if line.startswith("accuracy fast vs exact:"))
    assert check.count("Dice") == 7, check
    assert "accuracy vs exact" in text.strip().splitlines()[-1]
    refused = subprocess.run([sys.executable, str(BENCH / "complete_speed.py"), "--input", str(path)], cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "--input needs --checkpoint" in refused.stderr
    missing = subprocess.run([sys.executable, str(BENCH / "complete_speed.py"), "--checkpoint", str(demo), "--input",
                              str(tmp_path / "none.nii.gz")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "none.nii.gz: file not found" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_decode_bookkeeping_replays_the_recorded_decode():
    """The bundled model at 1 mm: the decode is recorded, replayed without the network asking for
    the same points and giving the same labels; ``--module`` replays a given decode_grid.py."""
    demo = BUNDLED_MODELS_DIR / "synthetic_demo.safetensors"
    module = ROOT / "HeartCompletionLib" / "inference" / "decode_grid.py"
    text = run_benchmark("decode_bookkeeping.py", "--checkpoint", str(demo), "--repeats", "1", "--module", str(module))
    lines = text.strip().splitlines()
    assert lines[0].startswith("command: python benchmarks/decode_bookkeeping.py --checkpoint"), lines[0]
    recorded = int(lines[1].split("recorded decode: ")[1].split(" queries")[0].replace(",", ""))
    asked = int(lines[2].split("), ")[1].split(" queries asked")[0].replace(",", ""))
    assert recorded == asked > 10_000, lines
    assert "bookkeeping alone: " in lines[2] and "labels identical to the recorded decode" in lines[2], lines[2]


def test_interpolation_error_compares_trilinear_and_cubic():
    """The bundled model at 1 mm, two boxes: both interpolants' error quantiles are printed, each
    ordered (median <= 90th <= 99th percentile) and a fraction of a millimetre."""
    demo = BUNDLED_MODELS_DIR / "synthetic_demo.safetensors"
    text = run_benchmark("interpolation_error.py", "--checkpoint", str(demo), "--boxes", "2", "--threads", "1")
    lines = text.strip().splitlines()
    assert lines[0].startswith("command: python benchmarks/interpolation_error.py --checkpoint"), lines[0]
    assert "2 boxes of 13^3 voxels decoded" in lines[1], lines[1]
    rows = [line for line in lines if " error (mm) median " in line]
    assert [row.split()[0] for row in rows] == ["trilinear", "trilinear", "Catmull-Rom", "Catmull-Rom"], rows
    for row in rows:
        q = [float(row.split(name)[1].split()[0]) for name in ("median", "90th", "99th")]
        assert 0.0 <= q[0] <= q[1] <= q[2] < 1.0, row


@pytest.mark.slow
def test_population_stats_prints_ranges_and_r2_with_and_without_modes():
    text = run_benchmark("population_stats.py", "--hearts", "12", "--spacing", "3", "--folds", "3")
    lines = text.splitlines()
    assert lines[0] == "command: python benchmarks/population_stats.py --hearts 12 --spacing 3 --folds 3"
    assert "with modes: 12/12 hearts" in text and "without modes: 12/12 hearts" in text
    lv = [line.split("|") for line in lines if line.startswith("| LV ")]
    assert len(lv) == 3  # modes table, independent table, comparison table
    assert all(float(x) > 0 for x in lv[0][2:7])  # min / p5 / median / p95 / max mL
    assert len(lv[2]) == 7 and all(float(x) <= 1.0 for x in lv[2][2:6])  # four R^2


@pytest.mark.skipif(sys.platform == "win32", reason="bash script")
def test_gpu_check_script_parses_and_explains_itself():
    subprocess.run(["bash", "-n", str(BENCH / "gpu_check.sh")], check=True)
    help_text = subprocess.run(["bash", str(BENCH / "gpu_check.sh"), "--help"], capture_output=True, text=True,
                               check=True).stdout
    for part in ("sweep", "data", "speed", "phase1", "complete", "studydata", "bg:PART"):
        assert part in help_text


@pytest.mark.slow
def test_gpu_check_runs_a_background_part_and_waits_for_it(tmp_path):
    """``bg:PART`` runs next to the parts after it, ``wait`` waits for it: here the study's data
    (3 + 3 hearts) in the background, a part that prints the time while it runs, then the packing,
    which must find the background part's finished console log."""
    out, work = tmp_path / "out", tmp_path / "work"
    bindir = Path(sys.executable).parent  # python3 and the console scripts of this environment first
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}", "SKIP_INSTALL": "1", "DEVICE": "cpu",
           "OUT": str(out), "WORK": str(work), "DEADLINE_S": "300", "PARTS": "bg:studydata wait pack",
           "STUDY_ARGS": "--train_hearts 3 --heldout_hearts 3"}
    proc = subprocess.run(["bash", str(BENCH / "gpu_check.sh")], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    waited = next(i for i, line in enumerate(lines) if "wait: for the background parts" in line)
    finished = next(i for i, line in enumerate(lines) if line.startswith("studydata: exit 0"))
    packed = next(i for i, line in enumerate(lines) if line.rstrip().endswith("texts.tgz"))  # pack's listing
    assert waited < finished < packed  # `wait` returned only when the background part had finished
    assert (work / "study" / "prepared" / "train.csv").is_file()
    listing = subprocess.run(["tar", "tzf", str(out / "texts.tgz")], capture_output=True, text=True, check=True).stdout
    assert "studydata_console.txt" in listing and "machine.txt" in listing


@pytest.mark.slow
def test_fuzz_readers_runs_at_its_smallest_size():
    text = run_benchmark("fuzz_readers.py", "--count", "6", "--seed", "1")
    assert text.startswith("command: ") and "fuzz_readers.py --count 6" in text
    assert "6 mutations in" in text and "total" in text and "FAIL" not in text


def test_fps_speed_checks_the_cuda_graph_or_says_why_not():
    """On a CUDA machine: eager and graph indices agree (exit 0) and both times are printed; without
    CUDA it is a usage error naming the reason, never a silent pass."""
    import torch

    proc = subprocess.run([sys.executable, str(BENCH / "fps_speed.py"), "--shapes", "4x600x32"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    if torch.cuda.is_available():
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "same indices: True" in proc.stdout and "CUDA graph" in proc.stdout
    else:
        assert proc.returncode == 2 and "CUDA is not available" in proc.stderr
