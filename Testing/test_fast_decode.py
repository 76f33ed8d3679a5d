"""The fast decode (HeartCompletionLib.inference.decode_grid) against the exact hierarchical decode.

Real parts only: the bundled ``synthetic-demo`` checkpoint (the ``compact`` size trained on
synthetic hearts, so its fields and surfaces are realistic) on a synthetic heart rasterised at a
fine anisotropic spacing (0.9 x 0.9 x 1.2 mm: the coarse lattice has strides 8 x 8 x 4, so split
and unsplit axes, interpolated lattice nodes and interpolated voxels are all exercised). No
timing is asserted: speed is measured by ``benchmarks/complete_speed.py``.
"""

from __future__ import annotations

import numpy as np
import pytest

from HeartCompletionLib.geometry.metrics import assd_mm, dice
from HeartCompletionLib.inference.completion import (
    DECODE_MODES,
    DEFAULT_DECODE,
    CompletionError,
    complete_label_map,
    complete_masks,
)
from HeartCompletionLib.inference.decode_grid import label_margin_ambiguity
from HeartCompletionLib.io.labelmap import LabelMap
from HeartCompletionLib.io.synthetic import synthetic_label_map
from HeartCompletionLib.model.registry import BUNDLED_MODELS_DIR

DEMO = BUNDLED_MODELS_DIR / "synthetic_demo.safetensors"
SUBSET_B = (6, 7, 8, 9, 10)  # Aorta, PA, LAA, Coronary, PV: completed from Myocardium, LA, LV, RA, RV
SPACING = (0.9, 0.9, 1.2)


@pytest.fixture(scope="module")
def demo():
    from HeartCompletionLib.model.checkpoint import load_inference_checkpoint

    return load_inference_checkpoint(DEMO, device="cpu")


@pytest.fixture(scope="module")
def fine_partial():
    truth = synthetic_label_map(seed=3, spacing_mm=SPACING)
    labels = truth.labels.copy()
    labels[np.isin(labels, SUBSET_B)] = 0
    return LabelMap(labels, truth.ijk_to_ras, source="<synthetic seed=3, fine>")


@pytest.fixture(scope="module")
def both(demo, fine_partial):
    fast = complete_label_map(fine_partial, demo, device="cpu", decode="fast")
    exact = complete_label_map(fine_partial, demo, device="cpu", decode="exact")
    return fast, exact


def test_default_is_fast_and_modes_are_listed():
    assert DEFAULT_DECODE == "fast" and set(DECODE_MODES) == {"fast", "exact"}


@pytest.mark.slow
def test_fast_agrees_with_exact_within_the_bar(both, fine_partial):
    fast, exact = both
    assert fast.completed_labels == exact.completed_labels == list(SUBSET_B)
    for label in SUBSET_B:
        a, b = fast.label_map.labels == label, exact.label_map.labels == label
        assert b.sum() > 100, f"the exact decode predicts almost nothing for {label}: not a useful reference"
        assert dice(a, b) >= 0.99, (label, dice(a, b))
        assert assd_mm(a, b, fine_partial.ijk_to_ras) <= 0.2, (label, assd_mm(a, b, fine_partial.ijk_to_ras))
    # the point of it: far fewer network queries, and most fine voxels come from interpolation
    assert fast.grid["queries"] < 0.6 * exact.grid["queries"], (fast.grid["queries"], exact.grid["queries"])
    assert sum(level.get("interpolated", 0) for level in fast.grid["levels"]) > fast.grid["queries"]


@pytest.mark.slow
def test_fast_keeps_given_voxels_exactly_and_writes_one_label_per_voxel(both, fine_partial):
    fast, _ = both
    given = fine_partial.labels > 0
    assert np.array_equal(fast.label_map.labels[given], fine_partial.labels[given])
    assert not np.isin(fast.label_map.labels[~given], [1, 2, 3, 4, 5]).any(), "a given structure grew"
    assert fast.label_map.labels.shape == fine_partial.shape
    assert np.array_equal(fast.label_map.ijk_to_ras, fine_partial.ijk_to_ras)


