"""Bad input never crashes and never loses data (issue 14, rows 4-13 and 15).

Every test reproduces one row of the fault matrix with real files, real models and real
processes (no mocks); each failed before its fix. Faults a root test process cannot provoke
with permissions (a read-only disk) are provoked with a file-size limit (``RLIMIT_FSIZE``:
writes fail with EFBIG exactly as they fail with ENOSPC on a full disk).
"""

from __future__ import annotations

import json
import os
import resource
import signal
import struct
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from fixtures_training import write_analytic_case, write_case_lists

from HeartCompletionLib.errors import HeartCompletionError
from HeartCompletionLib.io.labelmap_files import LabelMapError, read_label_map, write_label_map
from HeartCompletionLib.io.synthetic import synthetic_label_map
from HeartCompletionLib.model.checkpoint import CheckpointError, load_inference_checkpoint, read_checkpoint_metadata
from HeartCompletionLib.structures.table import StructureTable

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
SMALL_CASE = dict(num_surface=6000, num_volume=3000, num_near=4000)
SMALL_PREPARE = ["--num_surface", "3000", "--num_volume", "3000", "--num_near", "3000",
                 "--min_surface_per_structure", "100"]
CHECK_SMALL = ["--min_surface", "1000", "--min_volume", "1000", "--min_near", "1000",
               "--min_samples_per_structure", "50"]


# --- helpers --------------------------------------------------------------------------------
def _tiny_checkpoint(path: Path) -> Path:
    """A real (untrained) tiny model saved as an inference checkpoint."""
    from HeartCompletionLib.geometry.normalization import Normalization
    from HeartCompletionLib.model.checkpoint import save_inference_checkpoint
    from HeartCompletionLib.model.configs import get_config
    from HeartCompletionLib.model.vecset import HeartVecSet

    table = StructureTable.default()
    return save_inference_checkpoint(path, HeartVecSet(get_config("tiny", len(table))), table, Normalization(),
                                     phase=1, data_summary={})


def _rewrite_metadata(src: Path, dst: Path, edit) -> Path:
    """Copy a safetensors checkpoint with its HeartCompletion metadata changed by ``edit(meta)``."""
    raw = src.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    meta = json.loads(header["__metadata__"]["heartcompletion"])
    edit(meta)
    header["__metadata__"]["heartcompletion"] = json.dumps(meta)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    dst.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])
    return dst


def _rewrite_case(path: Path, edit) -> Path:
    """Rewrite a prepared case with ``edit(arrays)`` applied (as a user's script would)."""
    from heart_training.data.case_format import OPTIONAL_KEYS, load_case, save_case

    case = load_case(path, optional=OPTIONAL_KEYS)
    meta = {k: v for k, v in case.pop("meta").items() if k not in ("format", "format_version")}
    edit(case)
    return save_case(path, case, meta)


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


# --- row 4: sign-flipped training data ------------------------------------------------------
@pytest.mark.slow
def test_row4_sign_flipped_case_fails_check_and_gate(tmp_path, capsys):
    from heart_training.data import prepare_cli
    from heart_training.data.data_gate import check_case as gate_check
    from heart_training.data.dataset import CaseRef
    from heart_training.data.dataset_check import CheckLimits, check_case

    limits = CheckLimits(min_surface=1000, min_volume=1000, min_near=1000)
    good = write_analytic_case(tmp_path / "good" / "case.npz", seed=0, **SMALL_CASE)
    assert check_case(good, limits) == [] and gate_check(CaseRef("t", good, "case")) == []
    flipped = write_analytic_case(tmp_path / "flipped" / "case.npz", seed=0, **SMALL_CASE)

    def flip(case):
        case["volume_sdf"] = -case["volume_sdf"]
        case["near_sdf"] = -case["near_sdf"]

    _rewrite_case(flipped, flip)
    assert any("sign" in p for p in check_case(flipped, limits)), check_case(flipped, limits)
    problems = gate_check(CaseRef("t", flipped, "case"))
    assert any("sign" in p and str(flipped) in p for p in problems), problems
    assert prepare_cli.main(["--check", str(flipped.parent), "--quiet", *CHECK_SMALL]) == 1
    assert "positive inside" in capsys.readouterr().out


