"""The first real-anatomy figures (issue 11): phase 4 on real partial labels, scored on held-out patients.

    python benchmarks/real_study.py --init synthetic-demo --budget cpu --output_dir runs/real_cpu  # ~40 min, 2 cores
    python benchmarks/real_study.py --init runs/study_gpu/phase3/model_best.safetensors --budget gpu \
        --output_dir runs/real_gpu                                                                 # ~5 min, one GPU
    PARTS=real bash benchmarks/gpu_check.sh   # the gpu budget on a lent GPU machine, results in $OUT
    python benchmarks/real_study.py --init synthetic-demo --budget smoke --output_dir /tmp/real     # the test's size

Stages (each resumes by rerunning the same command; a finished stage is skipped):

1. ``prepare``: ``heart-prepare`` of the real partial sources of ``--real_dir`` with their own
   conventions (ACDC cine MRI: RV, Myocardium, LV; 2018 LA challenge LGE MRI: LA) and ``heart-split``
   **by patient** (ED and ES frames of one patient on one side; ``test`` = the held-out patients),
   plus full synthetic hearts of the covarying population (the mix's anchor);
2. ``train``: ``heart-train --config phase4_real`` from ``--init`` (its architecture:
   ``model.config=from_init``) on the weighted mix synthetic 0.5 / ACDC 0.3 / LA 0.2;
3. ``eval``: ``heart-eval`` on the held-out patients, model next to the nearest-case baseline built
   from the training patients of the same source: LA reconstruction (input the LA, scored the LA:
   scenario ``full``; heart-eval fits the latents for ``RECONSTRUCTION_FIT_STEPS`` there, as nothing
   is missing) and ACDC completion within what is annotated (``missing_RV``, ``missing_LV``,
   ``missing_Myocardium``; the default fitting); the ``--init`` model is scored the same way, so the table shows what
   phase 4 changed;
4. ``whole``: the whole heart from one real structure, with the phase-4 model through
   :func:`HeartCompletionLib.inference.completion.complete_label_map`: the CT LAD (platipy) and the CT PA
   (TotalSegmentator) against their whole-heart envelopes (inside / fill,
   :mod:`HeartCompletionLib.inference.envelope`), and a held-out ACDC stack on a grown isotropic grid
   (``--extend_mm``/``--output_spacing`` of ``heart-complete``); one figure per source (slices and 3-D);
5. ``report``: ``real_study.md`` (targets: LA Dice >= 0.90 and ASSD <= 1.0 mm; the model beats the
   baseline on all three ACDC scenarios), ``real_study.json``.

Nothing here is tuned to the shared files: the split is by a fixed seed, the recipe is the
config's, and the same command scores any other cases of these sources put in ``--real_dir``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from completion_study import (  # noqa: E402
    _cell,
    _device_name,
    _git_commit,
    _stat,
    _torch_version,
    checked_device,
    study_folder,
)
from envelope_check import CASES as ENVELOPE_CASES  # noqa: E402  (name, folder, input, envelope)
from envelope_check import grid_text  # noqa: E402

DEFAULT_REAL = REPO.parent / "shared" / "data" / "real"
STAGES = ("prepare", "train", "eval", "whole", "report")
#: the real partial sources of phase 4 (folder = dataset name in phase4_real.yaml)
SOURCES = ("acdc_cmr", "la2018_lgemri")
ACDC_SCENARIOS = ("missing_RV", "missing_LV", "missing_Myocardium")
LA_TARGET = {"dice": 0.90, "assd_mm": 1.0}
#: a short-axis stack is completed on a grid grown by this much and resampled to this spacing
ACDC_EXTEND_MM, ACDC_SPACING_MM = 40.0, 1.5


@dataclass(frozen=True)
class Budget:
    name: str
    synthetic_hearts: int
    synthetic_spacing_mm: float
    max_real_cases: int  #: per source, 0 = all (the smoke test takes a few)
    steps: int
    batch_size: int
    lr: float
    device: str
    threads: int
    num_workers: int
    val_every: int
    max_eval_cases: int  #: per evaluation, 0 = all held-out cases
    sample: tuple = ()  #: data.* overrides


STUDY_SAMPLE = ("num_input_points=2048", "min_points_per_structure=32", "num_volume_queries=512",
                "num_near_queries=1024", "num_surface_queries=256")
BUDGETS = {
    "smoke": Budget("smoke", synthetic_hearts=3, synthetic_spacing_mm=3.0, max_real_cases=6, steps=3, batch_size=2,
                    lr=5e-4, device="cpu", threads=1, num_workers=0, val_every=3, max_eval_cases=1,
                    sample=("num_input_points=512", "min_points_per_structure=8", "num_volume_queries=64",
                            "num_near_queries=128", "num_surface_queries=32")),
    "cpu": Budget("cpu", synthetic_hearts=40, synthetic_spacing_mm=1.5, max_real_cases=0, steps=600, batch_size=8,
                  lr=5e-4, device="cpu", threads=2, num_workers=1, val_every=200, max_eval_cases=0, sample=STUDY_SAMPLE),
    "gpu": Budget("gpu", synthetic_hearts=100, synthetic_spacing_mm=1.5, max_real_cases=0, steps=2000, batch_size=32,
                  lr=5e-4, device="cuda", threads=0, num_workers=12, val_every=500, max_eval_cases=0,
                  sample=STUDY_SAMPLE),
}


def log(message: str) -> None:
    print(f"[real {time.strftime('%H:%M:%S')}] {message}", flush=True)


def _run(cmd: list, log_path: Path, what: str, env: dict | None = None) -> None:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a", encoding="utf-8") as handle:
        rc = subprocess.call([str(c) for c in cmd], stdout=handle, stderr=subprocess.STDOUT, env=env)
    if rc != 0:
        raise RuntimeError(f"{what} failed (exit {rc}); see {log_path}")


def _cli(module: str) -> list:
    return [sys.executable, "-m", module]


# --- 1. prepare --------------------------------------------------------------------------------
def source_inputs(real_dir: Path, source: str, out: Path, max_cases: int) -> Path:
    """The source's folder, or (``max_cases``) a folder of links to its first files, patients kept whole."""
    folder = real_dir / source
    if not (folder / "labels.json").is_file():
        raise RuntimeError(f"{folder}: no labels.json (is --real_dir {real_dir} the shared real data?)")
    if max_cases <= 0:
        return folder
    from HeartCompletionLib.io.labelmap_files import find_label_maps

    subset = out / "inputs" / source
    subset.mkdir(parents=True, exist_ok=True)
    for path in find_label_maps(folder)[:max_cases]:
        link = subset / path.name
        if not link.exists():
            link.symlink_to(path.resolve())
    return subset


