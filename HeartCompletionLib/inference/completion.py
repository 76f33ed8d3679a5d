"""Complete a partial heart: encode the given structures once, decode the missing ones hierarchically,
fuse them into the input's own voxel grid.

Steps of :func:`complete` (:func:`complete_label_map` is the same call with the fields of one
:class:`CompletionRequest` as keyword arguments; all geometry in RAS millimetres from the input's
``ijk_to_ras``; voxel indices never leave this module):

0. **Input** (:func:`_prepare_input`): the given structures of a label map, or of binary masks
   converted up front (:func:`complete_masks`: painted into one label map for the sampling, each
   mask's voxels kept), what is kept and what is predicted, and the grid the result is written on.
1. **Input points** (:func:`_encode`): area-uniform surface samples of the given structures (mm); the centre ``c``
   and the encoder points follow :mod:`HeartCompletionLib.model.encoder_input`, exactly the rule of
   training; ``x_n = (x - c) / S`` with the checkpoint's :class:`~HeartCompletionLib.geometry.normalization.Normalization`.
2. **Encode once** (:func:`_encode`; eval mode, ``torch.inference_mode``, seeded sampling: same input, same result),
   then **fit the latents** (:func:`_fit`, :mod:`.latent_fit`): a few seeded Adam steps on the latents
   only, until the decoded distances of the given structures match their true ones (30 steps, 250
   when every requested structure is given; ``fit_steps=0``: the encoder's latents as they are).
3. **Decode hierarchically** (:func:`_decode`) on the input's own voxel lattice, restricted to the *region* = the
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
4. **Fuse** (:func:`_fuse`): voxels of the given structures keep their label exactly (unless ``replace``); every
   other voxel of the region goes to the structure, among those not given, with the smallest
   signed distance when that distance is negative, and is written if that structure was asked for.
   One label per voxel by construction. Small disconnected pieces of the predicted structures
   (under ``min_island_fraction`` of the largest piece) and detached pieces (farther than
   ``max_detached_mm`` from every other structure) are cleared (:mod:`.islands`).

>>> from HeartCompletionLib.structures.table import StructureTable
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

from HeartCompletionLib.errors import HeartCompletionError
from HeartCompletionLib.geometry.affine import direction_of, ijk_to_ras_points, spacing_of, validate_ijk_to_ras
from HeartCompletionLib.io.labelmap import LabelMap, cropped, labelled_box, present_values
from HeartCompletionLib.model.encoder_input import encoder_arrays, encoder_centre_mm, select_encoder_points

from .decode_grid import (
    DEFAULT_DICE_LOSS,
    DEFAULT_ERROR_QUANTILE,
    DEFAULT_INTERP_CELL_MM,
    DEFAULT_NODE_BAND,
    DEFAULT_VOXEL_BAND,
    fast_hierarchical_labels,
)
from .islands import DEFAULT_MAX_DETACHED_MM, DEFAULT_MIN_ISLAND_FRACTION, remove_detached_pieces, remove_small_islands
from .latent_fit import (
    DEFAULT_FIT_ANCHOR,
    DEFAULT_FIT_LR,
    fit_label_map,
    fit_latents,
    fit_targets,
    resolve_fit_batch,
    resolve_fit_steps,
)
from .output_grid import box_on_grid, resample_nearest

#: Surface samples drawn from the given structures to place the heart (centre) and pick encoder
#: points; the floor per structure keeps heart-prepare's ratio (1,000 of 120,000).
SURFACE_SAMPLES = 40_000
SURFACE_FLOOR_FRACTION = 1_000 / 120_000
#: Default coarse lattice spacing (mm) and region margin around the given structures (mm). The
#: refinement test is sound for any cell size (a 1-Lipschitz field crossing a cell has a corner
#: within half its diagonal), so a coarse first lattice only saves queries far from every surface:
#: 16 mm instead of 8 gave the bundled model's labels voxel for voxel on the CT and 1 mm benchmark
#: hearts and 112 real label maps, from 5 % fewer queries (21 % on thick-slice MRI); a rough field,
#: not 1-Lipschitz, may differ in a few voxels (docs/benchmarks.md, session 19).
DEFAULT_GRID_SPACING_MM = 16.0
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
                        "voxel_band": DEFAULT_VOXEL_BAND, "error_quantile": DEFAULT_ERROR_QUANTILE,
                        "dice_loss": DEFAULT_DICE_LOSS}

_CORNERS = np.array(list(product((0, 1), repeat=3)), dtype=np.int64)
# progress fractions: sampling+encoding, then decoding, then fusion
_P_ENCODED, _P_DECODED = 0.15, 0.92


class CompletionCancelled(RuntimeError):
    """Raised when the ``cancel()`` hook returned True; nothing is written."""


class CompletionError(HeartCompletionError, ValueError):
    """An input that cannot be completed (the message names its source and the problem)."""


class NoGivenStructureError(CompletionError):
    """The input holds none of the table's structures: nothing to complete from."""


