"""Complete a partial heart: encode the given structures once, decode the missing ones hierarchically,
fuse them into the input's own voxel grid.

Steps of :func:`complete_label_map` (all geometry in RAS millimetres from the input's
``ijk_to_ras``; voxel indices never leave this module):

1. **Input points**: area-uniform surface samples of the given structures (mm); the centre ``c``
   and the encoder points follow :mod:`HeartCompletionLib.encoder_input`, exactly the rule of
   training; ``x_n = (x - c) / S`` with the checkpoint's :class:`~.normalization.Normalization`.
2. **Encode once** (eval mode, ``torch.inference_mode``, seeded sampling: same input, same result).
3. **Decode hierarchically** on the input's own voxel lattice, restricted to the *region* = the
   given structures' bounding box plus ``margin_mm``, clipped to the image: every
   ``2**L``-th voxel first (about ``grid_spacing_mm``), then cells whose corners disagree or lie
   within ``refine_factor`` x half a cell diagonal (mm) of a surface are split in two along each
   axis, down to single voxels. Uniform cells are filled from their corners. Queries are the
   voxel centres' RAS positions, so oblique, flipped and anisotropic grids need nothing special.
   ``decode="fast"`` (default) visits the same cells but, inside cells of at most 4 mm, interpolates
   the competing distances trilinearly and decodes exactly only the nodes and voxels whose label
   the interpolation leaves in doubt (:mod:`.decode_grid`); ``decode="exact"`` decodes every voxel
   of every refined cell (the reference: at CT resolution about 10x the queries, same labels to
   Dice >= 0.99 and ASSD <= 0.2 mm, see ``benchmarks/complete_speed.py --ct``).
4. **Fuse**: voxels of the given structures keep their label exactly (unless ``replace``); every
   other voxel of the region goes to the structure, among those not given, with the smallest
   signed distance when that distance is negative, and is written if that structure was asked for.
   One label per voxel by construction. Small disconnected pieces of the predicted structures
   (under ``min_island_fraction`` of the largest piece) are cleared (:mod:`.islands`).

>>> from HeartCompletionLib.structures import StructureTable
>>> resolve_structures(StructureTable.default(), ["LAA", 9, "10", "left ventricle"])
[3, 8, 9, 10]
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from .decode_grid import (
    DEFAULT_INTERP_CELL_MM,
    DEFAULT_NODE_BAND,
    DEFAULT_VOXEL_BAND,
    fast_hierarchical_labels,
)
from .encoder_input import encoder_arrays, encoder_centre_mm, select_encoder_points
from .errors import HeartCompletionError
from .geometry import direction_of, ijk_to_ras_points, spacing_of, validate_ijk_to_ras
from .islands import DEFAULT_MIN_ISLAND_FRACTION, remove_small_islands
from .labelmap import LabelMap

#: Surface samples drawn from the given structures to place the heart (centre) and pick encoder
#: points; the floor per structure keeps heart-prepare's ratio (1,000 of 120,000).
SURFACE_SAMPLES = 40_000
SURFACE_FLOOR_FRACTION = 1_000 / 120_000
#: Default coarse lattice spacing (mm) and region margin around the given structures (mm).
DEFAULT_GRID_SPACING_MM = 8.0
DEFAULT_MARGIN_MM = 60.0
#: A cell is refined when a corner's |signed distance| < factor x half its diagonal (1 is exact
#: for a true distance function; > 1 allows for a network that is not perfectly 1-Lipschitz).
DEFAULT_REFINE_FACTOR = 1.0
#: Queries decoded per model call on a GPU: bounds memory.
DEFAULT_CHUNK = 16_384
#: Queries per model call on the CPU: activations that stay in the caches decode about twice as
#: fast as 16,384 (small: 66k vs 34k queries/s on 2 threads of the 2-core machine).
DEFAULT_CPU_CHUNK = 4_096

#: Decoding of the fine levels: "fast" interpolates inside cells of at most ~2 mm and decodes
#: exactly only where a label could change (:mod:`.decode_grid`); "exact" decodes every voxel of
#: every cell near a surface (the reference).
DECODE_MODES = ("fast", "exact")
DEFAULT_DECODE = "fast"
FAST_OPTION_DEFAULTS = {"interp_cell_mm": DEFAULT_INTERP_CELL_MM, "node_band": DEFAULT_NODE_BAND,
                        "voxel_band": DEFAULT_VOXEL_BAND}

_CORNERS = np.array(list(product((0, 1), repeat=3)), dtype=np.int64)
# progress fractions: sampling+encoding, then decoding, then fusion
_P_ENCODED, _P_DECODED = 0.15, 0.92


class CompletionCancelled(RuntimeError):
    """Raised when the ``cancel()`` hook returned True; nothing is written."""


class CompletionError(HeartCompletionError, ValueError):
    """An input that cannot be completed (the message names its source and the problem)."""


@dataclass
class CompletionResult:
    """Output of :func:`complete_label_map`.

    ``label_map``: the completed label map in the input's geometry (same shape, ``ijk_to_ras``).
    ``completed_labels``: structures predicted and written; ``given_labels``: structures taken
    from the input. ``timings``: seconds per step; ``grid``: lattice sizes (region voxels, coarse
    nodes, refined queries, ...). ``signed_distance_mm``: label -> float32 volume (mm, negative
    inside, NaN outside the region), only when asked for. ``messages``: warnings for the user.
    """

    label_map: LabelMap
    completed_labels: list[int]
    given_labels: list[int]
    timings: dict = field(default_factory=dict)
    grid: dict = field(default_factory=dict)
    centre_mm: np.ndarray | None = None
    signed_distance_mm: dict | None = None
    messages: list[str] = field(default_factory=list)

    def predicted_mask(self, label: int) -> np.ndarray:
        """Voxels the model added for ``label`` (never overlaps a given structure)."""
        if label not in self.completed_labels:
            raise KeyError(f"label {label} was not completed (completed: {self.completed_labels})")
        return self.label_map.labels == label


def resolve_structures(table, structures) -> list[int]:
    """Table labels for names, synonyms or label values (sorted, unique); ``KeyError`` if unknown."""
    labels = set()
    for s in structures:
        if isinstance(s, (int, np.integer)) and not isinstance(s, bool):
            labels.add(table.by_label(int(s)).label)
        elif isinstance(s, str) and s.strip().isdigit():  # "9" from a command line
            labels.add(table.by_label(int(s)).label)
        else:
            labels.add(table.by_name(str(s)).label)
    return sorted(labels)


def check_device(device):
    """The ``torch.device`` for ``"auto"`` (CUDA if available), ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...

    Raises :class:`CompletionError` when CUDA is asked for but not available (callers check this
    before reading any input).
    """
    import torch

    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise CompletionError(f"device {device!r}: {exc}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CompletionError(f"device {device!r} was asked for but CUDA is not available (torch {torch.__version__})")
    return dev


def _check_lengths(grid_spacing_mm, margin_mm) -> None:
    """Refuse decoding-lattice options that would be silently replaced or decode every voxel."""
    if grid_spacing_mm is not None and not (np.isfinite(grid_spacing_mm) and grid_spacing_mm > 0):
        raise CompletionError(f"grid_spacing_mm must be a length > 0 mm, got {grid_spacing_mm!r}")
    if not (np.isfinite(margin_mm) and margin_mm >= 0):
        raise CompletionError(f"margin_mm must be a length >= 0 mm, got {margin_mm!r}")


def _check_decode(decode, fast_options) -> dict:
    """The fast decode's options (defaults filled in); refuses an unknown mode, key or value."""
    if decode not in DECODE_MODES:
        raise CompletionError(f"decode must be one of {', '.join(DECODE_MODES)}, got {decode!r}")
    options = dict(FAST_OPTION_DEFAULTS)
    for key, value in (fast_options or {}).items():
        if key not in FAST_OPTION_DEFAULTS:
            raise CompletionError(f"fast decode option {key!r} is unknown (known: {', '.join(FAST_OPTION_DEFAULTS)})")
        try:
            value = float(value)
        except (TypeError, ValueError):
            value = float("nan")
        if not (np.isfinite(value) and value >= 0):
            raise CompletionError(f"fast decode option {key} must be a number >= 0, got {fast_options[key]!r}")
        options[key] = value
    return options