def stage_prepare(out: Path, budget: Budget, real_dir: Path, workers: int) -> dict:
    data = out / "data"
    sizes = {}
    for source in SOURCES:
        prepared = data / source
        if not (prepared / "test.csv").is_file():
            inputs = source_inputs(real_dir, source, out, budget.max_real_cases)
            log(f"prepare: {source} ({inputs}) with its convention -> {prepared}")
            _run([*_cli("heart_training.data.prepare_cli"), "--input_dir", inputs, "--output_dir", prepared,
                  "--label_map", real_dir / source / "labels.json", "--workers", workers, "--quiet"],
                 out / "logs" / f"prepare_{source}.log", f"heart-prepare of {source}")
            _run([*_cli("heart_training.data.split"), "--data_dir", prepared, "--val_fraction", 0.15,
                  "--test_fraction", 0.25, "--seed", 0], out / "logs" / f"split_{source}.log", f"heart-split of {source}")
        sizes[source] = {split: _rows(prepared / f"{split}.csv") for split in ("train", "val", "test")}
    synthetic = data / "synthetic"
    if not (synthetic / "train.csv").is_file():
        maps = out / "synthetic_maps"
        log(f"prepare: {budget.synthetic_hearts} synthetic hearts (covarying modes) -> {synthetic}")
        _run([*_cli("heart_training.data.synth_cli"), "--modes", "--cases", budget.synthetic_hearts, "--seed", 4004,
              "--spacing", *([budget.synthetic_spacing_mm] * 3), "--output_dir", maps],
             out / "logs" / "synth.log", "heart-synth")
        _run([*_cli("heart_training.data.prepare_cli"), "--input_dir", maps, "--output_dir", synthetic, "--workers", workers,
              "--quiet"], out / "logs" / "prepare_synthetic.log", "heart-prepare of the synthetic hearts")
        _run([*_cli("heart_training.data.split"), "--data_dir", synthetic, "--val_fraction", 0.1, "--seed", 0],
             out / "logs" / "split_synthetic.log", "heart-split of the synthetic hearts")
    sizes["synthetic"] = {split: _rows(synthetic / f"{split}.csv") for split in ("train", "val")}
    for source in SOURCES:
        log(f"prepare: {source}: " + ", ".join(f"{k} {v}" for k, v in sizes[source].items())
            + " cases (split by patient)")
    return sizes


