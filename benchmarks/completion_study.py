"""The completion study: does a trained model fill in missing structures better than copying the
most similar known heart? One command, from nothing to a table.

    python benchmarks/completion_study.py --budget cpu --output_dir runs/study_cpu      # ~90 min, 2 cores
    python benchmarks/completion_study.py --budget gpu --output_dir runs/study_gpu      # ~8 min, one H100/H200
    python benchmarks/completion_study.py --budget smoke --output_dir /tmp/study        # a minute: the test's size

Stages (each resumes by rerunning the same command; a finished stage is skipped):

1. ``hearts``: synthetic hearts of the covarying population (``heart-synth --modes``) from two
   disjoint seed ranges: training hearts (30 % with the LAA cut by the field of view, as in
   ImageCAS) and **held-out** hearts, a third of them on oblique, anisotropic grids;
2. ``prepare``: ``heart-prepare`` of the training hearts and ``heart-split`` (train / val);
3. ``train``: the curriculum phase 1 -> 2 -> 3 (``heart-train``), each phase initialised from the
   previous phase's best checkpoint;
4. ``eval``: ``heart-eval`` of the phase-3 model on the held-out hearts (scenarios full, subset_A,
   subset_B, drop_k, missing_*), model and nearest-training-heart baseline side by side, in
   ``--eval_workers`` parallel shards merged into one report;
5. ``report``: ``study.md`` (per scenario and structure: Dice / HD95 / ASSD of model and baseline,
   the winner in bold, n; the verdict against the targets; the validation learning curves; the
   command, git commit, device and wall times) and ``study.json``.

The held-out hearts never enter training, validation or the baseline's candidates.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
STAGES = ("hearts", "prepare", "train", "eval", "report")
PHASES = (1, 2, 3)
#: seeds of held-out hearts come from another SeedSequence entropy than the training hearts'
HELDOUT_SEED_OFFSET = 1_000_003
CHAMBERS_AND_MYOCARDIUM = ("Myocardium", "LA", "LV", "RA", "RV")
TARGET_SCENARIOS = ("subset_A", "subset_B", "drop_k")


@dataclass(frozen=True)
class Budget:
    """Everything a budget fixes. Steps per phase; spacings in mm; points per prepared case."""

    name: str
    train_hearts: int
    heldout_hearts: int
    train_spacing_mm: float
    heldout_spacing_mm: float
    oblique_spacing_mm: tuple
    oblique_fraction: float
    prepare_points: tuple  #: (surface, volume, near) samples per case
    model: str
    model_overrides: dict
    steps: tuple  #: optimizer steps of phases 1, 2, 3
    lr: tuple  #: peak learning rate of phases 1, 2, 3
    batch_size: int
    val_every: int
    num_workers: int
    device: str
    threads: int
    scenarios: tuple
    sample: dict = field(default_factory=dict)  #: data.* overrides (points per sample)
    extra: tuple = ()  #: further heart-train overrides, every phase
    phase_extra: tuple = ((), (), ())  #: further heart-train overrides of phases 1, 2, 3
    #: > 0: phases 2 and 3 get the steps that fill this many training seconds at phase 1's
    #: measured speed (their ratio kept; written to steps.json, so a rerun trains the same steps)
    train_seconds: float = 0.0
    #: phase 1 starts from this checkpoint ("": from scratch): a second pass of the curriculum over a
    #: finished study's phase-3 model trains it longer than one device call allows
    init: str = ""


#: the study's model: the named `compact` size (about 1.2 M parameters, a ~5 MB checkpoint, bundled;
#: `small` narrowed to width 128 and depth 4, latent queries drawn from the input points)
STUDY_MODEL = "compact"
SAMPLE = {"num_input_points": 2048, "min_points_per_structure": 32, "num_volume_queries": 512,
          "num_near_queries": 1024, "num_surface_queries": 256}

#: the curriculum's masks as the study trains them: phase 2 also drops a single structure (the
#: design's 2-5 never shows the model the missing_X case), phase 3 mixes the named subsets with
#: half random drops (a phase 3 of subsets only forgets drop_k; docs/completion_study.md)
RECIPE = ((), ("mask.drop_min=1",), ("mask.random_drop_prob=0.5", "mask.drop_min=1"))

BUDGETS = {
    "smoke": Budget("smoke", train_hearts=5, heldout_hearts=2, train_spacing_mm=2.0, heldout_spacing_mm=3.0,
                    oblique_spacing_mm=(2.5, 2.5, 3.5), oblique_fraction=0.34, prepare_points=(40_000, 6000, 8000),
                    model="tiny", model_overrides={"latent_queries": "fps"}, steps=(4, 4, 4),
                    lr=(3e-3, 2e-3, 1e-3), batch_size=2, val_every=4, num_workers=0, device="cpu", threads=1,
                    scenarios=("full", "subset_A", "drop_k", "missing_LAA"),
                    sample={"num_input_points": 256, "min_points_per_structure": 8, "num_volume_queries": 64,
                            "num_near_queries": 128, "num_surface_queries": 32}, phase_extra=RECIPE),
    "cpu": Budget("cpu", train_hearts=200, heldout_hearts=24, train_spacing_mm=1.5, heldout_spacing_mm=1.5,
                  oblique_spacing_mm=(1.2, 1.2, 2.0), oblique_fraction=0.34, prepare_points=(60_000, 40_000, 60_000),
                  model=STUDY_MODEL, model_overrides={}, steps=(700, 1200, 400), lr=(2e-3, 1e-3, 5e-4),
                  batch_size=8, val_every=300, num_workers=1, device="cpu", threads=2,
                  scenarios=("full", "subset_A", "subset_B", "drop_k", "missing_*"), sample=SAMPLE,
                  phase_extra=RECIPE),
    "gpu": Budget("gpu", train_hearts=200, heldout_hearts=24, train_spacing_mm=1.5, heldout_spacing_mm=1.5,
                  oblique_spacing_mm=(1.2, 1.2, 2.0), oblique_fraction=0.34, prepare_points=(60_000, 60_000, 100_000),
                  model=STUDY_MODEL, model_overrides={}, steps=(3000, 6000, 3000), lr=(2e-3, 1e-3, 5e-4),
                  batch_size=64, val_every=500, num_workers=12, device="cuda", threads=0,
                  scenarios=("full", "subset_A", "subset_B", "drop_k", "missing_*"), sample=SAMPLE,
                  extra=("data.device_cache=true",), phase_extra=RECIPE, train_seconds=400.0),
}


def log(message: str) -> None:
    print(f"[study {time.strftime('%H:%M:%S')}] {message}", flush=True)


# --- 1. hearts --------------------------------------------------------------------------------
def heart_plan(budget: Budget, seed: int) -> list[dict]:
    """One record per heart: file, seed, grid and whether it is held out (seeds disjoint by construction)."""
    from heart_training.data.synth_cli import case_seed

    plan = []
    n_cut = int(round(0.3 * budget.train_hearts))
    cut = set(np.random.default_rng(seed).permutation(budget.train_hearts)[:n_cut].tolist())
    for i in range(budget.train_hearts):
        plan.append({"split": "train", "file": f"train/heart_{i:04d}.nii.gz", "seed": case_seed(seed, i),
                     "spacing_mm": [budget.train_spacing_mm] * 3, "oblique": False,
                     "truncate": "LAA" if i in cut else None})
    n_oblique = int(round(budget.oblique_fraction * budget.heldout_hearts))
    for i in range(budget.heldout_hearts):
        oblique = i >= budget.heldout_hearts - n_oblique
        plan.append({"split": "heldout", "file": f"heldout/heart_{i:04d}.nii.gz",
                     "seed": case_seed(seed + HELDOUT_SEED_OFFSET, i),
                     "spacing_mm": list(budget.oblique_spacing_mm) if oblique else [budget.heldout_spacing_mm] * 3,
                     "oblique": oblique, "truncate": None})
    train_seeds = {p["seed"] for p in plan if p["split"] == "train"}
    if any(p["seed"] in train_seeds for p in plan if p["split"] == "heldout"):
        raise RuntimeError("a held-out heart shares its seed with a training heart")
    return plan


def _oblique_direction(seed: int) -> np.ndarray:
    from HeartCompletionLib.geometry.affine import rotation_matrix

    rng = np.random.default_rng([seed, 7])
    axis = rng.normal(size=3)
    return rotation_matrix(axis / np.linalg.norm(axis), np.deg2rad(rng.uniform(20.0, 35.0)))


def _write_heart(args) -> dict:
    record, root = args
    from HeartCompletionLib.io.labelmap_files import write_label_map
    from HeartCompletionLib.io.synthetic import synthetic_label_map

    path = Path(root) / record["file"]
    lm = synthetic_label_map(record["seed"], spacing_mm=record["spacing_mm"], modes=True,
                             direction=_oblique_direction(record["seed"]) if record["oblique"] else None,
                             truncate=record["truncate"])
    write_label_map(lm, path)
    info = lm.metadata["synthetic"]
    return {**record, "shape": list(lm.shape), "modes": info.get("modes"),
            "touching_border": info.get("touching_border", [])}


def stage_hearts(out: Path, budget: Budget, seed: int, workers: int) -> None:
    hearts = out / "hearts"
    done = hearts / "hearts.json"
    if done.is_file():
        log(f"hearts: {done} exists, skipped")
        return
    from tqdm import tqdm

    for split in ("train", "heldout"):
        (hearts / split).mkdir(parents=True, exist_ok=True)
    plan = heart_plan(budget, seed)
    todo = [(r, str(hearts)) for r in plan]
    records = []
    log(f"hearts: {budget.train_hearts} training + {budget.heldout_hearts} held-out synthetic hearts (modes)")
    with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
        for record in tqdm(pool.map(_write_heart, todo, chunksize=4), total=len(todo), desc="hearts", unit="heart"):
            records.append(record)
    tmp = done.with_suffix(".tmp")
    tmp.write_text(json.dumps({"seed": seed, "budget": budget.name, "hearts": records}, indent=1), encoding="utf-8")
    os.replace(tmp, done)


# --- 2. prepare + split ------------------------------------------------------------------------
def stage_prepare(out: Path, budget: Budget, workers: int) -> None:
    from heart_training.data.prepare import PrepareOptions
    from heart_training.data.prepare_cli import prepare_dataset
    from heart_training.data.split import write_splits

    prepared = out / "prepared"
    if (prepared / "train.csv").is_file():
        log(f"prepare: {prepared / 'train.csv'} exists, skipped")
        return
    surface, volume, near = budget.prepare_points
    options = PrepareOptions(num_surface=surface, num_volume=volume, num_near=near,
                             min_surface_per_structure=min(1000, surface // 20))
    log(f"prepare: {budget.train_hearts} training hearts -> {prepared} ({workers} workers)")
    manifest = prepare_dataset(out / "hearts" / "train", prepared, options, workers=workers)
    failed = [c for c in manifest.get("cases", []) if c.get("status") != "ok"]
    if failed:
        raise RuntimeError(f"heart-prepare failed on {len(failed)} case(s), e.g. {failed[0]}")
    write_splits([prepared], val_fraction=0.1, seed=0)


# --- 3. train ----------------------------------------------------------------------------------
def phase_overrides(budget: Budget, phase: int, out: Path, device: str) -> list[str]:
    steps, lr = budget.steps[phase - 1], budget.lr[phase - 1]
    o = [f"data.datasets.0.data_dir={out / 'prepared'}", "data.datasets.0.name=synthetic_modes",
         f"model.config={budget.model}", f"optim.max_steps={steps}", f"optim.lr={lr}",
         f"optim.batch_size={budget.batch_size}", f"optim.warmup_steps={max(1, min(200, steps // 10))}",
         f"run.val_every={min(budget.val_every, steps)}", f"run.checkpoint_every={min(budget.val_every, steps)}",
         f"run.log_every={max(1, min(50, steps // 10))}", f"run.device={device}", f"run.threads={budget.threads}",
         f"data.num_workers={budget.num_workers}", "data.max_val_cases=16", "run.progress=false",
         f"loss.eikonal_queries={min(128, budget.sample.get('num_near_queries', 128))}"]
    o += [f"model.overrides.{k}={v}" for k, v in budget.model_overrides.items()]
    o += [f"data.{k}={v}" for k, v in budget.sample.items()]
    if phase > 1:
        o.append(f"model.init_from={out / f'phase{phase - 1}' / 'model_best.safetensors'}")
    elif budget.init:
        o.append(f"model.init_from={budget.init}")
    return o + list(budget.extra) + list(budget.phase_extra[phase - 1])


def fitted_steps(budget: Budget, phase1_seconds: float) -> tuple:
    """Steps of phases 2 and 3 that fill ``budget.train_seconds`` at phase 1's measured speed
    (start-up included, so it errs short), in the budget's ratio; rounded to 100 above 100, at least 1."""
    rate = budget.steps[0] / max(phase1_seconds, 1e-6)
    left = max(0.0, budget.train_seconds - phase1_seconds) * rate
    share = budget.steps[1] / (budget.steps[1] + budget.steps[2])

    def rounded(n: float) -> int:
        return int(round(n, -2)) if n >= 100 else max(1, int(round(n)))

    return (budget.steps[0], rounded(left * share), rounded(left * (1 - share)))