@dataclass
class CompletionResult:
    """Output of :func:`complete_label_map`.

    ``label_map``: the completed label map in the input's geometry (same shape, ``ijk_to_ras``).
    ``completed_labels``: structures predicted and written; ``given_labels``: structures taken
    from the input. ``timings``: seconds per step; ``grid``: lattice sizes (region voxels, coarse
    nodes, refined queries, ...). ``signed_distance_mm``: label -> float32 volume (mm, negative
    inside, NaN outside the region), only when asked for. ``messages``: warnings for the user.
    ``fit_losses``: when the latents were fitted (``fit_steps``; None: 30 steps, 250 when every
    requested structure is given, :func:`.latent_fit.resolve_fit_steps`), the fitting loss (mean
    |error| of the given structures' signed distances, network units, on each step's batch) before
    each step and after the last.
    """

    label_map: LabelMap
    completed_labels: list[int]
    given_labels: list[int]
    timings: dict = field(default_factory=dict)
    grid: dict = field(default_factory=dict)
    centre_mm: np.ndarray | None = None
    signed_distance_mm: dict | None = None
    messages: list[str] = field(default_factory=list)
    fit_losses: list[float] | None = None

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
        if key in ("error_quantile", "dice_loss") and value > 1:
            raise CompletionError(f"fast decode option {key} must be a fraction in [0, 1], got {value:g}")
        options[key] = value
    return options