def _rows(csv_path: Path) -> int:
    if not csv_path.is_file():
        return 0
    return max(0, len(csv_path.read_text(encoding="utf-8").strip().splitlines()) - 1)


# --- 2. train ----------------------------------------------------------------------------------
def train_overrides(out: Path, budget: Budget, init: Path, device: str, extra=()) -> list[str]:
    data = out / "data"
    steps = budget.steps
    o = [f"model.init_from={init}", "model.config=from_init",
         f"data.datasets.0.data_dir={data / 'synthetic'}", f"data.datasets.1.data_dir={data / 'acdc_cmr'}",
         f"data.datasets.2.data_dir={data / 'la2018_lgemri'}", f"optim.max_steps={steps}", f"optim.lr={budget.lr}",
         f"optim.batch_size={budget.batch_size}", f"optim.warmup_steps={max(1, min(100, steps // 10))}",
         f"run.val_every={min(budget.val_every, steps)}", f"run.checkpoint_every={min(budget.val_every, steps)}",
         f"run.log_every={max(1, min(50, steps // 10))}", f"run.device={device}", f"run.threads={budget.threads}",
         f"data.num_workers={budget.num_workers}", "data.max_val_cases=24", "run.progress=false",
         "run.tensorboard=false", "loss.eikonal_queries=128"]
    return o + [f"data.{s}" for s in budget.sample] + list(extra)


def stage_train(out: Path, budget: Budget, init: Path, device: str, extra=()) -> float:
    run_dir = out / "phase4"
    marker = run_dir / "DONE"
    if marker.is_file():
        log("train: phase 4 done earlier, skipped")
        return json.loads(marker.read_text())["seconds"]
    log(f"train: phase 4 from {init}, {budget.steps} steps of {budget.batch_size} -> {run_dir}")
    started = time.perf_counter()
    _run([*_cli("heart_training.train.trainer"), "--config", "phase4_real", "--output_dir", run_dir, "--resume",
          *train_overrides(out, budget, init, device, extra)], run_dir / "stdout.log", "heart-train phase 4")
    seconds = round(time.perf_counter() - started, 1)
    marker.write_text(json.dumps({"seconds": seconds}), encoding="utf-8")
    log(f"train: finished in {seconds:.0f} s; " + mix_summary(run_dir))
    return seconds


def mix_summary(run_dir: Path) -> str:
    """What the mix really did, from the train log: draw frequency per source and unannotated targets."""
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text(encoding="utf-8").splitlines()]
    train = [r for r in records if r.get("split") == "train"]
    if not train:
        return "no train records"
    draws = {k[len("draw_freq/"):]: np.mean([r[k] for r in train]) for k in train[0] if k.startswith("draw_freq/")}
    unannotated = sum(r.get("targets_on_unannotated", 0) for r in train)
    return ("drawn " + ", ".join(f"{k} {v:.2f}" for k, v in draws.items())
            + f"; targets on unannotated structures: {unannotated}")


