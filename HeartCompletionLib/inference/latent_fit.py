"""Test-time fitting: move the encoded latents until the model reproduces the *given* structures.

The encoder is amortised: one forward pass turns the given surfaces into latents, and what the
decoder makes of them is only as close to the given structures as training got (the held-out
myocardium of a whole given heart came back at Dice 0.86; a real left atrium at 0.81). The given
label map, however, tells exactly what the field should be for the given structures. Fitting takes
the encoder's latents as the starting point and runs a few Adam steps on them (the network's weights
never change) so that the decoded signed distances of the given structures match their true signed
distances, the targets of training (:func:`~HeartCompletionLib.geometry.signed_distance.signed_distances_mm`),
at points on, near and around their surfaces. The missing structures are decoded from the fitted
latents: they move with the shape the model now sees, through the same latent set (an
auto-decoder's inference, as in DeepSDF, started from the encoder's answer).

A penalty ``anchor`` x mean((z - z0)^2) / mean(z0^2) keeps the latents near the encoder's, i.e.
inside what the decoder was trained on. Structures cut by the field of view contribute only where
a point is farther from the image border than from the structure, the training rule.

Measured effect and cost: docs/completion_study.md ("Fitting the latents to the given structures").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from HeartCompletionLib.geometry.surface import COARSE_SURFACE_MM

#: Default Adam steps (0: off), learning rate relative to the latents' RMS, and anchor weight.
DEFAULT_FIT_STEPS = 30
DEFAULT_FIT_LR = 0.04
DEFAULT_FIT_ANCHOR = 0.0
#: Steps for re-predicting the given structures themselves (``--replace``, a reconstruction): more
#: fitting keeps improving what was given (real LA, validation patients: Dice 0.873 / 0.920 at
#: 30 / 250 steps) while it starts to cost the missing structures after about 30.
RECONSTRUCTION_FIT_STEPS = 250
#: Fitting points: surface samples, near-surface samples (Gaussian offsets of these sigmas, the
#: prepared data's), and uniform samples in the given box padded by ``VOLUME_PADDING_MM``.
FIT_SURFACE_POINTS = 2_048
FIT_NEAR_POINTS = 4_096
FIT_VOLUME_POINTS = 1_024
NEAR_SIGMAS_MM = (1.0, 4.0)
VOLUME_PADDING_MM = 10.0
#: A truncated structure's target counts only farther than |target| + this from the image border.
TRUNCATION_MARGIN_MM = 2.0
#: Points decoded per step (a fresh seeded draw from the fitting points each step; all if fewer),
#: whose count sets the step's cost. A completion's 30 steps complete as well from 512 as from
#: 2,048 (24 held-out synthetic hearts: mean Dice -0.0005 +- 0.0005) at a quarter of the network
#: work; a reconstruction's 250 steps fit closer with 2,048 (8 tuning hearts, ``full``: Dice 0.893
#: against 0.887 with 512). docs/completion_study.md, "Points per fitting step".
DEFAULT_FIT_BATCH = 512
RECONSTRUCTION_FIT_BATCH = 2_048


def is_reconstruction(requested, given) -> bool:
    """Whether every structure asked for is one of the given ones: nothing is missing, the fit only
    re-predicts what it was given (``--replace``, heart-eval's ``full``)."""
    return set(requested) <= set(given)


def resolve_fit_steps(fit_steps, requested, given) -> int:
    """Steps to fit: ``fit_steps`` when given; otherwise (``None``, "auto")
    :data:`RECONSTRUCTION_FIT_STEPS` for a reconstruction (:func:`is_reconstruction`: nothing can
    drift), else :data:`DEFAULT_FIT_STEPS`.

    >>> resolve_fit_steps(None, [3], [3]), resolve_fit_steps(None, [6, 7], [1, 2]), resolve_fit_steps(5, [3], [3])
    (250, 30, 5)
    """
    if fit_steps is not None:
        return int(fit_steps)
    return RECONSTRUCTION_FIT_STEPS if is_reconstruction(requested, given) else DEFAULT_FIT_STEPS


def resolve_fit_batch(fit_batch, requested, given) -> int:
    """Points per step: ``fit_batch`` when given; otherwise (``None``, "auto")
    :data:`RECONSTRUCTION_FIT_BATCH` for a reconstruction, else :data:`DEFAULT_FIT_BATCH`.

    >>> resolve_fit_batch(None, [3], [3]), resolve_fit_batch(None, [6, 7], [1, 2]), resolve_fit_batch(64, [3], [3])
    (2048, 512, 64)
    """
    if fit_batch is not None:
        return int(fit_batch)
    return RECONSTRUCTION_FIT_BATCH if is_reconstruction(requested, given) else DEFAULT_FIT_BATCH


@dataclass
class FitTargets:
    """Points (RAS mm), the given structures' true signed distances there (mm) and where they count."""

    points_mm: np.ndarray  # (N, 3) float64
    columns: np.ndarray  # (G,) class indices (label - 1) of the given structures
    target_mm: np.ndarray  # (N, G) float32
    valid: np.ndarray  # (N, G) bool
    owner: np.ndarray  # (N,) column of the structure a point was drawn on or near, -1 for volume points


def fit_label_map(label_map, labels, target_mm: float = COARSE_SURFACE_MM):
    """The map the targets are computed on: ``label_map`` at about ``target_mm`` (whole blocks of
    :func:`~HeartCompletionLib.geometry.surface.block_factors`), each voxel the structure among
    ``labels`` that fills more than half of its block (0 where none does), with the matrix of the
    block centres; the map itself when its voxels are already that large. A CT's 0.4 mm voxels
    would cost the distance transforms 5x the time for differences well under the model's detail."""
    from HeartCompletionLib.geometry.affine import spacing_of
    from HeartCompletionLib.geometry.surface import block_factors, block_matrix, block_mean
    from HeartCompletionLib.io.labelmap import LabelMap

    matrix = np.asarray(label_map.ijk_to_ras, dtype=np.float64)
    factors = block_factors(spacing_of(matrix), target_mm)
    if np.all(factors == 1):
        return label_map
    out = None
    for value in labels:
        fraction = block_mean(label_map.labels == value, factors)
        if out is None:
            out = np.zeros(fraction.shape, dtype=label_map.labels.dtype)
        out[fraction > 0.5] = value
    return LabelMap(out, block_matrix(matrix, factors), label_map.source, label_map.metadata)


def fit_targets(label_map, meshes, surface_points_mm, surface_index, given, rng: np.random.Generator,
                image_shape=None, image_ijk_to_ras=None, truncated=()) -> FitTargets:
    """The fitting points and targets of the given structures ``given`` (table labels).

    ``label_map`` holds the given structures (e.g. the cropped, about 1 mm map the surfaces were
    sampled on) and ``meshes`` their surfaces; ``surface_points_mm`` (S, 3) and ``surface_index``
    (S,) class indices are the area-uniform surface samples. ``truncated``: labels cut by the
    border of the image (``image_shape``, ``image_ijk_to_ras``), whose surface there is not real.
    """
    from HeartCompletionLib.geometry.affine import distance_to_image_border_mm
    from HeartCompletionLib.geometry.signed_distance import signed_distances_mm

    given = [int(v) for v in given]
    all_pts = np.asarray(surface_points_mm, dtype=np.float64)
    index = np.asarray(surface_index)
    # the same number of surface and near points for every given structure: a coronary weighs as
    # much as the myocardium (area-proportional points let the large structures win)
    groups = [np.flatnonzero(index == v - 1) for v in given]
    groups = [(c, g) for c, g in enumerate(groups) if len(g)]
    surf, near, owner = [], [], []
    for c, g in groups:
        n_s, n_n = -(-FIT_SURFACE_POINTS // len(groups)), -(-FIT_NEAR_POINTS // len(groups))
        surf.append(all_pts[rng.choice(g, size=n_s)])
        pick = all_pts[rng.choice(g, size=n_n)]
        sigmas = np.asarray(NEAR_SIGMAS_MM)[np.arange(n_n) % len(NEAR_SIGMAS_MM)]
        near.append(pick + rng.normal(size=pick.shape) * sigmas[:, None])
        owner += [c] * (n_s + n_n)
    pts = all_pts[np.concatenate([g for _, g in groups])]
    lo, hi = pts.min(axis=0) - VOLUME_PADDING_MM, pts.max(axis=0) + VOLUME_PADDING_MM
    volume = rng.uniform(lo, hi, size=(FIT_VOLUME_POINTS, 3))
    points = np.concatenate([*[np.concatenate([s, n]) for s, n in zip(surf, near)], volume])
    owner = np.asarray(owner + [-1] * FIT_VOLUME_POINTS, dtype=np.int64)
    target = signed_distances_mm(label_map, points, given, meshes=meshes)
    valid = np.isfinite(target)
    cut = [c for c, v in enumerate(given) if v in set(int(t) for t in truncated)]
    if cut and image_shape is not None:
        border = distance_to_image_border_mm(points, image_shape, image_ijk_to_ras)
        for c in cut:
            valid[:, c] &= border > np.abs(np.nan_to_num(target[:, c])) + TRUNCATION_MARGIN_MM
    return FitTargets(points, np.asarray([v - 1 for v in given], dtype=np.int64),
                      np.nan_to_num(target).astype(np.float32), valid, owner)


def _fit_loss(pred, target, valid, own):
    """Half the mean |error| over every valid (point, structure), half the mean over structures of
    each one's error at its own points (on and near its surface): small structures count alike."""
    import torch

    err = (pred - target).abs()
    everywhere = torch.where(valid, err, torch.zeros_like(err)).sum() / valid.sum().clamp_min(1)
    counts = own.sum(dim=0)
    per_structure = (torch.where(own, err, torch.zeros_like(err)).sum(dim=0) / counts.clamp_min(1)).sum()
    return 0.5 * (everywhere + per_structure / (counts > 0).sum().clamp_min(1))


def fit_latents(model, latents, targets: FitTargets, centre_mm, normalization, steps: int,
                lr: float = DEFAULT_FIT_LR, anchor: float = DEFAULT_FIT_ANCHOR, seed: int = 0,
                batch: int = DEFAULT_FIT_BATCH, report=None) -> tuple:
    """``(fitted latents, losses)``: ``steps`` Adam steps on a copy of ``latents`` (B=1, M, W) that
    lower the mean |decoded - true| signed distance (network units) of the given structures at the
    target points. ``lr`` is relative to the latents' RMS. The model's weights are not touched (no
    gradient is kept for them); ``losses`` holds the loss before each step and after the last.
    ``report(fraction)``, if given, is called after each step (progress; it may raise to cancel)."""
    import torch

    dev = latents.device
    z0 = latents.detach().clone()  # a normal tensor even when ``latents`` is an inference tensor
    scale = float(z0.pow(2).mean().sqrt().clamp_min(1e-8))
    z = z0.clone().requires_grad_(True)
    opt = _Adam(z, lr=lr * scale)
    q = torch.from_numpy(normalization.points_to_network(targets.points_mm, centre_mm).astype(np.float32)).to(dev)[None]
    target = torch.from_numpy(targets.target_mm / normalization.scale_mm).to(dev)
    valid = torch.from_numpy(targets.valid).to(dev)
    columns = torch.from_numpy(targets.columns).to(dev)
    own = torch.zeros_like(valid)  # each point's own structure (the one it was drawn on or near)
    drawn = torch.from_numpy(targets.owner).to(dev)
    rows = torch.nonzero(drawn >= 0).squeeze(1)
    own[rows, drawn[rows]] = True
    own &= valid
    gen = torch.Generator().manual_seed(int(seed))
    n = len(targets.points_mm)
    losses = []
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        with torch.enable_grad():
            for k in range(int(steps) + 1):
                last = k == int(steps)  # the loss after the last step only: no graph, no update
                pick = torch.randperm(n, generator=gen)[:batch].to(dev) if n > batch else slice(None)
                with torch.set_grad_enabled(not last):
                    fit = _fit_loss(model.decode(z, q[:, pick], chunk_size=None)[0][:, columns], target[pick],
                                    valid[pick], own[pick])
                losses.append(float(fit.detach()))
                if last:
                    break
                loss = fit + anchor * (z - z0).pow(2).mean() / (scale * scale) if anchor > 0 else fit
                z.grad = None
                loss.backward()
                opt.step()
                if report is not None:
                    report((k + 1) / int(steps))
    finally:
        for p in params:
            p.requires_grad_(True)
    return z.detach(), losses


class _Adam:
    """``torch.optim.Adam``'s update of one tensor (its single-tensor formula, no weight decay; the
    same numbers on the CPU, bit for bit), written out because ``torch.optim`` imports torch's
    compiler on first use: about 3 s of every completion process on the 2-core machine."""

    def __init__(self, param, lr: float, betas=(0.9, 0.999), eps: float = 1e-8):
        import torch

        self.param, self.lr, self.betas, self.eps = param, float(lr), betas, eps
        self.exp_avg = torch.zeros_like(param, memory_format=torch.preserve_format)
        self.exp_avg_sq = torch.zeros_like(param, memory_format=torch.preserve_format)
        self.steps = 0

    def step(self) -> None:
        import torch

        b1, b2 = self.betas
        grad = self.param.grad
        self.steps += 1
        with torch.no_grad():
            self.exp_avg.lerp_(grad, 1 - b1)
            self.exp_avg_sq.mul_(b2).addcmul_(grad, grad, value=1 - b2)
            correction1 = 1 - b1 ** float(self.steps)
            correction2 = 1 - b2 ** float(self.steps)
            denom = (self.exp_avg_sq.sqrt() / correction2**0.5).add_(self.eps)
            self.param.addcdiv_(self.exp_avg, denom, value=-(self.lr / correction1))
