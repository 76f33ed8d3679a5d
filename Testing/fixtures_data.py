"""Data fixtures shared by every area's tests (re-exported by ``Testing/conftest.py``).

- :func:`geometries` -- the four test geometries (isotropic RAS, LPS-like flipped axes,
  anisotropic 0.6x0.6x1.5 mm, oblique) as keyword arguments of ``synthetic_label_map``.
- ``synthetic_heart_files`` (session) -- three small synthetic cases at 1.5 mm in ``.nii.gz``
  plus ``dataset.json``; one of them has its LAA cut by the field of view.
- ``synthetic_label_map_1p5`` (session) -- one in-memory synthetic heart at 1.5 mm (seed 0).
- ``synthetic_heart_in_geometries`` (session) -- one heart (seed 3) rasterised into each of the
  four geometries: ``{name: LabelMap}``.
- :func:`structure_centroids_ras` -- label -> RAS centroid (mm) of a label map's voxel centres.

Session fixtures are shared: never modify their files or arrays in place (copy first).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

__all__ = ["GEOMETRY_NAMES", "SyntheticCases", "geometries", "structure_centroids_ras", "synthetic_heart_files",
           "synthetic_heart_in_geometries", "synthetic_label_map_1p5"]

GEOMETRY_NAMES = ("iso_ras", "lps_flipped", "anisotropic", "oblique")


def geometries(base_spacing_mm: float = 1.5) -> dict[str, dict]:
    """The four test geometries, name -> kwargs for ``synthetic_label_map`` (``spacing_mm``,
    ``direction`` (3x3, columns = voxel axes in RAS, or ``None``), ``flip_axes``).

    ``base_spacing_mm`` sets the isotropic/LPS/oblique spacing; the anisotropic one is always
    0.6 x 0.6 x 1.5 mm (thin in-plane, thick slices, like a clinical CT/MR stack).
    """
    from HeartCompletionLib.geometry.affine import rotation_matrix

    s = float(base_spacing_mm)
    return {
        "iso_ras": {"spacing_mm": (s, s, s), "direction": None, "flip_axes": ()},
        # i towards left, j towards posterior: what an LPS (DICOM/ITK) image stores.
        "lps_flipped": {"spacing_mm": (s, s, s), "direction": None, "flip_axes": (0, 1)},
        "anisotropic": {"spacing_mm": (0.6, 0.6, 1.5), "direction": None, "flip_axes": ()},
        "oblique": {"spacing_mm": (s, s * 1.1, s * 0.9), "direction": rotation_matrix([1.0, 2.0, 3.0], 0.45),
                    "flip_axes": ()},
    }


class SyntheticCases(list):
    """List of case paths with ``.dir`` (the folder), ``.dataset`` (its dataset.json dict) and
    ``.truncated`` (per case: the structure name cut by the field of view, or ``None``)."""

    dir: Path
    dataset: dict
    truncated: list


@pytest.fixture(scope="session")
def synthetic_heart_files(tmp_path_factory) -> SyntheticCases:
    """Three synthetic cases (1.5 mm, ``.nii.gz``, dataset seed 7) written by ``heart-synth``'s
    own function, plus ``dataset.json``; exactly one of them has its LAA cut by the field of view
    (see ``.truncated``)."""
    from heart_training.data.synth_cli import write_synthetic_dataset

    folder = tmp_path_factory.mktemp("synthetic_hearts")
    dataset = write_synthetic_dataset(folder, cases=3, seed=7, spacing_mm=(1.5, 1.5, 1.5), fmt=".nii.gz",
                                      truncate_fraction=1 / 3, truncate_structure="LAA", progress=False)
    cases = SyntheticCases(folder / c["file"] for c in dataset["cases"])
    cases.dir = folder
    cases.dataset = dataset
    cases.truncated = [c["truncated_structure"] for c in dataset["cases"]]
    return cases


@pytest.fixture(scope="session")
def synthetic_label_map_1p5():
    """Synthetic heart (seed 0) at 1.5 mm isotropic, RAS-aligned, in memory. Do not modify."""
    from HeartCompletionLib.io.synthetic import synthetic_label_map

    label_map = synthetic_label_map(seed=0, spacing_mm=1.5)
    label_map.labels.setflags(write=False)  # shared by the session: fail loudly on in-place edits
    return label_map


@pytest.fixture(scope="session")
def synthetic_heart_in_geometries() -> dict:
    """The same synthetic heart (seed 3) in the four :func:`geometries` (1.5 mm base), read-only."""
    from HeartCompletionLib.io.synthetic import synthetic_heart, synthetic_label_map

    heart = synthetic_heart(seed=3)
    maps = {name: synthetic_label_map(heart=heart, **geom) for name, geom in geometries(1.5).items()}
    for label_map in maps.values():
        label_map.labels.setflags(write=False)
    return maps


def structure_centroids_ras(label_map) -> dict[int, np.ndarray]:
    """Label -> RAS centroid (mm) of its voxel centres (helper for geometry tests)."""
    labels = np.asarray(label_map.labels)
    m = label_map.ijk_to_ras
    out = {}
    for label in np.unique(labels[labels > 0]).tolist():
        mask = labels == label
        ijk = [np.arange(n) @ mask.sum(axis=tuple(a for a in range(3) if a != axis)) for axis, n in enumerate(mask.shape)]
        out[int(label)] = np.array(ijk, dtype=np.float64) / mask.sum() @ m[:3, :3].T + m[:3, 3]
    return out
