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
#: detached pieces are measured on voxels sampled about this far apart (mm) ...
_DETACHED_SAMPLE_MM = 1.0
#: ... grouped in blocks of at least this size (mm)
_DETACHED_BLOCK_MM = 2.0


def label_pieces(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """The 26-connected pieces of a boolean mask: ``(labels, count)``, 0 outside, 1..count inside
    (numbered in any order). The ``cc3d`` package (extra "fast") when installed, about 6x faster
    than scipy's ``ndimage.label``, which is used otherwise; the pieces are the same.

    >>> mask = np.zeros((5, 5, 5), dtype=bool)
    >>> mask[0, 0, 0] = mask[1, 1, 1] = mask[3, 3, 3] = True  # the first two touch at a corner
    >>> label_pieces(mask)[1]
    2
    """
    try:
        import cc3d
    except ImportError:  # optional (extra "fast")
        from scipy import ndimage

        return ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    pieces, count = cc3d.connected_components(mask, connectivity=26, return_N=True)
    return pieces, int(count)


def remove_small_islands(labels: np.ndarray, values: Iterable[int], min_fraction: float = DEFAULT_MIN_ISLAND_FRACTION,
                         where: np.ndarray | None = None) -> dict[int, int]:
    """Clear (in place) the small pieces of each label in ``values``; returns voxels removed per label.

    ``where`` (bool, same shape): only voxels there may be removed (e.g. the newly written ones);
    pieces are still measured on the whole label. ``min_fraction <= 0`` removes nothing.
    """
    removed: dict[int, int] = {}
    if min_fraction <= 0:
        return removed
    for value in values:
        mask = labels == value
        if not mask.any():
            continue
        pieces, count = label_pieces(mask)
        if count < 2:
            continue
        sizes = np.bincount(pieces.ravel())
        sizes[0] = 0
        small = sizes < min_fraction * sizes.max()
        small[0] = False
        if not small.any():
            continue
        drop = small[pieces]  # a lookup per voxel (np.isin sorts)
        if where is not None:
            drop &= where
        labels[drop] = 0
        removed[int(value)] = int(drop.sum())
    return removed


def remove_detached_pieces(labels: np.ndarray, values: Iterable[int], spacing_mm,
                           max_gap_mm: float = DEFAULT_MAX_DETACHED_MM) -> dict[int, int]:
    """Clear (in place) the pieces of each label in ``values`` that lie farther than ``max_gap_mm``
    from every other labelled voxel (other structures and the label's other pieces), if another
    piece of the same label lies within it; returns voxels removed per label. Everything is
    measured on blocks of at least 2 mm holding the voxels of a lattice of about 1 mm (a block is
    occupied by a label if one of those voxels has it; pieces in touching blocks are one piece), so
    distances are exact to a block, a structure thinner than the lattice may go unseen (neither
    measured nor removed), and a CT grid costs about what a 1 mm grid does. ``max_gap_mm <= 0``
    removes nothing.

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

    from HeartCompletionLib.geometry.signed_distance import edt_outside

    removed: dict[int, int] = {}
    values = [int(v) for v in values]
    if max_gap_mm <= 0 or not values:
        return removed
    spacing = np.broadcast_to(np.asarray(spacing_mm, dtype=np.float64), (3,))
    # the voxels on a lattice of about 1 mm (every voxel of a grid of 1 mm or coarser), grouped in
    # blocks of at least 2 mm: a CT grid of 78 M voxels is read as 2.9 M, the blocks are 0.1 M
    step = np.maximum(1, np.floor(_DETACHED_SAMPLE_MM / spacing)).astype(int)
    block = np.maximum(1, np.ceil(_DETACHED_BLOCK_MM / (spacing * step))).astype(int)
    block_vox = step * block  # voxels of the full grid per block and axis
    block_mm = spacing * block_vox
    limit = max_gap_mm + float(np.linalg.norm(block_mm))  # neighbouring blocks may hold voxels 0 mm apart
    structure = np.ones((3, 3, 3), dtype=bool)
    present = _presence_bits(labels[::step[0], ::step[1], ::step[2]], block)
    for value in values:
        here = ((present >> np.uint64(value)) & np.uint64(1)).astype(bool)
        pieces, count = label_pieces(here)
        if count < 2:
            continue
        others = (present & ~np.uint64((1 << value) | 1)) != 0
        attached = np.zeros(count + 1, dtype=bool)
        if others.any():  # the pieces touching another structure (26-neighbouring blocks: within the limit)
            attached[np.unique(pieces[ndimage.binary_dilation(others, structure=structure)])] = True
            attached[0] = False
        boxes = ndimage.find_objects(pieces)
        reach = np.ceil(limit / block_mm).astype(int) + 1
        for k in np.flatnonzero(~attached[1:]) + 1:  # the rest: distance to the other structures and the
            crop = tuple(slice(max(0, b.start - r), min(n, b.stop + r))  # label's other pieces, within reach
                         for b, r, n in zip(boxes[k - 1], reach, pieces.shape))
            this = pieces[crop] == k
            rest = others[crop] | ((pieces[crop] > 0) & ~this)
            if rest.any():
                attached[k] = bool(edt_outside(~this, block_mm)[rest].min() <= limit)
        if attached[1:].all() or not attached[1:].any():
            continue
        count_removed = 0
        for k in np.flatnonzero(~attached[1:]) + 1:  # clear each detached piece within its blocks
            # grown by one block: voxels between the lattice's samples may sit in a neighbouring block
            # (nothing else of this label is within reach of a detached piece)
            box = ndimage.find_objects((pieces == k).astype(np.int8))[0]
            box = tuple(slice(max(0, b.start - 1), min(n, b.stop + 1)) for b, n in zip(box, pieces.shape))
            blocks = ndimage.binary_dilation(pieces[box] == k, structure=structure)
            voxels = tuple(slice(b.start * n, min(b.stop * n, size)) for b, n, size in zip(box, block_vox, labels.shape))
            sub = labels[voxels]
            drop = (sub == value) & _voxels_of_blocks(blocks, block_vox, sub.shape)
            sub[drop] = 0
            count_removed += int(drop.sum())
        removed[value] = count_removed
    return removed


def _presence_bits(labels: np.ndarray, block, slab_blocks: int = 16) -> np.ndarray:
    """For each ``block``-sized block, a uint64 with bit ``v`` set if label ``v`` (0-63) occurs in it;
    computed slab by slab along the first axis (a few tens of MB at a time on a CT grid)."""
    low, high = (int(labels.min()), int(labels.max())) if labels.size else (0, 0)
    if low < 0 or high > 63:
        raise ValueError(f"labels must be in 0..63 to measure detached pieces, got {low}..{high}")
    dtype = np.uint32 if high < 32 else np.uint64
    coarse = [-(-n // b) for n, b in zip(labels.shape, block)]
    out = np.zeros(coarse, dtype=np.uint64)
    rows = slab_blocks * int(block[0])
    for start in range(0, labels.shape[0], rows):
        bits = np.left_shift(dtype(1), labels[start:start + rows].astype(dtype))
        first = start // int(block[0])
        # per axis, the OR of the b strided slices (several times faster than a reduce over a short
        # strided axis of a 6-D view)
        for axis, b in enumerate(int(v) for v in block):
            if b == 1:
                continue
            if bits.shape[axis] % b:
                pad = [(0, 0)] * 3
                pad[axis] = (0, (-bits.shape[axis]) % b)
                bits = np.pad(bits, pad)
            index = [slice(None)] * 3
            index[axis] = slice(0, None, b)
            pooled = bits[tuple(index)].copy()
            for offset in range(1, b):
                index[axis] = slice(offset, None, b)
                pooled |= bits[tuple(index)]
            bits = pooled
        out[first:first + bits.shape[0]] = bits
    return out


def _voxels_of_blocks(blocks: np.ndarray, block, shape) -> np.ndarray:
    """The voxel mask (``shape``) of a block mask: each block repeated ``block`` times per axis."""
    full = blocks
    for axis, b in enumerate(block):
        full = np.repeat(full, b, axis=axis)
    return full[: shape[0], : shape[1], : shape[2]]