# --- 3. eval -----------------------------------------------------------------------------------
def evaluations(out: Path, init: Path) -> list[tuple]:
    """(name, checkpoint, source, scenarios, with baseline) of every evaluation."""
    phase4 = out / "phase4" / "model_best.safetensors"
    return [("la_phase4", phase4, "la2018_lgemri", ("full",), True),
            ("acdc_phase4", phase4, "acdc_cmr", ACDC_SCENARIOS, True),
            ("la_init", init, "la2018_lgemri", ("full",), False),
            ("acdc_init", init, "acdc_cmr", ACDC_SCENARIOS, False)]


def stage_eval(out: Path, budget: Budget, init: Path, device: str) -> float:
    started = time.perf_counter()
    for name, checkpoint, source, scenarios, baseline in evaluations(out, init):
        eval_dir = out / "eval" / name
        if (eval_dir / "summary.json").is_file():
            log(f"eval: {name} done earlier, skipped")
            continue
        log(f"eval: {name}: {checkpoint.name} on the held-out patients of {source} ({', '.join(scenarios)})")
        cmd = [*_cli("heart_training.evaluation.evaluate"), "--checkpoint", checkpoint, "--data_dir", out / "data" / source,
               "--split", "test", "--output_dir", eval_dir, "--device", device, "--quiet", "--figure_cases", 1,
               "--figure_scenarios", scenarios[0], "--max_cases", budget.max_eval_cases, "--scenarios", *scenarios]
        if not baseline:
            cmd.append("--no_baseline")
        _run(cmd, out / "logs" / f"eval_{name}.log", f"heart-eval {name}")
    return round(time.perf_counter() - started, 1)