def planned_budget(out: Path, budget: Budget) -> Budget:
    """The budget with the steps fitted earlier (``steps.json``), if any."""
    path = out / "steps.json"
    if budget.train_seconds > 0 and path.is_file():
        return replace(budget, steps=tuple(json.loads(path.read_text(encoding="utf-8"))["steps"]))
    return budget


def stage_train(out: Path, budget: Budget, device: str) -> tuple[dict, Budget]:
    """Trains phases 1 -> 2 -> 3; returns their wall seconds and the budget with the steps trained."""
    seconds = {}
    for phase in PHASES:
        if phase == 2 and budget.train_seconds > 0 and not (out / "steps.json").is_file():
            steps = fitted_steps(budget, seconds[1])
            log(f"train: phase 1 took {seconds[1]:.0f} s for {budget.steps[0]} steps; phases 2 and 3 get "
                f"{steps[1]} and {steps[2]} steps to fill {budget.train_seconds:.0f} s")
            (out / "steps.json").write_text(json.dumps({"steps": steps, "phase1_seconds": seconds[1],
                                                        "train_seconds": budget.train_seconds}), encoding="utf-8")
        budget = planned_budget(out, budget)
        run_dir = out / f"phase{phase}"
        marker = run_dir / "DONE"
        if marker.is_file():
            log(f"train: phase {phase} done earlier, skipped")
            seconds[phase] = json.loads(marker.read_text())["seconds"]
            continue
        cmd = [sys.executable, "-m", "heart_training.train.trainer", "--config", f"phase{phase}", "--output_dir",
               str(run_dir), "--resume", *phase_overrides(budget, phase, out, device)]
        log(f"train: phase {phase}, {budget.steps[phase - 1]} steps -> {run_dir}")
        run_dir.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        with open(run_dir / "stdout.log", "a", encoding="utf-8") as handle:
            rc = subprocess.call(cmd, stdout=handle, stderr=subprocess.STDOUT)
        if rc != 0:
            raise RuntimeError(f"heart-train phase {phase} failed (exit {rc}); see {run_dir / 'stdout.log'}")
        seconds[phase] = round(time.perf_counter() - started, 1)
        curve = validation_curve(run_dir)
        log(f"train: phase {phase} finished in {seconds[phase]:.0f} s; validation IoU "
            + ", ".join(f"{s}: {v:.3f}" for s, v in curve))
        marker.write_text(json.dumps({"seconds": seconds[phase]}), encoding="utf-8")
    return seconds, budget