def _resolve_checkpoint(checkpoint, device):
    from .checkpoint import load_inference_checkpoint

    dev = check_device(device)
    if isinstance(checkpoint, (str, Path)):
        checkpoint = load_inference_checkpoint(checkpoint, device=dev)
    # a preloaded checkpoint is moved in place (the Slicer module keeps one between runs)
    checkpoint.model.to(dev).eval()
    return checkpoint, dev


def closest_canonical(label_map: LabelMap) -> LabelMap:
    """The same voxels stored with their axes closest to R, A, S (a view, no copy).

    Exact for flips and axis permutations, so surface sampling (and hence the whole completion)
    does not depend on how an image happens to be stored; oblique grids keep their voxels too.
    """
    direction = direction_of(label_map.ijk_to_ras)
    perm = [int(a) for a in np.argmax(np.abs(direction), axis=1)]  # voxel axis closest to R, A, S
    if sorted(perm) != [0, 1, 2]:
        return label_map
    labels = np.transpose(label_map.labels, perm)
    m = label_map.ijk_to_ras[:, perm + [3]].copy()
    for axis in range(3):
        if m[axis, axis] < 0:
            labels = np.flip(labels, axis)
            m[:3, 3] += m[:3, axis] * (labels.shape[axis] - 1)
            m[:3, axis] *= -1.0
    return LabelMap(labels, m, label_map.source, label_map.metadata)


