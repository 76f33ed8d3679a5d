"""Remove small disconnected pieces ("islands") of predicted structures.

A network's zero level set can leave a few stray voxels or blobs far from a structure. After
fusion, every connected piece of a predicted structure smaller than ``min_fraction`` of that
structure's largest piece is cleared to background (0). Pieces are 26-connected, which is the
same on flipped, permuted and oblique grids. A structure with several real parts (pulmonary
veins, left and right coronary trees) keeps every part of comparable size; given structures are
never touched (the caller passes only the predicted labels).

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