# --- 4. whole heart from one real structure ------------------------------------------------------
def _held_out_stack(out: Path) -> Path | None:
    import csv

    with open(out / "data" / "acdc_cmr" / "test.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    sources = sorted(r["source"] for r in rows if r.get("source"))
    return Path(sources[0]) if sources else None


def stage_whole(out: Path, real_dir: Path, device: str) -> list[dict]:
    """Completes each single real structure with the phase-4 model; envelope metric; one figure each."""
    from heart_training.evaluation.report import completion_figure

    from HeartCompletionLib.inference.completion import complete_label_map
    from HeartCompletionLib.inference.envelope import ENVELOPE_STRUCTURES, envelope_fit, read_envelope
    from HeartCompletionLib.inference.output_grid import grown_grid
    from HeartCompletionLib.io.labelmap_files import read_label_map
    from HeartCompletionLib.model.checkpoint import load_inference_checkpoint

    result_path = out / "whole" / "whole.json"
    if result_path.is_file():
        log("whole: done earlier, skipped")
        return json.loads(result_path.read_text(encoding="utf-8"))
    (out / "whole").mkdir(parents=True, exist_ok=True)
    checkpoint = load_inference_checkpoint(out / "phase4" / "model_best.safetensors")
    table = checkpoint.table
    heart_labels = [table.by_name(n).label for n in ENVELOPE_STRUCTURES]
    rows = []
    for name, folder, input_name, envelope_name in ENVELOPE_CASES:
        input_path, envelope_path = real_dir / folder / input_name, real_dir / folder / envelope_name
        if not input_path.is_file():
            log(f"whole: {input_path} not found, {name} left out")
            continue
        given = read_label_map(input_path, table=table)
        envelope = read_envelope(envelope_path)
        started = time.perf_counter()
        completed = complete_label_map(given, checkpoint, device=device, seed=0).label_map
        row = {"case": name, "input": [table.by_label(v).name for v in given.present_labels()],
               "grid": grid_text(completed), "seconds": round(time.perf_counter() - started, 1),
               "heart": envelope_fit(completed, *envelope, heart_labels),
               "all": envelope_fit(completed, *envelope, table.labels),
               "cut_by_view": [table.by_label(v).name for v in completed.border_labels()]}
        row["figure"] = str(completion_figure(out / "whole" / f"{name}.png", given, completed, table,
                                              f"{name}: the whole heart from the {', '.join(row['input'])}",
                                              envelope=envelope).name)
        rows.append(row)
        log(f"whole: {name}: heart inside {row['heart']['inside_fraction']:.2f}, "
            f"fill {row['heart']['fill_fraction']:.2f}")
    stack = _held_out_stack(out)
    if stack is not None:
        given = read_label_map(stack, table=table, convention=real_dir / "acdc_cmr" / "labels.json")
        grid = grown_grid(given, extend_mm=ACDC_EXTEND_MM, spacing_mm=ACDC_SPACING_MM)
        started = time.perf_counter()
        completed = complete_label_map(given, checkpoint, device=device, seed=0, output_grid=grid).label_map
        name = f"acdc_cmr ({stack.name[: -len('.nii.gz')]})"
        row = {"case": name, "input": [table.by_label(v).name for v in given.present_labels()],
               "grid": grid_text(completed), "seconds": round(time.perf_counter() - started, 1),
               "volumes_ml": {table.by_label(v).name: round(float(np.count_nonzero(completed.labels == v))
                                                            * float(np.prod(completed.spacing_mm)) / 1000.0, 1)
                              for v in completed.present_labels()},
               "cut_by_view": [table.by_label(v).name for v in completed.border_labels()]}
        row["figure"] = str(completion_figure(out / "whole" / "acdc_cmr.png", given, completed, table,
                                              f"{name}: the whole heart from a short-axis stack, grown "
                                              f"{ACDC_EXTEND_MM:.0f} mm, {ACDC_SPACING_MM} mm isotropic").name)
        rows.append(row)
        log(f"whole: {name}: {len(row['volumes_ml'])} structures on {row['grid']}")
    result_path.write_text(json.dumps(rows, indent=1), encoding="utf-8")
    return rows


# --- 5. report ---------------------------------------------------------------------------------
def _summary(out: Path, name: str) -> dict | None:
    path = out / "eval" / name / "summary.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def verdict(out: Path) -> dict:
    checks = {}
    la = _summary(out, "la_phase4")
    if la and "full" in la["scenarios"]:
        per = la["scenarios"]["full"]["structures"].get("LA", {}).get("model")
        dice, assd = _stat(per, "dice"), _stat(per, "assd_mm")
        checks["la"] = {"dice": dice, "assd_mm": assd, "n": int((per or {}).get("dice", {}).get("n", 0)),
                        "met": bool(dice >= LA_TARGET["dice"] and assd <= LA_TARGET["assd_mm"])}
    acdc = _summary(out, "acdc_phase4")
    if acdc:
        wins = {}
        for scenario in ACDC_SCENARIOS:
            o = acdc["scenarios"].get(scenario, {}).get("overall", {})
            md, bd = _stat(o.get("model"), "dice"), _stat(o.get("baseline"), "dice")
            ma, ba = _stat(o.get("model"), "assd_mm"), _stat(o.get("baseline"), "assd_mm")
            wins[scenario] = {"model_dice": md, "baseline_dice": bd, "model_assd_mm": ma, "baseline_assd_mm": ba,
                              "met": bool(md > bd and ma < ba)}
        checks["acdc"] = {"scenarios": wins, "met": all(w["met"] for w in wins.values())}
    return checks


def write_report(out: Path, budget: Budget, args, init: Path, timings: dict, sizes: dict, whole: list) -> Path:
    checks = verdict(out)
    lines = [f"# Real-anatomy figures, budget `{budget.name}`", "",
             f"Command: `{' '.join(['python', 'benchmarks/real_study.py', *args.argv])}`", "",
             f"Git commit: `{_git_commit()}`; device: {_device_name(args.device or budget.device)}; torch "
             f"{_torch_version()}. Wall time: prepare {timings.get('prepare_s', 0):.0f} s, phase 4 "
             f"{timings.get('train_s', 0):.0f} s, evaluation {timings.get('eval_s', 0):.0f} s, whole hearts "
             f"{timings.get('whole_s', 0):.0f} s.", "",
             f"Phase 4 from `{init}` ({budget.steps} steps of {budget.batch_size}, lr {budget.lr}, "
             "`training/configs/phase4_real.yaml`: synthetic 0.5 / ACDC 0.3 / LA 0.2"
             + (f"; overrides {' '.join(args.overrides)}" if args.overrides else "") + "); "
             + (mix_summary(out / "phase4") if (out / "phase4" / "log.jsonl").is_file() else "no log") + ".", "",
             "Patients (split by patient, seed 0; `test` = held out, never trained on nor in the baseline): "
             + "; ".join(f"{s}: " + ", ".join(f"{k} {v}" for k, v in n.items()) for s, n in sizes.items()) + ".", "",
             "## Targets", "", "| target | measured | met |", "|---|---|---|"]
    if "la" in checks:
        c = checks["la"]
        lines.append(f"| real LA reconstruction (input LA, scored LA): Dice >= 0.90, ASSD <= 1.0 mm | Dice "
                     f"{c['dice']:.3f}, ASSD {c['assd_mm']:.2f} mm (n {c['n']}) | {'yes' if c['met'] else '**no**'} |")
    if "acdc" in checks:
        for scenario, c in checks["acdc"]["scenarios"].items():
            lines.append(f"| ACDC {scenario}: model beats the nearest training patient (Dice and ASSD) | Dice "
                         f"{_cell(c['model_dice'], c['baseline_dice'], True, 3)}, ASSD "
                         f"{_cell(c['model_assd_mm'], c['baseline_assd_mm'], False, 2)} mm (model / baseline) "
                         f"| {'yes' if c['met'] else '**no**'} |")
    lines += ["", "## Per scenario and structure", "",
              "Each cell: phase-4 model / baseline, then the `--init` model (before phase 4); HD95 and ASSD in mm.", "",
              "| source | scenario | structure | n | Dice | HD95 | ASSD | Dice before phase 4 | ASSD before |",
              "|---|---|---|---|---|---|---|---|---|"]
    for source, after_name, before_name in (("LA", "la_phase4", "la_init"), ("ACDC", "acdc_phase4", "acdc_init")):
        after, before = _summary(out, after_name), _summary(out, before_name)
        if not after:
            continue
        for scenario, entry in after["scenarios"].items():
            for structure, per in [("all scored", entry["overall"])] + list(entry["structures"].items()):
                m, b = per.get("model"), per.get("baseline")
                if before and scenario in before["scenarios"]:
                    e = before["scenarios"][scenario]
                    pre = (e["overall"] if structure == "all scored" else e["structures"].get(structure, {})).get("model")
                else:
                    pre = None
                n = int((m or {}).get("dice", {}).get("n", entry["num_cases"]))
                lines.append(f"| {source} | {scenario} | {structure} | {n} | "
                             f"{_cell(_stat(m, 'dice'), _stat(b, 'dice'), True, 3)} | "
                             f"{_cell(_stat(m, 'hd95_mm'), _stat(b, 'hd95_mm'), False, 1)} | "
                             f"{_cell(_stat(m, 'assd_mm'), _stat(b, 'assd_mm'), False, 2)} | "
                             f"{_stat(pre, 'dice'):.3f} | {_stat(pre, 'assd_mm'):.2f} |")
    lines += ["", "## The whole heart from one real structure", "",
              "| case | input | output grid | heart inside envelope | envelope filled | all: inside | all: fill "
              "| completion cut by the view | s | figure |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in whole:
        h, a = r.get("heart"), r.get("all")
        cells = (f"{h['inside_fraction']:.2f} | {h['fill_fraction']:.2f} | {a['inside_fraction']:.2f} | "
                 f"{a['fill_fraction']:.2f}") if h else "(no envelope) | - | - | -"
        lines.append(f"| {r['case']} | {', '.join(r['input'])} | {r['grid']} | {cells} | "
                     f"{', '.join(r['cut_by_view']) or '-'} | {r['seconds']} | `whole/{r['figure']}` |")
    for r in whole:
        if "volumes_ml" in r:
            lines += ["", f"{r['case']}: completed volumes (ml) "
                      + ", ".join(f"{k} {v}" for k, v in r["volumes_ml"].items()) + "."]
    lines += ["", "HTML reports (box plots, slice overlays, 3-D snapshots): "
              + ", ".join(f"`eval/{name}/report.html`" for name, *_ in evaluations(out, init)) + ".", ""]
    path = out / "real_study.md"
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines), encoding="utf-8")
    os.replace(tmp, path)
    record = {"budget": asdict(budget), "argv": args.argv, "init": str(init), "git_commit": _git_commit(),
              "timings": timings, "sizes": sizes, "verdict": checks, "whole": whole}
    (out / "real_study.json").write_text(json.dumps(record, indent=1, default=str), encoding="utf-8")
    return path


