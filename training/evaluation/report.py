"""``heart-eval`` outputs: metrics CSV, summary JSON, box plots, slice overlays and one HTML report.

Every file is written through a temporary file and ``os.replace``: an interrupted run never
leaves a half-written report. The HTML page embeds its images (``data:`` URIs), so it is one
self-contained file that can be mailed or archived; its links point at ``metrics.csv`` and
``summary.json`` beside it. Plots use matplotlib's Agg backend (no display needed).

Statistics (:func:`HeartCompletionLib.geometry.metrics.summarize`): mean, median, quartiles and IQR over
the defined values; ``n_undefined`` counts NaNs (a structure missing from the prediction has
Dice 0 and undefined distances, see :mod:`HeartCompletionLib.geometry.metrics`).
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import os
from pathlib import Path

import numpy as np

from HeartCompletionLib.atomic_io import atomic_write_bytes, atomic_write_text
from HeartCompletionLib.geometry.affine import direction_of, spacing_of
from HeartCompletionLib.geometry.metrics import METRIC_UNITS, summarize

CSV_COLUMNS = ("case", "scenario", "method", "structure", "label", "dice", "hd95_mm", "assd_mm",
               "volume_error_percent", "pred_volume_ml", "ref_volume_ml", "truncated", "seconds", "inputs", "baseline_case")
METRIC_LABELS = {"dice": "Dice", "hd95_mm": "HD95 (mm)", "assd_mm": "ASSD (mm)", "volume_error_percent": "volume error (%)"}
METHOD_COLOURS = {"model": "#1f77b4", "baseline": "#ff7f0e"}


def _save_figure(fig, path: Path) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return atomic_write_bytes(path, buffer.getvalue())


def _finite_or_none(value):
    """JSON has no NaN: undefined statistics are written as ``null``."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _clean(obj):
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        obj = obj.item()
    return _finite_or_none(obj)


# --- summary ---------------------------------------------------------------------------------
def summarize_rows(rows: list[dict], meta: dict, table) -> dict:
    """Statistics per scenario x structure x method x metric, plus each scenario pooled over structures."""
    scenarios: dict = {}
    for name in meta["scenarios"]:
        mine = [r for r in rows if r["scenario"] == name]
        if not mine:
            continue
        entry = {"num_cases": len({r["case"] for r in mine}), "overall": {}, "structures": {}}
        for method in ("model", "baseline"):
            of_method = [r for r in mine if r["method"] == method]
            if not of_method:
                continue
            entry["overall"][method] = {m: summarize([r[m] for r in of_method]) for m in METRIC_UNITS}
            # one completion per case: its wall time is repeated on each structure row
            seconds = {r["case"]: r["seconds"] for r in of_method if r.get("seconds") is not None}
            entry.setdefault("seconds_per_case", {})[method] = summarize(list(seconds.values()))
            for structure in table.names:
                values = [r for r in of_method if r["structure"] == structure]
                if values:
                    entry["structures"].setdefault(structure, {})[method] = {
                        m: summarize([r[m] for r in values]) for m in METRIC_UNITS
                    }
        scenarios[name] = entry
    headline = []
    for name, entry in scenarios.items():
        parts = []
        for method, stats in entry["overall"].items():
            parts.append(f"{method} Dice {stats['dice']['mean']:.3f}, HD95 {stats['hd95_mm']['median']:.1f} mm")
        headline.append(f"{name} ({entry['num_cases']} cases): " + "; ".join(parts))
    return {"meta": meta, "metric_units": METRIC_UNITS, "scenarios": scenarios, "headline": headline}


def write_csv(path: Path, rows: list[dict]) -> Path:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    return atomic_write_text(path, buffer.getvalue())


