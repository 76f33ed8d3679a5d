"""Fast hierarchical decoding of a voxel lattice: exact coarse levels, interpolated fine levels.

The exact decode (:func:`HeartCompletionLib.inference.completion._hierarchical_labels`) splits every cell
near a surface down to single voxels and decodes every voxel of those cells. Below about 1-2 mm
the network's fields are smooth, so this module decodes the coarse levels the same way, and on
the fine levels (cells whose largest edge is at most ``interp_cell_mm``) it **interpolates** the
competing structures' signed distances trilinearly from the cell corners and decodes exactly only
where the interpolated value is *ambiguous*. Bands are fractions of the split cell's half
diagonal (the unit of the refinement test, so they scale with the cell):

- a lattice node of a finer level is decoded when its ambiguity is under ``node_band`` x half
  the parent cell's diagonal (so the nodes around every surface are exact, and the voxels below
  interpolate from exact corners);
- a voxel is decoded when its ambiguity is under ``voxel_band`` x half the diagonal of its cell;
  beyond that band, the finest level decodes the least ambiguous voxels of each structure until the
  labels expected wrong among the rest (from the interpolation errors measured at the voxels just
  decoded) cost it at most ``dice_loss`` of Dice against the exact decode (:func:`_over_budget`).

The *ambiguity* of a vector of competing distances ``d`` (mm, negative inside) is how far it is
from changing the voxel's label: ``|d1|`` (the smallest distance against the zero level), and
where ``d1 < 0`` also ``(d2 - d1) / 2`` (the two smallest distances: where two structures
compete). Cells are refined by the exact rule (corner labels differ, or a corner within
``refine_factor`` x half the cell diagonal of a surface), so the same cells are visited as by
the exact decode; only the values inside the finest cells are cheaper. Voxels the caller marks
*settled* (the kept given structures, which fusion never overwrites) are never decoded at the
finest level, and cells made only of them are not refined.

>>> import numpy as np
>>> labels, margin, ambiguity = label_margin_ambiguity(
...     np.array([[-2.0, -1.5], [3.0, 0.5]], dtype=np.float32), np.array([6, 7], dtype=np.int16))
>>> labels.tolist(), margin.tolist(), ambiguity.tolist()
([6, 0], [1.5, 0.5], [0.25, 0.5])
"""

from __future__ import annotations

import time
from functools import partial
from itertools import product
from typing import Callable

import numpy as np

from HeartCompletionLib.geometry.affine import ijk_to_ras_points, spacing_of
from HeartCompletionLib.io.labelmap import value_counts

#: fine levels are interpolated when the parent cell's largest edge is at most this (mm)
DEFAULT_INTERP_CELL_MM = 4.0
#: interpolated lattice nodes with an ambiguity under this x half the cell diagonal are decoded exactly
DEFAULT_NODE_BAND = 0.23
#: interpolated voxels with an ambiguity under this x half the cell diagonal are decoded exactly
DEFAULT_VOXEL_BAND = 0.088

#: the measured interpolation error (this quantile of |exact - interpolated| over the decoded
#: values) widens a level's band: a field that is not smooth at the cell size (e.g. an
#: under-trained network) is decoded more exactly instead of being smoothed over. A lower quantile
#: decodes fewer voxels of a rough field at some accuracy (``docs/benchmarks.md``)
DEFAULT_ERROR_QUANTILE = 0.99

#: at the finest level, beyond the voxel band, a voxel is decoded only where the *expected* number
#: of wrong labels left undecoded would cost a structure more than this much Dice against the exact
#: decode (see :func:`_over_budget`). The estimate counts every error larger than the voxel's
#: ambiguity, of either sign. It prices only what the finest level leaves interpolated: on the
#: synthetic CT heart and ten real label maps the whole fast decode lost 0-0.0034 of Dice against the
#: exact one (``docs/benchmarks.md``, session 13)
DEFAULT_DICE_LOSS = 0.002
#: fewer decoded voxels than this at the finest level give no error distribution to budget with:
#: the band widened by the previous level's error is decoded instead
MIN_ERROR_SAMPLES = 64