@pytest.mark.slow
def test_unbounded_bands_reproduce_the_exact_decode(demo, fine_partial):
    """With every band infinite, every interpolated value is decoded: the exact result, voxel for voxel."""
    crop = LabelMap(fine_partial.labels[40:140, 40:140, 30:110].copy(), fine_partial.ijk_to_ras, source="crop")
    big = {"node_band": 1e9, "voxel_band": 1e9}
    fast = complete_label_map(crop, demo, device="cpu", decode="fast", fast_options=big)
    exact = complete_label_map(crop, demo, device="cpu", decode="exact")
    differ = int((fast.label_map.labels != exact.label_map.labels).sum())
    assert differ <= 2, f"{differ} voxels differ"  # float noise of batching at |d| ~ 1e-6 mm at most


def test_a_rough_field_is_decoded_exactly_where_interpolation_fails(tmp_path):
    """A real ``tiny`` network with a random output layer has a field that is rough at every scale:
    pure interpolation (bands 0, nothing measured) is far off, the default fast decode measures
    the error, widens its bands and comes close to the exact decode."""
    import torch

    from HeartCompletionLib.geometry.normalization import Normalization
    from HeartCompletionLib.model.checkpoint import load_inference_checkpoint, save_inference_checkpoint
    from HeartCompletionLib.model.configs import get_config
    from HeartCompletionLib.model.vecset import HeartVecSet
    from HeartCompletionLib.structures.table import StructureTable

    torch.manual_seed(0)
    model = HeartVecSet(get_config("tiny", 10)).eval()
    with torch.no_grad():
        model.to_sdf.weight.normal_(0.0, 0.05)
        model.to_sdf.bias.fill_(0.02)
    path = tmp_path / "rough.safetensors"
    save_inference_checkpoint(path, model, StructureTable.default(), Normalization(), phase="test",
                              data_summary={"note": "random output layer: a rough field"})
    rough = load_inference_checkpoint(path, device="cpu")
    truth = synthetic_label_map(seed=3, spacing_mm=2.0)
    labels = truth.labels.copy()
    labels[np.isin(labels, SUBSET_B)] = 0
    source = LabelMap(labels, truth.ijk_to_ras, source="rough")
    exact = complete_label_map(source, rough, device="cpu", decode="exact", min_island_fraction=0)
    fast = complete_label_map(source, rough, device="cpu", decode="fast", min_island_fraction=0)
    blind = complete_label_map(source, rough, device="cpu", decode="fast", min_island_fraction=0,
                               fast_options={"node_band": 0, "voxel_band": 0})
    worst_fast = min(dice(fast.label_map.labels == v, exact.label_map.labels == v) for v in SUBSET_B)
    worst_blind = min(dice(blind.label_map.labels == v, exact.label_map.labels == v) for v in SUBSET_B)
    # a random network is far rougher than any trained one (errors of tens of mm over a 4 mm cell):
    # the widening recovers most of it (0.986 here, the realistic cases above meet 0.99)
    assert worst_fast >= 0.98 and worst_blind < 0.9, (worst_fast, worst_blind)
    assert any((level.get("measured_band_mm") or 0) > (level.get("band_mm") or 0) for level in fast.grid["levels"])


def test_fast_masks_never_overlap_overlapping_given_masks(demo):
    truth = synthetic_label_map(seed=1, spacing_mm=2.0)
    masks = {lab: truth.labels == lab for lab in (1, 2, 3, 4, 5)}
    masks[4] = masks[4] | np.roll(masks[2], 2, axis=0)  # RA overlaps LA: the given masks overlap
    result = complete_masks(masks, truth.ijk_to_ras, demo, device="cpu", decode="fast")
    given_any = np.logical_or.reduce(list(masks.values()))
    for label in result.completed_labels:
        assert not (result.predicted_mask(label) & given_any).any()