def _present_values(labels: np.ndarray) -> np.ndarray:
    """``np.unique(labels)`` of an integer label volume, slab by slab (no full-size int64 copy)."""
    if labels.size == 0 or labels.ndim == 0 or labels.dtype.kind not in "iu":
        return np.unique(labels)
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high > 65_535:
        return np.unique(labels)
    counts = np.zeros(high + 1, dtype=np.int64)
    for plane in labels:  # one slab at a time: the int64 cast stays small
        counts += np.bincount(plane.ravel(), minlength=high + 1)
    return np.flatnonzero(counts).astype(labels.dtype)


def _fuse_slabs(sub: np.ndarray, region_labels: np.ndarray, labels) -> dict:
    """Write ``region_labels`` into the free (0) voxels of ``sub`` in place, one slab at a time (no
    full-size temporaries), and return the bounding box (slices) of each of ``labels`` in ``sub``."""
    seen = {lab: [np.zeros(n, dtype=bool) for n in sub.shape] for lab in labels}
    for i in range(sub.shape[0]):
        r, s = region_labels[i], sub[i]
        if not r.any():
            continue
        np.copyto(s, r, casting="unsafe", where=(r > 0) & (s == 0))
        for lab in labels:
            m = s == lab
            if m.any():
                seen[lab][0][i] = True
                seen[lab][1] |= m.any(axis=1)
                seen[lab][2] |= m.any(axis=0)
    boxes = {}
    for lab, flags in seen.items():
        if flags[0].any():
            boxes[lab] = tuple(slice(int(np.argmax(f)), int(len(f) - np.argmax(f[::-1]))) for f in flags)
    return boxes


def _given_input(source, ijk_to_ras, table, structures, replace):
    """``(base labels, sampling LabelMap, given, kept, requested)`` from a LabelMap or mask dict."""
    k = len(table)
    if isinstance(source, LabelMap):
        label_map = source
        values = _present_values(label_map.labels)
        unknown = [int(v) for v in values if v < 0 or v > k]
        if unknown:
            raise CompletionError(
                f"{label_map.source}: label value(s) {unknown} are not structures of the checkpoint's table "
                f"(1..{k}: {table.names}); map them first (label convention)"
            )
        given = [int(v) for v in values if v > 0]
        masks = None
    else:
        if ijk_to_ras is None:
            raise CompletionError("binary masks need their ijk_to_ras (4x4, RAS mm)")
        masks = {int(lab): np.asarray(m, dtype=bool) for lab, m in source.items()}
        shapes = {m.shape for m in masks.values()}
        if len(shapes) != 1 or len(next(iter(shapes))) != 3:
            raise CompletionError(f"masks must be 3-D and share one shape, got {sorted(shapes)}")
        bad = [lab for lab in masks if not 1 <= lab <= k]
        if bad:
            raise CompletionError(f"mask label(s) {bad} are not structures of the table (1..{k})")
        given = sorted(lab for lab, m in masks.items() if m.any())
        painted = np.zeros(next(iter(shapes)), dtype=np.uint8 if k < 255 else np.uint16)
        for lab in given:  # where masks overlap the later label wins (only for sampling)
            painted[masks[lab]] = lab
        label_map = LabelMap(painted, ijk_to_ras, source="<segments>")
    if not given:
        raise CompletionError(f"{label_map.source}: no structure of the table {table.names} in the input")
    requested = sorted(set(table.labels) - set(given)) if structures is None else resolve_structures(table, structures)
    replaced = [lab for lab in requested if lab in given] if replace else []
    kept = [lab for lab in given if lab not in replaced]
    requested = [lab for lab in requested if lab not in kept]
    dtype = label_map.labels.dtype if np.iinfo(label_map.labels.dtype).max >= k else np.uint16
    if masks is None:
        base = label_map.labels.astype(dtype, copy=True)
        if replaced:
            base[np.isin(base, replaced)] = 0
    else:
        base = np.zeros(label_map.shape, dtype=dtype)
        for lab in kept:
            base[masks[lab]] = lab
    return base, label_map, given, kept, requested