_CORNERS = np.array(list(product((0, 1), repeat=3)), dtype=np.int64)


def label_margin_ambiguity(values: np.ndarray, write: np.ndarray):
    """``(label int16, margin, ambiguity)`` of competing distances ``values`` (..., C) in mm.

    ``label``: ``write[argmin]`` where the smallest distance is negative, else 0; ``margin``:
    the smallest ``|d|`` (the refinement test of the exact decode); ``ambiguity``: distance to a
    label change (see the module docstring).
    """
    values = np.asarray(values)
    d1 = values[..., 0].copy()
    which = np.zeros(d1.shape, dtype=np.intp)
    d2 = np.full(d1.shape, np.inf, dtype=values.dtype)
    margin = np.abs(d1)
    for c in range(1, values.shape[-1]):  # C is small: one vectorised pass per structure
        x = values[..., c]
        lower = x < d1
        np.minimum(d2, np.where(lower, d1, x), out=d2)
        which[lower] = c
        np.minimum(d1, x, out=d1)
        np.minimum(margin, np.abs(x), out=margin)
    labels = np.where(d1 < 0, write[which], 0).astype(np.int16)
    ambiguity = np.abs(d1)
    np.minimum(ambiguity, 0.5 * (d2 - d1), out=ambiguity, where=d1 < 0)
    return labels, margin, ambiguity


def _two_smallest(values: np.ndarray):
    """The smallest and the second smallest (``inf`` for a single column) of each row of ``values``
    (n, C): one vectorised pass per column, no sort."""
    d1 = values[:, 0].copy()
    d2 = np.full(d1.shape, np.inf, dtype=values.dtype)
    for c in range(1, values.shape[-1]):
        x = values[:, c]
        np.minimum(d2, np.maximum(d1, x), out=d2)
        np.minimum(d1, x, out=d1)
    return d1, d2


def interpolation_error(exact_vals: np.ndarray, interp_vals: np.ndarray) -> np.ndarray:
    """Per row of competing distances (n, C), the error (mm) that matters for the label: the larger
    of the errors of the smallest and of the second smallest distance (the label depends on those
    two only: their signs and their difference)."""
    e1, e2 = _two_smallest(exact_vals)
    i1, i2 = _two_smallest(interp_vals)
    err = np.abs(e1 - i1)
    if exact_vals.shape[-1] > 1:
        np.maximum(err, np.abs(e2 - i2), out=err)
    return err


def _measured_band(exact_vals: np.ndarray, interp_vals: np.ndarray, quantile: float) -> float:
    """The ``quantile`` of the :func:`interpolation_error` at decoded values."""
    if len(exact_vals) == 0:
        return 0.0
    return float(np.quantile(interpolation_error(exact_vals, interp_vals), quantile))


def _near_structures(values: np.ndarray, write: np.ndarray):
    """For each row of competing distances (n, C): the label written for the structure whose zero
    level is nearest (``write[argmin]``) and, where the row is inside and its ambiguity is the half
    difference of the two smallest distances, the label of the runner-up (else 0): the structures
    whose labels the row's ambiguity is about (a wrong label there costs these two their Dice).

    >>> rows = np.array([[0.3, 2.0], [-2.0, -1.8], [-0.5, 3.0]], dtype=np.float32)
    >>> [v.tolist() for v in _near_structures(rows, np.array([6, 7], dtype=np.int16))]
    [[6, 6, 6], [0, 7, 0]]
    """
    d1, d2 = values[:, 0].copy(), np.full(len(values), np.inf, dtype=values.dtype)
    first, second = np.zeros(len(values), dtype=np.int8), np.zeros(len(values), dtype=np.int8)
    for c in range(1, values.shape[1]):  # C is small: one vectorised pass per structure, no sort
        x = values[:, c]
        lower = x < d1
        second = np.where(lower, first, np.where(x < d2, np.int8(c), second))
        d2 = np.where(lower, d1, np.minimum(d2, x))
        first = np.where(lower, np.int8(c), first)
        d1 = np.minimum(d1, x)
    pair = (d1 < 0) & (0.5 * (d2 - d1) < np.abs(d1))
    return write[first], np.where(pair, write[second], 0).astype(write.dtype)