def test_options_are_validated_with_clear_errors(demo, fine_partial):
    with pytest.raises(CompletionError, match=r"decode must be one of fast, exact, got 'slow'"):
        complete_label_map(fine_partial, demo, decode="slow")
    with pytest.raises(CompletionError, match=r"option 'band' is unknown \(known: interp_cell_mm, node_band, voxel_band, "
                                              r"error_quantile, dice_loss\)"):
        complete_label_map(fine_partial, demo, fast_options={"band": 0.1})
    with pytest.raises(CompletionError, match=r"error_quantile must be a fraction in \[0, 1\], got 1.5"):
        complete_label_map(fine_partial, demo, fast_options={"error_quantile": 1.5})
    with pytest.raises(CompletionError, match=r"dice_loss must be a fraction in \[0, 1\], got 2"):
        complete_label_map(fine_partial, demo, fast_options={"dice_loss": 2})
    for bad in (-0.1, float("nan"), float("inf"), "wide", None):
        with pytest.raises(CompletionError, match=r"voxel_band must be a number >= 0"):
            complete_label_map(fine_partial, demo, fast_options={"voxel_band": bad})


def test_cli_and_background_process_pass_the_same_option(capsys):
    from HeartCompletionLib.inference import completion_process
    from HeartCompletionLib.inference.complete_cli import _parser

    assert _parser().parse_args(["--checkpoint", "c", "--input", "i", "--output", "o"]).decode == DEFAULT_DECODE
    assert _parser().parse_args(["--checkpoint", "c", "--input", "i", "--output", "o", "--decode", "exact"]).decode == "exact"
    with pytest.raises(SystemExit) as exit_info:
        _parser().parse_args(["--checkpoint", "c", "--input", "i", "--output", "o", "--decode", "slow"])
    assert exit_info.value.code == 2 and "invalid choice: 'slow'" in capsys.readouterr().err
    assert (completion_process.DECODE_MODES, completion_process.DEFAULT_DECODE) == (DECODE_MODES, DEFAULT_DECODE)
    command = completion_process.build_command("ck", "in.nrrd", "out.nrrd", decode="exact")
    assert command[command.index("--decode") + 1] == "exact"
    assert command[1:5] == ["-m", "HeartCompletionLib.inference.complete_cli", "--protocol", "lines"]
    assert _parser().parse_args(command[3:]).decode == "exact"


def test_label_margin_ambiguity_matches_a_sort_based_reference():
    rng = np.random.default_rng(0)
    values = rng.normal(scale=2.0, size=(4000, 5)).astype(np.float32)
    write = np.array([6, 0, 8, 9, 10], dtype=np.int16)  # structure 1 competes but is not asked for
    labels, margin, ambiguity = label_margin_ambiguity(values, write)
    order = np.sort(values, axis=1)
    d1, d2 = order[:, 0], order[:, 1]
    assert np.array_equal(labels, np.where(d1 < 0, write[values.argmin(1)], 0))
    assert np.allclose(margin, np.abs(values).min(1))
    assert np.allclose(ambiguity, np.where(d1 < 0, np.minimum(-d1, (d2 - d1) / 2), d1))
    one = label_margin_ambiguity(values[:, :1], write[:1])  # a single competing structure
    assert np.allclose(one[2], np.abs(values[:, 0]))


def test_settled_voxels_are_left_undecoded_and_change_nothing_else():
    """Voxels the caller writes anyway (the kept given structures) are not decoded at the finest
    level, and cells entirely settled are not refined; every other voxel gets the same label."""
    from HeartCompletionLib.inference.decode_grid import fast_hierarchical_labels

    ijk_to_ras = np.diag([0.5, 0.5, 0.6, 1.0])
    size = np.array([60, 60, 50])
    centres = np.array([[14.0, 15.0, 15.0], [17.0, 15.0, 15.0]])  # two competing balls (mm)
    radii = np.array([7.0, 5.0])
    queried = []

    def decode(points, report):
        queried.append(len(points))
        return (np.linalg.norm(points[:, None] - centres[None], axis=-1) - radii).astype(np.float32)

    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in size], indexing="ij"), -1)
    settled = np.linalg.norm(ijk * [0.5, 0.5, 0.6] - [10.0, 15.0, 15.0], axis=-1) < 6.0  # a given ball
    args = (decode, np.array([6, 7]), [0, 0, 0], size, ijk_to_ras, [8, 8, 8], 1.0, lambda f: None)
    free, _ = fast_hierarchical_labels(*args)
    n_free = sum(queried)
    queried.clear()
    some, stats = fast_hierarchical_labels(*args, settled=settled)
    n_some = sum(queried)
    assert settled.any() and (free[settled] > 0).any()  # the given ball overlaps the predicted ones
    assert np.array_equal(free[~settled], some[~settled])
    assert n_some < n_free and sum(level["queries"] for level in stats["levels"]) == n_some
    everything = fast_hierarchical_labels(*args, settled=np.ones(tuple(size), dtype=bool))[1]
    assert [level["queries"] for level in everything["levels"]][1:] == [0] * (len(everything["levels"]) - 1)