@dataclass(frozen=True)
class CompletionRequest:
    """What to complete and how: the options of :func:`complete_label_map` in one frozen value.

    ``heart-complete`` (:mod:`.complete_cli`, also the Slicer panel's background process) builds
    one from its options and passes it to :func:`complete`; :func:`complete_label_map` builds one
    from its keyword arguments. ``structures``: names, synonyms or labels to produce (None: every
    structure absent from the input); ``fast_options``: see :func:`complete_label_map`;
    ``output_grid``: ``(shape, ijk_to_ras)`` or None (the input's grid). Lattice lengths and the
    decode mode/options are checked on construction (:class:`CompletionError`); the device when the
    model is loaded, the structures and the output grid against the checkpoint's table and the input.
    """

    structures: tuple | None = None
    replace: bool = False
    device: str = "auto"
    seed: int = 0
    num_input_points: int | None = None
    grid_spacing_mm: float | None = None
    margin_mm: float = DEFAULT_MARGIN_MM
    refine_factor: float = DEFAULT_REFINE_FACTOR
    decode: str = DEFAULT_DECODE
    fast_options: Mapping[str, float] | None = None
    min_island_fraction: float = DEFAULT_MIN_ISLAND_FRACTION
    chunk_size: int | None = None
    output_grid: tuple | None = None
    hierarchical: bool = True
    return_signed_distance: bool = False
    max_detached_mm: float = DEFAULT_MAX_DETACHED_MM
    fit_steps: int | None = None
    fit_lr: float = DEFAULT_FIT_LR
    fit_anchor: float = DEFAULT_FIT_ANCHOR
    fit_batch: int | None = None

    def __post_init__(self) -> None:
        if self.structures is not None and not isinstance(self.structures, tuple):
            object.__setattr__(self, "structures", tuple(self.structures))
        _check_lengths(self.grid_spacing_mm, self.margin_mm)
        _check_decode(self.decode, self.fast_options)
        if not (np.isfinite(self.max_detached_mm) and self.max_detached_mm >= 0):
            raise CompletionError(f"max_detached_mm must be a length >= 0 mm, got {self.max_detached_mm!r}")
        steps = self.fit_steps
        if steps is not None and (not isinstance(steps, (int, np.integer)) or isinstance(steps, bool) or steps < 0):
            raise CompletionError(f"fit_steps must be a whole number of steps >= 0 or None (auto), got {steps!r}")
        if not (isinstance(self.fit_lr, (int, float)) and np.isfinite(self.fit_lr) and self.fit_lr > 0):
            raise CompletionError(f"fit_lr must be a number > 0, got {self.fit_lr!r}")
        if not (isinstance(self.fit_anchor, (int, float)) and np.isfinite(self.fit_anchor) and self.fit_anchor >= 0):
            raise CompletionError(f"fit_anchor must be a number >= 0, got {self.fit_anchor!r}")
        batch = self.fit_batch
        if batch is not None and (not isinstance(batch, (int, np.integer)) or isinstance(batch, bool) or batch < 1):
            raise CompletionError(f"fit_batch must be a whole number of points >= 1 or None (auto), got {batch!r}")
        if batch is not None:
            object.__setattr__(self, "fit_batch", int(batch))
        if steps is not None:
            object.__setattr__(self, "fit_steps", int(steps))

    @property
    def fast_decode_options(self) -> dict:
        """The fast decode's options with the defaults filled in (:mod:`.decode_grid`)."""
        return _check_decode(self.decode, self.fast_options)


def _resolve_checkpoint(checkpoint, device):
    from HeartCompletionLib.model.checkpoint import load_inference_checkpoint

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


@dataclass
class _Input:
    """The input of one completion after :func:`_prepare_input`, on the grid the result is written on.

    ``base``: the kept given voxels (0 elsewhere) on the output grid; ``sample_map``: the given
    structures on the input's grid (their surfaces are sampled there); ``given``: labels present;
    ``kept``: given labels written as given; ``requested``: labels to predict and write;
    ``given_lo/hi``: the given voxels' box on the input grid; ``region_lo/hi``: that box on the
    output grid, whose matrix is ``geometry``.
    """

    base: np.ndarray
    sample_map: LabelMap
    given: list[int]
    kept: list[int]
    requested: list[int]
    given_lo: np.ndarray
    given_hi: np.ndarray
    region_lo: np.ndarray
    region_hi: np.ndarray
    geometry: np.ndarray


def _label_map_given(label_map: LabelMap, table):
    """``(label_map, given labels)`` of a label map in the table's values (other values refused)."""
    k = len(table)
    values = present_values(label_map.labels)
    unknown = [int(v) for v in values if v < 0 or v > k]
    if unknown:
        raise CompletionError(
            f"{label_map.source}: label value(s) {unknown} are not structures of the checkpoint's table "
            f"(1..{k}: {table.names}); map them first (label convention)"
        )
    return label_map, [int(v) for v in values if v > 0]


def _masks_given(source, ijk_to_ras, table):
    """``(sampling label map, given labels, masks)`` of ``{label: bool mask}`` on one grid: the
    masks painted into one label map for the surface sampling (where they overlap the later label
    wins); the masks themselves give the kept voxels."""
    k = len(table)
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
    return LabelMap(painted, ijk_to_ras, source="<segments>"), given, masks