def validation_curve(run_dir: Path) -> list[tuple[int, float]]:
    """(step, mean validation IoU) of a run's log.jsonl (volume + near queries of the val hearts)."""
    curve = []
    path = run_dir / "log.jsonl"
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            rec = json.loads(line)
            if rec.get("split") == "val" and rec.get("iou_mean") is not None:
                curve.append((int(rec["step"]), float(rec["iou_mean"])))
    return curve


# --- 4. eval -----------------------------------------------------------------------------------
_FLOAT_COLUMNS = ("dice", "hd95_mm", "assd_mm", "volume_error_percent", "pred_volume_ml", "ref_volume_ml", "seconds")


def _read_rows(path: Path) -> list[dict]:
    rows = []
    with open(path, newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            for key in _FLOAT_COLUMNS:
                row[key] = float(row[key]) if row.get(key) not in (None, "", "nan") else float("nan")
            row["label"] = int(row["label"])
            row["truncated"] = row.get("truncated") == "True"
            rows.append(row)
    return rows


def _describe(args):
    """Nearest-case baseline descriptor of one training label map (a worker process)."""
    from heart_training.evaluation.baseline import describe_label_map

    from HeartCompletionLib.io.labelmap_files import read_label_map

    path, case_id = args
    return describe_label_map(read_label_map(path), case_id, source=path)


def stage_eval(out: Path, budget: Budget, device: str, eval_workers: int, workers: int,
               fit_steps: int | None = None) -> float:
    from heart_training.evaluation.baseline import save_descriptor_cache
    from heart_training.evaluation.evaluate import find_cases, load_baseline
    from heart_training.evaluation.report import write_outputs

    from HeartCompletionLib.model.checkpoint import load_inference_checkpoint

    eval_dir = out / "eval"
    if (eval_dir / "summary.json").is_file():
        log(f"eval: {eval_dir / 'summary.json'} exists, skipped")
        return json.loads((eval_dir / "summary.json").read_text())["meta"].get("wall_s", 0.0)
    started = time.perf_counter()
    checkpoint = out / "phase3" / "model_best.safetensors"
    table = load_inference_checkpoint(checkpoint).table
    heldout = sorted((out / "hearts" / "heldout").glob("*.nii.gz"))
    train_dir = out / "hearts" / "train"
    cache = eval_dir / "baseline_index.npz"
    eval_dir.mkdir(parents=True, exist_ok=True)
    train_cases = find_cases(train_dir)
    log(f"eval: baseline index of {len(train_cases)} training hearts ({workers} processes)")
    with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
        described = list(pool.map(_describe, [(c.path.resolve(), c.case_id) for c in train_cases], chunksize=4))
    save_descriptor_cache(cache, described)
    load_baseline(train_cases, table, progress=False, cache_path=cache)  # every file a cache hit: checks the index
    shards = [heldout[i::eval_workers] for i in range(eval_workers) if heldout[i::eval_workers]]
    procs = []
    log(f"eval: {len(heldout)} held-out hearts x {len(budget.scenarios)} scenario kinds in {len(shards)} shard(s)")
    for k, files in enumerate(shards):
        shard_dir = eval_dir / "shards" / str(k)
        shard_dir.mkdir(parents=True, exist_ok=True)
        with open(shard_dir / "cases.csv", "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["case_id", "source"])
            for path in files:
                writer.writerow([path.name[: -len(".nii.gz")], str(path.resolve())])
        cmd = [sys.executable, "-m", "heart_training.evaluation.evaluate", "--checkpoint", str(checkpoint), "--data_dir",
               str(shard_dir / "cases.csv"), "--train_dir", str(train_dir), "--baseline_cache", str(cache),
               "--output_dir", str(shard_dir), "--device", device, "--quiet", "--figure_cases",
               "1" if k == 0 else "0", "--scenarios", *budget.scenarios]
        if fit_steps is not None:
            cmd += ["--fit_steps", str(fit_steps)]
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // max(1, len(shards))))}
        log_file = open(shard_dir / "stdout.log", "w", encoding="utf-8")  # noqa: SIM115 - closed after wait()
        procs.append((k, subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env), log_file))
    for k, proc, log_file in procs:
        returncode = proc.wait()
        log_file.close()
        if returncode != 0:
            raise RuntimeError(f"heart-eval shard {k} failed (exit {proc.returncode}); see "
                               f"{eval_dir / 'shards' / str(k) / 'stdout.log'}")
    rows, figures, scenarios = [], [], None
    for k in range(len(shards)):
        shard_dir = eval_dir / "shards" / str(k)
        rows += _read_rows(shard_dir / "metrics.csv")
        summary = json.loads((shard_dir / "summary.json").read_text(encoding="utf-8"))
        scenarios = scenarios or summary["meta"]["scenarios"]
        figures += [shard_dir / f for f in summary.get("files", {}).get("figures", [])]
    wall = round(time.perf_counter() - started, 1)
    meta = {"checkpoint": str(checkpoint), "phase": 3, "data": str(out / "hearts" / "heldout"), "split": "heldout",
            "num_cases": len({r["case"] for r in rows}), "scenarios": scenarios, "seed": 0,
            "skipped": {}, "failed": [], "baseline": "nearest training case, centroid-aligned",
            "num_training_cases": budget.train_hearts, "structures": table.names,
            "command": "benchmarks/completion_study.py (sharded heart-eval)", "wall_s": wall}
    write_outputs(eval_dir, rows, meta, table, figures)
    log(f"eval: {len(rows)} metric rows in {wall:.0f} s -> {eval_dir / 'report.html'}")
    return wall


# --- 5. report ---------------------------------------------------------------------------------
def _stat(entry: dict | None, metric: str, key: str = "mean") -> float:
    if not entry:
        return float("nan")
    value = entry.get(metric, {}).get(key)
    return float("nan") if value is None else float(value)


def _cell(model: float, baseline: float, higher_is_better: bool, digits: int) -> str:
    m, b = f"{model:.{digits}f}", f"{baseline:.{digits}f}"
    if np.isfinite(model) and np.isfinite(baseline) and model != baseline:
        if (model > baseline) == higher_is_better:
            m = f"**{m}**"
        else:
            b = f"**{b}**"
    return f"{m} / {b}"


def verdict(summary: dict) -> dict:
    """The issue's targets, each with its measured numbers and met / not met."""
    scen = summary["scenarios"]
    out = {}
    for name in TARGET_SCENARIOS:
        if name in scen:
            o = scen[name]["overall"]
            md, bd = _stat(o.get("model"), "dice"), _stat(o.get("baseline"), "dice")
            ma, ba = _stat(o.get("model"), "assd_mm"), _stat(o.get("baseline"), "assd_mm")
            out[name] = {"model_dice": md, "baseline_dice": bd, "model_assd_mm": ma, "baseline_assd_mm": ba,
                         "met": bool(md > bd and ma < ba)}
    missing = {k: v for k, v in scen.items() if k.startswith("missing_")}
    wins = []
    for name, entry in missing.items():
        o = entry["overall"]
        if _stat(o.get("model"), "dice") > _stat(o.get("baseline"), "dice") and \
                _stat(o.get("model"), "assd_mm") < _stat(o.get("baseline"), "assd_mm"):
            wins.append(name[len("missing_"):])
    out["missing_X"] = {"wins": wins, "of": len(missing), "met": len(wins) >= min(8, len(missing)) and bool(missing)}
    if "full" in scen:
        dice = {s: _stat(scen["full"]["structures"].get(s, {}).get("model"), "dice") for s in CHAMBERS_AND_MYOCARDIUM}
        out["full_chambers"] = {"dice": dice, "met": all(v >= 0.90 for v in dice.values())}
    return out


def _library_fit_steps() -> str:
    from HeartCompletionLib.inference.latent_fit import DEFAULT_FIT_STEPS, RECONSTRUCTION_FIT_STEPS

    return f"{DEFAULT_FIT_STEPS} ({RECONSTRUCTION_FIT_STEPS} in `full`, where nothing is missing)"


def write_report(out: Path, budget: Budget, args, timings: dict) -> Path:
    summary = json.loads((out / "eval" / "summary.json").read_text(encoding="utf-8"))
    checks = verdict(summary)
    lines = [f"# Completion study, budget `{budget.name}`", ""]
    lines += [f"Command: `{' '.join(['python', 'benchmarks/completion_study.py', *args.argv])}`", "",
              f"Git commit: `{_git_commit()}`; device: {_device_name(args.device or budget.device)}; "
              f"host: {platform.node()} ({os.cpu_count()} CPU cores); torch {_torch_version()}.", "",
              f"Wall time: hearts + prepare {timings.get('data_s', 0):.0f} s, training "
              + ", ".join(f"phase {p} {timings.get('train_s', {}).get(p, 0):.0f} s" for p in PHASES)
              + f", evaluation {timings.get('eval_s', 0):.0f} s.", "",
              f"Data: {budget.train_hearts} training hearts (synthetic, covarying modes, {budget.train_spacing_mm} mm, "
              f"30 % with the LAA cut by the field of view; 90 % train / 10 % validation), "
              f"{budget.heldout_hearts} held-out hearts from a disjoint seed range "
              f"({int(round(budget.oblique_fraction * budget.heldout_hearts))} on oblique "
              f"{'x'.join(str(s) for s in budget.oblique_spacing_mm)} mm grids). Baseline: the nearest of the "
              f"{budget.train_hearts} training hearts, aligned on the given structures' centroids.", "",
              f"Model: `{budget.model}`" + (f" with {json.dumps(budget.model_overrides)}" if budget.model_overrides else "")
              + (f", phase 1 initialised from `{budget.init}` (a second pass of the curriculum)" if budget.init
                 else "") + "; steps per phase "
              f"{'/'.join(map(str, budget.steps))}"
              + (f" (phases 2 and 3 fitted to {budget.train_seconds:.0f} training seconds at phase 1's speed; "
                 f"`--steps {' '.join(map(str, budget.steps))}` reruns them)" if budget.train_seconds > 0 else "")
              + f", peak lr {'/'.join(map(str, budget.lr))}, batch {budget.batch_size}; further overrides: "
              + "; ".join(f"phase {p}: {' '.join(list(budget.extra) + list(budget.phase_extra[p - 1])) or '-'}"
                          for p in PHASES) + ".", ""]
    if args.fit_steps is None:
        lines += [f"Inference: the latents fitted to the given structures for {_library_fit_steps()} steps before "
                  "decoding (heart-eval's default).", ""]
    else:
        lines += [f"Inference: the latents fitted to the given structures for {args.fit_steps} steps before decoding "
                  f"(`heart-eval --fit_steps {args.fit_steps}`"
                  + (", i.e. the encoder's latents as they are)." if args.fit_steps == 0 else ")."), ""]
    lines += ["## Verdict against the targets", "", "| target | model | baseline | met |", "|---|---|---|---|"]
    for name in TARGET_SCENARIOS:
        if name in checks:
            c = checks[name]
            lines.append(f"| {name}: mean Dice and mean ASSD beat the baseline | Dice {c['model_dice']:.3f}, ASSD "
                         f"{c['model_assd_mm']:.2f} mm | Dice {c['baseline_dice']:.3f}, ASSD "
                         f"{c['baseline_assd_mm']:.2f} mm | {'yes' if c['met'] else '**no**'} |")
    mx = checks["missing_X"]
    lines.append(f"| missing_X: model wins (Dice and ASSD) for >= 8 of 10 | {len(mx['wins'])} of {mx['of']}: "
                 f"{', '.join(mx['wins']) or '-'} | | {'yes' if mx['met'] else '**no**'} |")
    if "full_chambers" in checks:
        fc = checks["full_chambers"]
        lines.append("| full: Dice >= 0.90 for chambers and myocardium | "
                     + ", ".join(f"{k} {v:.3f}" for k, v in fc["dice"].items())
                     + f" | | {'yes' if fc['met'] else '**no**'} |")
    lines += ["", "## Per scenario and structure", "",
              "Each cell: model / baseline (mean over held-out hearts); the better one in bold. HD95 and ASSD in mm.", "",
              "| scenario | structure | n | Dice | HD95 | ASSD |", "|---|---|---|---|---|---|"]
    for name, entry in summary["scenarios"].items():
        rows = [("all scored", entry["overall"])] + list(entry["structures"].items())
        for structure, per in rows:
            m, b = per.get("model"), per.get("baseline")
            n = int((m or {}).get("dice", {}).get("n", entry["num_cases"]))
            lines.append(f"| {name} | {structure} | {n} | {_cell(_stat(m, 'dice'), _stat(b, 'dice'), True, 3)} | "
                         f"{_cell(_stat(m, 'hd95_mm'), _stat(b, 'hd95_mm'), False, 1)} | "
                         f"{_cell(_stat(m, 'assd_mm'), _stat(b, 'assd_mm'), False, 2)} |")
    lines += ["", "## Learning curves (validation hearts, mean IoU of volume + near-surface queries)", ""]
    for phase in PHASES:
        curve = validation_curve(out / f"phase{phase}")
        lines.append(f"- phase {phase}: " + (", ".join(f"step {s}: {v:.3f}" for s, v in curve) or "(none)"))
    lines += ["", f"The HTML report with box plots and slice overlays: `{out / 'eval' / 'report.html'}`.", ""]
    path = out / "study.md"
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines), encoding="utf-8")
    os.replace(tmp, path)
    study = {"budget": asdict(budget), "argv": args.argv, "git_commit": _git_commit(), "timings": timings,
             "verdict": checks}
    (out / "study.json").write_text(json.dumps(study, indent=1, default=str), encoding="utf-8")
    return path