# --- row 5: the data gate checks every case, once, in parallel -------------------------------
@pytest.mark.slow
def test_row5_gate_checks_every_case_and_caches_by_hash(tmp_path):
    from heart_training.config import load_config
    from heart_training.data.data_gate import DataGateError, run_case_checks
    from heart_training.data.dataset import CaseRef
    from heart_training.train.trainer import train

    data = tmp_path / "data"
    names = [f"c{i}" for i in range(5)]
    for i, name in enumerate(names):
        write_analytic_case(data / f"{name}.npz", seed=i, **SMALL_CASE)
    # x100 distances in a case the old sample (gate_cases=2: the first and the last) never saw
    _rewrite_case(data / "c2.npz", lambda c: (c.__setitem__("volume_sdf", c["volume_sdf"] * 100),
                                             c.__setitem__("near_sdf", c["near_sdf"] * 100)))
    write_case_lists(data, names, [])
    cfg = load_config("tiny_test", [f"data.datasets.0.data_dir={data}", f"run.output_dir={tmp_path / 'run'}",
                                    "optim.max_steps=2", "run.threads=1", "run.gate_cases=2",
                                    f"run.gate_cache_dir={tmp_path / 'cache'}"])
    with pytest.raises(DataGateError, match="c2.npz"):
        train(cfg)
    assert not (tmp_path / "run" / "state_last.pt").exists()

    # one verdict per file content; parallel and serial agree; a cached verdict is reused
    refs = [CaseRef("t", data / f"{n}.npz", n) for n in names]
    cache = tmp_path / "cache2"
    serial = run_case_checks(refs, workers=1, cache_dir=cache)
    assert serial and all("c2.npz" in p for p in serial)
    assert len(list(cache.glob("*.json"))) == len(names)  # one verdict per file content
    assert run_case_checks(refs, workers=2, cache_dir=cache) == serial
    # the cache is keyed by content: a verdict planted under c0's hash is what the gate reports for c0
    entry = next(e for e in cache.glob("*.json") if json.loads(e.read_text())["file"] == str(refs[0].path))
    entry.write_text(json.dumps({**json.loads(entry.read_text()), "problems": ["planted verdict"]}))
    again = run_case_checks(refs, workers=1, cache_dir=cache)
    assert f"{refs[0].path}: planted verdict" in again


# --- row 6: a crafted checkpoint header --------------------------------------------------------
@pytest.mark.slow
def test_row6_crafted_header_is_refused_before_building(tmp_path):
    good = _tiny_checkpoint(tmp_path / "tiny.safetensors")
    crafted = _rewrite_metadata(good, tmp_path / "huge.safetensors",
                                lambda m: m["model_config"].update(width=8192, depth=48))
    # in a process limited to 6 GB of address space: before the fix building the model failed there
    code = ("import resource, sys\n"
            "resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))\n"
            "from HeartCompletionLib.model.checkpoint import load_inference_checkpoint, CheckpointError\n"
            "try:\n"
            f"    load_inference_checkpoint({str(crafted)!r})\n"
            "except CheckpointError as exc:\n"
            "    print('REFUSED', exc); sys.exit(3)\n")
    result = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 3, result.stderr[-2000:]
    assert str(crafted) in result.stdout and "do not match" in result.stdout


# --- row 7: size guard in the label-map readers ----------------------------------------------
def _nifti_header_bytes(shape, dtype=np.uint8) -> bytes:
    import nibabel as nib

    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header.set_sform(np.eye(4), code=1)
    return header.binaryblock + b"\0" * 4  # vox_offset 352