def _given_input(source, ijk_to_ras, table, structures, replace):
    """``(base labels, sampling LabelMap, given, kept, requested)`` from a LabelMap or mask dict."""
    k = len(table)
    if isinstance(source, LabelMap):
        (label_map, given), masks = _label_map_given(source, table), None
    else:
        label_map, given, masks = _masks_given(source, ijk_to_ras, table)
    if not given:
        raise NoGivenStructureError(f"{label_map.source}: no structure of the table {table.names} in the input")
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


def _prepare_input(source, ijk_to_ras, table, request: CompletionRequest) -> _Input:
    """Step 0: the given structures, what to keep and to predict, and the grid the result is written
    on (the input's, or ``request.output_grid`` with the kept voxels carried over by nearest neighbour)."""
    try:
        base, sample_map, given, kept, requested = _given_input(source, ijk_to_ras, table, request.structures,
                                                                request.replace)
    except KeyError as exc:
        raise CompletionError(f"structures to complete: {exc.args[0]}") from exc
    geometry = sample_map.ijk_to_ras
    given_lo, given_hi = labelled_box(sample_map.labels)
    region_lo, region_hi = given_lo, given_hi  # the given box on the grid the result is written on
    if request.output_grid is not None:
        out_shape, out_matrix = request.output_grid
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
    return _Input(base, sample_map, given, kept, requested, given_lo, given_hi, region_lo, region_hi, geometry)


def _region(given_lo, given_hi, shape, ijk_to_ras, margin_mm: float):
    """``(lo, hi)`` voxel box (half-open) around the given voxels' box plus ``margin_mm``, in the image."""
    pad = np.ceil(margin_mm / spacing_of(ijk_to_ras)).astype(np.int64)
    return np.maximum(0, given_lo - pad), np.minimum(np.asarray(shape), given_hi + pad)


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


@dataclass
class _Decoded:
    """Output of :func:`_decode`: labels of the region ``[lo, hi)`` of the output grid (0 = none),
    the requested structures' distances there (dense decode only), lattice stats, query count."""

    region_labels: np.ndarray
    sdf: np.ndarray | None
    stats: dict
    lo: np.ndarray
    hi: np.ndarray
    strides: np.ndarray
    queries: int


def _encode(inp: _Input, ck, dev, request: CompletionRequest, step, timings: dict):
    """Steps 1-2: surface points of the given structures -> centre and encoder points (the training
    rule) -> latents, encoded once. Returns ``(latents, centre_mm)``; call under ``inference_mode``."""
    import torch

    from HeartCompletionLib.geometry.surface import coarse_structure_surfaces, sample_structure_surfaces

    step(0.02, "sampling the input surfaces")
    t = time.perf_counter()
    rng = np.random.default_rng(request.seed)
    floor = max(1, int(SURFACE_SAMPLES * SURFACE_FLOOR_FRACTION))
    # the given structures' box only: the same surfaces without passes over the whole image
    # (a map finer than 1 mm is block-averaged to about 1 mm first: the same surfaces to well under
    # a voxel of the training data, several times faster at CT resolution)
    canonical = closest_canonical(cropped(inp.sample_map, inp.given_lo, inp.given_hi))
    meshes = coarse_structure_surfaces(canonical, inp.given)
    points, normals, point_labels = sample_structure_surfaces(
        canonical, inp.given, SURFACE_SAMPLES, rng, min_per_structure=floor, meshes=meshes)
    points = np.asarray(points, dtype=np.float64)
    index = np.asarray(point_labels, dtype=np.int64) - 1
    inputs = [lab - 1 for lab in inp.given]
    centre = encoder_centre_mm(points, index, inputs)
    n_points = int(request.num_input_points or ck.num_input_points)
    chosen = select_encoder_points(index, inputs, n_points, rng, min_per_structure=ck.min_per_structure)
    xyz_n, onehot = encoder_arrays(points[chosen], index[chosen], centre, ck.normalization, len(ck.table))
    timings["surface_s"] = time.perf_counter() - t
    step(0.1, "encoding the input structures")

    t = time.perf_counter()
    nrm = torch.from_numpy(np.asarray(normals, dtype=np.float32)[chosen])[None].to(dev) \
        if ck.config.use_normals else None
    latents, _ = ck.model.encode(torch.from_numpy(xyz_n)[None].to(dev), torch.from_numpy(onehot)[None].to(dev), nrm)
    timings["encode_s"] = time.perf_counter() - t
    return latents, centre, _Surfaces(canonical, meshes, points, index, rng)


