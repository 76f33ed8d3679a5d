"""Synthetic heart generator and ``heart-synth``: anatomy plausibility, geometry independence,
truncation, determinism, and the dataset the CLI writes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fixtures_data import structure_centroids_ras
from heart_training.data.synth_cli import case_seed, main

from HeartCompletionLib.geometry.affine import voxel_centers_ras
from HeartCompletionLib.io.labelmap_files import read_label_map
from HeartCompletionLib.io.synthetic import (
    centred_grid,
    synthetic_heart,
    synthetic_label_map,
)
from HeartCompletionLib.structures.table import StructureTable

TABLE = StructureTable.default()

#: Plausible volumes (mL) of each structure: adult hearts, generous bounds.
VOLUME_RANGES_ML = {
    "Myocardium": (60, 220), "LA": (30, 120), "LV": (50, 200), "RA": (35, 140), "RV": (50, 220),
    "Aorta": (35, 180), "PA": (20, 110), "LAA": (2, 20), "Coronary": (1, 10), "PV": (8, 45),
}


@pytest.fixture(scope="module")
def hearts_1p5():
    return [synthetic_label_map(seed=seed, spacing_mm=1.5) for seed in range(3)]


def test_all_ten_structures_with_plausible_sizes(hearts_1p5):
    for lm in hearts_1p5:
        assert lm.present_labels() == list(range(1, 11))
        for s in TABLE:
            count = int((lm.labels == s.label).sum())
            assert count >= 300, f"{s.name}: only {count} voxels at 1.5 mm"
            volume_ml = count * lm.voxel_volume_mm3 / 1000.0
            low, high = VOLUME_RANGES_ML[s.name]
            assert low <= volume_ml <= high, f"{s.name}: {volume_ml:.1f} mL outside {low}..{high}"
        # whole heart roughly 120 x 100 x 120 mm (aorta and PA branches included)
        ras = voxel_centers_ras(lm.shape, lm.ijk_to_ras)[lm.labels > 0]
        extent = ras.max(axis=0) - ras.min(axis=0)
        assert np.all(extent > 90) and np.all(extent < 170), extent
        assert lm.metadata["synthetic"]["touching_border"] == []  # default grid has a margin


def test_rough_anatomical_layout():
    lm = synthetic_label_map(seed=0, spacing_mm=2.0)
    c = {TABLE.by_label(k).name: v for k, v in structure_centroids_ras(lm).items()}
    assert c["RV"][0] > c["LV"][0] and c["RA"][0] > c["LA"][0]  # right chambers to the patient's right (+x)
    assert c["LA"][1] < c["LV"][1] and c["PV"][1] < c["LA"][1]  # atrium and veins posterior (-y)
    assert c["LA"][2] > c["LV"][2] and c["Aorta"][2] > c["LV"][2]  # above the ventricle
    assert c["LAA"][0] < c["LA"][0]  # appendage on the left


def test_rasterize_matches_pointwise_inside_no_overlap():
    """The bounding-box rasteriser gives exactly the priority-resolved label of each voxel centre."""
    heart = synthetic_heart(seed=4)
    shape, m = heart.default_grid(spacing_mm=(2.0, 2.5, 1.8), direction=None, flip_axes=(2,))
    lm = heart.rasterize(shape, m)
    expected = heart.inside(voxel_centers_ras(shape, m).reshape(-1, 3)).reshape(shape)
    np.testing.assert_array_equal(lm.labels, expected)
    # raw shapes do overlap (e.g. coronaries on the myocardium); priority leaves one label per voxel
    lv = heart.primitives["LV"][0]
    assert heart.inside(lv.center[None])[0] == TABLE.by_name("LV").label


def test_same_heart_in_four_geometries_same_physical_places(synthetic_heart_in_geometries):
    maps = synthetic_heart_in_geometries
    ref = maps["iso_ras"]
    ref_c = structure_centroids_ras(ref)
    ref_v = {k: (ref.labels == k).sum() * ref.voxel_volume_mm3 for k in ref_c}
    for name, lm in maps.items():
        assert lm.present_labels() == list(range(1, 11)), name
        half_voxel = 0.5 * max(lm.spacing_mm.max(), ref.spacing_mm.max())
        for label, centroid in structure_centroids_ras(lm).items():
            dist = np.linalg.norm(centroid - ref_c[label])
            assert dist < half_voxel, f"{name}/{TABLE.by_label(label).name}: centroid off by {dist:.2f} mm"
            vol = (lm.labels == label).sum() * lm.voxel_volume_mm3
            tol = 0.04 if ref_v[label] > 20_000 else 0.15  # thin/small structures: partial-volume noise
            assert abs(vol / ref_v[label] - 1) < tol, f"{name}/{TABLE.by_label(label).name}: volume {vol / ref_v[label]:.3f}"
    assert np.linalg.det(maps["lps_flipped"].ijk_to_ras[:3, :3]) > 0  # two flips: still right-handed
    assert maps["lps_flipped"].ijk_to_ras[0, 0] < 0 and maps["lps_flipped"].ijk_to_ras[1, 1] < 0


def test_truncate_cuts_the_field_of_view_through_the_structure():
    heart = synthetic_heart(seed=5)
    full = synthetic_label_map(heart=heart, spacing_mm=2.0)
    cut = synthetic_label_map(heart=heart, spacing_mm=2.0, truncate="LAA", truncate_depth=0.4)
    laa = TABLE.by_name("LAA").label
    assert laa in cut.border_labels()
    assert laa not in full.border_labels()
    kept = (cut.labels == laa).sum() / (full.labels == laa).sum()
    assert 0.3 < kept < 0.85, kept
    assert cut.metadata["synthetic"]["truncated_structure"] == "LAA"
    assert "LAA" in cut.metadata["synthetic"]["touching_border"]
    # voxels that remain sit where they were: same analytic labels at the cropped grid's centres
    expected = heart.inside(voxel_centers_ras(cut.shape, cut.ijk_to_ras).reshape(-1, 3)).reshape(cut.shape)
    np.testing.assert_array_equal(cut.labels, expected)
    with pytest.raises(ValueError, match="depth"):
        synthetic_label_map(heart=heart, spacing_mm=3.0, truncate="LAA", truncate_depth=1.5)


def test_seed_determinism_and_variety():
    a, b = synthetic_label_map(seed=11, spacing_mm=3.0), synthetic_label_map(seed=11, spacing_mm=3.0)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.ijk_to_ras, b.ijk_to_ras)
    c = synthetic_label_map(seed=12, spacing_mm=3.0)
    assert a.shape != c.shape or not np.array_equal(a.labels, c.labels)
    assert a.metadata["synthetic"]["rotation_deg"] != c.metadata["synthetic"]["rotation_deg"]
    assert max(abs(v) for v in a.metadata["synthetic"]["rotation_deg"]) <= 15.0
    assert case_seed(0, 1) != case_seed(1, 0)  # datasets of neighbouring seeds share no heart


def test_ct_like_spacing_with_explicit_shape():
    """CT-like voxels (0.4 x 0.4 x 0.5 mm) on an explicit grid centred on the heart (small crop here;
    the full 512 x 512 x ~300 grid is the CLI's --ct_like)."""
    heart = synthetic_heart(seed=2)
    lm = synthetic_label_map(heart=heart, spacing_mm=(0.4, 0.4, 0.5), shape=(96, 96, 64))
    assert lm.shape == (96, 96, 64)
    np.testing.assert_allclose(lm.spacing_mm, (0.4, 0.4, 0.5))
    low, high = heart.bounds()
    centre = lm.ijk_to_ras[:3, :3] @ ((np.array(lm.shape) - 1) / 2) + lm.ijk_to_ras[:3, 3]
    np.testing.assert_allclose(centre, 0.5 * (low + high), atol=1e-9)
    assert len(lm.present_labels()) >= 1
    np.testing.assert_allclose(centred_grid((3, 3, 3), (1, 1, 1), (5, 6, 7))[:3, 3], (4, 5, 6))
    partial = synthetic_label_map(heart=heart, spacing_mm=3.0, shape=(40, None, None))  # None: cover the heart
    assert partial.shape[0] == 40 and partial.shape[1:] == synthetic_label_map(heart=heart, spacing_mm=3.0).shape[1:]


def test_heart_synth_cli_writes_dataset(tmp_path, capsys):
    out = tmp_path / "synth"
    rc = main(["--output_dir", str(out), "--cases", "3", "--seed", "1", "--spacing", "3", "3", "3",
               "--truncate_fraction", "0.34", "--drop", "pulmonary veins", "--format", ".nrrd"])
    assert rc == 0
    dataset = json.loads((out / "dataset.json").read_text())
    assert dataset["numCases"] == 3 and dataset["file_ending"] == ".nrrd"
    assert dataset["labels"]["LV"] == 3 and dataset["labels"]["background"] == 0
    assert dataset["dropped"] == ["PV"]
    assert sum(1 for c in dataset["cases"] if c["truncated_structure"] == "LAA") == 1
    assert sorted(p.name for p in out.iterdir()) == ["dataset.json"] + [c["file"] for c in dataset["cases"]]
    for case in dataset["cases"]:
        lm = read_label_map(out / case["file"])
        assert TABLE.by_name("PV").label not in lm.present_labels()
        assert len(lm.present_labels()) == 9
        np.testing.assert_allclose(lm.spacing_mm, 3.0)
        touching = [TABLE.by_label(v).name for v in lm.border_labels()]
        assert ("LAA" in touching) == (case["truncated_structure"] == "LAA")
    assert "wrote 3 cases" in capsys.readouterr().out
    # an existing dataset is not overwritten by accident
    assert main(["--output_dir", str(out), "--cases", "1"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["--output_dir", str(tmp_path / "bad"), "--cases", "1", "--drop", "spleen"]) == 2
    assert "spleen" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0


def test_shared_fixture_files(synthetic_heart_files):
    assert len(synthetic_heart_files) == 3 and (synthetic_heart_files.dir / "dataset.json").is_file()
    assert synthetic_heart_files.truncated.count("LAA") == 1
    for path, truncated in zip(synthetic_heart_files, synthetic_heart_files.truncated):
        lm = read_label_map(path)
        np.testing.assert_allclose(lm.spacing_mm, 1.5, atol=1e-5)
        assert lm.present_labels() == list(range(1, 11))
        assert (TABLE.by_name("LAA").label in lm.border_labels()) == (truncated == "LAA")


# --- latent modes (docs/synthetic_population.md) -------------------------------------------------

#: The original generator, measured before the modes existed: seed -> (3 mm grid shape, sha256 of
#: labels + ijk_to_ras (first 16 hex digits), voxel count per label 1..10). modes=False must keep
#: every existing seed bit for bit.
OLD_SEEDS_3MM = {
    0: ((55, 54, 59), "607c83879d22297a", [4783, 2495, 4329, 3342, 5188, 4252, 2151, 298, 166, 665]),
    1: ((45, 55, 50), "39dd5cb6a1472f38", [3422, 1766, 2982, 2039, 3396, 2704, 1448, 184, 99, 530]),
    7: ((53, 54, 58), "d865541c6e75baff", [5458, 2434, 4127, 2548, 3674, 3669, 2266, 234, 131, 573]),
    123456789: ((58, 61, 53), "af267d92beeb89c7", [5572, 2692, 3719, 2762, 5523, 3851, 2290, 244, 157, 599]),
}


def _checksum(lm) -> str:
    import hashlib

    return hashlib.sha256(lm.labels.tobytes() + np.ascontiguousarray(lm.ijk_to_ras).tobytes()).hexdigest()[:16]


def _volumes_ml(lm) -> dict[str, float]:
    counts = np.bincount(lm.labels.ravel(), minlength=len(TABLE) + 1)
    return {s.name: counts[s.label] * lm.voxel_volume_mm3 / 1000.0 for s in TABLE}


@pytest.mark.parametrize("seed", sorted(OLD_SEEDS_3MM))
def test_old_seeds_unchanged_without_modes(seed):
    shape, digest, counts = OLD_SEEDS_3MM[seed]
    for lm in (synthetic_label_map(seed=seed, spacing_mm=3.0), synthetic_label_map(seed=seed, spacing_mm=3.0, modes=False)):
        assert lm.shape == shape
        assert np.bincount(lm.labels.ravel(), minlength=11)[1:].tolist() == counts
        assert _checksum(lm) == digest
        assert "modes" not in lm.metadata["synthetic"]


def test_modes_are_reproducible_recorded_and_drawn_from_their_own_stream():
    from HeartCompletionLib.io.synthetic import MODE_CLIP, MODE_NAMES, draw_modes

    a = synthetic_label_map(seed=21, spacing_mm=3.0, modes=True)
    b = synthetic_label_map(seed=21, spacing_mm=3.0, modes=True)
    np.testing.assert_array_equal(a.labels, b.labels)
    modes = a.metadata["synthetic"]["modes"]
    assert list(modes) == list(MODE_NAMES) and modes == draw_modes(21)
    assert all(isinstance(v, float) and abs(v) <= MODE_CLIP for v in modes.values())
    # the recorded values rebuild the same heart; another seed draws other modes
    again = synthetic_label_map(seed=21, spacing_mm=3.0, modes=modes)
    np.testing.assert_array_equal(again.labels, a.labels)
    assert draw_modes(22) != modes
    # the old stream is untouched: same pose as the heart without modes, but another heart
    plain = synthetic_heart(seed=21)
    moded = synthetic_heart(seed=21, modes=True)
    assert moded.params["rotation_deg"] == plain.params["rotation_deg"]
    assert moded.params["translation_mm"] == plain.params["translation_mm"]
    assert _checksum(synthetic_label_map(seed=21, spacing_mm=3.0)) != _checksum(a)
    with pytest.raises(ValueError, match="lv_dilatation"):
        synthetic_heart(seed=1, modes={"lv_dilatation": 1.0})
    with pytest.raises(TypeError):
        synthetic_heart(seed=1, modes="yes")


def _pair(mode: str, value: float = 2.0, seed: int = 3, spacing: float = 2.0):
    """The same heart (same jitter, no pose) at mode = -value and +value, every other mode at 0."""
    hearts = [synthetic_heart(seed, modes={mode: v}, max_rotation_deg=0.0, max_translation_mm=0.0)
              for v in (-value, value)]
    return hearts, [_volumes_ml(synthetic_label_map(heart=h, spacing_mm=spacing)) for h in hearts]


def _wall_mm(heart) -> float:
    return float(heart.primitives["Myocardium"][0].radii[0] - heart.primitives["LV"][0].radii[0])


def test_modes_move_the_structures_they_claim():
    (lo, hi), (v_lo, v_hi) = _pair("lv_dilation")
    assert v_hi["LV"] > 1.3 * v_lo["LV"] and v_hi["LA"] > 1.1 * v_lo["LA"]
    assert _wall_mm(hi) < _wall_mm(lo)
    lv_lo, lv_hi = lo.primitives["LV"][0].radii, hi.primitives["LV"][0].radii
    assert lv_hi[0] / lv_hi[2] > lv_lo[0] / lv_lo[2]  # more spherical

    (lo, hi), (v_lo, v_hi) = _pair("lv_hypertrophy")
    assert _wall_mm(hi) > 1.3 * _wall_mm(lo)
    assert v_hi["LV"] < v_lo["LV"] and v_hi["Myocardium"] > v_lo["Myocardium"]

    _, (v_lo, v_hi) = _pair("right_heart_load")
    for name in ("RV", "RA", "PA"):
        assert v_hi[name] > 1.15 * v_lo[name], name

    _, (v_lo, v_hi) = _pair("atrial_enlargement")
    for name in ("LA", "LAA", "PV"):
        assert v_hi[name] > 1.15 * v_lo[name], name

    _, (v_lo, v_hi) = _pair("body_size")
    for name in v_lo:
        assert v_hi[name] > 1.3 * v_lo[name], name

    (lo, hi), (v_lo, v_hi) = _pair("aortic_ageing")
    assert v_hi["Aorta"] > 1.1 * v_lo["Aorta"]
    top = [max(c.b[2] for c in h.primitives["Aorta"]) for h in (lo, hi)]
    assert top[1] > top[0] + 5.0  # the arch rises

    (lo, hi), _ = _pair("heart_orientation")
    tilt = [abs(h.primitives["LV"][0].axes[2, 2]) for h in (lo, hi)]  # |cos| of the long axis to superior
    assert tilt[1] < tilt[0]  # + = more horizontal
    la = [h.primitives["LA"][0].center for h in (lo, hi)]
    np.testing.assert_allclose(la[0], la[1])  # the atria stay put: only the ventricles turn

    (lo, hi), _ = _pair("coronary_dominance")
    rca_r = [h.primitives["Coronary"][-1].radius for h in (lo, hi)]
    assert rca_r[1] > rca_r[0]


@pytest.mark.slow
def test_fifty_heart_population_within_documented_ranges():
    from HeartCompletionLib.io.synthetic import VOLUME_RANGES_ML

    volumes = {name: [] for name in TABLE.names}
    for seed in range(50):
        lm = synthetic_label_map(seed=seed, spacing_mm=2.5, modes=True)
        assert lm.present_labels() == list(range(1, 11)), seed
        for name, v in _volumes_ml(lm).items():
            volumes[name].append(v)
    for name, vals in volumes.items():
        low, high = VOLUME_RANGES_ML[name]
        assert low <= min(vals) and max(vals) <= high, f"{name}: {min(vals):.1f}..{max(vals):.1f} mL outside {low}..{high}"
    # structures covary: LA and LAA volumes, RV and PA volumes correlate across hearts
    assert np.corrcoef(volumes["LA"], volumes["LAA"])[0, 1] > 0.5
    assert np.corrcoef(volumes["RV"], volumes["PA"])[0, 1] > 0.5


def test_heart_synth_modes_and_grid_size_guard(tmp_path, capsys):
    from heart_training.data.synth_cli import MAX_VOXELS

    out = tmp_path / "modes"
    assert main(["--output_dir", str(out), "--cases", "2", "--spacing", "3", "3", "3", "--modes"]) == 0
    dataset = json.loads((out / "dataset.json").read_text())
    assert dataset["modes"] is True
    for case in dataset["cases"]:
        assert case["modes"] == synthetic_heart(case["seed"], modes=True).params["modes"]
    capsys.readouterr()
    plain = tmp_path / "plain"
    assert main(["--output_dir", str(plain), "--cases", "1", "--spacing", "3", "3", "3"]) == 0
    dataset = json.loads((plain / "dataset.json").read_text())
    assert dataset["modes"] is False and "modes" not in dataset["cases"][0]
    capsys.readouterr()
    # a grid above the limit is refused, naming its size, before anything is written
    assert MAX_VOXELS == 1.5e9
    huge = tmp_path / "huge"
    assert main(["--output_dir", str(huge), "--cases", "1", "--spacing", "0.1", "0.1", "0.1"]) == 2
    err = capsys.readouterr().err
    assert "voxels" in err and " x " in err and "--max_voxels" in err
    assert not huge.exists()
    assert main(["--output_dir", str(huge), "--cases", "1", "--spacing", "3", "3", "3", "--max_voxels", "1000"]) == 2
    assert "1e+03" in capsys.readouterr().err and not huge.exists()