def _given_box(labels: np.ndarray):
    """``(lo, hi)`` voxel box (half-open) of the given (> 0) voxels, found slab by slab."""
    seen = [np.zeros(n, dtype=bool) for n in labels.shape]
    for i, plane in enumerate(labels):  # slab by slab: no full-size temporary
        m = plane > 0
        if m.any():
            seen[0][i] = True
            seen[1] |= m.any(axis=1)
            seen[2] |= m.any(axis=0)
    idx = [np.flatnonzero(f) for f in seen]
    return np.array([int(i[0]) for i in idx]), np.array([int(i[-1]) + 1 for i in idx])


def _region(given_lo, given_hi, shape, ijk_to_ras, margin_mm: float):
    """``(lo, hi)`` voxel box (half-open) around the given voxels' box plus ``margin_mm``, in the image."""
    pad = np.ceil(margin_mm / spacing_of(ijk_to_ras)).astype(np.int64)
    return np.maximum(0, given_lo - pad), np.minimum(np.asarray(shape), given_hi + pad)


def _cropped(label_map: LabelMap, lo, hi) -> LabelMap:
    """The voxels ``[lo, hi)`` of ``label_map`` (a view) with the matrix that keeps them in place."""
    m = np.asarray(label_map.ijk_to_ras, dtype=np.float64).copy()
    m[:3, 3] = m[:3, :3] @ np.asarray(lo, dtype=np.float64) + m[:3, 3]
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    return LabelMap(label_map.labels[box], m, label_map.source, label_map.metadata)


class _Field:
    """Decodes RAS points (mm) into (output label, min |sdf| of competing structures in mm).

    ``competing``: class indices not given (they share the free voxels); ``write_labels``: table
    label to write for each competing index (0 when it was not asked for).
    """

    def __init__(self, model, latents, centre_mm, normalization, competing, write_labels, device, chunk,
                 cancel, keep_sdf=None):
        import torch

        self.torch, self.model, self.latents = torch, model, latents
        self.centre, self.norm, self.device, self.chunk, self.cancel = centre_mm, normalization, device, chunk, cancel
        self.competing = torch.as_tensor(competing, device=device)
        self.write = torch.as_tensor(write_labels, dtype=torch.int16, device=device)
        self.keep_sdf = None if keep_sdf is None else torch.as_tensor(keep_sdf, device=device)
        self.queries = 0

    def _decoded_mm(self, points_mm: np.ndarray, report: Callable[[float], None]):
        """Yield ``(start, stop, sdf_mm)``: every structure's distance (mm, a device tensor) at
        ``points_mm[start:stop]``, chunk by chunk, honouring cancel and reporting progress."""
        n = len(points_mm)
        for start in range(0, n, self.chunk):
            if self.cancel is not None and self.cancel():
                raise CompletionCancelled("completion cancelled")
            stop = min(n, start + self.chunk)
            q = self.norm.points_to_network(points_mm[start:stop], self.centre).astype(np.float32)
            q = self.torch.from_numpy(q).to(self.device)[None]
            yield start, stop, self.norm.distance_to_mm(self.model.decode(self.latents, q, chunk_size=None)[0])
            self.queries += stop - start
            report(stop / n)

    def __call__(self, points_mm: np.ndarray, report: Callable[[float], None]):
        torch, n = self.torch, len(points_mm)
        labels = np.zeros(n, dtype=np.int16)
        margin = np.zeros(n, dtype=np.float32)
        sdf_out = None if self.keep_sdf is None else np.zeros((n, len(self.keep_sdf)), dtype=np.float32)
        for start, stop, sdf_mm in self._decoded_mm(points_mm, report):
            comp = sdf_mm[:, self.competing]
            best, which = comp.min(dim=1)
            labels[start:stop] = torch.where(best < 0, self.write[which], 0).cpu().numpy()
            margin[start:stop] = comp.abs().min(dim=1).values.cpu().numpy()
            if sdf_out is not None:
                sdf_out[start:stop] = sdf_mm[:, self.keep_sdf].cpu().numpy()
        return labels, margin, sdf_out

    def competing_sdf(self, points_mm: np.ndarray, report: Callable[[float], None]) -> np.ndarray:
        """Signed distances (n, C) float32 mm of the competing structures at ``points_mm``."""
        out = np.zeros((len(points_mm), len(self.competing)), dtype=np.float32)
        for start, stop, sdf_mm in self._decoded_mm(points_mm, report):
            out[start:stop] = sdf_mm[:, self.competing].float().cpu().numpy()
        return out