# --- figures ---------------------------------------------------------------------------------
def box_plot(path: Path, rows: list[dict], scenario: str, table) -> Path:
    """Per-structure box plots of Dice and HD95, model vs baseline side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mine = [r for r in rows if r["scenario"] == scenario]
    structures = [s for s in table.names if any(r["structure"] == s for r in mine)]
    methods = [m for m in ("model", "baseline") if any(r["method"] == m for r in mine)]
    fig, axes = plt.subplots(1, 2, figsize=(max(6.0, 1.1 * len(structures) + 3), 3.6), squeeze=False)
    for ax, metric in zip(axes[0], ("dice", "hd95_mm")):
        width = 0.8 / len(methods)
        for m_index, method in enumerate(methods):
            data = []
            for structure in structures:
                values = np.array([r[metric] for r in mine if r["structure"] == structure and r["method"] == method],
                                  dtype=float)
                data.append(values[np.isfinite(values)])
            positions = np.arange(len(structures)) + (m_index - (len(methods) - 1) / 2) * width
            parts = ax.boxplot(data, positions=positions, widths=width * 0.9, patch_artist=True, showfliers=True,
                               manage_ticks=False)
            for box in parts["boxes"]:
                box.set_facecolor(METHOD_COLOURS[method])
                box.set_alpha(0.7)
            ax.plot([], [], color=METHOD_COLOURS[method], linewidth=6, alpha=0.7, label=method)
        ax.set_xticks(np.arange(len(structures)))
        ax.set_xticklabels(structures, rotation=45, ha="right")
        ax.set_ylabel(METRIC_LABELS[metric])
        if metric == "dice":
            ax.set_ylim(-0.02, 1.02)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(loc="lower left", fontsize=8)
    fig.suptitle(f"scenario {scenario}: model vs nearest-case baseline")
    return _save_figure(fig, path)


def _to_ras_order(label_map):
    """Labels permuted/flipped so array axes run along +R, +A, +S (nearest axes), and their spacing.

    Only for display: oblique grids are shown on their nearest RAS-aligned axes.
    """
    direction = direction_of(label_map.ijk_to_ras)
    spacing = spacing_of(label_map.ijk_to_ras)
    order = [int(np.argmax(np.abs(direction[r, :]))) for r in range(3)]  # voxel axis closest to RAS axis r
    if sorted(order) != [0, 1, 2]:
        order = [0, 1, 2]
    labels = np.transpose(label_map.labels, order)
    for r, axis in enumerate(order):
        if direction[r, axis] < 0:
            labels = np.flip(labels, axis=r)
    return labels, spacing[order]


def case_overlay_figure(path: Path, reference, predictions: dict, scenario, table, title: str = "") -> Path:
    """Axial, coronal and sagittal slices through the scored structures: the reference, then each
    method's completion with the reference outlines of the scored structures in white. Given
    structures are drawn faded, scored ones in full colour (table colours)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("reference", reference)] + [(m, predictions[m]) for m in ("model", "baseline") if m in predictions]
    ref_ras, spacing = _to_ras_order(reference)
    scored = np.isin(ref_ras, scenario.scored_labels)
    centre = np.round(np.argwhere(scored).mean(axis=0)).astype(int) if scored.any() else np.array(ref_ras.shape) // 2
    palette = np.zeros((max(table.labels) + 1, 3))
    for s in table:
        palette[s.label] = np.array(s.color) / 255.0
    # (view, slicing axis, in-plane axes, label of the screen's left edge)
    views = [("axial", 2, (0, 1), "R"), ("coronal", 1, (0, 2), "R"), ("sagittal", 0, (1, 2), "P")]
    fig, axes = plt.subplots(len(panels), 3, figsize=(9.5, 3.1 * len(panels)), squeeze=False)
    for row, (name, label_map) in enumerate(panels):
        labels, _ = _to_ras_order(label_map)
        for col, (view, axis, (h, v), screen_left) in enumerate(views):
            ax = axes[row][col]
            section = np.take(labels, centre[axis], axis=axis)  # 2-D, axes (h, v) in RAS order
            rgb = palette[np.clip(section, 0, len(palette) - 1)]
            faded = ~np.isin(section, scenario.scored_labels) & (section > 0)
            rgb[faded] *= 0.45
            extent = (0, section.shape[0] * spacing[h], 0, section.shape[1] * spacing[v])
            ax.imshow(np.transpose(rgb, (1, 0, 2)), origin="lower", extent=extent, interpolation="nearest")
            if name != "reference":
                ref_section = np.take(ref_ras, centre[axis], axis=axis)
                for label in scenario.scored_labels:
                    mask = ref_section == label
                    if mask.any() and not mask.all():
                        ax.contour(mask.T.astype(float), levels=[0.5], colors="white", linewidths=0.7,
                                   origin="lower", extent=extent)
            if view != "sagittal":
                ax.invert_xaxis()  # radiological: the patient's right on the screen's left
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{name}: {view}", fontsize=9)
            ax.text(0.01, 0.5, screen_left, transform=ax.transAxes, color="w", fontsize=8)
    _structure_legend(fig, scenario.scored_labels, table)
    fig.suptitle(f"{title} (faded: given structures)", fontsize=10)
    return _save_figure(fig, path)