def _git_commit() -> str:
    try:
        return subprocess.check_output(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _torch_version() -> str:
    import torch

    return f"{torch.__version__} (CUDA {torch.version.cuda})" if torch.cuda.is_available() else torch.__version__


def _device_name(device: str) -> str:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()})"


# --- command line ------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/completion_study.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Budgets: " + "; ".join(f"{b.name}: {b.train_hearts}+{b.heldout_hearts} hearts, {b.model} "
                                       f"{'/'.join(map(str, b.steps))} steps on {b.device}" for b in BUDGETS.values()))
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="cpu", help="size of the study (default cpu)")
    parser.add_argument("--output_dir", type=Path, default=None, help="study folder (default runs/study_<budget>)")
    parser.add_argument("--seed", type=int, default=0, help="population seed (default 0)")
    parser.add_argument("--device", default=None, help="cpu | cuda (default: the budget's)")
    parser.add_argument("--workers", type=int, default=None, help="processes for hearts and prepare (default: cores)")
    parser.add_argument("--eval_workers", type=int, default=None,
                        help="parallel heart-eval shards (default: the CPU cores, at most 12 on CUDA)")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES),
                        help="run only these stages (default: all; finished ones are skipped anyway)")
    parser.add_argument("--steps", type=int, nargs=3, default=None, metavar=("P1", "P2", "P3"),
                        help="override the budget's steps per phase (and its --train_seconds fitting)")
    parser.add_argument("--lr", type=float, nargs=3, default=None, metavar=("P1", "P2", "P3"),
                        help="override the budget's peak learning rate per phase")
    parser.add_argument("--init", type=Path, default=None, metavar="CHECKPOINT",
                        help="start phase 1 from this checkpoint (e.g. an earlier study's phase3/model_best."
                             "safetensors, same model) instead of from scratch: a second pass of the curriculum")
    parser.add_argument("--train_seconds", type=float, default=None,
                        help="fit the steps of phases 2 and 3 to this many training seconds from phase 1's speed "
                             "(0: the budget's steps as they are; default: the budget's, gpu 400)")
    parser.add_argument("--data_path", choices=("budget", "loader", "device"), default="budget",
                        help="training data path: the budget's (default; gpu: device), the DataLoader, or the "
                             "device-resident cache (data.device_cache=true)")
    parser.add_argument("--fit_steps", type=int, default=None, metavar="N",
                        help="heart-eval --fit_steps: steps fitting the latents to the given structures before "
                             "decoding (default: heart-eval's, 30, or 250 where nothing is missing; 0: the encoder's "
                             "latents as they are)")
    parser.add_argument("--train_hearts", type=int, default=None, help="override the budget's training hearts")
    parser.add_argument("--heldout_hearts", type=int, default=None, help="override the budget's held-out hearts")
    return parser