#: the measured errors are summarised by this many quantile intervals for :func:`_over_budget`
ERROR_QUANTILES = 1_000


def _errors_by_structure(errors: np.ndarray, near: np.ndarray, other: np.ndarray, labels) -> dict:
    """The measured ``errors`` (n,) of the voxels about each structure of ``labels`` (``near`` or
    ``other`` is it, see :func:`_near_structures`): a structure's field may be rougher than the
    others' (a thin wall's distance has a ridge inside it). With fewer than
    :data:`MIN_ERROR_SAMPLES` of its own, a structure gets all of them."""
    out = {}
    for label in labels:
        mine = errors[(near == label) | (other == label)]
        out[label] = mine if len(mine) >= MIN_ERROR_SAMPLES else errors
    return out


def _over_budget(amb: np.ndarray, near: np.ndarray, other: np.ndarray, errors_of: dict, lower: dict,
                 counts: Callable[[], dict], dice_loss: float) -> tuple:
    """``(decode, expected)``: which of the undecoded voxels (ambiguities ``amb`` (n,), structures
    ``near`` and ``other`` (n,), see :func:`_near_structures`) must be decoded so that, for each
    structure ``w`` of ``N`` voxels, the labels expected wrong among the rest cost it at most
    ``dice_loss`` of Dice; ``expected``: those expected wrong labels, summed over the structures.

    A voxel's label is wrong only if its interpolation error exceeds its ambiguity: with
    ``errors_of[w]`` the errors measured at this level near ``w`` (:func:`interpolation_error`,
    :func:`_errors_by_structure`), the chance is at most the fraction of them larger than ``amb``
    (taken at the :data:`ERROR_QUANTILES` quantile below ``amb``: rounded up). A wrong voxel adds 1
    to the symmetric difference of a structure of ``N`` voxels, i.e. costs about ``1 / (2 N)`` of
    Dice, so each structure may leave ``2 N dice_loss`` expected wrong labels: its safest voxels
    (largest ambiguity) are left first, and the rest are decoded. ``lower[w]`` is at most ``N``
    (a cheap count); ``counts()`` gives every ``N`` and is called only when a structure's expected
    wrong labels exceed the budget of its lower count.

    >>> amb = np.array([0.05, 0.15, 0.25, 0.35])
    >>> w = np.array([6, 6, 6, 6]); o = np.zeros(4, dtype=int)
    >>> errors = {6: np.array([0.0, 0.1, 0.2, 0.3])}  # chances (rounded up) 1, 1/2, 1/4, 0: 1.75 expected
    >>> decode, expected = _over_budget(amb, w, o, errors, {6: 10}, lambda: {6: 100}, 0.0025)  # 0.5 allowed
    >>> decode.tolist(), expected
    ([True, True, False, False], 0.25)
    >>> _over_budget(amb, w, o, errors, {6: 400}, None, 0.0025)[0].tolist()  # 2 allowed: none decoded
    [False, False, False, False]
    """
    mine = {}
    for label in lower:
        rows = np.flatnonzero((near == label) | (other == label))
        errors = np.asarray(errors_of[label], dtype=np.float64)
        levels = min(ERROR_QUANTILES, len(errors))
        edges = np.quantile(errors, np.linspace(0.0, 1.0, levels + 1))
        # bin k: edges[k-1] <= amb < edges[k]; at most a fraction 1 - (k-1)/levels of the errors exceed amb
        bins = np.searchsorted(edges.astype(amb.dtype), amb[rows], side="right")
        chance = np.clip(1.0 - (np.arange(levels + 2) - 1.0) / levels, 0.0, 1.0)
        per_bin = np.bincount(bins, minlength=levels + 2)
        mine[label] = rows, bins, per_bin * chance
    decode = np.zeros(len(amb), dtype=bool)
    expected = {label: float(wrong.sum()) for label, (_, _, wrong) in mine.items()}
    over = [label for label in mine if expected[label] > 2.0 * lower[label] * dice_loss]
    every = counts() if over else {}
    for label in over:
        rows, bins, wrong = mine[label]
        from_safest = np.cumsum(wrong[::-1])[::-1]  # expected wrong in bins >= k
        beyond = np.flatnonzero(from_safest > 2.0 * every[label] * dice_loss)
        if len(beyond):  # bins below the first one within budget are decoded
            decode[rows[bins <= beyond[-1]]] = True
            expected[label] = float(from_safest[beyond[-1] + 1]) if beyond[-1] + 1 < len(wrong) else 0.0
    return decode, sum(expected.values())