def _structure_legend(fig, labels, table) -> None:
    from matplotlib.patches import Patch

    handles = [Patch(color=table.by_label(v).color_float, label=table.by_label(v).name) for v in labels]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, -0.02))


#: voxel size (mm) the label maps are subsampled to before meshing the snapshots (speed, not accuracy)
SNAPSHOT_VOXEL_MM = 3.0


def _coarse(label_map):
    """Every n-th voxel so that the spacing is about :data:`SNAPSHOT_VOXEL_MM` (same RAS frame)."""
    from HeartCompletionLib.io.labelmap import LabelMap

    step = np.maximum(1, np.rint(SNAPSHOT_VOXEL_MM / spacing_of(label_map.ijk_to_ras))).astype(int)
    matrix = label_map.ijk_to_ras.copy()
    matrix[:3, :3] = matrix[:3, :3] * step[None, :]
    return LabelMap(label_map.labels[::step[0], ::step[1], ::step[2]], matrix, source=label_map.source)


def _draw_meshes(ax, meshes: dict, table, low=None, high=None):
    """Draws ``{label: (vertices, faces)}`` in table colours with Lambert shading (light from the
    viewer's side, anterior-left-superior); returns the running (low, high) corners in mm."""
    from mpl_toolkits.mplot3d.art3d import Poly3DCollection

    light = np.array([-0.5, 0.6, 0.6]) / np.linalg.norm([-0.5, 0.6, 0.6])
    for label, (vertices, faces) in meshes.items():
        triangles = vertices[faces]
        normals = np.cross(triangles[:, 1] - triangles[:, 0], triangles[:, 2] - triangles[:, 0])
        normals /= np.linalg.norm(normals, axis=1, keepdims=True) + 1e-12
        shade = 0.35 + 0.65 * np.clip(normals @ light, 0.0, 1.0)
        colours = np.clip(np.asarray(table.by_label(label).color_float)[None, :] * shade[:, None], 0, 1)
        ax.add_collection3d(Poly3DCollection(triangles, facecolors=colours, edgecolors="none", linewidths=0))
        low = vertices.min(axis=0) if low is None else np.minimum(low, vertices.min(axis=0))
        high = vertices.max(axis=0) if high is None else np.maximum(high, vertices.max(axis=0))
    return low, high


def _equal_box(axes, low, high) -> None:
    """One box for all 3-D panels, equal mm on every axis."""
    if low is None:
        return
    centre, half = 0.5 * (low + high), 0.5 * float(np.max(high - low)) + 2.0
    for ax in axes:
        ax.set_xlim(centre[0] - half, centre[0] + half)
        ax.set_ylim(centre[1] - half, centre[1] + half)
        ax.set_zlim(centre[2] - half, centre[2] + half)
        ax.set_box_aspect((1, 1, 1))