def checked_device(parser: argparse.ArgumentParser, device: str) -> str:
    """``device``, or a usage error when it asks for CUDA that this machine lacks."""
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            parser.error(f"--device {device}: CUDA is not available here (torch {torch.__version__})")
    return device


def study_folder(output_dir: Path | None, default_name: str) -> tuple[Path, Path, dict]:
    """``(folder, timings.json path, timings so far)`` of a study (default ``runs/<default_name>``)."""
    out = (output_dir or REPO / "runs" / default_name).resolve()
    out.mkdir(parents=True, exist_ok=True)
    timings_path = out / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.is_file() else {}
    return out, timings_path, timings


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv
    budget = BUDGETS[args.budget]
    if args.steps:
        if min(args.steps) < 1:
            parser.error("--steps must be positive")
        budget = replace(budget, steps=tuple(args.steps), train_seconds=0.0)
    if args.fit_steps is not None and args.fit_steps < 0:
        parser.error("--fit_steps must be >= 0")
    if args.lr:
        if min(args.lr) <= 0:
            parser.error("--lr must be positive")
        budget = replace(budget, lr=tuple(args.lr))
    if args.init is not None:
        if not args.init.is_file():
            parser.error(f"--init {args.init}: no such checkpoint file")
        budget = replace(budget, init=str(args.init.resolve()))
    if args.train_seconds is not None:
        if args.train_seconds < 0:
            parser.error("--train_seconds must be >= 0")
        budget = replace(budget, train_seconds=float(args.train_seconds))
    if args.data_path != "budget":
        extra = tuple(o for o in budget.extra if not o.startswith("data.device_cache="))
        budget = replace(budget, extra=extra + (f"data.device_cache={str(args.data_path == 'device').lower()}",))
    for name in ("train_hearts", "heldout_hearts"):
        value = getattr(args, name)
        if value is not None:
            if value < 3:
                parser.error(f"--{name} must be at least 3")
            budget = replace(budget, **{name: value})
    device = checked_device(parser, args.device or budget.device)
    out, timings_path, timings = study_folder(args.output_dir, f"study_{budget.name}")
    cores = os.cpu_count() or 2
    workers = args.workers or cores
    eval_workers = args.eval_workers or (min(12, cores) if device.startswith("cuda") else cores)
    log(f"budget {budget.name} -> {out} (device {device}, {workers} workers)")
    try:
        if "hearts" in args.stages or "prepare" in args.stages:
            started = time.perf_counter()
            if "hearts" in args.stages:
                stage_hearts(out, budget, args.seed, workers)
            if "prepare" in args.stages:
                stage_prepare(out, budget, workers)
            timings["data_s"] = timings.get("data_s", 0) + round(time.perf_counter() - started, 1)
        if "train" in args.stages:
            seconds, budget = stage_train(out, budget, device)
            timings["train_s"] = {**timings.get("train_s", {}), **seconds}
        if "eval" in args.stages:
            timings["eval_s"] = stage_eval(out, budget, device, eval_workers, workers, args.fit_steps)
    finally:
        timings_path.write_text(json.dumps(timings), encoding="utf-8")
    if "report" in args.stages:
        budget = planned_budget(out, budget)
        timings["train_s"] = {int(k): v for k, v in timings.get("train_s", {}).items()}
        path = write_report(out, budget, args, timings)
        log(f"report: {path}")
        print(path.read_text(encoding="utf-8").split("## Per scenario")[0])
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except RuntimeError as exc:
        print(f"completion_study: error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