def test_row7_header_promising_more_than_the_file_holds(tmp_path):
    import gzip

    # a .nii.gz of a few KB whose header claims 1024^3 voxels (1 GB): refused before allocating
    path = tmp_path / "claims_1g.nii.gz"
    path.write_bytes(gzip.compress(_nifti_header_bytes((1024, 1024, 1024)) + b"\1" * 100_000))
    tracemalloc.start()
    with pytest.raises(LabelMapError, match="claims_1g.nii.gz.*(promises|holds)"):
        read_label_map(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 50e6, f"{peak / 1e6:.0f} MB allocated for a {path.stat().st_size}-byte file"
    # an uncompressed NRRD whose sizes exceed its data
    nrrd_path = tmp_path / "claims.nrrd"
    nrrd_path.write_bytes(b"NRRD0004\ntype: uint8\ndimension: 3\nsizes: 1024 1024 1024\nencoding: raw\n\n"
                          + b"\0" * 1000)
    with pytest.raises(LabelMapError, match="claims.nrrd.*(promises|holds)"):
        read_label_map(nrrd_path)


def test_row7_voxel_limit_option(tmp_path, monkeypatch):
    path = write_label_map(synthetic_label_map(seed=0, spacing_mm=3.0), tmp_path / "heart.nii.gz")
    voxels = int(np.prod(read_label_map(path).shape))
    with pytest.raises(LabelMapError, match=rf"heart.nii.gz.*{voxels:,} voxels.*limit of 1,000"):
        read_label_map(path, max_voxels=1000)
    monkeypatch.setenv("HEARTCOMPLETION_MAX_VOXELS", "1000")
    with pytest.raises(LabelMapError, match="HEARTCOMPLETION_MAX_VOXELS"):
        read_label_map(path)
    # heart-prepare --max_voxels: the case fails alone with that message
    from heart_training.data import prepare_cli

    monkeypatch.delenv("HEARTCOMPLETION_MAX_VOXELS")
    out = tmp_path / "out"
    assert prepare_cli.main(["--input_dir", str(tmp_path), "--output_dir", str(out), "--quiet", "--workers", "1",
                         "--max_voxels", "1000", *SMALL_PREPARE]) == 1
    assert "limit" in json.loads((out / "manifest.json").read_text())["cases"][0]["reason"]


@pytest.mark.slow
def test_row7_memory_error_becomes_a_clear_error(tmp_path):
    import nibabel as nib

    path = tmp_path / "big.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((512, 512, 400), np.uint8), np.eye(4)), str(path))
    code = ("import resource, sys\n"
            "from HeartCompletionLib.io.labelmap_files import read_label_map, LabelMapError\n"
            "size = [int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmSize')][0] * 1024\n"
            "resource.setrlimit(resource.RLIMIT_AS, (size + (250 << 20),) * 2)\n"
            "try:\n"
            f"    read_label_map({str(path)!r})\n"
            "except LabelMapError as exc:\n"
            "    print('REFUSED', exc); sys.exit(3)\n")
    result = subprocess.run([sys.executable, "-c", code], env={**ENV, "OPENBLAS_NUM_THREADS": "1"},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 3, result.stderr[-2000:]
    assert str(path) in result.stdout and "memory" in result.stdout


# --- row 8: an 8-bit intensity image is not a label map --------------------------------------
def test_row8_intensity_image_is_refused(tmp_path):
    import nibabel as nib

    heart = synthetic_label_map(seed=0, spacing_mm=2.0)
    rng = np.random.default_rng(0)
    intensity = np.clip(40 + 18.0 * heart.labels + rng.normal(0, 12, heart.shape), 0, 255).astype(np.uint8)
    path = tmp_path / "ct_8bit.nii.gz"
    nib.save(nib.Nifti1Image(intensity, heart.ijk_to_ras), str(path))
    with pytest.raises(LabelMapError, match="ct_8bit.nii.gz.*not a label map"):
        read_label_map(path)
    noise = tmp_path / "noise.nrrd"
    import nrrd

    nrrd.write(str(noise), rng.integers(0, 256, (40, 40, 40)).astype(np.uint8))
    with pytest.raises(LabelMapError, match="noise.nrrd.*not a label map"):
        read_label_map(noise)
    # a label map of another numbering (many labels, piecewise constant) is still read, with warnings
    many = heart.labels.astype(np.int16) * 7 + (heart.labels > 0)  # values 8, 15, ... 71
    other = tmp_path / "other_numbering.nii.gz"
    nib.save(nib.Nifti1Image(many, heart.ijk_to_ras), str(other))
    with pytest.warns(UserWarning):
        assert read_label_map(other).shape == heart.shape


# --- row 9: workers die with their parent ----------------------------------------------------
@pytest.mark.slow
def test_row9_kill_9_of_prepare_leaves_no_orphan_workers(tmp_path):
    source = tmp_path / "in"
    for seed in range(6):
        write_label_map(synthetic_label_map(seed=seed, spacing_mm=1.5), source / f"case_{seed}.nii.gz")
    process = subprocess.Popen(
        [sys.executable, "-m", "heart_training.data.prepare_cli", "--input_dir", str(source), "--output_dir",
         str(tmp_path / "out"), "--workers", "2", "--quiet", "--num_surface", "120000", "--num_volume", "200000",
         "--num_near", "200000"], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(workers) < 2:
            time.sleep(0.2)
            workers = [p for p in _children(process.pid) if "python" in Path(f"/proc/{p}/comm").read_text()]
        assert len(workers) >= 2, "heart-prepare did not start two workers"
        time.sleep(1.0)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_alive(p) for p in workers):
            time.sleep(0.2)
        orphans = [p for p in workers if _alive(p)]
        assert not orphans, f"workers {orphans} outlived their parent"
    finally:
        for pid in workers:  # never leave our own processes behind, even when the test fails
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        if process.poll() is None:
            process.kill()


# --- row 10: messages, not tracebacks ---------------------------------------------------------
def test_row10_malformed_safetensors_header(tmp_path):
    for name, header in [("offsets.safetensors", {"w": {"dtype": "F32", "shape": [1], "data_offsets": "x"}}),
                         ("shape.safetensors", {"w": {"dtype": "F32", "shape": "big", "data_offsets": [0, 4]}}),
                         ("list.safetensors", {"w": [1, 2]})]:
        text = json.dumps(header).encode()
        path = tmp_path / name
        path.write_bytes(struct.pack("<Q", len(text)) + text + b"\0" * 4)
        for reader in (read_checkpoint_metadata, load_inference_checkpoint):
            with pytest.raises(CheckpointError, match=name):
                reader(path)


def test_row10_label_map_and_table_json_that_are_lists(tmp_path, capsys):
    from heart_training.data import prepare_cli

    write_label_map(synthetic_label_map(seed=0, spacing_mm=3.0), tmp_path / "in" / "case.nii.gz")
    as_list = tmp_path / "list.json"
    as_list.write_text('["Myocardium", "LA"]')
    for option in ("--label_map", "--table"):
        assert prepare_cli.main(["--input_dir", str(tmp_path / "in"), "--output_dir", str(tmp_path / "out"),
                             option, str(as_list), "--quiet", *SMALL_PREPARE]) == 2
        assert f"{as_list}" in capsys.readouterr().err


def test_row10_manifest_on_a_full_disk(tmp_path):
    from heart_training.data import prepare_cli

    write_label_map(synthetic_label_map(seed=0, spacing_mm=3.0), tmp_path / "in" / "case.nii.gz")
    out = tmp_path / "out"
    args = ["--input_dir", str(tmp_path / "in"), "--output_dir", str(out), "--quiet", "--workers", "1",
            *SMALL_PREPARE]
    assert prepare_cli.main(args) == 0
    manifest = (out / "manifest.json").read_bytes()

    def tiny_files():  # writes beyond 100 bytes fail with EFBIG, as they fail with ENOSPC on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100, 100))

    result = subprocess.run([sys.executable, "-m", "heart_training.data.prepare_cli", *args], env=ENV,
                            preexec_fn=tiny_files, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and str(out / "manifest.json") in result.stderr
    assert (out / "manifest.json").read_bytes() == manifest and not list(out.rglob("*.tmp"))


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """A 2-step tiny training run (data + run folder) to resume from."""
    from heart_training.train.trainer import main

    root = tmp_path_factory.mktemp("short_run")
    data = root / "data"
    write_analytic_case(data / "a.npz", seed=0, **SMALL_CASE)
    write_case_lists(data, ["a"], [])
    args = ["--config", "tiny_test", f"data.datasets.0.data_dir={data}", "optim.max_steps=2", "run.threads=1",
            "run.val_every=0", "run.checkpoint_every=0", f"run.gate_cache_dir={root / 'cache'}"]
    assert main([*args, "--output_dir", str(root / "run")]) == 0
    return root, args


def test_row10_corrupt_or_pickled_state_on_resume(short_run, tmp_path, capsys):
    import shutil

    from heart_training.train.trainer import main

    root, args = short_run
    for name, content in [("garbage", b"\x00not a state file" * 10),
                          ("pickle", b"\x80\x04\x95\x1f\x00\x00\x00\x00\x00\x00\x00\x8c\x02os\x94\x8c\x06system"
                                     b"\x94\x93\x94\x8c\x04true\x94\x85\x94R\x94.")]:
        run = tmp_path / name
        shutil.copytree(root / "run", run)
        (run / "state_last.pt").write_bytes(content)
        assert main([*args, "optim.max_steps=3", "--output_dir", str(run), "--resume"]) == 2
        err = capsys.readouterr().err
        assert str(run / "state_last.pt") in err and "Traceback" not in err
        assert (run / "state_last.pt").read_bytes() == content  # evidence kept, not overwritten


def test_row10_override_with_invalid_yaml(capsys):
    from heart_training.train.trainer import main

    assert main(["--config", "tiny_test", "optim.lr=[1"]) == 2
    assert "optim.lr=[1" in capsys.readouterr().err


@pytest.mark.slow
def test_row10_full_disk_while_saving_training_state(short_run, tmp_path):
    import shutil

    root, args = short_run
    run = tmp_path / "run"
    shutil.copytree(root / "run", run)
    state = (run / "state_last.pt").read_bytes()
    limit = len(state) // 2  # logs and config fit, the training state does not

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    result = subprocess.run([sys.executable, "-m", "heart_training.train.trainer", *args, "optim.max_steps=4",
                             "run.tensorboard=false", "run.progress=false", "--output_dir", str(run), "--resume"],
                            env=ENV, preexec_fn=small_files, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and str(run / "state_last.pt") in result.stderr
    assert (run / "state_last.pt").read_bytes() == state and not list(run.rglob("*.tmp"))


# --- row 11: structure names from a checkpoint -------------------------------------------------
def test_row11_newline_in_a_structure_name_is_refused(tmp_path):
    good = _tiny_checkpoint(tmp_path / "tiny.safetensors")

    def evil(meta):
        meta["structure_table"]["structures"][2]["name"] = "LV\nSegment0_Name:=x"

    crafted = _rewrite_metadata(good, tmp_path / "evil.safetensors", evil)
    for reader in (read_checkpoint_metadata, load_inference_checkpoint):
        with pytest.raises(CheckpointError, match=r"evil.safetensors.*control character"):
            reader(crafted)


# --- row 12: interrupted writes leave no *.tmp ---------------------------------------------------
def test_row12_sigterm_during_a_write_removes_the_temporary(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    code = ("import numpy as np\n"
            "from HeartCompletionLib.io.labelmap import LabelMap\n"
            "from HeartCompletionLib.io.labelmap_files import write_label_map\n"
            "rng = np.random.default_rng(0)\n"
            "labels = rng.integers(0, 11, (400, 400, 300)).astype(np.int16)\n"
            "print('ready', flush=True)\n"
            f"write_label_map(LabelMap(labels, np.eye(4)), {str(out / 'big.nii.gz')!r})\n")
    process = subprocess.Popen([sys.executable, "-c", code], env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not list(out.glob("*.tmp")):
            time.sleep(0.01)
        assert list(out.glob("*.tmp")), "the write never started"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == -signal.SIGTERM  # still dies by the signal
    finally:
        if process.poll() is None:
            process.kill()
    assert list(out.iterdir()) == []


def test_row12_stale_temporaries_are_swept_at_start(short_run, tmp_path):
    import shutil

    from heart_training.train.trainer import main

    root, args = short_run
    run = tmp_path / "run"
    shutil.copytree(root / "run", run)
    stale = [run / "state_last.pt.k2j4_x9a.tmp", run / "model_final.safetensors.abcd1234.tmp"]
    foreign = [run / "notes.tmp", run / "state_last.pt.user-copy.tmp"]
    for path in stale + foreign:
        path.write_bytes(b"left by a killed run")
    assert main([*args, "optim.max_steps=3", "--output_dir", str(run), "--resume"]) == 0
    assert not any(p.exists() for p in stale) and all(p.exists() for p in foreign)


# --- row 13: heart-eval does not exit 0 after skipping files ------------------------------------
@pytest.mark.slow
def test_row13_heart_eval_fails_when_a_file_was_unreadable(tmp_path, capsys):
    from heart_training.evaluation.evaluate import main

    ckpt = _tiny_checkpoint(tmp_path / "tiny.safetensors")
    data, train = tmp_path / "maps", tmp_path / "train"
    for seed in range(2):
        write_label_map(synthetic_label_map(seed=seed, spacing_mm=3.0), data / f"h{seed}.nii.gz")
        write_label_map(synthetic_label_map(seed=seed + 2, spacing_mm=3.0), train / f"t{seed}.nii.gz")
    (data / "broken.nii.gz").write_bytes(b"not a nifti file at all")
    rc = main(["--checkpoint", str(ckpt), "--data_dir", str(data), "--train_dir", str(train), "--output_dir",
               str(tmp_path / "eval"), "--scenarios", "subset_A", "--figure_cases", "0", "--device", "cpu",
               "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1, err
    assert str(data / "broken.nii.gz") in err
    assert (tmp_path / "eval" / "summary.json").is_file()  # what could be scored is still written


# --- row 15: resume verifies the output's stored checksums ---------------------------------------
def test_row15_resume_redoes_an_npz_corrupted_in_place(tmp_path):
    from heart_training.data import prepare_cli

    write_label_map(synthetic_label_map(seed=0, spacing_mm=3.0), tmp_path / "in" / "case.nii.gz")
    out = tmp_path / "out"
    args = ["--input_dir", str(tmp_path / "in"), "--output_dir", str(out), "--quiet", "--workers", "1",
            *SMALL_PREPARE]
    assert prepare_cli.main(args) == 0
    from heart_training.data.case_format import load_case

    npz = out / "case.npz"
    good = load_case(npz)
    size = npz.stat().st_size
    with open(npz, "r+b") as handle:  # flip bytes in the middle of the distances, sizes unchanged
        handle.seek(size // 2)
        handle.write(b"\xff" * 64)
    assert prepare_cli.main(args) == 0
    entry = json.loads((out / "manifest.json").read_text())["cases"][0]
    assert not entry.get("resumed") and any("checksum" in w for w in entry["warnings"])
    again = load_case(npz)  # prepared again: the arrays of before the damage
    assert all(np.array_equal(good[k], again[k], equal_nan=True) for k in good if k != "meta")


def test_errors_share_one_base():
    from heart_training.config import ConfigError
    from heart_training.data.case_format import CaseFormatError
    from heart_training.data.data_gate import DataGateError
    from heart_training.data.prepare import PrepareError

    for cls in (LabelMapError, CheckpointError, CaseFormatError, ConfigError, DataGateError, PrepareError):
        assert issubclass(cls, HeartCompletionError)
    assert issubclass(LabelMapError, ValueError) and issubclass(DataGateError, RuntimeError)  # old excepts hold