@dataclass
class _Surfaces:
    """What :func:`_encode` sampled, for :func:`_fit`: the cropped about-1 mm map of the given
    structures, their meshes, the surface samples (mm) with class indices, the seeded generator."""

    label_map: LabelMap
    meshes: dict
    points: np.ndarray
    index: np.ndarray
    rng: np.random.Generator


def _fit(inp: _Input, ck, latents, centre, surfaces: _Surfaces, request: CompletionRequest, steps: int, step,
         timings: dict):
    """Step 2b (``steps`` > 0, :func:`.latent_fit.resolve_fit_steps`; points per step:
    :func:`.latent_fit.resolve_fit_batch`): the latents fitted to the given structures
    (:mod:`.latent_fit`); outside ``inference_mode``, the model's weights untouched."""
    step(0.11, "fitting the latents to the given structures")
    t = time.perf_counter()
    fit_map = fit_label_map(surfaces.label_map, inp.given)  # about 1 mm
    # the sampling meshes are the same blocks' partial-volume surfaces: on a CT heart they bring the
    # targets nearer the 0.4 mm map's distances than the block map's own meshes (within 3 mm of a
    # surface: mean error 0.06 against 0.11 mm), and are not extracted again (0.9 -> 0.4 s)
    targets = fit_targets(fit_map, surfaces.meshes, surfaces.points, surfaces.index, inp.given,
                          surfaces.rng, inp.sample_map.shape, inp.sample_map.ijk_to_ras,
                          truncated=inp.sample_map.border_labels())
    def report(fraction: float) -> None:  # progress through the fit; step() also honours cancel
        step(0.11 + (_P_ENCODED - 0.11) * fraction, "fitting the latents to the given structures")

    latents, losses = fit_latents(ck.model, latents, targets, centre, ck.normalization, steps,
                                  lr=request.fit_lr, anchor=request.fit_anchor, seed=request.seed,
                                  batch=resolve_fit_batch(request.fit_batch, inp.requested, inp.given),
                                  report=report)
    timings["fit_s"] = time.perf_counter() - t
    return latents, losses


def _decode(inp: _Input, ck, dev, latents, centre, request: CompletionRequest, step, cancel,
            timings: dict) -> _Decoded:
    """Step 3: decode in the region around the given structures on the output grid's own voxel
    lattice (hierarchical fast or exact, or dense); call under ``inference_mode``."""
    step(_P_ENCODED, "decoding signed distances")
    t = time.perf_counter()
    table, kept, requested, geometry = ck.table, inp.kept, inp.requested, inp.geometry
    competing = [lab - 1 for lab in table.labels if lab not in kept]
    write = [lab if lab in requested else 0 for lab in table.labels if lab not in kept]
    chunk_size = request.chunk_size
    if chunk_size is None:
        chunk_size = DEFAULT_CPU_CHUNK if dev.type == "cpu" else DEFAULT_CHUNK
    fld = _Field(ck.model, latents, centre, ck.normalization, competing, write, dev, int(chunk_size), cancel,
                 keep_sdf=[lab - 1 for lab in requested] if request.return_signed_distance else None)
    lo, hi = _region(inp.region_lo, inp.region_hi, inp.base.shape, geometry, request.margin_mm)

    def report(f: float) -> None:
        step(_P_ENCODED + (_P_DECODED - _P_ENCODED) * f, "decoding signed distances")

    grid_spacing_mm = DEFAULT_GRID_SPACING_MM if request.grid_spacing_mm is None else request.grid_spacing_mm
    strides = _coarse_strides(spacing_of(geometry), grid_spacing_mm)
    sdf = None
    hierarchical = request.hierarchical and not request.return_signed_distance
    if hierarchical and request.decode == "fast":
        # the kept given voxels: fusion never writes over them, so their labels need no decoding
        box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
        settled = inp.base[box] != 0 if inp.kept else None
        region_labels, stats = fast_hierarchical_labels(fld.competing_sdf, write, lo, hi, geometry, strides,
                                                        request.refine_factor, report, settled=settled,
                                                        **request.fast_decode_options)
    elif hierarchical:
        region_labels, stats = _hierarchical_labels(fld, lo, hi, geometry, strides, request.refine_factor, report)
    else:
        region_labels, sdf = _dense_labels(fld, lo, hi, geometry, report)
        stats = {"levels": [{"stride_vox": [1, 1, 1], "cells": int(np.prod(hi - lo)), "queries": fld.queries}]}
    timings["decode_s"] = time.perf_counter() - t
    return _Decoded(region_labels, sdf, stats, lo, hi, strides, int(fld.queries))


