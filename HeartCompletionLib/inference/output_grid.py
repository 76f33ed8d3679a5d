"""The grid a completion is written on, when it is not the input's own.

A short-axis MRI stack (10 mm slices, ventricles only) or a crop around one vessel leaves most
of the heart outside its field of view and at a resolution no heart surface survives. The
completion can therefore be written on another grid (``heart-complete --extend_mm / --output_spacing
/ --reference``; ``complete_label_map(output_grid=...)``):

- :func:`grown_grid`: the input's voxel axes (same direction cosines), the input's extent grown
  to cover the given structures' box plus ``extend_mm`` on every side, at the input's spacing or
  another (one value: isotropic);
- a reference image's grid: exactly another image's grid (any NIfTI / NRRD / MetaImage image, e.g.
  the CT the labels were drawn on, read by :func:`HeartCompletionLib.io.labelmap_files.read_image_geometry`),
  as the Slicer panel's reference volume.

The given structures are carried onto the new grid by nearest neighbour
(:func:`resample_nearest`) and never changed by the completion; their surfaces are still sampled
on the input's own grid, so the encoder sees the same input whatever the output grid.

A grid is a pair ``(shape, ijk_to_ras)``: voxel counts and the 4x4 voxel-centre -> RAS mm matrix.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from HeartCompletionLib.errors import HeartCompletionError
from HeartCompletionLib.geometry.affine import direction_of, spacing_of, validate_ijk_to_ras
from HeartCompletionLib.io.labelmap import LabelMap, labelled_box

#: voxels per slab of nearest-neighbour resampling (bounded temporaries at CT sizes)
_SLAB_VOXELS = 4_000_000


class OutputGridError(HeartCompletionError, ValueError):
    """An output grid that cannot be made (message names the input and the problem)."""


def grown_grid(label_map: LabelMap, extend_mm: float = 0.0, spacing_mm=None,
               max_voxels: int | None = None) -> tuple[tuple[int, int, int], np.ndarray]:
    """The input's axes, covering its own extent and the given structures' box grown by
    ``extend_mm`` (>= 0) on every side, at ``spacing_mm`` (one value, three, or ``None``: the
    input's). Refuses a grid of more than ``max_voxels`` voxels (default: the reader's limit)."""
    from HeartCompletionLib.io.labelmap_files import voxel_limit

    source = label_map.source
    extend_mm = float(extend_mm)
    if not math.isfinite(extend_mm) or extend_mm < 0:
        raise OutputGridError(f"{source}: extend_mm must be a finite length >= 0 mm, got {extend_mm:g}")
    m = validate_ijk_to_ras(label_map.ijk_to_ras, source)
    spacing_in = spacing_of(m)
    if spacing_mm is None:
        spacing = spacing_in
    else:
        spacing = np.broadcast_to(np.asarray(spacing_mm, dtype=np.float64).ravel(), (3,)).copy() \
            if np.size(spacing_mm) in (1, 3) else None
        if spacing is None or not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
            raise OutputGridError(f"{source}: output spacing must be one or three lengths > 0 mm, got {spacing_mm}")
    lo = -0.5 * spacing_in
    hi = (np.asarray(label_map.shape, dtype=np.float64) - 0.5) * spacing_in
    box = labelled_box(label_map.labels)
    if box is not None:  # its voxel faces, in mm from voxel 0's centre along the input's axes
        lo = np.minimum(lo, (box[0] - 0.5) * spacing_in - extend_mm)
        hi = np.maximum(hi, (box[1] - 0.5) * spacing_in + extend_mm)
    shape = tuple(int(max(1, math.ceil((b - a) / s - 1e-6))) for a, b, s in zip(lo, hi, spacing))
    limit, where = voxel_limit(max_voxels)
    if int(np.prod(shape, dtype=np.int64)) > limit:
        raise OutputGridError(f"{source}: the output grid {shape[0]} x {shape[1]} x {shape[2]} at "
                              f"{'x'.join(f'{s:g}' for s in spacing)} mm would have {int(np.prod(shape, dtype=np.int64)):,} "
                              f"voxels, more than the limit {limit:,} ({where}); use a coarser --output_spacing "
                              "or a smaller --extend_mm")
    # centre the grid on the covered box (its extent is rounded up to whole voxels)
    lo = lo - 0.5 * (np.asarray(shape) * spacing - (hi - lo))
    direction = direction_of(m)
    out = np.eye(4)
    out[:3, :3] = direction * spacing[None, :]
    out[:3, 3] = m[:3, 3] + direction @ (lo + 0.5 * spacing)
    return shape, out


def resample_nearest(labels: np.ndarray, ijk_to_ras: np.ndarray, shape, out_ijk_to_ras: np.ndarray,
                     fill: int = 0) -> np.ndarray:
    """``labels`` (on ``ijk_to_ras``) at the voxel centres of the grid ``(shape, out_ijk_to_ras)``
    by nearest neighbour; ``fill`` outside the input. Slab by slab along the last axis."""
    labels = np.asarray(labels)
    shape = tuple(int(n) for n in shape)
    to_in = np.linalg.inv(np.asarray(ijk_to_ras, dtype=np.float64)) @ np.asarray(out_ijk_to_ras, dtype=np.float64)
    out = np.full(shape, fill, dtype=labels.dtype)
    ii, jj = np.meshgrid(np.arange(shape[0], dtype=np.float64), np.arange(shape[1], dtype=np.float64), indexing="ij")
    plane = ii.size
    step = max(1, _SLAB_VOXELS // max(plane, 1))
    in_shape = np.asarray(labels.shape)
    for k0 in range(0, shape[2], step):
        ks = np.arange(k0, min(shape[2], k0 + step), dtype=np.float64)
        ijk = np.stack([np.repeat(ii[..., None], len(ks), 2), np.repeat(jj[..., None], len(ks), 2),
                        np.broadcast_to(ks, ii.shape + (len(ks),))], axis=-1).reshape(-1, 3)
        src = np.rint(ijk @ to_in[:3, :3].T + to_in[:3, 3]).astype(np.int64)
        inside = np.all((src >= 0) & (src < in_shape), axis=1)
        values = np.full(len(src), fill, dtype=labels.dtype)
        values[inside] = labels[src[inside, 0], src[inside, 1], src[inside, 2]]
        out[:, :, k0: k0 + len(ks)] = values.reshape(shape[0], shape[1], len(ks))
    return out


def box_on_grid(lo_vox, hi_vox, ijk_to_ras: np.ndarray, shape, out_ijk_to_ras: np.ndarray):
    """The half-open voxel box of ``out`` that holds the box ``[lo_vox, hi_vox)`` of the input grid
    (its eight corners mapped, rounded outwards, clipped to ``shape``)."""
    to_out = np.linalg.inv(np.asarray(out_ijk_to_ras, dtype=np.float64)) @ np.asarray(ijk_to_ras, dtype=np.float64)
    lo_f, hi_f = np.asarray(lo_vox, dtype=np.float64) - 0.5, np.asarray(hi_vox, dtype=np.float64) - 0.5
    corners = np.array(list(itertools.product(*zip(lo_f, hi_f))))
    mapped = corners @ to_out[:3, :3].T + to_out[:3, 3]
    lo = np.clip(np.floor(mapped.min(axis=0) + 0.5).astype(np.int64), 0, np.asarray(shape))
    hi = np.clip(np.ceil(mapped.max(axis=0) + 0.5).astype(np.int64), 0, np.asarray(shape))
    return lo, np.maximum(hi, lo)