def _structure_voxels(v_labs, free, write, out=None, size=None, settled=None) -> dict:
    """Voxels of each written label (``write``, not 0): those of the finest level's cells at the
    ``free`` indices of ``v_labs`` (cells, voxels), counted (alone, at most the region's count) and,
    given ``out``, plus an estimate of those of the cells settled on coarser levels (already in
    ``out``; the finest cells' blocks are still 0 there) from every 2nd voxel along each axis, the
    settled voxels left out (fusion keeps the given structures there). A budget needs no exact
    count, and the sample costs an eighth of a pass over the region."""
    top = int(max(write.max(), 0)) + 1
    counts = np.bincount(v_labs[free], minlength=top)[:top]
    if out is not None:
        sample = out[tuple(slice(0, int(n), 2) for n in size)]
        if settled is not None:
            sample = sample[~settled[::2, ::2, ::2]]
        counts = counts + 8 * value_counts(sample, top)[:top]
    return {int(w): int(counts[w]) for w in np.unique(write) if w > 0}


def _trilinear_weights(t: np.ndarray) -> np.ndarray:
    """Weights (n, 8) of the 8 cell corners (order of ``_CORNERS``) at fractional positions t (n, 3)."""
    w = np.ones((len(t), 8))
    for axis in range(3):
        c = _CORNERS[:, axis][None]
        w *= np.where(c == 1, t[:, axis : axis + 1], 1.0 - t[:, axis : axis + 1])
    return w.astype(np.float32)


def _free_voxels(mask, cells, stride, offs, size, settled):
    """``(cell index, voxel index, voxel ijk)`` of the voxels ``mask`` (cells, voxels) marks that lie
    in the region (voxels beyond it are cropped anyway) and are not ``settled``."""
    n_idx, v_idx = np.nonzero(mask)
    vox = cells[n_idx] * stride + offs[v_idx]
    keep = (vox < size).all(-1)
    if settled is not None:
        keep[keep] = ~settled[tuple(vox[keep].T)]
    return n_idx[keep], v_idx[keep], vox[keep]


def _and_pairs(a: np.ndarray, axis: int) -> np.ndarray:
    """``a`` pooled by pairs along ``axis`` (logical and); an unpaired last element is kept as it
    is (its partner would lie beyond the region, which counts as settled)."""
    n = a.shape[axis]
    first, second, last = ([slice(None)] * a.ndim for _ in range(3))
    first[axis], second[axis], last[axis] = slice(0, n - 1, 2), slice(1, n, 2), slice(n - 1, n)
    pooled = a[tuple(first)] & a[tuple(second)]
    return np.concatenate([pooled, a[tuple(last)]], axis=axis) if n % 2 else pooled


