"""Test-time fitting of the latents to the given structures (HeartCompletionLib.inference.latent_fit).

Real parts only: the bundled ``synthetic-demo`` checkpoint and synthetic hearts. The fitted model
must reproduce a whole given heart better than the encoder's latents alone (the reason the option
exists), lower its own loss, leave the network's weights alone, follow its seed, and refuse bad
options. No timing is asserted: the cost is measured in docs/completion_study.md.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch

from HeartCompletionLib.geometry.metrics import dice
from HeartCompletionLib.inference.completion import CompletionError, CompletionRequest, complete_label_map
from HeartCompletionLib.inference.latent_fit import (
    DEFAULT_FIT_BATCH,
    DEFAULT_FIT_STEPS,
    FIT_SURFACE_POINTS,
    RECONSTRUCTION_FIT_BATCH,
    RECONSTRUCTION_FIT_STEPS,
    fit_latents,
    fit_targets,
)
from HeartCompletionLib.io.labelmap import LabelMap
from HeartCompletionLib.io.synthetic import synthetic_label_map
from HeartCompletionLib.model.registry import BUNDLED_MODELS_DIR

DEMO = BUNDLED_MODELS_DIR / "synthetic_demo.safetensors"
ALL = list(range(1, 11))
CHAMBERS = (1, 2, 3, 4, 5)  # Myocardium, LA, LV, RA, RV


@pytest.fixture(scope="module")
def demo():
    from HeartCompletionLib.model.checkpoint import load_inference_checkpoint

    return load_inference_checkpoint(DEMO, device="cpu")


@pytest.fixture(scope="module")
def heart():
    return synthetic_label_map(seed=11, spacing_mm=(1.5, 1.5, 1.5), modes=True)


@pytest.fixture(scope="module")
def full(demo, heart):
    """The whole heart given and every structure re-predicted, without and with fitting."""
    runs = {steps: complete_label_map(heart, demo, structures=ALL, replace=True, device="cpu", fit_steps=steps)
            for steps in (0, 30)}
    return runs


def _mean_dice(result, truth, labels) -> float:
    return float(np.mean([dice(result.label_map.labels == k, truth.labels == k) for k in labels]))


def test_fitting_reproduces_a_given_heart_better_than_the_encoder_alone(full, heart):
    plain, fitted = full[0], full[30]
    assert plain.fit_losses is None and "fit_s" not in plain.timings
    assert len(fitted.fit_losses) == 31 and fitted.timings["fit_s"] > 0
    # the loss is a minibatch estimate: compare the first and the mean of the last few
    assert np.mean(fitted.fit_losses[-5:]) < 0.85 * fitted.fit_losses[0]
    before, after = _mean_dice(plain, heart, CHAMBERS), _mean_dice(fitted, heart, CHAMBERS)
    assert after > before + 0.01, (before, after)
    assert _mean_dice(fitted, heart, CHAMBERS) > 0.9


def test_missing_structures_follow_the_fitted_latents(demo, heart):
    given = LabelMap(np.where(np.isin(heart.labels, CHAMBERS), heart.labels, 0).astype(heart.labels.dtype),
                     heart.ijk_to_ras, source="<chambers>")
    plain = complete_label_map(given, demo, device="cpu", fit_steps=0)
    fitted = complete_label_map(given, demo, device="cpu", fit_steps=30)
    missing = [6, 7, 8, 9, 10]
    assert plain.completed_labels == fitted.completed_labels == missing
    # the given voxels are kept either way; the completion changes with the latents
    for result in (plain, fitted):
        assert np.array_equal(result.label_map.labels[given.labels > 0], given.labels[given.labels > 0])
    assert not np.array_equal(plain.label_map.labels, fitted.label_map.labels)


def test_fitting_leaves_the_weights_alone_and_follows_its_seed(demo, heart, full):
    weights = {k: v.clone() for k, v in demo.model.state_dict().items()}
    flags = {k: p.requires_grad for k, p in demo.model.named_parameters()}
    again = complete_label_map(heart, demo, structures=ALL, replace=True, device="cpu", fit_steps=30)
    assert np.array_equal(again.label_map.labels, full[30].label_map.labels)
    assert again.fit_losses == full[30].fit_losses
    for k, v in demo.model.state_dict().items():
        assert torch.equal(v, weights[k]), k
    assert {k: p.requires_grad for k, p in demo.model.named_parameters()} == flags
    assert all(p.grad is None for p in demo.model.parameters())
    other = complete_label_map(heart, demo, structures=ALL, replace=True, device="cpu", fit_steps=30, seed=1)
    assert other.fit_losses != full[30].fit_losses


def test_targets_balance_structures_and_drop_the_cut_side_of_a_truncated_one(heart):
    from HeartCompletionLib.geometry.surface import sample_structure_surfaces, structure_surfaces

    rng = np.random.default_rng(0)
    given = [1, 9]  # the myocardium and the coronary: areas an order of magnitude apart
    meshes = structure_surfaces(heart, given)
    points, _, labels = sample_structure_surfaces(heart, given, 20_000, rng, min_per_structure=100, meshes=meshes)
    index = np.asarray(labels) - 1
    assert (index == 8).sum() < 0.2 * (index == 0).sum()
    t = fit_targets(heart, meshes, points, index, given, np.random.default_rng(1))
    owned = np.bincount(t.owner[t.owner >= 0], minlength=2)
    assert owned[0] == owned[1]  # as many points on and near the coronary as on the myocardium
    assert list(t.columns) == [0, 8] and t.valid.all()
    surface = slice(0, FIT_SURFACE_POINTS // 2)  # each structure's surface points come first, then its near ones
    assert (t.owner[surface] == 0).all() and np.abs(t.target_mm[surface, 0]).max() < 1.0  # on its surface
    # the same heart cut by a plane: the myocardium's points near the cut no longer count
    matrix = heart.ijk_to_ras.copy()
    matrix[:3, 3] = heart.ijk_to_ras[:3, :3] @ [0, 0, 30] + heart.ijk_to_ras[:3, 3]  # the same voxels in place
    cut = LabelMap(heart.labels[:, :, 30:].copy(), matrix, source="<cut>")
    whole = [v for v in (2, 4, 6, 7, 8) if v not in cut.border_labels()]
    assert 1 in cut.border_labels() and whole  # the myocardium is cut, some other structure is not
    given = [1, whole[0]]
    meshes = structure_surfaces(cut, given)
    points, _, labels = sample_structure_surfaces(cut, given, 20_000, rng, min_per_structure=100, meshes=meshes)
    kept = fit_targets(cut, meshes, points, np.asarray(labels) - 1, given, np.random.default_rng(1),
                       cut.shape, cut.ijk_to_ras, truncated=cut.border_labels())
    free = fit_targets(cut, meshes, points, np.asarray(labels) - 1, given, np.random.default_rng(1))
    assert free.valid[:, 0].all() and 0 < (~kept.valid[:, 0]).sum() < 0.5 * len(kept.valid)
    assert kept.valid[:, 1].all() and free.valid[:, 1].all()  # the whole structure: all its targets count
    # exactly the myocardium's points nearer the border than the structure (plus the margin) were dropped
    from HeartCompletionLib.geometry.affine import distance_to_image_border_mm
    from HeartCompletionLib.inference.latent_fit import TRUNCATION_MARGIN_MM

    border = distance_to_image_border_mm(kept.points_mm, cut.shape, cut.ijk_to_ras)
    assert np.array_equal(kept.valid[:, 0], border > np.abs(kept.target_mm[:, 0]) + TRUNCATION_MARGIN_MM)


def test_fit_latents_directly_lowers_the_loss_of_random_latents(demo, heart):
    """From latents that know nothing of the heart, fitting alone must move the field towards it."""
    from HeartCompletionLib.geometry.surface import sample_structure_surfaces, structure_surfaces

    rng = np.random.default_rng(0)
    meshes = structure_surfaces(heart, [3])
    points, _, labels = sample_structure_surfaces(heart, [3], 5_000, rng, meshes=meshes)
    targets = fit_targets(heart, meshes, points, np.asarray(labels) - 1, [3], rng)
    centre = np.asarray(points).mean(axis=0)
    z = torch.randn(1, demo.config.num_latents, demo.config.width, generator=torch.Generator().manual_seed(0))
    fitted, losses = fit_latents(demo.model, z, targets, centre, demo.normalization, steps=40, lr=0.05)
    assert fitted.shape == z.shape and not torch.equal(fitted, z)
    assert np.mean(losses[-5:]) < 0.7 * losses[0]


def test_options_are_validated_and_reach_every_entry_point(capsys):
    for bad in (-1, 1.5, True, "ten"):
        with pytest.raises(CompletionError, match=r"fit_steps must be a whole number of steps >= 0"):
            CompletionRequest(fit_steps=bad)
    for bad in (0.0, -0.1, float("nan"), "fast"):
        with pytest.raises(CompletionError, match=r"fit_lr must be a number > 0"):
            CompletionRequest(fit_lr=bad)
    with pytest.raises(CompletionError, match=r"fit_anchor must be a number >= 0"):
        CompletionRequest(fit_anchor=-1.0)
    for bad in (0, -5, 2.5, True, "all"):
        with pytest.raises(CompletionError, match=r"fit_batch must be a whole number of points >= 1 or None"):
            CompletionRequest(fit_batch=bad)
    assert CompletionRequest().fit_steps is None  # auto: resolve_fit_steps
    assert CompletionRequest().fit_batch is None and CompletionRequest(fit_batch=np.int64(64)).fit_batch == 64

    from heart_training.evaluation.evaluate import build_parser

    from HeartCompletionLib.inference import completion_process
    from HeartCompletionLib.inference.complete_cli import _parser

    base = ["--checkpoint", "c", "--input", "i", "--output", "o"]
    assert _parser().parse_args(base).fit_steps is None
    assert _parser().parse_args([*base, "--fit_steps", "0"]).fit_steps == 0
    with pytest.raises(SystemExit):
        _parser().parse_args([*base, "--fit_steps", "-3"])
    assert "must be >= 0, got -3" in capsys.readouterr().err
    command = completion_process.build_command("ck", "in.nrrd", "out.nrrd", fit_steps=0)
    assert _parser().parse_args(command[3:]).fit_steps == 0
    assert "--fit_steps" not in completion_process.build_command("ck", "in.nrrd", "out.nrrd")
    assert build_parser().parse_args(["--checkpoint", "c", "--data_dir", "d"]).fit_steps is None
    assert build_parser().parse_args(["--checkpoint", "c", "--data_dir", "d"]).fit_batch is None
    assert build_parser().parse_args(["--checkpoint", "c", "--data_dir", "d", "--fit_batch", "64"]).fit_batch == 64
    from heart_training.evaluation.evaluate import main as eval_main

    capsys.readouterr()
    assert eval_main(["--checkpoint", str(DEMO), "--data_dir", "nowhere", "--fit_steps", "-2"]) == 2
    assert "fit_steps must be a whole number of steps >= 0" in capsys.readouterr().err
    assert eval_main(["--checkpoint", str(DEMO), "--data_dir", "nowhere", "--fit_batch", "0"]) == 2
    assert "fit_batch must be a whole number of points >= 1" in capsys.readouterr().err


def test_fit_batch_is_the_points_decoded_per_step(demo, heart):
    """The request's ``fit_batch`` reaches the fit: the same batch gives the same fit, another batch
    another one; more than there are fitting points decodes all of them at each step (no draw).
    Auto (None): DEFAULT_FIT_BATCH for a completion, RECONSTRUCTION_FIT_BATCH for a reconstruction."""
    lv = LabelMap(np.where(heart.labels == 3, 3, 0).astype(heart.labels.dtype), heart.ijk_to_ras, source="<LV>")
    run = partial(complete_label_map, lv, demo, structures=["LV", "RV"], device="cpu", fit_steps=3)
    small, again = run(fit_batch=64), run(fit_batch=64)
    every, every_again = run(fit_batch=100_000), run(fit_batch=200_000)
    assert small.fit_losses == again.fit_losses and len(small.fit_losses) == 4
    assert small.fit_losses != every.fit_losses
    assert every.fit_losses == every_again.fit_losses  # more than there are points: all of them, every step
    assert DEFAULT_FIT_BATCH < RECONSTRUCTION_FIT_BATCH
    auto, default = run(), run(fit_batch=DEFAULT_FIT_BATCH)
    assert auto.fit_losses == default.fit_losses != run(fit_batch=RECONSTRUCTION_FIT_BATCH).fit_losses
    rebuild = partial(complete_label_map, lv, demo, structures=["LV"], replace=True, device="cpu", fit_steps=3)
    assert rebuild().fit_losses == rebuild(fit_batch=RECONSTRUCTION_FIT_BATCH).fit_losses
    assert rebuild().fit_losses != rebuild(fit_batch=DEFAULT_FIT_BATCH).fit_losses


def test_auto_fits_longer_only_when_nothing_is_missing(demo, heart):
    """The default (None): a reconstruction (every requested structure given) gets
    RECONSTRUCTION_FIT_STEPS, a completion DEFAULT_FIT_STEPS; either can be set explicitly."""
    lv = LabelMap(np.where(heart.labels == 3, 3, 0).astype(heart.labels.dtype), heart.ijk_to_ras, source="<LV>")
    again = complete_label_map(lv, demo, structures=["LV"], replace=True, device="cpu")
    assert len(again.fit_losses) == RECONSTRUCTION_FIT_STEPS + 1
    short = complete_label_map(lv, demo, structures=["LV"], replace=True, device="cpu", fit_steps=DEFAULT_FIT_STEPS)
    # more fitting reproduces the given LV more closely
    truth = heart.labels == 3
    assert dice(again.label_map.labels == 3, truth) > dice(short.label_map.labels == 3, truth)
    completed = complete_label_map(lv, demo, structures=["LV", "RV"], replace=True, device="cpu")
    assert len(completed.fit_losses) == DEFAULT_FIT_STEPS + 1  # the RV is missing: the completion setting


def test_fitting_targets_of_a_fine_map_come_from_a_block_majority_map_in_place():
    from HeartCompletionLib.geometry.affine import spacing_of
    from HeartCompletionLib.inference.latent_fit import fit_label_map as coarse_label_map

    fine = synthetic_label_map(seed=5, spacing_mm=(0.4, 0.4, 0.5))
    coarse = coarse_label_map(fine, [1, 3, 5])
    assert np.allclose(spacing_of(coarse.ijk_to_ras), [0.8, 0.8, 1.0])
    assert set(np.unique(coarse.labels)) <= {0, 1, 3, 5}
    for value in (1, 3, 5):  # same volume and place, to a fraction of a coarse voxel
        a, b = fine.labels == value, coarse.labels == value
        va, vb = a.sum() * 0.4 * 0.4 * 0.5, b.sum() * 0.8 * 0.8 * 1.0
        assert abs(va - vb) < 0.05 * va, value
        ca = fine.ijk_to_ras[:3, :3] @ np.argwhere(a).mean(axis=0) + fine.ijk_to_ras[:3, 3]
        cb = coarse.ijk_to_ras[:3, :3] @ np.argwhere(b).mean(axis=0) + coarse.ijk_to_ras[:3, 3]
        assert np.linalg.norm(ca - cb) < 0.3, value
    one_mm = synthetic_label_map(seed=5, spacing_mm=(1.0, 1.0, 1.0))
    assert coarse_label_map(one_mm, [1]) is one_mm


def test_fit_reports_progress_and_can_be_cancelled(demo, heart):
    from HeartCompletionLib.inference.completion import CompletionCancelled

    seen = []
    complete_label_map(heart, demo, structures=ALL, replace=True, device="cpu", fit_steps=10,
                       progress=lambda f, m: seen.append((f, m)))
    fitting = [f for f, m in seen if m.startswith("fitting the latents")]
    assert len(fitting) >= 10 and fitting == sorted(fitting)
    assert 0.1 <= fitting[0] and fitting[-1] <= 0.15  # between encoding and decoding
    messages = [m for _, m in seen]
    last_fit = max(i for i, m in enumerate(messages) if m.startswith("fitting"))
    assert messages.index("decoding signed distances") > last_fit
    calls = {"n": 0}

    def cancel_after_a_few():
        calls["n"] += 1
        return any(m.startswith("fitting the latents") for _, m in seen[-1:]) and calls["n"] > 6

    seen.clear()
    with pytest.raises(CompletionCancelled):
        complete_label_map(heart, demo, structures=ALL, replace=True, device="cpu", fit_steps=200,
                           progress=lambda f, m: seen.append((f, m)), cancel=cancel_after_a_few)
    assert all(p.requires_grad for p in demo.model.parameters())  # restored after the cancelled fit


def test_targets_of_a_fine_map_near_its_surface_use_the_partial_volume_meshes():
    """On a 0.4 mm map the fit's targets come from the block-majority map of about 1 mm with the
    sampling meshes (the same blocks' partial-volume surfaces, which completion passes): nearer the
    true distance than with that map's own staircase meshes. A ball of radius 11 mm, true signed
    distance |x - c| - r."""
    from HeartCompletionLib.geometry.surface import coarse_structure_surfaces, sample_structure_surfaces
    from HeartCompletionLib.inference.latent_fit import fit_label_map

    spacing = np.array([0.4, 0.4, 0.5])
    shape = (80, 80, 64)
    ijk_to_ras = np.diag([*spacing, 1.0])
    centre = (np.array(shape) - 1) / 2 * spacing + np.array([0.13, -0.07, 0.11])  # off the voxel lattice
    grid = np.stack(np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij"), axis=-1)
    fine = LabelMap((np.linalg.norm(grid - centre, axis=-1) <= 11.0).astype(np.uint8) * 3, ijk_to_ras)
    meshes = coarse_structure_surfaces(fine, [3])
    rng = np.random.default_rng(0)
    points, _, labels = sample_structure_surfaces(fine, [3], 4000, rng, meshes=meshes)
    index = np.asarray(labels, dtype=np.int64) - 1
    block_map = fit_label_map(fine, [3])
    assert block_map is not fine
    errors = {}
    for name, use in (("sampling meshes", meshes), ("own meshes", None)):
        t = fit_targets(block_map, use, points, index, [3], np.random.default_rng(1))
        true = np.linalg.norm(t.points_mm - centre, axis=1) - 11.0
        near = t.valid[:, 0] & (np.abs(true) < 3.0)
        errors[name] = float(np.abs(t.target_mm[near, 0] - true[near]).mean())
    assert errors["sampling meshes"] < 0.1 and errors["sampling meshes"] < 0.8 * errors["own meshes"], errors


def test_the_written_out_adam_is_torch_adam_bit_for_bit():
    """The fit's Adam (``torch.optim`` stays unused: it imports torch's compiler on first use) gives
    torch.optim.Adam's numbers exactly, step by step."""
    from HeartCompletionLib.inference.latent_fit import _Adam

    gen = torch.Generator().manual_seed(0)
    start = torch.randn(1, 16, 8, generator=gen)
    ours, theirs = start.clone().requires_grad_(True), start.clone().requires_grad_(True)
    mine, reference = _Adam(ours, lr=0.03), torch.optim.Adam([theirs], lr=0.03)
    for _ in range(30):
        target = torch.randn(1, 16, 8, generator=gen)
        for z in (ours, theirs):
            z.grad = None
            ((z - target) ** 2 * torch.linspace(0.1, 3, 8)).sum().backward()
        mine.step()
        reference.step()
        assert torch.equal(ours, theirs)
    assert not torch.equal(ours, start)