def test_a_coarser_first_lattice_changes_the_queries_not_the_labels():
    """For a distance field (1-Lipschitz) the refinement test holds for any cell size, so the first
    lattice's spacing (default 16 mm, 8 mm before) only spares the nodes far from every surface:
    the same labels voxel for voxel from 8, 16 and 32 mm, a 3 mm ball far from the others included,
    and fewer queries from 16 mm than from 8 (32 mm pads this small region's lattice far beyond it)."""
    from HeartCompletionLib.inference.completion import DEFAULT_GRID_SPACING_MM, _coarse_strides
    from HeartCompletionLib.inference.decode_grid import fast_hierarchical_labels

    spacing = np.array([0.5, 0.5, 0.6])
    centres = np.array([[14.0, 15.0, 15.0], [17.0, 15.0, 15.0], [38.0, 36.0, 30.0]])
    radii = np.array([7.0, 5.0, 1.5])

    def decode(points, report):
        return (np.linalg.norm(points[:, None] - centres[None], axis=-1) - radii).astype(np.float32)

    labels, queries = [], []
    for mm in (8.0, DEFAULT_GRID_SPACING_MM, 32.0):
        out, stats = fast_hierarchical_labels(decode, np.array([6, 7, 8]), [0, 0, 0], np.array([96, 90, 62]),
                                              np.diag([*spacing, 1.0]), _coarse_strides(spacing, mm), 1.0,
                                              lambda f: None)
        labels.append(out)
        queries.append(sum(level["queries"] for level in stats["levels"]))
    assert DEFAULT_GRID_SPACING_MM == 16.0
    assert (labels[0] == 8).sum() > 50  # the small ball is there
    assert np.array_equal(labels[0], labels[1]) and np.array_equal(labels[0], labels[2])
    assert queries[1] < queries[0], queries


def _rippled_balls(amplitude: float, wavelength: float):
    """Two overlapping analytic balls (labels 6, 7) on a 0.4 x 0.4 x 0.5 mm grid, plus a ripple of
    ``amplitude`` mm and ``wavelength`` mm (like an under-trained network's field): the
    ``fast_hierarchical_labels`` arguments."""
    ijk_to_ras = np.diag([0.4, 0.4, 0.5, 1.0])
    size = np.array([64, 64, 56])
    centres, radii = np.array([[12.0, 13.0, 14.0], [15.0, 13.0, 14.0]]), np.array([7.0, 5.0])

    def decode(points, report):
        ripple = amplitude * np.sin(2 * np.pi * points / wavelength).sum(-1, keepdims=True)
        return (np.linalg.norm(points[:, None] - centres[None], axis=-1) - radii + ripple).astype(np.float32)

    return (decode, np.array([6, 7]), [0, 0, 0], size, ijk_to_ras, [8, 8, 8], 1.0, lambda f: None)


def test_the_dice_budget_bounds_what_the_finest_level_leaves_interpolated():
    """``dice_loss``: a larger budget decodes fewer voxels at the finest level, the loss of Dice
    against the exact decode (every voxel of the same cells) stays within it, and the expected
    wrong labels reported grow with it. On a ripple of 1.6 mm wavelength, finer than the 2-voxel
    lattice, so no interpolation removes it."""
    from HeartCompletionLib.inference.decode_grid import fast_hierarchical_labels

    args = _rippled_balls(0.1, 1.6)
    exact = fast_hierarchical_labels(*args, interp_cell_mm=0.0)[0]
    finest, expected = [], []
    for budget in (0.0, 0.002, 0.01, 0.05):
        labels, stats = fast_hierarchical_labels(*args, dice_loss=budget)
        finest.append(stats["levels"][-1]["queries"])
        expected.append(stats["levels"][-1]["expected_wrong"])
        for w in (6, 7):
            a, b = labels == w, exact == w
            assert 1 - (a ^ b).sum() / (a.sum() + b.sum()) >= 1 - max(budget, 0.001), (budget, w)
    assert finest[0] > finest[1] > finest[2] > finest[3]
    assert expected[0] == 0.0 < expected[1] < expected[2] < expected[3]