def _settled_cells(settled: np.ndarray, size, strides) -> dict:
    """For every cell stride of the refinement (``strides`` halved level by level): which cells have
    every voxel settled. Voxels beyond the region count as settled (they are cropped)."""
    strides = np.asarray(strides, dtype=np.int64)
    whole = -(-np.asarray(size) // strides) * strides  # the voxels of whole coarse cells
    sequence = [strides]
    while (sequence[-1] > 1).any():
        sequence.append(sequence[-1] // np.where(sequence[-1] > 1, 2, 1))
    pooled, current, out = settled, np.ones(3, dtype=np.int64), {}
    for stride in reversed(sequence[:-1]):  # fine to coarse, halving with strided slices (10x faster than reshape + all)
        for axis in range(3):
            while current[axis] < stride[axis]:
                pooled = _and_pairs(pooled, axis)
                current[axis] *= 2
        shape = tuple(int(v) for v in whole // stride)
        if pooled.shape != shape:  # the cells beyond the region (once, at the finest stride: the
            full = np.ones(shape, dtype=bool)  # padded shape halves exactly from there on)
            full[tuple(slice(0, n) for n in pooled.shape)] = pooled
            pooled = full
        out[tuple(int(v) for v in stride)] = pooled
    return out


def _child_nodes(cells, at, corner_vals, stride, split, first_index, region_cells):
    """The lattice nodes that splitting the cells (origins ``cells`` in units of ``stride``, corners
    ``at``, their values ``corner_vals`` (cells, 8, C)) by ``split`` adds: ``(ijk (n, 3), values
    interpolated trilinearly (n, C) float32, table)``. ``table`` (cells, positions) holds the node index
    of every child lattice position of every cell (``product`` order over ``split + 1`` per axis):
    the corner's where the position is a corner, else ``first_index`` + the new node's row. A node
    on a face or an edge shared by two active cells is added once."""
    child_stride = stride // split
    pos = np.array(list(product(*[range(s + 1) for s in split])), dtype=np.int64)  # in child strides
    corner = (pos % split == 0).all(1)
    table = np.empty((len(cells), len(pos)), dtype=np.int64)
    table[:, corner] = at[:, np.ravel_multi_index((pos[corner] // split).T, (2, 2, 2))]
    fresh = np.flatnonzero(~corner)
    # one row per distinct position: scatter the row number of every (cell, position) into a scratch
    # lattice and read back which one landed (any one of a repeated position: all read the same),
    # O(n) instead of a sort
    grid_shape = tuple(int(v) for v in region_cells * split + 1)  # the lattice, in child strides
    # linear index in that lattice (linear in ijk: offsets add)
    keys = (np.ravel_multi_index((cells * split).T, grid_shape)[:, None]
            + np.ravel_multi_index(pos[fresh].T, grid_shape)[None]).reshape(-1)
    scratch = np.empty(int(np.prod(grid_shape)), dtype=np.int32)  # pages touched only where written
    order = np.arange(len(keys), dtype=np.int32)
    scratch[keys] = order
    landed = scratch[keys]
    rows = np.flatnonzero(landed == order)  # the distinct positions, one row each
    row_of = np.empty(len(keys), dtype=np.int64)
    row_of[rows] = np.arange(len(rows))
    table[:, fresh] = first_index + row_of[landed].reshape(len(cells), len(fresh))
    cell, j = np.divmod(rows, len(fresh))
    ijk = np.stack(np.unravel_index(keys[rows], grid_shape), -1) * child_stride
    # trilinear values from the parent's corners: one small matrix product for every (cell,
    # position), then one row per distinct position
    w = _trilinear_weights(pos[fresh] / split)  # (fresh, 8)
    n, c = corner_vals.shape[0], corner_vals.shape[-1]
    every = (np.ascontiguousarray(corner_vals.transpose(0, 2, 1)).reshape(-1, 8) @ w.T).reshape(n, c, len(fresh))
    values = every[cell, :, j]
    return ijk, values, table


def fast_hierarchical_labels(
    decode: Callable[[np.ndarray, Callable[[float], None]], np.ndarray],
    write: np.ndarray,
    lo,
    hi,
    ijk_to_ras,
    strides,
    refine_factor: float,
    report: Callable[[float], None],
    interp_cell_mm: float = DEFAULT_INTERP_CELL_MM,
    node_band: float = DEFAULT_NODE_BAND,
    voxel_band: float = DEFAULT_VOXEL_BAND,
    error_quantile: float = DEFAULT_ERROR_QUANTILE,
    settled: np.ndarray | None = None,
    dice_loss: float = DEFAULT_DICE_LOSS,
):
    """Labels (int16) of the region voxels ``[lo, hi)`` and decoding statistics.

    ``decode(points_mm (n, 3), report)`` returns the competing structures' signed distances
    (n, C) float32 in mm; ``write`` (C,) the label written for each (0: not asked for).
    ``strides``: coarse lattice step per axis in voxels (powers of two). ``settled`` (bool, the
    region's shape): voxels whose label the caller writes anyway (the kept given structures, which
    fusion never overwrites); the finest level decodes none of them, and their returned label is
    the interpolated one. ``error_quantile``: which quantile of the measured interpolation error
    widens the bands of the coarser levels (see :data:`DEFAULT_ERROR_QUANTILE`); ``dice_loss``: the
    finest level's budget (see :data:`DEFAULT_DICE_LOSS` and :func:`_over_budget`).
    """
    lo, hi, strides = np.asarray(lo), np.asarray(hi), np.asarray(strides, dtype=np.int64)
    write = np.asarray(write, dtype=np.int16)
    size = hi - lo
    spacing = spacing_of(ijk_to_ras)
    n_cells = -(-size // strides)
    out = np.zeros(n_cells * strides, dtype=np.int16)
    levels = int(np.log2(strides.max())) + 1
    per_level = []
    settled_cells = None if settled is None else _settled_cells(settled, size, strides)

    # level 0: every coarse node, exactly. Lattice nodes live in arrays that only grow (values,
    # label, margin, ambiguity, exact or not, ijk), and every cell carries the indices ``at`` of its 8
    # corners in them: a node is computed once, not once per corner, and never searched for
    t = time.perf_counter()
    node_dims = n_cells + 1
    node_ijk = np.stack(np.meshgrid(*[np.arange(n) for n in node_dims], indexing="ij"), -1).reshape(-1, 3) * strides
    vals = decode(ijk_to_ras_points(node_ijk + lo, ijk_to_ras), lambda f: report(f / levels))
    exact = np.ones(len(vals), dtype=bool)
    node_lab, node_marg, node_amb = label_margin_ambiguity(vals, write)
    cells = np.stack(np.meshgrid(*[np.arange(n) for n in n_cells], indexing="ij"), -1).reshape(-1, 3)
    at = np.ravel_multi_index((cells[:, None, :] + _CORNERS[None]).reshape(-1, 3).T, node_dims).reshape(-1, 8)
    per_level.append({"stride_vox": strides.tolist(), "cells": len(cells), "queries": len(vals), "interpolated": 0,
                      "seconds": round(time.perf_counter() - t, 3)})
    stride = strides.copy()
    level = 0
    final_done = False
    error_per_scale = 0.0  # measured band / cell scale of the last interpolated level (mm per mm^2)
    while len(cells) and not (stride == 1).all():
        level += 1
        t = time.perf_counter()
        span = (level / levels, (level + 1) / levels)

        def sub_report(f, s=span):
            report(s[0] + f * (s[1] - s[0]))

        labs, marg, corner_amb = node_lab[at], node_marg[at], node_amb[at]  # (cells, 8)
        tau = refine_factor * 0.5 * float(np.linalg.norm(stride * spacing))
        active = (labs != labs[:, :1]).any(1) | (marg.min(1) < tau)
        if settled_cells is not None:  # a cell whose every voxel is settled needs no finer values
            active &= ~settled_cells[tuple(stride)][tuple(cells.T)]
        blocks = out.reshape(out.shape[0] // stride[0], stride[0], out.shape[1] // stride[1], stride[1],
                             out.shape[2] // stride[2], stride[2])
        # a cell that is not refined has its corners' label in every voxel; ``out`` starts at 0 (pages
        # not yet touched), so only the cells of a structure are written: each voxel at most once
        idle = ~active & (labs[:, 0] != 0)
        blocks[cells[idle, 0], :, cells[idle, 1], :, cells[idle, 2], :] = labs[idle, 0][:, None, None, None]
        cells, at, labs, corner_amb = cells[active], at[active], labs[active], corner_amb[active]
        corner_vals = vals[at]  # (cells, 8, C): the active cells' corner distances, for interpolation
        interp = float((stride * spacing).max()) <= interp_cell_mm + 1e-9
        half_diagonal = 0.5 * float(np.linalg.norm(stride * spacing))
        scale = half_diagonal ** 2  # trilinear error grows with the square of the cell size
        split = np.where(stride > 1, 2, 1)
        child_stride = stride // split
        if (child_stride == 1).all():
            # last level: every voxel of the active cells' blocks, interpolated or decoded. A cell whose
            # corners share one label, each at least the band from a label change, has that label in
            # every voxel under trilinear interpolation (each distance, and each difference of two,
            # stays within its corner values): *uniform*, filled without interpolating, unless this
            # level's measured errors (below) reach its corners' ambiguity
            uniform = np.zeros(len(cells), dtype=bool)
            corner_min = corner_amb.min(1)
            if interp:
                band = max(voxel_band * scale, error_per_scale * scale)
                uniform = (labs == labs[:, :1]).all(1) & (corner_min >= band)
            every_cell, every_vals, every_at = cells, corner_vals, at
            kept = np.flatnonzero(uniform)  # indices into the active cells
            cells, corner_vals, at = cells[~uniform], corner_vals[~uniform], at[~uniform]
            offs = np.array(list(product(*[range(s) for s in stride])), dtype=np.int64)  # (v, 3)
            w = _trilinear_weights(offs / stride)
            v = np.matmul(w[None], corner_vals)  # (cells, voxels, C)
            v_labs, _, amb = label_margin_ambiguity(v, write)
            # first the voxel band (every voxel where not interpolating), then, beyond it, the voxels a
            # structure's Dice budget needs, judged by the errors the first decode measured
            floor = voxel_band * scale
            need = amb < floor if interp else np.ones(amb.shape, dtype=bool)
            need[:, 0] &= ~exact[at[:, 0]]  # the block's first voxel is its exact corner node
            n_idx, v_idx, vox = _free_voxels(need, cells, stride, offs, size, settled)
            errors = np.zeros(0, dtype=np.float32)
            if len(n_idx):
                exact_vals = decode(ijk_to_ras_points(vox + lo, ijk_to_ras), sub_report)
                v_labs[n_idx, v_idx] = label_margin_ambiguity(exact_vals, write)[0]
                if interp:
                    errors = interpolation_error(exact_vals, v[n_idx, v_idx])
            measured = float(np.quantile(errors, error_quantile)) if len(errors) else 0.0
            expected_wrong = 0.0
            if len(errors) >= MIN_ERROR_SAMPLES:  # uniform cells within reach of the errors are interpolated too
                reach = corner_min[kept] < errors.max()
                if reach.any():
                    reopen = kept[reach]
                    cells, at = np.concatenate([cells, every_cell[reopen]]), np.concatenate([at, every_at[reopen]])
                    v2 = np.matmul(w[None], every_vals[reopen])
                    l2, _, a2 = label_margin_ambiguity(v2, write)
                    v, v_labs, amb = np.concatenate([v, v2]), np.concatenate([v_labs, l2]), np.concatenate([amb, a2])
                    kept = kept[~reach]
            fill = kept[labs[kept, 0] != 0]
            blocks[every_cell[fill, 0], :, every_cell[fill, 1], :, every_cell[fill, 2], :] = \
                labs[fill, 0][:, None, None, None]
            n_uniform = len(kept) * int(np.prod(stride))
            if interp:
                if len(errors) >= MIN_ERROR_SAMPLES:
                    more = (amb >= floor) & (amb < errors.max())  # elsewhere no measured error is large enough
                else:  # too few decoded voxels to judge the errors by: the band the coarser levels measured
                    more = (amb < band) & ~need
                more[:, 0] &= ~exact[at[:, 0]]
                m_idx, mv_idx, mvox = _free_voxels(more, cells, stride, offs, size, settled)
                if len(errors) >= MIN_ERROR_SAMPLES and len(m_idx):
                    near, other = _near_structures(v[m_idx, mv_idx], write)
                    free = (np.concatenate([n_idx, m_idx]), np.concatenate([v_idx, mv_idx]))
                    # the decoded and the candidate voxels undercount each structure; the rest of the
                    # region is counted (from a sample of it) only when some structure needs more
                    lower = _structure_voxels(v_labs, free, write)
                    errors_of = _errors_by_structure(errors, *_near_structures(v[n_idx, v_idx], write), lower)
                    pick, expected_wrong = _over_budget(
                        amb[m_idx, mv_idx], near, other, errors_of, lower,
                        partial(_structure_voxels, v_labs, free, write, out, size, settled), dice_loss)
                    m_idx, mv_idx, mvox = m_idx[pick], mv_idx[pick], mvox[pick]
                if len(m_idx):
                    v_labs[m_idx, mv_idx] = label_margin_ambiguity(
                        decode(ijk_to_ras_points(mvox + lo, ijk_to_ras), sub_report), write)[0]
                n_idx = np.concatenate([n_idx, m_idx])
            blocks[cells[:, 0], :, cells[:, 1], :, cells[:, 2], :] = v_labs.reshape(len(cells), *stride)
            per_level.append({"stride_vox": [1, 1, 1], "cells": int(len(cells) * len(offs)) + n_uniform,
                              "queries": int(len(n_idx)),
                              "interpolated": int(len(cells) * len(offs) - len(n_idx)) + n_uniform if interp else 0,
                              "band_mm": round(floor, 4) if interp else None,
                              "measured_band_mm": round(measured, 4) if interp else None,
                              "expected_wrong": round(expected_wrong, 1) if interp else None,
                              "seconds": round(time.perf_counter() - t, 3)})
            final_done = True
            break
        # an intermediate level: the child lattice nodes of the active cells
        new_ijk, new_vals, table = _child_nodes(cells, at, corner_vals, stride, split, len(vals),
                                                n_cells * strides // stride)
        band = measured = new_lab = None
        if interp:  # label, margin and ambiguity of the interpolated values (kept where nothing is decoded)
            new_lab, new_marg, new_amb = label_margin_ambiguity(new_vals, write)
            band = max(node_band * scale, error_per_scale * scale)
            need = new_amb < band
        else:
            need = np.ones(len(new_vals), dtype=bool)
        if need.any():
            interp_vals = new_vals[need]
            new_vals[need] = decode(ijk_to_ras_points(new_ijk[need] + lo, ijk_to_ras), sub_report)
            if interp:
                measured = _measured_band(new_vals[need], interp_vals, error_quantile)
                error_per_scale = max(error_per_scale, measured / scale)
                if measured > band:  # rougher than the band assumed: decode the wider band too
                    more = (new_amb < measured) & ~need
                    if more.any():
                        new_vals[more] = decode(ijk_to_ras_points(new_ijk[more] + lo, ijk_to_ras), sub_report)
                        need |= more
        per_level.append({"stride_vox": child_stride.tolist(), "cells": int(len(cells)), "queries": int(need.sum()),
                          "interpolated": int((~need).sum()),
                          "band_mm": None if band is None else round(band, 4),
                          "measured_band_mm": None if measured is None else round(measured, 4),
                          "seconds": round(time.perf_counter() - t, 3)})
        if new_lab is None:
            new_lab, new_marg, new_amb = label_margin_ambiguity(new_vals, write)
        elif need.any():  # the decoded nodes' own values replace the interpolated ones
            new_lab[need], new_marg[need], new_amb[need] = label_margin_ambiguity(new_vals[need], write)
        vals, exact = np.concatenate([vals, new_vals]), np.concatenate([exact, need])
        node_lab, node_marg = np.concatenate([node_lab, new_lab]), np.concatenate([node_marg, new_marg])
        node_amb, node_ijk = np.concatenate([node_amb, new_amb]), np.concatenate([node_ijk, new_ijk])
        children = np.array(list(product(*[range(s) for s in split])), dtype=np.int64)
        child_corners = np.ravel_multi_index((children[:, None, :] + _CORNERS[None]).reshape(-1, 3).T, tuple(split + 1))
        at = table[:, child_corners].reshape(-1, 8)
        cells = (cells[:, None, :] * split + children[None]).reshape(-1, 3)
        stride = child_stride
    if not final_done:  # the coarse lattice was already the voxel lattice: its nodes are the voxels
        keep = np.all(node_ijk < np.array(out.shape), axis=1) & exact
        out[tuple(node_ijk[keep].T)] = node_lab[keep]
    crop = tuple(slice(0, int(n)) for n in size)
    return out[crop], {"levels": per_level}