def _coarse_strides(spacing: np.ndarray, grid_spacing_mm: float) -> np.ndarray:
    """Per-axis powers of two (voxels) closest below ``grid_spacing_mm`` (nested lattices)."""
    ratio = np.maximum(grid_spacing_mm / spacing, 1.0)
    return (2 ** np.floor(np.log2(ratio + 1e-9))).astype(np.int64)


def _hierarchical_labels(fld: _Field, lo, hi, ijk_to_ras, strides, refine_factor, report):
    """Labels of the region voxels ``[lo, hi)`` (int16) by coarse-to-fine decoding, and stats."""
    size = hi - lo
    spacing = spacing_of(ijk_to_ras)
    n_cells = -(-size // strides)
    dims = n_cells * strides + 1  # padded lattice; voxels beyond the region are cropped at the end
    out = np.zeros(n_cells * strides, dtype=np.int16)  # whole cells; nodes on the far faces are dropped
    keys = np.zeros(0, dtype=np.int64)
    labs = np.zeros(0, dtype=np.int16)
    marg = np.zeros(0, dtype=np.float32)
    cells = np.stack(np.meshgrid(*[np.arange(n) for n in n_cells], indexing="ij"), -1).reshape(-1, 3)
    stride = strides.copy()
    levels = int(np.log2(strides.max())) + 1
    per_level = []
    for level in range(levels):
        t = time.perf_counter()
        # linear lattice index of each cell's 8 corners (index arithmetic is linear: no (C, 8, 3) array)
        corner_keys = (np.ravel_multi_index((cells * stride).T, dims)[:, None]
                       + np.ravel_multi_index((_CORNERS * stride).T, dims)[None]).reshape(-1)
        needed = np.unique(corner_keys)
        pos = np.searchsorted(keys, needed).clip(max=max(len(keys) - 1, 0))
        new = needed[~(keys[pos] == needed)] if len(keys) else needed
        ijk = np.stack(np.unravel_index(new, dims), -1) + lo
        span = (level / levels, (level + 1) / levels)
        new_labs, new_marg, _ = fld(ijk_to_ras_points(ijk, ijk_to_ras), lambda f, s=span: report(s[0] + f * (s[1] - s[0])))
        order = np.argsort(np.concatenate([keys, new]), kind="stable")
        keys = np.concatenate([keys, new])[order]
        labs = np.concatenate([labs, new_labs])[order]
        marg = np.concatenate([marg, new_marg])[order]
        per_level.append({"stride_vox": stride.tolist(), "cells": len(cells), "queries": len(new),
                          "seconds": round(time.perf_counter() - t, 3)})
        if (stride == 1).all() or len(cells) == 0:
            break
        at = np.searchsorted(keys, corner_keys).reshape(-1, 8)
        corner_labs, corner_marg = labs[at], marg[at]
        tau = refine_factor * 0.5 * float(np.linalg.norm(stride * spacing))
        active = (corner_labs != corner_labs[:, :1]).any(1) | (corner_marg.min(1) < tau)
        # uniform cells: fill their voxel block from the corners (finer levels overwrite the rest)
        idle, idle_lab = cells[~active], corner_labs[~active, 0]
        blocks = out.reshape(n_cells[0] * strides[0] // stride[0], stride[0], n_cells[1] * strides[1] // stride[1],
                             stride[1], n_cells[2] * strides[2] // stride[2], stride[2])  # a view: out is contiguous
        blocks[idle[:, 0], :, idle[:, 1], :, idle[:, 2], :] = idle_lab[:, None, None, None]
        split = np.where(stride > 1, 2, 1)
        children = np.array(list(product(*[range(s) for s in split])), dtype=np.int64)
        cells = (cells[active][:, None, :] * split + children[None]).reshape(-1, 3)
        stride = stride // split
    node = np.stack(np.unravel_index(keys, dims), -1)
    keep = np.all(node < np.array(out.shape), axis=1)
    out[tuple(node[keep].T)] = labs[keep]  # every decoded voxel is exact
    crop = tuple(slice(0, int(n)) for n in size)
    return out[crop], {"levels": per_level}


def _dense_labels(fld: _Field, lo, hi, ijk_to_ras, report):
    """Every region voxel decoded (reference for tests, and needed for signed distances)."""
    size = hi - lo
    ijk = np.stack(np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi)], indexing="ij"), -1).reshape(-1, 3)
    labs, _, sdf = fld(ijk_to_ras_points(ijk, ijk_to_ras), report)
    sdf = None if sdf is None else sdf.reshape(*size, -1)
    return labs.reshape(*size), sdf