def _fuse(result: CompletionResult, inp: _Input, decoded: _Decoded, table, request: CompletionRequest, step,
          timings: dict) -> None:
    """Step 4: predicted voxels only where no kept given structure is; small pieces cleared; the
    result's labels, messages and signed distances filled in place."""
    step(_P_DECODED, "fusing the structures")
    t = time.perf_counter()
    requested = inp.requested
    box = tuple(slice(int(a), int(b)) for a, b in zip(decoded.lo, decoded.hi))
    out = result.label_map.labels
    sub = out[box]
    boxes = _fuse_slabs(sub, decoded.region_labels, requested)
    timings["fusion_write_s"] = time.perf_counter() - t
    t_islands = time.perf_counter()
    removed = {}
    for lab, crop in boxes.items():  # each structure in its own bounding box: the same pieces, far fewer voxels
        # a requested label occurs only where it was just written (kept labels are never requested)
        removed.update(remove_small_islands(sub[crop], [lab], request.min_island_fraction))
    detached = remove_detached_pieces(sub, list(boxes), spacing_of(inp.geometry), request.max_detached_mm)
    timings["islands_s"] = time.perf_counter() - t_islands
    result.messages += [f"{table.by_label(lab).name}: removed {n} voxels in small disconnected pieces"
                        for lab, n in removed.items() if n]
    result.messages += [f"{table.by_label(lab).name}: removed {n} voxels in pieces more than "
                        f"{request.max_detached_mm:g} mm from every other structure" for lab, n in detached.items() if n]
    result.completed_labels = list(requested)
    result.messages += [f"{table.by_label(lab).name}: the model predicts no voxel" for lab in requested
                        if lab not in boxes]
    if decoded.sdf is not None:
        result.signed_distance_mm = {}
        for j, lab in enumerate(requested):
            vol = np.full(out.shape, np.nan, dtype=np.float32)
            vol[box] = decoded.sdf[..., j]
            result.signed_distance_mm[lab] = vol
    timings["fusion_s"] = time.perf_counter() - t


def _grid_stats(decoded: _Decoded, geometry, output_voxels: int) -> dict:
    lo, hi, strides, stats = decoded.lo, decoded.hi, decoded.strides, decoded.stats
    coarse = int(stats["levels"][0]["queries"])
    return {
        "region_lo_vox": lo.tolist(), "region_hi_vox": hi.tolist(),
        "region_voxels": int(np.prod(hi - lo)), "output_voxels": int(output_voxels),
        "coarse_stride_vox": strides.tolist(),
        "coarse_spacing_mm": (strides * spacing_of(geometry)).round(4).tolist(),
        "coarse_nodes": coarse,
        "refined_queries": int(decoded.queries - coarse),
        "queries": int(decoded.queries), **stats,
    }