# --- command line ------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/real_study.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Budgets: " + "; ".join(f"{b.name}: {b.steps} steps of {b.batch_size} on {b.device}, "
                                       f"{b.synthetic_hearts} synthetic hearts" for b in BUDGETS.values()))
    parser.add_argument("--init", required=True,
                        help="the phase-3 (or phase-2) model to fine-tune: a .safetensors path or a registered "
                             "name (synthetic-demo)")
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="cpu", help="size of the run (default cpu)")
    parser.add_argument("--output_dir", type=Path, default=None, help="study folder (default runs/real_<budget>)")
    parser.add_argument("--real_dir", type=Path, default=DEFAULT_REAL, help=f"the real data (default {DEFAULT_REAL})")
    parser.add_argument("--device", default=None, help="cpu | cuda (default: the budget's)")
    parser.add_argument("--workers", type=int, default=None, help="processes for prepare (default: cores)")
    parser.add_argument("--steps", type=int, default=None, help="override the budget's phase-4 steps")
    parser.add_argument("--overrides", nargs="+", default=[], metavar="KEY=VALUE",
                        help="further heart-train overrides of phase 4, e.g. loss.teacher=0")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES),
                        help="run only these stages (default: all; finished ones are skipped anyway)")
    return parser


def main(argv=None) -> int:
    from dataclasses import replace

    from HeartCompletionLib.model.registry import RegistryError, resolve_checkpoint

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv
    budget = BUDGETS[args.budget]
    if args.steps is not None:
        if args.steps < 1:
            parser.error("--steps must be positive")
        budget = replace(budget, steps=args.steps)
    try:
        init = resolve_checkpoint(args.init)[0].resolve()
    except RegistryError as exc:
        parser.error(f"--init: {exc}")
    if not args.real_dir.is_dir():
        parser.error(f"--real_dir {args.real_dir}: no such folder (the shared real data)")
    device = checked_device(parser, args.device or budget.device)
    out, timings_path, timings = study_folder(args.output_dir, f"real_{budget.name}")
    workers = args.workers or os.cpu_count() or 2
    log(f"budget {budget.name}, init {init} -> {out} (device {device})")
    sizes, whole = {}, []

    def add(key: str, seconds: float) -> None:  # written after every stage: a run stopped later keeps them
        timings[key] = round(timings.get(key, 0) + seconds, 1)
        timings_path.write_text(json.dumps(timings), encoding="utf-8")

    if "prepare" in args.stages or "report" in args.stages:
        started = time.perf_counter()
        sizes = stage_prepare(out, budget, args.real_dir, workers)
        if "prepare" in args.stages:
            add("prepare_s", time.perf_counter() - started)
    if "train" in args.stages:
        trained_before = (out / "phase4" / "DONE").is_file()
        seconds = stage_train(out, budget, init, device, args.overrides)
        if not trained_before:
            add("train_s", seconds)
    if "eval" in args.stages:
        add("eval_s", stage_eval(out, budget, init, device))
    if "whole" in args.stages or "report" in args.stages:
        started = time.perf_counter()
        whole = stage_whole(out, args.real_dir, device)
        if "whole" in args.stages:
            add("whole_s", time.perf_counter() - started)
    if "report" in args.stages:
        path = write_report(out, budget, args, init, timings, sizes, whole)
        log(f"report: {path}")
        print(path.read_text(encoding="utf-8").split("## Per scenario")[0])
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except RuntimeError as exc:
        print(f"real_study: error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