def case_mesh_figure(path: Path, reference, predictions: dict, scenario, table, title: str = "") -> Path:
    """3-D snapshots of the scored structures' surfaces (RAS mm, seen from the front-left):
    the reference and each method's completion, from label maps subsampled to ~3 mm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from HeartCompletionLib.io.meshes import structure_meshes

    panels = [("reference", reference)] + [(m, predictions[m]) for m in ("model", "baseline") if m in predictions]
    fig = plt.figure(figsize=(3.4 * len(panels), 3.6))
    low, high = None, None
    axes = []
    for col, (name, label_map) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), col + 1, projection="3d")
        meshes = structure_meshes(_coarse(label_map), labels=scenario.scored_labels, smoothing_iterations=5)
        low, high = _draw_meshes(ax, meshes, table, low, high)
        ax.set_title(name, fontsize=9)
        ax.view_init(elev=15, azim=-60)
        ax.set_xlabel("R (mm)", fontsize=7)
        ax.set_ylabel("A (mm)", fontsize=7)
        ax.set_zlabel("S (mm)", fontsize=7)
        ax.tick_params(labelsize=6)
        ax.locator_params(nbins=4)
        axes.append(ax)
    _equal_box(axes, low, high)
    _structure_legend(fig, scenario.scored_labels, table)
    fig.suptitle(f"{title}: surfaces of the scored structures", fontsize=10)
    return _save_figure(fig, path)


def completion_figure(path: Path, given, completed, table, title: str = "", envelope=None) -> Path:
    """One completion without a reference (a real single structure, a short-axis stack): axial,
    coronal and sagittal slices through the completed heart on its output grid, with the given
    structures outlined in white and, if given, a whole-heart ``envelope`` ``(bool mask, ijk_to_ras)``
    (any grid; matched by physical position) in yellow; then a 3-D snapshot of every structure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from HeartCompletionLib.inference.output_grid import resample_nearest
    from HeartCompletionLib.io.labelmap import LabelMap
    from HeartCompletionLib.io.meshes import structure_meshes

    def on_output_grid(labels, ijk_to_ras):
        resampled = resample_nearest(labels, ijk_to_ras, completed.shape, completed.ijk_to_ras)
        return _to_ras_order(LabelMap(resampled, completed.ijk_to_ras))[0]

    labels_ras, spacing = _to_ras_order(completed)
    given_ras = on_output_grid(given.labels, given.ijk_to_ras)
    envelope_ras = None if envelope is None else on_output_grid(envelope[0].astype(np.int16), envelope[1]) > 0
    foreground = labels_ras > 0
    centre = (np.round(np.argwhere(foreground).mean(axis=0)).astype(int) if foreground.any()
              else np.array(labels_ras.shape) // 2)
    palette = np.zeros((max(table.labels) + 1, 3))
    for structure in table:
        palette[structure.label] = np.array(structure.color) / 255.0
    views = [("axial", 2, (0, 1), "R"), ("coronal", 1, (0, 2), "R"), ("sagittal", 0, (1, 2), "P")]
    fig = plt.figure(figsize=(13.0, 3.6))
    for col, (view, axis, (h, v), screen_left) in enumerate(views):
        ax = fig.add_subplot(1, 4, col + 1)
        section = np.take(labels_ras, centre[axis], axis=axis)
        rgb = palette[np.clip(section, 0, len(palette) - 1)]
        extent = (0, section.shape[0] * spacing[h], 0, section.shape[1] * spacing[v])
        ax.imshow(np.transpose(rgb, (1, 0, 2)), origin="lower", extent=extent, interpolation="nearest")
        outlines = [(np.take(given_ras, centre[axis], axis=axis) > 0, "white", "solid")]
        if envelope_ras is not None:
            outlines.append((np.take(envelope_ras, centre[axis], axis=axis), "yellow", "dashed"))
        for mask, colour, style in outlines:
            if mask.any() and not mask.all():
                ax.contour(mask.T.astype(float), levels=[0.5], colors=colour, linewidths=0.8, linestyles=style,
                           origin="lower", extent=extent)
        if view != "sagittal":
            ax.invert_xaxis()  # radiological: the patient's right on the screen's left
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(view, fontsize=9)
        ax.text(0.01, 0.5, screen_left, transform=ax.transAxes, color="w", fontsize=8)
    ax = fig.add_subplot(1, 4, 4, projection="3d")
    present = completed.present_labels()
    meshes = structure_meshes(_coarse(completed), labels=present, smoothing_iterations=5)
    _equal_box([ax], *_draw_meshes(ax, meshes, table))
    ax.view_init(elev=15, azim=-60)
    ax.set_title("3-D (front-left)", fontsize=9)
    ax.tick_params(labelsize=6)
    _structure_legend(fig, present, table)
    extra = ", envelope dashed yellow" if envelope is not None else ""
    fig.suptitle(f"{title} (given structures outlined in white{extra})", fontsize=10)
    return _save_figure(fig, path)


# --- HTML ------------------------------------------------------------------------------------
def _fmt(stats: dict | None, key: str = "mean", digits: int = 3) -> str:
    if not stats or stats.get(key) is None or not math.isfinite(stats[key]):
        return "-"
    return f"{stats[key]:.{digits}f}"


def _better(metric: str, model: float | None, baseline: float | None) -> str | None:
    if model is None or baseline is None or not (math.isfinite(model) and math.isfinite(baseline)):
        return None
    if metric == "dice":
        return "model" if model > baseline else "baseline" if baseline > model else None
    a, b = (abs(model), abs(baseline)) if metric == "volume_error_percent" else (model, baseline)
    return "model" if a < b else "baseline" if b < a else None


def _cells(per_method: dict) -> str:
    """Model | baseline cells for Dice mean, HD95 median, ASSD mean, volume error median (better one bold)."""
    out = []
    for metric, key, digits in (("dice", "mean", 3), ("dice", "median", 3), ("hd95_mm", "median", 1),
                                ("assd_mm", "mean", 2), ("volume_error_percent", "median", 1)):
        values = {m: per_method.get(m, {}).get(metric) for m in ("model", "baseline")}
        best = _better(metric, *(v.get(key) if v else None for v in values.values()))
        for method, stats in values.items():
            text = _fmt(stats, key, digits)
            if stats and metric == "dice" and key == "mean" and stats.get("iqr") is not None:
                text += f" <small>(IQR {_fmt(stats, 'iqr', 2)})</small>"
            out.append(f"<td class='{method}'>{'<b>' + text + '</b>' if best == method else text}</td>")
    return "".join(out)


TABLE_HEAD = ("<tr><th rowspan=2>{first}</th><th colspan=2>Dice mean</th><th colspan=2>Dice median</th>"
              "<th colspan=2>HD95 median (mm)</th><th colspan=2>ASSD mean (mm)</th><th colspan=2>vol. err. median (%)</th>"
              "<th rowspan=2>n (undef.)</th></tr><tr>" + "<th>model</th><th>baseline</th>" * 5 + "</tr>")


def _n_cell(per_method: dict) -> str:
    stats = per_method.get("model", {}).get("hd95_mm") or {}
    return f"<td>{stats.get('n', 0)} ({stats.get('n_undefined', 0)})</td>"


def _embed(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def write_html(path: Path, summary: dict, plots: dict, figures: list[Path]) -> Path:
    meta = summary["meta"]
    esc = html.escape
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>HeartCompletion evaluation</title><style>",
        "body{font-family:sans-serif;margin:1.5em;max-width:1300px}table{border-collapse:collapse;margin:.6em 0}",
        "td,th{border:1px solid #bbb;padding:2px 7px;text-align:right}th{background:#eee}td:first-child{text-align:left}",
        "td.model{background:#eef4fb}td.baseline{background:#fdf2e7}img{max-width:100%}code{background:#f4f4f4}",
        "</style></head><body><h1>HeartCompletion evaluation</h1>",
        f"<p>Checkpoint <code>{esc(str(meta['checkpoint']))}</code> (phase {esc(str(meta.get('phase')))}) on "
        f"<code>{esc(str(meta['data']))}</code>: {meta['num_cases']} cases; baseline: "
        f"{esc(str(meta.get('baseline') or 'none'))} ({meta.get('num_training_cases', 0)} training cases). "
        "Metrics on each case's original image grid; distances in mm between boundary voxels; a structure the "
        "method did not produce has Dice 0 and undefined distances (counted as <i>undef.</i>). "
        "Bold: the better of model and baseline.</p>",
        "<p>Files: <a href='metrics.csv'>metrics.csv</a> (every case, scenario, structure and method), "
        "<a href='summary.json'>summary.json</a>.</p>",
        "<h2>Overview (all scored structures pooled)</h2><table>", TABLE_HEAD.format(first="scenario"),
    ]
    for name, entry in summary["scenarios"].items():
        parts.append(f"<tr><td><a href='#{esc(name)}'>{esc(name)}</a> ({entry['num_cases']} cases)</td>"
                     f"{_cells(entry['overall'])}{_n_cell(entry['overall'])}</tr>")
    parts.append("</table>")
    timing = []
    for name, entry in summary["scenarios"].items():
        per = entry.get("seconds_per_case", {})
        timing.append(f"{esc(name)}: " + ", ".join(f"{m} {_fmt(per[m], 'median', 2)} s" for m in per))
    parts.append("<p>Median wall time per completion (this machine): " + "; ".join(timing) + ".</p>")
    skipped = {k: v for k, v in meta.get("skipped", {}).items() if v}
    if skipped or meta.get("failed"):
        parts.append(f"<p>Skipped (scenario not applicable to a case): {esc(json.dumps(skipped))}. "
                     f"Failed cases: {esc(json.dumps(meta.get('failed', [])))}</p>")
    for name, entry in summary["scenarios"].items():
        parts += [f"<h2 id='{esc(name)}'>Scenario {esc(name)}</h2><table>", TABLE_HEAD.format(first="structure")]
        for structure, per_method in entry["structures"].items():
            parts.append(f"<tr><td>{esc(structure)}</td>{_cells(per_method)}{_n_cell(per_method)}</tr>")
        parts.append("</table>")
        if name in plots:
            parts.append(f"<img alt='box plots {esc(name)}' src='{_embed(plots[name])}'>")
    if figures:
        parts.append("<h2>Cases</h2><p>Faded: given structures; full colour: scored ones; white: the reference "
                     "outline of the scored structures.</p>")
        parts += [f"<p><img alt='{esc(Path(f).stem)}' src='{_embed(f)}'></p>" for f in figures]
    parts.append(f"<p><small>Command: <code>{esc(str(meta.get('command', '')))}</code></small></p></body></html>")
    return atomic_write_text(path, "\n".join(parts))


def _make_readable(paths) -> None:
    """Temporary files are created private (0600); reports are for sharing: apply the umask instead."""
    umask = os.umask(0)
    os.umask(umask)
    for path in paths:
        os.chmod(path, 0o666 & ~umask)


def write_outputs(output_dir: Path, rows: list[dict], meta: dict, table, figures: list[Path]) -> dict:
    """metrics.csv, summary.json, plots/box_<scenario>.png and report.html; returns the summary."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize_rows(rows, meta, table)
    write_csv(output_dir / "metrics.csv", rows)
    plots = {name: box_plot(output_dir / "plots" / f"box_{name}.png", rows, name, table) for name in summary["scenarios"]}
    summary["files"] = {"csv": "metrics.csv", "html": "report.html",
                        "plots": {k: str(p.relative_to(output_dir)) for k, p in plots.items()},
                        "figures": [str(Path(f).relative_to(output_dir)) for f in figures]}
    atomic_write_text(output_dir / "summary.json", json.dumps(_clean(summary), indent=1, allow_nan=False) + "\n")
    write_html(output_dir / "report.html", summary, plots, figures)
    _make_readable([output_dir / n for n in ("metrics.csv", "summary.json", "report.html")] + list(plots.values())
                   + [Path(f) for f in figures])
    return summary