def test_cells_whose_corners_agree_are_interpolated_when_the_errors_reach_them():
    """On a 1.5 mm grid (the real MRI and CT sources' spacing) only the voxels are interpolated, so
    no coarser level has measured the field's roughness when the cells whose corners agree are
    filled. With a ripple of 1 mm (4 mm wavelength) a corner margin above the voxel band is no
    guarantee: such cells are interpolated and budgeted too once this level's errors reach their
    margin (filling them lost 0.015 of Dice against the exact decode; a real chest CT lost 0.015
    of its myocardium that way)."""
    from HeartCompletionLib.inference.decode_grid import fast_hierarchical_labels

    centres, radii = np.array([[28.0, 30.0, 29.0], [36.0, 30.0, 29.0]]), np.array([12.0, 7.0])

    def decode(points, report):
        ripple = 1.0 * np.sin(2 * np.pi * points / 4.0).sum(-1, keepdims=True)
        return (np.linalg.norm(points[:, None] - centres[None], axis=-1) - radii + ripple).astype(np.float32)

    args = (decode, np.array([6, 7]), [0, 0, 0], np.array([40, 40, 40]), np.diag([1.5, 1.5, 1.5, 1.0]), [4, 4, 4],
            1.0, lambda f: None)
    exact = fast_hierarchical_labels(*args, interp_cell_mm=0.0)[0]
    labels, stats = fast_hierarchical_labels(*args)
    assert stats["levels"][-1]["band_mm"] is not None  # the voxels are interpolated
    for w in (6, 7):
        a, b = labels == w, exact == w
        assert 1 - (a ^ b).sum() / (a.sum() + b.sum()) >= 0.995, w


def test_a_lower_error_quantile_decodes_fewer_nodes_of_a_rough_field():
    """``error_quantile`` sets how far the measured interpolation error widens the node bands of
    the coarser interpolated levels: on a ripple of 3.2 mm wavelength (the 2-4 mm lattices' scale)
    the median decodes fewer lattice nodes than the 90th percentile, and that fewer than the 99th."""
    from HeartCompletionLib.inference.decode_grid import fast_hierarchical_labels

    def nodes(q):
        levels = fast_hierarchical_labels(*_rippled_balls(0.5, 3.2), error_quantile=q)[1]["levels"]
        return sum(level["queries"] for level in levels[1:-1])

    assert nodes(0.5) < nodes(0.9) < nodes(0.99)


def test_settled_cells_match_a_padded_reference_on_odd_sizes():
    """Which cells are wholly settled, per stride of the refinement, against a direct reference:
    the mask padded with settled voxels to whole coarse cells and reduced block by block (odd and
    even sizes, unequal strides per axis, so axes stop halving at different levels)."""
    from HeartCompletionLib.inference.decode_grid import _settled_cells

    rng = np.random.default_rng(3)
    for size, strides in (((13, 10, 7), (8, 4, 2)), ((16, 9, 12), (4, 8, 4)), ((5, 5, 5), (1, 2, 4))):
        settled = rng.random(size) < 0.9  # mostly settled: whole cells exist at every stride
        whole = -(-np.array(size) // strides) * strides
        padded = np.ones(tuple(whole), dtype=bool)
        padded[tuple(slice(0, n) for n in size)] = settled
        pooled = _settled_cells(settled, size, strides)
        assert len(pooled) == int(np.log2(max(strides)))
        for stride, cells in pooled.items():
            shape = [x for n, s in zip(whole, stride) for x in (n // s, s)]
            expected = padded.reshape(shape).all(axis=(1, 3, 5))
            assert cells.shape == expected.shape and np.array_equal(cells, expected), (size, strides, stride)
            assert expected.any() and not expected.all()
