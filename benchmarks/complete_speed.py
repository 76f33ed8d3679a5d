"""Seconds, peak memory and the accuracy of the fast decode for one completion with the ``small`` model on CPU.

The heart is the synthetic heart of ``--seed`` rasterised at ``--spacing`` mm (or, with ``--ct``,
into a CT-sized grid: 512 x 512 x 300 voxels of 0.4 x 0.4 x 0.5 mm), with the structures of
``--drop`` removed (default subset B: Aorta, PA, LAA, Coronary, PV, i.e. complete B from subset
A). The model is a trained checkpoint (``--checkpoint``) or, by default, a ``small`` HeartVecSet
fitted to this one heart's signed distances (ridge regression of the output layer on the random
features, then ``--fit_steps`` Adam steps; at 1 mm for ``--ct``, as the model works in mm): a
real network of the real size whose zero level sets look like a heart, so the hierarchical
decode refines a realistic number of cells. (An untrained model outputs 0 everywhere, which is
the worst case: every voxel refined.)

It prints the seconds of every stage (input surfaces, encode, decode per level, fusion, island
clean-up, writing the .nii.gz), the peak resident memory of the timed completion (``ru_maxrss``;
the fit runs in a child process) and, with ``--decode fast`` (default), the **accuracy check**:
the same completion with ``--decode exact`` (today's full hierarchical decode) and, per completed
structure, Dice and ASSD (mm) between the two (bar: Dice >= 0.99, ASSD <= 0.2 mm). Run::

    python benchmarks/complete_speed.py --threads 2          # 1 mm
    python benchmarks/complete_speed.py --threads 2 --ct     # CT resolution

``--input FILE`` completes a label map from a file instead (``--label_map``: its numbering, as for
``heart-complete``; every structure missing from it is completed), e.g. a real partial label map,
with the same timings and accuracy check (no truth to compare with)::

    python benchmarks/complete_speed.py --checkpoint CK --input ../shared/data/real/la2018_lgemri/CASE.nii.gz \
        --label_map ../shared/data/real/la2018_lgemri/labels.json
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

B_SUBSET = ("Aorta", "PA", "LAA", "Coronary", "PV")


CT_SPACING_MM = (0.4, 0.4, 0.5)
CT_SHAPE = (512, 512, 300)
#: the accuracy bar of the fast decode against the exact one (completed structures)
MIN_DICE, MAX_ASSD_MM = 0.99, 0.2


def partial_heart(seed: int, spacing, drop, shape=None):
    from HeartCompletionLib.io.labelmap import LabelMap
    from HeartCompletionLib.io.synthetic import synthetic_label_map
    from HeartCompletionLib.structures.table import StructureTable

    truth = synthetic_label_map(seed=seed, spacing_mm=spacing, shape=shape)
    labels = truth.labels.copy()
    labels[np.isin(labels, [s.label for s in StructureTable.default().subset(drop)])] = 0
    return truth, LabelMap(labels, truth.ijk_to_ras, source=f"<synthetic seed={seed}, {spacing} mm>")


def complete_with_decode_hook(checkpoint: str, ct: bool, hook):
    """One completion of the benchmark's heart (seed 0, subset B completed; ``ct``: the CT grid,
    else 1 mm) with ``checkpoint``, while ``completion.fast_hierarchical_labels`` is replaced by
    ``hook(original)`` (other benchmarks record or capture the fast decode that way); returns the
    :class:`CompletionResult`."""
    from HeartCompletionLib.inference import completion
    from HeartCompletionLib.model.checkpoint import load_inference_checkpoint

    spacing, shape = (CT_SPACING_MM, CT_SHAPE) if ct else (1.0, None)
    model = load_inference_checkpoint(checkpoint)  # before the heart: a bad file fails at once
    _, source = partial_heart(0, spacing, list(B_SUBSET), shape)
    original = completion.fast_hierarchical_labels
    completion.fast_hierarchical_labels = hook(original)
    try:
        return completion.complete_label_map(source, model)
    finally:
        completion.fast_hierarchical_labels = original


def fit_model(path: Path, config: str, seed: int, spacing: float, drop, steps: int = 300, lr: float = 2e-3,
              points: int = 60_000) -> None:
    """A ``config`` model fitted to one heart's signed distances (mm / S) for the encoder input of
    its partial version: output layer by ridge regression on the random features, then ``steps``
    Adam steps on every weight."""
    import torch

    from HeartCompletionLib.geometry.normalization import Normalization
    from HeartCompletionLib.geometry.signed_distance import signed_distances_mm
    from HeartCompletionLib.geometry.surface import sample_structure_surfaces
    from HeartCompletionLib.model.checkpoint import save_inference_checkpoint
    from HeartCompletionLib.model.configs import get_config
    from HeartCompletionLib.model.encoder_input import encoder_arrays, encoder_centre_mm, select_encoder_points
    from HeartCompletionLib.model.vecset import HeartVecSet
    from HeartCompletionLib.structures.table import StructureTable

    torch.manual_seed(seed)
    table, norm = StructureTable.default(), Normalization()
    truth, source = partial_heart(seed, spacing, drop)
    rng = np.random.default_rng(seed)
    given = source.present_labels()
    pts, _, lab = sample_structure_surfaces(source, given, 40_000, rng, min_per_structure=333)
    idx = np.asarray(lab, dtype=np.int64) - 1
    inputs = [g - 1 for g in given]
    centre = encoder_centre_mm(pts, idx, inputs)
    chosen = select_encoder_points(idx, inputs, 2048, rng, min_per_structure=32)
    xyz, onehot = encoder_arrays(pts[chosen], idx[chosen], centre, norm, len(table))
    # training-like targets: half near the surfaces of all structures, half in the heart's box
    all_pts, _, _ = sample_structure_surfaces(truth, truth.present_labels(), points // 2, rng, min_per_structure=500)
    near = all_pts + rng.normal(scale=3.0, size=all_pts.shape)
    lo, hi = all_pts.min(0) - 30.0, all_pts.max(0) + 30.0
    q_mm = np.concatenate([near, rng.uniform(lo, hi, size=(points - len(near), 3))])
    target = signed_distances_mm(truth, q_mm, table.labels) / norm.scale_mm
    model = HeartVecSet(get_config(config, len(table))).eval()
    with torch.inference_mode():
        latents, _ = model.encode(torch.from_numpy(xyz)[None], torch.from_numpy(onehot)[None])
        q = torch.from_numpy(norm.points_to_network(q_mm, centre).astype(np.float32))[None]
        feats = model.decoder_norm(model.decoder(model.query_embed(model.fourier(q)), latents))[0].double()
    design = torch.cat([feats, torch.ones(len(feats), 1, dtype=torch.float64)], dim=1)
    t = torch.from_numpy(np.clip(target, -0.3, 0.3)).double()  # far values matter less than the surface
    w = torch.linalg.solve(design.T @ design + 1e-3 * torch.eye(design.shape[1], dtype=torch.float64), design.T @ t)
    with torch.no_grad():
        model.to_sdf.weight.copy_(w[:-1].T.float())
        model.to_sdf.bias.copy_(w[-1].float())
    # then a short fit of every weight to this one heart (random features alone are too smooth)
    model.train()
    x_t, oh_t = torch.from_numpy(xyz)[None], torch.from_numpy(onehot)[None]
    q_all = torch.from_numpy(norm.points_to_network(q_mm, centre).astype(np.float32))
    t_all = torch.from_numpy(target.astype(np.float32))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1), pct_start=0.1)
    start = time.perf_counter()
    for step in range(steps):
        pick = torch.from_numpy(rng.choice(len(q_all), 2048))
        sdf = model(x_t, oh_t, q_all[pick][None])["sdf"][0]
        loss = (sdf - t_all[pick]).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 25 == 0 or step == steps - 1:
            print(f"fit step {step}: L1 {loss.item() * norm.scale_mm:.2f} mm ({time.perf_counter() - start:.0f} s)", flush=True)
    model.eval()
    save_inference_checkpoint(path, model, table, norm, phase="benchmark-fit",
                              data_summary={"fitted_to": f"synthetic seed {seed}, {spacing} mm"})


def _time_writing(result, table) -> float:
    """Seconds to write the completed label map as .nii.gz (what heart-complete does)."""
    from HeartCompletionLib.io.labelmap_files import write_label_map

    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        write_label_map(result.label_map, Path(tmp) / "completed.nii.gz", table=table)
        return time.perf_counter() - t


def _stage_line(result, writing_s) -> str:
    t = result.timings
    levels = " + ".join(f"{lv['queries']:,} q {lv.get('seconds', 0):.2f} s" for lv in result.grid["levels"])
    parts = [f"load {t.get('load_s', 0):.2f}", f"surfaces {t.get('surface_s', 0):.2f}", f"encode {t.get('encode_s', 0):.2f}",
             f"latent fit {t.get('fit_s', 0):.2f}", f"decode {t.get('decode_s', 0):.2f} [{levels}]", f"fusion {t.get('fusion_write_s', 0):.2f}",
             f"islands {t.get('islands_s', 0):.2f}"]
    if writing_s is not None:
        parts.append(f"writing {writing_s:.2f}")
    return ", ".join(parts)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="trained checkpoint (default: fit a random model's output layer)")
    p.add_argument("--config", default="small", help="model config of the fitted model (default small)")
    p.add_argument("--spacing", type=float, default=1.0, help="output voxel size in mm (default 1)")
    p.add_argument("--ct", action="store_true",
                   help=f"CT-sized grid: {' x '.join(map(str, CT_SHAPE))} voxels of {' x '.join(map(str, CT_SPACING_MM))} mm "
                        "(overrides --spacing)")
    p.add_argument("--seed", type=int, default=0, help="synthetic heart seed")
    p.add_argument("--drop", nargs="+", default=list(B_SUBSET), help="structures removed from the input")
    p.add_argument("--input", default=None, metavar="FILE",
                   help="complete this label map instead of the synthetic heart (needs --checkpoint)")
    p.add_argument("--label_map", default=None, metavar="CONV",
                   help="label numbering of --input: 'mmwhs', 'totalsegmentator' or a JSON file (default: the table's)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"), help="device of the completion: cpu | cuda | auto (default cpu)")
    p.add_argument("--decode", default="fast", choices=("fast", "exact"),
                   help="fine-level decoding (default fast); fast also runs exact once for the accuracy check")
    p.add_argument("--no_check", action="store_true", help="skip the accuracy check against --decode exact")
    p.add_argument("--grid_spacing_mm", type=float, default=None, help="coarse lattice (default: completion's)")
    p.add_argument("--refine_factor", type=float, default=None, help="refinement band (default: completion's)")
    p.add_argument("--fast_option", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                   help="fast decode option (interp_cell_mm, node_band, voxel_band, error_quantile, dice_loss), repeatable")
    p.add_argument("--repeats", type=int, default=1, help="timed completions (the best is reported)")
    p.add_argument("--fit_steps", type=int, default=300, help="Adam steps of the fit (default 300)")
    p.add_argument("--latent_fit_steps", type=int, default=None, metavar="N",
                   help="heart-complete --fit_steps of the timed completion (default: the library's, 30 here; 0: off)")
    p.add_argument("--fit_threads", type=int, default=1, help="torch threads of the fit (default 1)")
    p.add_argument("--_fit", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    print("command: python benchmarks/complete_speed.py " + " ".join(sys.argv[1:] if argv is None else argv), flush=True)

    import torch

    torch.set_num_threads(args.threads)
    if args._fit:
        fit_model(Path(args._fit), args.config, args.seed, args.spacing, args.drop, steps=args.fit_steps)
        return 0
    if args.input is not None and args.checkpoint is None:
        p.error("--input needs --checkpoint (the fitted model is fitted to the synthetic heart)")
    spacing, shape = (CT_SPACING_MM, CT_SHAPE) if args.ct else (args.spacing, None)
    fit_spacing = 1.0 if args.ct else args.spacing  # the model works in mm: a fit at 1 mm serves any grid
    ck_path = args.checkpoint
    if ck_path is None:
        ck_path = str(Path(tempfile.mkdtemp()) / f"{args.config}_fitted.safetensors")
        t = time.perf_counter()
        cmd = [sys.executable, __file__, "--_fit", ck_path, "--config", args.config, "--seed", str(args.seed),
               "--spacing", str(fit_spacing), "--threads", str(args.fit_threads), "--fit_steps", str(args.fit_steps),
               "--drop", *args.drop]
        subprocess.run(cmd, check=True)
        print(f"fitted a {args.config} model to the heart in {time.perf_counter() - t:.1f} s")

    from HeartCompletionLib.geometry.metrics import assd_mm, dice
    from HeartCompletionLib.inference.completion import complete_label_map
    from HeartCompletionLib.model.checkpoint import load_inference_checkpoint

    checkpoint = load_inference_checkpoint(ck_path, device=args.device)
    table = checkpoint.table
    if args.input is None:
        truth, source = partial_heart(args.seed, spacing, args.drop, shape)
    else:
        from HeartCompletionLib.errors import HeartCompletionError
        from HeartCompletionLib.geometry.affine import spacing_of
        from HeartCompletionLib.io.labelmap_files import read_label_map

        try:  # a missing or unreadable file, an unknown numbering: a usage error naming it
            truth, source = None, read_label_map(args.input, table=table, convention=args.label_map)
        except HeartCompletionError as exc:
            p.error(f"--input: {exc}")
        spacing = spacing_of(source.ijk_to_ras)
    options = {} if args.refine_factor is None else {"refine_factor": args.refine_factor}
    options.update(device=args.device, grid_spacing_mm=args.grid_spacing_mm, decode=args.decode,
                   fast_options={k: float(v) for k, v in args.fast_option})
    if args.latent_fit_steps is not None:
        options["fit_steps"] = args.latent_fit_steps
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    best = None
    for _ in range(args.repeats):
        t = time.perf_counter()
        result = complete_label_map(source, checkpoint, **options)
        wall = time.perf_counter() - t
        best = (wall, result) if best is None or wall < best[0] else best
    wall, result = best
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # before the exact check runs
    writing_s = _time_writing(result, table)
    g = result.grid
    report = {
        "config": checkpoint.config.to_dict(), "threads": args.threads, "image_shape": list(source.shape),
        "spacing_mm": list(np.broadcast_to(spacing, 3).astype(float)), "decode": args.decode,
        "latent_fit_steps": len(result.fit_losses or [1]) - 1,
        "completed": [table.by_label(v).name for v in result.completed_labels],
        "device": args.device, "seconds": round(wall, 2), "timings_s": {k: round(v, 2) for k, v in result.timings.items()},
        "writing_nii_gz_s": round(writing_s, 2),
        "peak_rss_mb": round(peak), "rss_before_completion_mb": round(rss_before),
        "output_voxels": g["output_voxels"], "region_voxels": g["region_voxels"],
        "coarse_spacing_mm": g["coarse_spacing_mm"], "coarse_nodes": g["coarse_nodes"],
        "refined_queries": g["refined_queries"], "levels": g["levels"],
        "dice_vs_truth": None if truth is None else {
            table.by_label(v).name: round(float(dice(result.label_map.labels == v, truth.labels == v)), 3)
            for v in result.completed_labels},
    }
    if args.input is not None:
        report["input"] = args.input
    print(json.dumps(report, indent=1))
    if torch.cuda.is_available() and args.device != "cpu":
        print(f"CUDA max allocated {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB ({torch.cuda.get_device_name()})")
    print(f"stages (s): {_stage_line(result, writing_s)}")
    verdict = ""
    if args.decode == "fast" and not args.no_check:
        options["decode"] = "exact"
        t = time.perf_counter()
        exact = complete_label_map(source, checkpoint, **options)
        exact_wall = time.perf_counter() - t
        print(f"exact decode: {exact_wall:.1f} s, {exact.grid['queries']:,} queries; "
              f"stages (s): {_stage_line(exact, None)}")
        rows, ok = [], True
        for v in result.completed_labels:
            a, b = result.label_map.labels == v, exact.label_map.labels == v
            d = float(dice(a, b)) if (a.any() or b.any()) else 1.0
            s_mm = float(assd_mm(a, b, source.ijk_to_ras)) if (a.any() and b.any()) else 0.0
            ok &= d >= MIN_DICE and s_mm <= MAX_ASSD_MM
            rows.append(f"{table.by_label(v).name} Dice {d:.4f} ASSD {s_mm:.3f} mm ({int((a != b).sum()):,} voxels differ)")
        print("accuracy fast vs exact: " + "; ".join(rows))
        verdict = (f"; accuracy vs exact {'PASS' if ok else 'FAIL'} (Dice >= {MIN_DICE}, ASSD <= {MAX_ASSD_MM} mm), "
                   f"exact {exact_wall:.1f} s")
    print(f"\n{wall:.1f} s ({args.decode} decode), peak RSS {peak / 1024:.2f} GB for {g['output_voxels']:,} output voxels "
          f"({g['coarse_nodes']:,} coarse nodes + {g['refined_queries']:,} refined queries vs "
          f"{g['region_voxels']:,} region voxels){verdict}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
