"""``heart-split``: deterministic train / val / test lists of prepared cases.

Each case goes to a split by a hash of ``(seed, dataset name, group)`` alone, so the
assignment is the same on every run and machine, and adding cases to a dataset never moves the
cases already there.

Splits are by patient (DESIGN.md, phase 4): cases of one *group* always land on the same side.
A case's group comes from ``--group_by REGEX`` searched (``re.search``) in its case name (the
``.npz`` path relative to its data folder, without ``.npz``): the first capturing group when it
took part in the match, else the whole match. A case the regex does not match is its own group,
named by its case name, so its hash (and side) is exactly what it was without grouping. The
default, :data:`DEFAULT_GROUP_BY`, groups

- the frames or phases of one name: everything before an ``_ED``, ``_ES`` or ``_frameNN`` tag
  (``-`` works too; any case; the tag must end at ``_``, ``-``, ``.`` or the end of the name):
  ``patient001_ED_label`` and ``patient001_ES_label`` -> ``patient001``,
  ``sub/P7-frame01`` -> ``sub/P7``;
- else everything up to and including ``patient`` followed by digits (``patient001_4d`` ->
  ``patient001``).

Names such as ``06SR5RBREL16DQ6M8LWS_LA_label`` or ``case_0001`` match neither and stay single.
``--group_by none`` turns grouping off. Groups never span datasets. Several prepared folders (datasets) are merged; a case is in exactly one
split. The fractions are met on average (a hash is a fair coin per case), not exactly; when
``test_fraction > 0`` at least one group is put in test (from validation if it has two or more,
else from train: the group whose hash score is closest to the test band), and when
``val_fraction > 0`` at least one in validation (from train, else from test, likewise), and train
is never left empty by the hash (it takes the closest group of validation, else of test): the only
departures from stability, and only in tiny datasets.

Output CSVs (``train.csv``, ``val.csv``, ``test.csv`` when ``test_fraction > 0``) have the columns
:data:`SPLIT_COLUMNS`: ``case`` (path of the ``.npz`` relative to the CSV's folder, absolute when
it is on another drive), ``dataset``, ``annotated`` and ``truncated`` (``;``-joined structure
names), ``case_id`` and ``source`` (the label map it was prepared from; evaluation reads it).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import os
import re
import sys
from pathlib import Path

from HeartCompletionLib.atomic_io import atomic_write_text
from HeartCompletionLib.errors import ExitCode, HeartCompletionError

from .case_format import CaseFormatError, load_case, read_manifest

SPLIT_COLUMNS = ("case", "dataset", "annotated", "truncated", "case_id", "source", "group")
#: default ``--group_by``: frames/phases of one patient (``patient001_ED_label`` / ``_ES_label``)
DEFAULT_GROUP_BY = r"(?i)^(.+?)[_-](?:ED|ES|frame\d+)(?=[_.-]|$)|^.*?patient[_-]?\d+"
SPLITS = ("train", "val", "test")


class SplitError(HeartCompletionError, ValueError):
    """Bad data folders or fractions (message names the folder or the value)."""


def split_score(seed: int, dataset: str, case_id: str) -> float:
    """A number in [0, 1) that depends only on ``(seed, dataset, case_id)``."""
    digest = hashlib.sha256(f"{int(seed)}\0{dataset}\0{case_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2.0**64


def compile_group_by(group_by: str | None):
    """The compiled ``--group_by`` regex, ``None`` for no grouping (``None``, ``""``, ``"none"``)."""
    if group_by is None or str(group_by).strip().lower() in ("", "none"):
        return None
    try:
        return re.compile(group_by)
    except re.error as exc:
        raise SplitError(f"--group_by {group_by!r} is not a regular expression: {exc}") from exc


def case_group(case_id: str, pattern) -> str:
    """The group (patient) of a case name: the first capturing group of ``pattern`` when it took
    part in the match, else the whole match; the case name itself when nothing matches.

    >>> p = compile_group_by(DEFAULT_GROUP_BY)
    >>> case_group("patient001_ED_label", p), case_group("patient001_ES_label", p)
    ('patient001', 'patient001')
    >>> case_group("06SR5RBREL16DQ6M8LWS_LA_label", p), case_group("patient012_4d", p)
    ('06SR5RBREL16DQ6M8LWS_LA_label', 'patient012')
    """
    if pattern is None:
        return case_id
    match = pattern.search(case_id)
    if match is None:
        return case_id
    group = match.group(1) if pattern.groups and match.group(1) is not None else match.group(0)
    return group or case_id


def collect_cases(data_dir: Path, dataset: str | None = None) -> list[dict]:
    """The prepared cases of one folder: ``ok`` cases of its manifest, else every ``.npz`` under it."""
    data_dir = Path(data_dir).resolve()
    if not data_dir.is_dir():
        raise SplitError(f"{data_dir}: no such data folder")
    dataset = dataset or data_dir.name
    manifest = read_manifest(data_dir)
    if manifest is not None:
        paths = [data_dir / e["output"] for e in manifest["cases"] if e.get("status") == "ok"]
    else:
        paths = sorted(data_dir.rglob("*.npz"))
    cases = []
    for path in paths:
        try:
            case = load_case(path, keys=["annotated", "truncated"])
        except CaseFormatError as exc:
            raise SplitError(f"{exc} (run heart-prepare again, or heart-prepare --check {data_dir})") from exc
        meta = case["meta"]
        names = meta.get("table") or [str(k) for k in range(len(case["annotated"]))]
        cases.append({
            "path": path,
            "dataset": dataset,
            "case_id": path.relative_to(data_dir).with_suffix("").as_posix(),
            "annotated": [n for n, a in zip(names, case["annotated"]) if a],
            "truncated": [n for n, t in zip(names, case["truncated"]) if t],
            "source": meta.get("source", ""),
        })
    return cases


def _ensure_one(out: dict, name: str, donors) -> None:
    """Moves one group into the empty split ``name`` from the first donor ``(split, index in its
    score order)`` that has two or more (groups are in ascending score order)."""
    if out[name]:
        return
    for donor, index in donors:
        if len(out[donor]) >= 2:
            out[name].append(out[donor].pop(index))
            return


def assign_splits(cases: list[dict], val_fraction: float, test_fraction: float, seed: int,
                  group_by: str | None = DEFAULT_GROUP_BY) -> dict[str, list[dict]]:
    """``{"train": [...], "val": [...], "test": [...]}``; every case in exactly one list, every
    group (:func:`case_group` of ``group_by``, per dataset) in exactly one split."""
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise SplitError(f"fractions must be in [0, 1) with a sum below 1, got val {val_fraction}, test {test_fraction}")
    pattern = compile_group_by(group_by)
    groups: dict[tuple, list[dict]] = {}
    for case in cases:
        case["group"] = case_group(case["case_id"], pattern)
        groups.setdefault((case["dataset"], case["group"]), []).append(case)
    out: dict[str, list[list[dict]]] = {name: [] for name in SPLITS}
    scored = sorted(((split_score(seed, d, g), members) for (d, g), members in groups.items()), key=lambda sc: sc[0])
    for score, members in scored:
        name = "test" if score < test_fraction else "val" if score < test_fraction + val_fraction else "train"
        out[name].append(members)
    # tiny datasets: a split asked for gets the group closest to its band from a split with two or more
    _ensure_one(out, "train", (("val", -1), ("test", -1)))
    if test_fraction > 0:
        _ensure_one(out, "test", (("val", 0), ("train", 0)))
    if val_fraction > 0:
        _ensure_one(out, "val", (("train", 0), ("test", -1)))
    flat: dict[str, list[dict]] = {name: [c for members in out[name] for c in members] for name in SPLITS}
    out = flat  # type: ignore[assignment]
    for name in SPLITS:
        out[name].sort(key=lambda c: (c["dataset"], c["case_id"]))
    return out


def _csv_text(cases: list[dict], output_dir: Path) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=SPLIT_COLUMNS)
    writer.writeheader()
    for case in cases:
        try:
            path = Path(os.path.relpath(case["path"], output_dir)).as_posix()
        except ValueError:  # another drive (Windows): keep it absolute
            path = str(case["path"])
        writer.writerow({
            "case": path, "dataset": case["dataset"], "annotated": ";".join(case["annotated"]),
            "truncated": ";".join(case["truncated"]), "case_id": case["case_id"], "source": case["source"],
            "group": case.get("group", case["case_id"]),
        })
    return buffer.getvalue()


def write_splits(data_dirs, output_dir=None, val_fraction: float = 0.1, test_fraction: float = 0.0, seed: int = 0,
                 group_by: str | None = DEFAULT_GROUP_BY) -> dict:
    """Write ``train.csv``/``val.csv`` (and ``test.csv``) plus ``split.json``; returns the counts.

    ``output_dir`` defaults to the first data folder. Dataset names are the folders' names; two
    folders of the same name are told apart by a ``-2``, ``-3``... suffix.
    """
    data_dirs = [Path(d).resolve() for d in data_dirs]
    if not data_dirs:
        raise SplitError("at least one --data_dir is needed")
    if len(set(data_dirs)) != len(data_dirs):
        raise SplitError(f"a data folder is given twice: {[str(d) for d in data_dirs]}")
    output_dir = Path(output_dir).resolve() if output_dir else data_dirs[0]
    names: list[str] = []
    cases: list[dict] = []
    for data_dir in data_dirs:
        name = data_dir.name
        suffix = 2
        while name in names:
            name, suffix = f"{data_dir.name}-{suffix}", suffix + 1
        names.append(name)
        found = collect_cases(data_dir, name)
        if not found:
            raise SplitError(f"{data_dir}: no prepared cases (.npz); run heart-prepare first")
        cases += found
    splits = assign_splits(cases, val_fraction, test_fraction, seed, group_by)
    output_dir.mkdir(parents=True, exist_ok=True)
    for name in SPLITS:
        if name == "test" and test_fraction <= 0:
            continue
        atomic_write_text(output_dir / f"{name}.csv", _csv_text(splits[name], output_dir))
    summary = {
        "seed": seed, "val_fraction": val_fraction, "test_fraction": test_fraction, "group_by": group_by,
        "groups": {n: len({(c["dataset"], c["group"]) for c in splits[n]}) for n in SPLITS},
        "datasets": {n: str(d) for n, d in zip(names, data_dirs)},
        "counts": {n: len(v) for n, v in splits.items()},
        "counts_per_dataset": {n: {s: sum(c["dataset"] == n for c in splits[s]) for s in SPLITS} for n in names},
    }
    atomic_write_text(output_dir / "split.json", json.dumps(summary, indent=1) + "\n")
    return summary


def read_split_csv(path) -> list[dict]:
    """Rows of a split CSV with ``case`` resolved to an absolute path (for the trainer/evaluation)."""
    path = Path(path)
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        row["case"] = str((path.parent / row["case"]).resolve())
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="heart-split",
        description="Write deterministic train.csv / val.csv (/ test.csv) of prepared cases (hash of seed, "
        "dataset and case name: stable under re-runs and when cases are added).",
    )
    parser.add_argument("--data_dir", type=Path, action="append", required=True,
                        help="a heart-prepare output folder; repeat to merge datasets")
    parser.add_argument("--val_fraction", type=float, default=0.1, help="share of cases for validation (default 0.1)")
    parser.add_argument("--test_fraction", type=float, default=0.0, help="share of cases for test (default 0)")
    parser.add_argument("--seed", type=int, default=0, help="changes the assignment (default 0)")
    parser.add_argument("--output_dir", type=Path, default=None, help="where the CSVs go (default: the first --data_dir)")
    parser.add_argument("--group_by", default=DEFAULT_GROUP_BY, metavar="REGEX",
                        help="cases whose names give the same patient stay on one side: the regex's first group "
                        "(or whole match, re.search in the case name) names the patient; unmatched cases stay "
                        "single; 'none' turns grouping off. Default: frames of one name (everything before an "
                        "_ED/_ES/_frameNN tag, e.g. patient001_ED_label -> patient001), else 'patient' + digits")
    args = parser.parse_args(argv)
    try:
        summary = write_splits(args.data_dir, args.output_dir, args.val_fraction, args.test_fraction, args.seed,
                               args.group_by)
    except SplitError as exc:
        print(f"heart-split: error: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    out = args.output_dir or args.data_dir[0]
    counts = ", ".join(f"{k} {v}" for k, v in summary["counts"].items() if k != "test" or args.test_fraction > 0)
    print(f"heart-split: {counts} -> {out}")
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
