"""Remove small disconnected pieces ("islands") and detached pieces of predicted structures.

A network's zero level set can leave a few stray voxels or blobs far from a structure. After
fusion, every connected piece of a predicted structure smaller than ``min_fraction`` of that
structure's largest piece is cleared to background (0). Pieces are 26-connected, which is the
same on flipped, permuted and oblique grids. A structure with several real parts (pulmonary
veins, left and right coronary trees) keeps every part of comparable size; given structures are
never touched (the caller passes only the predicted labels).

A second rule (:func:`remove_detached_pieces`) is anatomical: every structure of the heart touches
at least one other (chambers each other, vessels their chambers, the coronaries the myocardium and
aorta, the veins the LA), so a piece of a predicted structure lying more than ``max_gap_mm`` from
every other structure, given or predicted, is cleared, as long as another piece of that structure
is within that distance (a structure never disappears, only its detached pieces). Such pieces come
from decoding far from where training supervised the field: on 3 of 24 held-out synthetic hearts
the study's model drew a second right atrium of 24-100 ml, 65-77 mm from everything else, in the
corner of an oblique grid (docs/completion_study.md).

>>> import numpy as np
>>> labels = np.zeros((12, 12, 12), dtype=np.uint8)
>>> labels[1:6, 1:6, 1:6] = 2          # the structure: 125 voxels
>>> labels[8:11, 8:11, 8:11] = 2       # a second real part: 27 voxels, kept at 5 %
>>> labels[10, 1, 10] = 2              # one stray voxel
>>> remove_small_islands(labels, [2], min_fraction=0.05)
{2: 1}
>>> int((labels == 2).sum())
152
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

#: default for completion: pieces under 5 % of the structure's largest piece are removed
DEFAULT_MIN_ISLAND_FRACTION = 0.05
#: default for completion: pieces farther than this from every other structure are removed
DEFAULT_MAX_DETACHED_MM = 15.0
#: distances to the other structures are measured on blocks of about this size (mm)
_DETACHED_BLOCK_MM = 2.0


def remove_small_islands(labels: np.ndarray, values: Iterable[int], min_fraction: float = DEFAULT_MIN_ISLAND_FRACTION,
                         where: np.ndarray | None = None) -> dict[int, int]:
    """Clear (in place) the small pieces of each label in ``values``; returns voxels removed per label.

    ``where`` (bool, same shape): only voxels there may be removed (e.g. the newly written ones);
    pieces are still measured on the whole label. ``min_fraction <= 0`` removes nothing.
    """
    from scipy import ndimage

    removed: dict[int, int] = {}
    if min_fraction <= 0:
        return removed
    structure = np.ones((3, 3, 3), dtype=bool)
    for value in values:
        mask = labels == value
        if not mask.any():
            continue
        pieces, count = ndimage.label(mask, structure=structure)
        if count < 2:
            continue
        sizes = np.bincount(pieces.ravel())[1:]
        small = np.flatnonzero(sizes < min_fraction * sizes.max()) + 1
        if len(small) == 0:
            continue
        drop = np.isin(pieces, small)
        if where is not None:
            drop &= where
        labels[drop] = 0
        removed[int(value)] = int(drop.sum())
    return removed


def remove_detached_pieces(labels: np.ndarray, values: Iterable[int], spacing_mm,
                           max_gap_mm: float = DEFAULT_MAX_DETACHED_MM) -> dict[int, int]:
    """Clear (in place) the pieces of each label in ``values`` that lie farther than ``max_gap_mm``
    from every other labelled voxel (other structures and the label's other pieces), if another
    piece of the same label lies within it; returns voxels removed per label. Distances are
    measured on blocks of at least 2 mm (a block counts as occupied if any of its voxels is), so they
    are exact to a block. ``max_gap_mm <= 0`` removes nothing.

    >>> labels = np.zeros((40, 10, 10), dtype=np.uint8)
    >>> labels[0:10, :, :] = 1             # another structure
    >>> labels[10:14, 2:6, 2:6] = 2        # the structure, touching it
    >>> labels[34:38, 2:6, 2:6] = 2        # a piece of it 20 mm away from everything
    >>> remove_detached_pieces(labels, [2], spacing_mm=(1.0, 1.0, 1.0), max_gap_mm=15.0)
    {2: 64}
    >>> labels[10:14] = 0                  # no attached piece left: nothing is removed
    >>> remove_detached_pieces(labels, [2], spacing_mm=(1.0, 1.0, 1.0), max_gap_mm=15.0)
    {}
    """
    from scipy import ndimage

    removed: dict[int, int] = {}
    if max_gap_mm <= 0:
        return removed
    spacing = np.broadcast_to(np.asarray(spacing_mm, dtype=np.float64), (3,))
    block = np.maximum(1, np.ceil(_DETACHED_BLOCK_MM / spacing)).astype(int)
    limit = max_gap_mm + float(np.linalg.norm(spacing * block))  # neighbouring blocks may hold voxels 0 mm apart
    reach = np.ceil(limit / spacing).astype(int) + block  # voxels around a piece worth looking at
    structure = np.ones((3, 3, 3), dtype=bool)
    label_boxes = ndimage.find_objects(labels)  # [value - 1]: the bounding box of each value
    for value in values:
        box = label_boxes[value - 1] if 0 < value <= len(label_boxes) else None
        if box is None:
            continue
        # everything below happens within the label's box grown by the reach: whole pieces, and all
        # that lies within reach of them
        region = _grown(box, reach, labels.shape)
        sub = labels[region]
        occupied = sub != 0
        mask = sub == value
        pieces, count = ndimage.label(mask, structure=structure)
        if count < 2:
            continue
        # 1. distance of each piece to the other structures: one distance map per label, on blocks
        others = _blocks_any(occupied & ~mask, block)
        gap = ndimage.distance_transform_edt(~others, sampling=spacing * block) if others.any() else None
        coarse = _blocks_max(pieces, block)  # a block shared by two pieces shows the larger number
        attached = np.zeros(count + 1, dtype=bool)
        if gap is not None:
            nearest = ndimage.minimum(gap, labels=coarse, index=np.arange(1, count + 1))
            attached[1:] = np.asarray(nearest, dtype=np.float64) <= limit  # NaN (hidden piece): not yet
        # 2. the rest: distance to the label's other pieces (and, for a hidden piece, to anything), in a crop
        for k, piece_box in enumerate(ndimage.find_objects(pieces), start=1):
            if attached[k] or piece_box is None:
                continue
            crop = _grown(piece_box, reach, sub.shape)
            this = pieces[crop] == k
            rest = _blocks_any(occupied[crop] & ~this, block)
            if rest.any():
                near = ndimage.distance_transform_edt(~rest, sampling=spacing * block)
                attached[k] = near[_blocks_any(this, block)].min() <= limit
        if attached[1:].all() or not attached[1:].any():
            continue
        drop = np.isin(pieces, np.flatnonzero(~attached[1:]) + 1)
        sub[drop] = 0
        removed[int(value)] = int(drop.sum())
    return removed


def _grown(box, reach, shape) -> tuple:
    """``box`` (slices) grown by ``reach`` voxels per axis, clipped to ``shape``."""
    return tuple(slice(max(0, b.start - r), min(n, b.stop + r)) for b, r, n in zip(box, reach, shape))


def _blocks_any(mask: np.ndarray, block) -> np.ndarray:
    """Whether any voxel of each ``block``-sized block is set (the last blocks may be partial)."""
    return _blocks(mask, block).any(axis=(1, 3, 5))


def _blocks_max(array: np.ndarray, block) -> np.ndarray:
    """The largest value in each ``block``-sized block (0-padded)."""
    return _blocks(array, block).max(axis=(1, 3, 5))


def _blocks(array: np.ndarray, block) -> np.ndarray:
    """A 6-D view ``(I, bi, J, bj, K, bk)`` of ``array`` zero-padded to whole blocks."""
    pad = [(0, (-n) % b) for n, b in zip(array.shape, block)]
    padded = np.pad(array, pad) if any(p[1] for p in pad) else array
    shape = [n // b for n, b in zip(padded.shape, block)]
    return padded.reshape(shape[0], block[0], shape[1], block[1], shape[2], block[2])