def complete_label_map(
    label_map,
    checkpoint,
    structures=None,
    replace: bool = False,
    device="auto",
    progress: Callable[[float, str], None] | None = None,
    cancel: Callable[[], bool] | None = None,
    num_input_points: int | None = None,
    seed: int = 0,
    grid_spacing_mm: float | None = None,
    margin_mm: float = DEFAULT_MARGIN_MM,
    refine_factor: float = DEFAULT_REFINE_FACTOR,
    hierarchical: bool = True,
    return_signed_distance: bool = False,
    chunk_size: int | None = None,
    ijk_to_ras=None,
    min_island_fraction: float = DEFAULT_MIN_ISLAND_FRACTION,
    decode: str = DEFAULT_DECODE,
    fast_options: Mapping[str, float] | None = None,
    output_grid=None,
) -> CompletionResult:
    """Complete ``label_map`` with the model of ``checkpoint``; see the module docstring for the steps.

    ``label_map``: a :class:`LabelMap` with the checkpoint table's values, or a dict
    ``{label: bool mask (I, J, K)}`` (e.g. Slicer segments, may overlap) with ``ijk_to_ras``.
    ``checkpoint``: an ``InferenceCheckpoint`` or a path. ``structures``: names, synonyms or
    labels to produce (default: every structure absent from the input); a given structure in it
    is kept as given unless ``replace`` (then it is re-predicted; the encoder still sees it).
    ``device``: ``"auto"`` (CUDA if available), ``"cpu"``, ``"cuda"``. ``progress(fraction,
    message)`` is called with increasing fractions in [0, 1]; ``cancel()`` returning True raises
    :class:`CompletionCancelled`. ``num_input_points``: encoder points (default: as in training).
    ``grid_spacing_mm``: coarse lattice spacing (> 0; default 8 mm); ``margin_mm``: region around the
    given structures (>= 0); other values raise :class:`CompletionError`. An input that already
    holds every requested structure comes back unchanged with a "nothing to complete" message. ``hierarchical=False`` decodes every region voxel (slow reference);
    ``return_signed_distance`` also decodes densely and returns the requested structures' distances.
    ``min_island_fraction``: predicted pieces smaller than this fraction of the structure's largest
    piece are cleared (:mod:`HeartCompletionLib.islands`; 0 keeps every piece). ``decode``: ``"fast"``
    (default) or ``"exact"`` (see the module docstring); ``fast_options`` tunes the fast decode
    (``interp_cell_mm``, ``node_band``, ``voxel_band``, see :mod:`.decode_grid`); an unknown mode,
    key or a negative value raises :class:`CompletionError`. ``chunk_size``: queries per model call
    (default 4,096 on the CPU, 16,384 on a GPU). ``output_grid``: ``(shape, ijk_to_ras)`` of another
    grid to write the result on (:mod:`.output_grid`: grown, resampled or a reference image's); the
    given structures are carried onto it by nearest neighbour and kept, their surfaces still
    sampled on the input's grid (default: the input's grid).
    """
    import torch

    t_start = time.perf_counter()
    timings: dict[str, float] = {}

    def step(fraction: float, message: str) -> None:
        if cancel is not None and cancel():
            raise CompletionCancelled("completion cancelled")
        if progress is not None:
            progress(float(min(max(fraction, 0.0), 1.0)), message)

    _check_lengths(grid_spacing_mm, margin_mm)
    fast = _check_decode(decode, fast_options)
    step(0.0, "loading the model")
    ck, dev = _resolve_checkpoint(checkpoint, device)
    table, norm = ck.table, ck.normalization
    k = len(table)
    try:
        base, sample_map, given, kept, requested = _given_input(label_map, ijk_to_ras, table, structures, replace)
    except KeyError as exc:
        raise CompletionError(f"structures to complete: {exc.args[0]}") from exc
    geometry = sample_map.ijk_to_ras
    given_lo, given_hi = _given_box(sample_map.labels)
    region_lo, region_hi = given_lo, given_hi  # the given box on the grid the result is written on
    if output_grid is not None:
        from .output_grid import box_on_grid, resample_nearest

        out_shape, out_matrix = output_grid
        try:
            out_matrix = validate_ijk_to_ras(out_matrix, "output grid")
        except ValueError as exc:
            raise CompletionError(str(exc)) from None
        out_shape = tuple(int(n) for n in out_shape)
        if len(out_shape) != 3 or min(out_shape) < 1:
            raise CompletionError(f"output grid: shape {out_shape} is not a 3-D grid")
        base = resample_nearest(base, geometry, out_shape, out_matrix)
        region_lo, region_hi = box_on_grid(given_lo, given_hi, geometry, out_shape, out_matrix)
        if np.any(region_hi <= region_lo):
            raise CompletionError(f"{sample_map.source}: the given structures lie outside the output grid")
        geometry = out_matrix
    timings["load_s"] = time.perf_counter() - t_start
    result = CompletionResult(LabelMap(base, geometry, sample_map.source, dict(sample_map.metadata)), [], given,
                              timings)
    if not requested:  # e.g. a full heart: the input comes back unchanged, with the same timings keys
        result.messages.append(f"{sample_map.source}: nothing to complete (every requested structure is given)")
        timings["total_s"] = time.perf_counter() - t_start
        step(1.0, "nothing to complete")
        return result

    # 1. input surface points in mm -> centre and encoder points (the training rule)
    step(0.02, "sampling the input surfaces")
    from .surface import coarse_structure_surfaces, sample_structure_surfaces

    t = time.perf_counter()
    rng = np.random.default_rng(seed)
    floor = max(1, int(SURFACE_SAMPLES * SURFACE_FLOOR_FRACTION))
    # the given structures' box only: the same surfaces without passes over the whole image
    # (a map finer than 1 mm is block-averaged to about 1 mm first: the same surfaces to well under
    # a voxel of the training data, several times faster at CT resolution)
    canonical = closest_canonical(_cropped(sample_map, given_lo, given_hi))
    points, normals, point_labels = sample_structure_surfaces(
        canonical, given, SURFACE_SAMPLES, rng, min_per_structure=floor,
        meshes=coarse_structure_surfaces(canonical, given))
    points = np.asarray(points, dtype=np.float64)
    index = np.asarray(point_labels, dtype=np.int64) - 1
    inputs = [lab - 1 for lab in given]
    centre = encoder_centre_mm(points, index, inputs)
    n_points = int(num_input_points or ck.num_input_points)
    chosen = select_encoder_points(index, inputs, n_points, rng, min_per_structure=ck.min_per_structure)
    xyz_n, onehot = encoder_arrays(points[chosen], index[chosen], centre, norm, k)
    timings["surface_s"] = time.perf_counter() - t
    step(0.1, "encoding the input structures")

    with torch.inference_mode():
        t = time.perf_counter()
        nrm = torch.from_numpy(np.asarray(normals, dtype=np.float32)[chosen])[None].to(dev) \
            if ck.config.use_normals else None
        latents, _ = ck.model.encode(torch.from_numpy(xyz_n)[None].to(dev), torch.from_numpy(onehot)[None].to(dev), nrm)
        timings["encode_s"] = time.perf_counter() - t
        step(_P_ENCODED, "decoding signed distances")

        # 3. decode in the region around the given structures, on the input's own voxel lattice
        t = time.perf_counter()
        competing = [lab - 1 for lab in table.labels if lab not in kept]
        write = [lab if lab in requested else 0 for lab in table.labels if lab not in kept]
        if chunk_size is None:
            chunk_size = DEFAULT_CPU_CHUNK if dev.type == "cpu" else DEFAULT_CHUNK
        fld = _Field(ck.model, latents, centre, norm, competing, write, dev, int(chunk_size), cancel,
                     keep_sdf=[lab - 1 for lab in requested] if return_signed_distance else None)
        lo, hi = _region(region_lo, region_hi, base.shape, geometry, margin_mm)

        def report(f: float) -> None:
            step(_P_ENCODED + (_P_DECODED - _P_ENCODED) * f, "decoding signed distances")

        strides = _coarse_strides(spacing_of(geometry),
                                  DEFAULT_GRID_SPACING_MM if grid_spacing_mm is None else grid_spacing_mm)
        sdf = None
        if hierarchical and not return_signed_distance and decode == "fast":
            region_labels, stats = fast_hierarchical_labels(fld.competing_sdf, write, lo, hi, geometry, strides,
                                                            refine_factor, report, **fast)
        elif hierarchical and not return_signed_distance:
            region_labels, stats = _hierarchical_labels(fld, lo, hi, geometry, strides, refine_factor, report)
        else:
            region_labels, sdf = _dense_labels(fld, lo, hi, geometry, report)
            stats = {"levels": [{"stride_vox": [1, 1, 1], "cells": int(np.prod(hi - lo)), "queries": fld.queries}]}
        timings["decode_s"] = time.perf_counter() - t

    # 4. fusion: predicted voxels only where no kept given structure is
    step(_P_DECODED, "fusing the structures")
    t = time.perf_counter()
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    out = result.label_map.labels
    sub = out[box]
    boxes = _fuse_slabs(sub, region_labels, requested)
    timings["fusion_write_s"] = time.perf_counter() - t
    t_islands = time.perf_counter()
    removed = {}
    for lab, crop in boxes.items():  # each structure in its own bounding box: the same pieces, far fewer voxels
        # a requested label occurs only where it was just written (kept labels are never requested)
        removed.update(remove_small_islands(sub[crop], [lab], min_island_fraction))
    timings["islands_s"] = time.perf_counter() - t_islands
    result.messages += [f"{table.by_label(lab).name}: removed {n} voxels in small disconnected pieces"
                        for lab, n in removed.items() if n]
    result.completed_labels = list(requested)
    result.messages += [f"{table.by_label(lab).name}: the model predicts no voxel" for lab in requested
                        if lab not in boxes]
    if sdf is not None:
        result.signed_distance_mm = {}
        for j, lab in enumerate(requested):
            vol = np.full(out.shape, np.nan, dtype=np.float32)
            vol[box] = sdf[..., j]
            result.signed_distance_mm[lab] = vol
    timings["fusion_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t_start
    result.centre_mm = centre
    result.grid = {
        "region_lo_vox": lo.tolist(), "region_hi_vox": hi.tolist(),
        "region_voxels": int(np.prod(hi - lo)), "output_voxels": int(out.size),
        "coarse_stride_vox": strides.tolist(),
        "coarse_spacing_mm": (strides * spacing_of(geometry)).round(4).tolist(),
        "coarse_nodes": int(stats["levels"][0]["queries"]),
        "refined_queries": int(fld.queries - stats["levels"][0]["queries"]),
        "queries": int(fld.queries), **stats,
    }
    step(1.0, "done")
    return result


def complete_masks(masks: Mapping[int, np.ndarray], ijk_to_ras, checkpoint, **kwargs) -> CompletionResult:
    """:func:`complete_label_map` for binary masks ``{table label: bool (I, J, K)}`` on one grid.

    Use :meth:`CompletionResult.predicted_mask` for the new structures: they never overlap any
    given mask, even where given masks overlap each other.
    """
    return complete_label_map(dict(masks), checkpoint, ijk_to_ras=ijk_to_ras, **kwargs)