def complete(
    label_map,
    checkpoint,
    request: CompletionRequest | None = None,
    progress: Callable[[float, str], None] | None = None,
    cancel: Callable[[], bool] | None = None,
    ijk_to_ras=None,
) -> CompletionResult:
    """Complete ``label_map`` (a :class:`LabelMap`, or ``{label: bool mask}`` with ``ijk_to_ras``) as
    ``request`` asks (default: every missing structure, the defaults of :class:`CompletionRequest`).

    The steps: :func:`_prepare_input` (given, kept and requested structures; output grid),
    :func:`_encode`, :func:`_decode`, :func:`_fuse`. ``progress`` and ``cancel``: see
    :func:`complete_label_map`, which is this function with the request's fields as keyword arguments.
    """
    import torch

    request = CompletionRequest() if request is None else request
    t_start = time.perf_counter()
    timings: dict[str, float] = {}

    def step(fraction: float, message: str) -> None:
        if cancel is not None and cancel():
            raise CompletionCancelled("completion cancelled")
        if progress is not None:
            progress(float(min(max(fraction, 0.0), 1.0)), message)

    step(0.0, "loading the model")
    ck, dev = _resolve_checkpoint(checkpoint, request.device)
    inp = _prepare_input(label_map, ijk_to_ras, ck.table, request)
    timings["load_s"] = time.perf_counter() - t_start
    result = CompletionResult(LabelMap(inp.base, inp.geometry, inp.sample_map.source, dict(inp.sample_map.metadata)),
                              [], inp.given, timings)
    if not inp.requested:  # e.g. a full heart: the input comes back unchanged, with the same timings keys
        result.messages.append(f"{inp.sample_map.source}: nothing to complete (every requested structure is given)")
        timings["total_s"] = time.perf_counter() - t_start
        step(1.0, "nothing to complete")
        return result

    with torch.inference_mode():
        latents, centre, surfaces = _encode(inp, ck, dev, request, step, timings)
    steps = resolve_fit_steps(request.fit_steps, inp.requested, inp.given)
    if steps > 0:
        latents, result.fit_losses = _fit(inp, ck, latents, centre, surfaces, request, steps, step, timings)
    with torch.inference_mode():
        decoded = _decode(inp, ck, dev, latents, centre, request, step, cancel, timings)
    _fuse(result, inp, decoded, ck.table, request, step, timings)
    timings["total_s"] = time.perf_counter() - t_start
    result.centre_mm = centre
    result.grid = _grid_stats(decoded, inp.geometry, result.label_map.labels.size)
    step(1.0, "done")
    return result


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
    max_detached_mm: float = DEFAULT_MAX_DETACHED_MM,
    fit_steps: int | None = None,
    fit_lr: float = DEFAULT_FIT_LR,
    fit_anchor: float = DEFAULT_FIT_ANCHOR,
    fit_batch: int | None = None,
) -> CompletionResult:
    """Complete ``label_map`` with the model of ``checkpoint``; see the module docstring for the steps.

    The keyword arguments other than ``progress``, ``cancel`` and ``ijk_to_ras`` are the fields of a
    :class:`CompletionRequest`; ``complete(label_map, checkpoint, request)`` is the same call.

    ``label_map``: a :class:`LabelMap` with the checkpoint table's values, or a dict
    ``{label: bool mask (I, J, K)}`` (e.g. Slicer segments, may overlap) with ``ijk_to_ras``.
    ``checkpoint``: an ``InferenceCheckpoint`` or a path. ``structures``: names, synonyms or
    labels to produce (default: every structure absent from the input); a given structure in it
    is kept as given unless ``replace`` (then it is re-predicted; the encoder still sees it).
    ``device``: ``"auto"`` (CUDA if available), ``"cpu"``, ``"cuda"``. ``progress(fraction,
    message)`` is called with increasing fractions in [0, 1]; ``cancel()`` returning True raises
    :class:`CompletionCancelled`. ``num_input_points``: encoder points (default: as in training).
    ``grid_spacing_mm``: coarse lattice spacing (> 0; default 16 mm); ``margin_mm``: region around the
    given structures (>= 0); other values raise :class:`CompletionError`. An input that already
    holds every requested structure comes back unchanged with a "nothing to complete" message. ``hierarchical=False`` decodes every region voxel (slow reference);
    ``return_signed_distance`` also decodes densely and returns the requested structures' distances.
    ``min_island_fraction``: predicted pieces smaller than this fraction of the structure's largest
    piece are cleared (:mod:`HeartCompletionLib.inference.islands`; 0 keeps every piece), and so are pieces lying
    more than ``max_detached_mm`` (default 15) from every other structure while another piece of the
    same structure is attached (0 keeps them). ``decode``: ``"fast"``
    (default) or ``"exact"`` (see the module docstring); ``fast_options`` tunes the fast decode
    (``interp_cell_mm``, ``node_band``, ``voxel_band``, ``error_quantile``, ``dice_loss``, see
    :mod:`.decode_grid`); an unknown mode, key or a negative value raises :class:`CompletionError`.
    ``chunk_size``: queries per model call (default 4,096 on the CPU, 16,384 on a GPU).
    ``output_grid``: ``(shape, ijk_to_ras)`` of another grid to write the result on
    (:mod:`.output_grid`: grown, resampled or a reference image's); the given structures are
    carried onto it by nearest neighbour and kept, their surfaces still
    sampled on the input's grid (default: the input's grid). ``fit_steps``: Adam steps fitting the
    encoded latents to the given structures before decoding (:mod:`.latent_fit`; None, the default:
    30, or 250 when every requested structure is given, a reconstruction; 0: off), ``fit_lr`` its
    step size relative to the latents' RMS, ``fit_anchor`` the weight pulling them back to the
    encoder's, ``fit_batch`` the fitting points decoded per step (None: 512, or 2,048 for a
    reconstruction, :func:`.latent_fit.resolve_fit_batch`).
    """
    request = CompletionRequest(
        structures=structures, replace=replace, device=device, seed=seed, num_input_points=num_input_points,
        grid_spacing_mm=grid_spacing_mm, margin_mm=margin_mm, refine_factor=refine_factor, decode=decode,
        fast_options=fast_options, min_island_fraction=min_island_fraction, chunk_size=chunk_size,
        output_grid=output_grid, hierarchical=hierarchical, return_signed_distance=return_signed_distance,
        max_detached_mm=max_detached_mm, fit_steps=fit_steps, fit_lr=fit_lr, fit_anchor=fit_anchor,
        fit_batch=fit_batch,
    )
    return complete(label_map, checkpoint, request, progress=progress, cancel=cancel, ijk_to_ras=ijk_to_ras)


def complete_masks(masks: Mapping[int, np.ndarray], ijk_to_ras, checkpoint, request: CompletionRequest | None = None,
                   **kwargs) -> CompletionResult:
    """:func:`complete_label_map` for binary masks ``{table label: bool (I, J, K)}`` on one grid.

    The masks become a label map for the surface sampling plus the kept voxels of each given mask
    (:func:`_masks_given`) before the shared steps. ``request`` (a :class:`CompletionRequest`) or
    the keyword arguments of :func:`complete_label_map`, not both. Use
    :meth:`CompletionResult.predicted_mask` for the new structures: they never overlap any given
    mask, even where given masks overlap each other.
    """
    if request is None:
        return complete_label_map(dict(masks), checkpoint, ijk_to_ras=ijk_to_ras, **kwargs)
    hooks = {key: kwargs.pop(key) for key in ("progress", "cancel") if key in kwargs}
    if kwargs:
        raise TypeError(f"complete_masks: give the options in the request, not also as {sorted(kwargs)}")
    return complete(dict(masks), checkpoint, request, ijk_to_ras=ijk_to_ras, **hooks)
