"""Label-map files: ``.nii``/``.nii.gz`` (nibabel), ``.nrrd`` and Slicer ``.seg.nrrd`` (pynrrd),
MetaImage ``.mha``/``.mhd`` (SimpleITK, :mod:`HeartCompletionLib.io.metaimage`; Slicer ships it,
elsewhere ``pip install SimpleITK``; the other formats read without it).

Reading returns a :class:`~HeartCompletionLib.io.labelmap.LabelMap` whose ``ijk_to_ras`` maps voxel
indices to RAS millimetres exactly as the file says (NIfTI sform, else qform; NRRD ``space``,
``space directions`` and ``space origin``, LPS converted to RAS; MetaImage direction, spacing and
origin, LPS converted to RAS). Values become table labels:

- plain label maps: through ``label_conventions.apply_convention`` (the table's own values by
  default); values the table/convention lacks are warned about and become background;
- Slicer segmentations (3-D labelmap or 4-D layered ``.seg.nrrd``): each segment is matched to a
  structure by its SNOMED CT terminology code first, then by its name or a synonym
  (:func:`HeartCompletionLib.structures.segment_mapping.match_segment`, the rule the Slicer module uses). Unmatched segments are warned
  about and ignored. Where segments overlap (4-D files, one layer per group of non-overlapping
  segments), the later layer wins, as when Slicer paints segments in order into one label map,
  with a warning naming the structures and voxel counts.

A label map without any structure is **not** an error here (callers decide; ``heart-prepare``
skips such cases): ``label_map.present_labels()`` is empty. Anything that is not a label map
(float image with non-integer values, RGB/vector data, 4-D non-segmentation, negative values,
missing, unreadable or corrupt file) raises :class:`LabelMapError`, whose message starts with the
file path. So is an image whose values and histogram are not a label map's (an 8-bit intensity
image: more distinct values than the table and convention allow, most voxels of unknown values,
and not piecewise constant).

Size guard: before any voxel is read, the size the header promises is compared with the file
(an uncompressed file must hold it; a deflated one cannot expand more than ~1032:1) and with a
voxel limit (``max_voxels``; default :data:`DEFAULT_MAX_VOXELS` = 1.5 G voxels, or the
environment variable ``HEARTCOMPLETION_MAX_VOXELS``), so a crafted or truncated header never
allocates more memory than the file could justify; running out of memory anyway becomes a
:class:`LabelMapError` too. Writing is atomic (temporary file in the same folder, then ``os.replace``); the input
file is never modified.

>>> suffix_of("case_001.seg.nrrd"), suffix_of("CASE.NII.GZ")
('.seg.nrrd', '.nii.gz')
>>> case_name("data/Case_001.Seg.NRRD"), case_name("case_001.npz")
('Case_001', 'case_001.npz')

File names are one rule each, here: :func:`suffix_of` (which suffix), :func:`case_name` (the name
without it) and :func:`find_label_maps` (the label maps in a folder, sorted).
"""

from __future__ import annotations

import gzip
import math
import os
import warnings
from pathlib import Path

import numpy as np

from HeartCompletionLib.atomic_io import atomic_open
from HeartCompletionLib.errors import HeartCompletionError
from HeartCompletionLib.geometry.affine import LPS_TO_RAS
from HeartCompletionLib.structures.conventions import apply_convention, load_convention
from HeartCompletionLib.structures.segment_mapping import match_segment, terminology_entry
from HeartCompletionLib.structures.table import Structure, StructureTable

from .labelmap import LabelMap, cropped, i_fastest, labelled_box, present_values
from .metaimage import METAIMAGE_SUFFIXES

SUPPORTED_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".seg.nrrd", ".mha", ".mhd")

#: Largest label value accepted in a plain label map (beyond it, it is an intensity image).
MAX_LABEL_VALUE = 65535

#: Largest image read by default (voxels, all layers); 1.5 G voxels is a 1144^3 volume, far beyond
#: any cardiac CT (512 x 512 x 300 = 79 M) and still readable on a 32 GB workstation.
DEFAULT_MAX_VOXELS = 1_500_000_000
#: environment variable that changes the default voxel limit for every command
MAX_VOXELS_ENV = "HEARTCOMPLETION_MAX_VOXELS"
#: deflate (gzip/zlib) expands at most ~1032:1; a header promising more is lying
MAX_DEFLATE_RATIO = 1032

#: intensity-image test: refused when more distinct values than the table/convention allows, more
#: than this fraction of the non-zero voxels has a value it lacks, and fewer than
#: :data:`MIN_EQUAL_NEIGHBOURS` of neighbouring voxel pairs are equal (label maps are piecewise constant)
MAX_UNKNOWN_FRACTION = 0.5
MIN_EQUAL_NEIGHBOURS = 0.9

_AXIS_SIGNS = {"right": (0, 1), "left": (0, -1), "anterior": (1, 1), "posterior": (1, -1),
               "superior": (2, 1), "inferior": (2, -1)}
_SPACE_ABBREVIATIONS = {"r": "right", "l": "left", "a": "anterior", "p": "posterior", "s": "superior",
                        "i": "inferior"}


class LabelMapError(HeartCompletionError, ValueError):
    """A file that cannot be read or written as a label map; the message starts with its path."""

    def __init__(self, path, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path = Path(path)
        self.problem = problem


def suffix_of(path) -> str:
    """The label-map suffix of ``path`` (lower case), or :class:`LabelMapError` if unsupported."""
    name = Path(path).name.lower()
    for suffix in sorted(SUPPORTED_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return suffix
    raise LabelMapError(path, f"unsupported file type; supported: {', '.join(SUPPORTED_SUFFIXES)}")


def is_label_map_name(path) -> bool:
    """Whether ``path``'s name ends in a label-map suffix (:data:`SUPPORTED_SUFFIXES`, any case)."""
    return Path(path).name.lower().endswith(SUPPORTED_SUFFIXES)


def case_name(path) -> str:
    """The case name of a label-map file: its name without the label-map suffix, matched in any
    case and longest first (``"a/Case_1.seg.nrrd"`` -> ``"Case_1"``, not ``"Case_1.seg"``). A name
    without such a suffix (or that is only a suffix) comes back unchanged."""
    name = Path(path).name
    if not is_label_map_name(name):
        return name
    return name[: -len(suffix_of(name))] or name


def find_label_maps(folder, recursive: bool = True, include_hidden: bool = False, exclude=None) -> list[Path]:
    """The label-map files in ``folder`` (names ending in :data:`SUPPORTED_SUFFIXES`, any case), sorted by path.

    ``recursive``: also in subfolders; ``include_hidden``: also names starting with ``.`` and files
    inside such folders (below ``folder``); ``exclude``: a folder whose files are left out (e.g. an
    output folder inside the input folder). A ``.tmp`` temporary (:mod:`.atomic`) never matches.
    """
    folder = Path(folder)
    exclude = None if exclude is None else Path(exclude)
    found = []
    for path in sorted(folder.rglob("*") if recursive else folder.iterdir()):
        if not include_hidden and any(part.startswith(".") for part in path.relative_to(folder).parts):
            continue
        if exclude is not None and exclude in path.parents:
            continue
        if is_label_map_name(path) and path.is_file():
            found.append(path)
    return found


# --- segments ----------------------------------------------------------------------------
def _structure_of_segment(table: StructureTable, name: str, terminology: str | None) -> Structure | None:
    """The module's rule (:func:`segment_mapping.match_segment`: terminology code first, then
    name/synonym), plus a warning when the name points at another structure than the code."""
    structure, matched_by = match_segment(name, terminology or "", table)
    by_name = table.match_name(name) if name else None
    if matched_by == "terminology" and by_name is not None and by_name is not structure:
        warnings.warn(f"segment {name!r}: terminology says {structure.name!r}, name says {by_name.name!r}; "
                      f"using {structure.name!r}", UserWarning, stacklevel=3)
    return structure


# --- reading -------------------------------------------------------------------------------
def voxel_limit(max_voxels=None) -> tuple[int, str]:
    """``(limit, where it comes from)``: ``max_voxels`` if given, else ``$HEARTCOMPLETION_MAX_VOXELS``,
    else :data:`DEFAULT_MAX_VOXELS`. A bad value raises ``ValueError`` naming it."""
    if max_voxels is not None:
        source, raw = "max_voxels", max_voxels
    elif os.environ.get(MAX_VOXELS_ENV, "").strip():
        source, raw = MAX_VOXELS_ENV, os.environ[MAX_VOXELS_ENV]
    else:
        return DEFAULT_MAX_VOXELS, "default"
    try:
        limit = int(float(raw))
    except (TypeError, ValueError):
        limit = 0
    if limit < 1:
        raise ValueError(f"{source} must be a positive number of voxels, got {raw!r}")
    return limit, source


def _check_promise(path: Path, shape, itemsize: int, data_bytes: int | None, encoding: str, max_voxels) -> None:
    """Refuse a header whose voxel count exceeds the limit or whose data the file cannot hold,
    before anything of that size is allocated. ``data_bytes``: bytes after the header (None:
    unknown, e.g. a detached data file)."""
    limit, source = voxel_limit(max_voxels)
    shape = [int(n) for n in shape]
    if any(n < 0 for n in shape):
        raise LabelMapError(path, f"header gives a negative size {shape}")
    voxels = int(np.prod(shape, dtype=object)) if shape else 0
    if voxels > limit:
        hint = f"raise it with {MAX_VOXELS_ENV}" if source != MAX_VOXELS_ENV else f"{MAX_VOXELS_ENV} sets it"
        raise LabelMapError(path, f"image of {' x '.join(map(str, shape))} = {voxels:,} voxels exceeds the limit of "
                                  f"{limit:,} voxels ({source}; {hint} or --max_voxels where a command offers it)")
    promised = voxels * int(itemsize)
    if data_bytes is None:
        return
    if encoding == "raw" and promised > data_bytes:
        raise LabelMapError(path, f"header promises {promised:,} bytes of voxel data ({' x '.join(map(str, shape))}) "
                                  f"but the file holds {data_bytes:,}: truncated or damaged")
    if encoding == "deflate" and promised > MAX_DEFLATE_RATIO * data_bytes + 4096:
        raise LabelMapError(path, f"header promises {promised:,} bytes of voxel data ({' x '.join(map(str, shape))}) "
                                  f"but {data_bytes:,} compressed bytes cannot hold them: truncated or damaged")
    if encoding == "text" and 2 * voxels > data_bytes + 1:
        raise LabelMapError(path, f"header promises {voxels:,} values but the file holds {data_bytes:,} bytes of "
                                  "text: truncated or damaged")


def read_label_map(path, table=None, convention=None, max_voxels=None) -> LabelMap:
    """Read a label map file into table labels (int16) and its exact IJK->RAS matrix (mm).

    ``table``: a :class:`StructureTable`, a table JSON path or ``None`` (default ten structures).
    ``convention``: another dataset's numbering (see :mod:`label_conventions`) for plain label
    maps and for segments whose name/terminology match nothing.
    ``max_voxels``: refuse larger images (default: :func:`voxel_limit`).
    """
    path = Path(path)
    suffix = suffix_of(path)
    if not path.is_file():
        raise LabelMapError(path, "file not found" if not path.exists() else "not a regular file")
    table = StructureTable.from_spec(table)
    try:
        if suffix in (".nii", ".nii.gz"):
            values, ijk_to_ras, meta = _read_nifti(path, max_voxels)
            labels = _plain_labels(path, values, table, convention)
        elif suffix in METAIMAGE_SUFFIXES:
            values, ijk_to_ras, meta = _read_metaimage(path, max_voxels)
            labels = _plain_labels(path, values, table, convention)
        else:
            labels, ijk_to_ras, meta = _read_nrrd(path, table, convention, max_voxels)
        meta["format"] = suffix
        # C order whatever the file's layout, so downstream ravel/reshape never copy by surprise
        return LabelMap(c_order(labels), ijk_to_ras, source=str(path), metadata=meta)
    except LabelMapError:
        raise
    except MemoryError as exc:
        raise LabelMapError(path, f"not enough memory to read this image ({exc or 'MemoryError'}); free memory, or "
                                  f"lower the voxel limit ({MAX_VOXELS_ENV}) to refuse such files early") from None
    except (ValueError, TypeError, IndexError, OverflowError) as exc:  # geometry/convention problems
        message = str(exc)
        raise LabelMapError(path, message[len(str(path)) + 2:] if message.startswith(str(path)) else message) from exc


def _read_nifti(path: Path, max_voxels=None):
    import nibabel as nib

    try:
        img = nib.load(str(path))  # the header only
        shape, itemsize = img.shape, img.get_data_dtype().itemsize
        offset = int(getattr(img.dataobj, "offset", 0))
    except MemoryError:
        raise
    except Exception as exc:  # nibabel/gzip/zlib raise many types for corrupt files
        raise LabelMapError(path, f"cannot read NIfTI file ({type(exc).__name__}: {exc})") from exc
    compressed = path.name.lower().endswith(".gz")
    _check_promise(path, shape, itemsize, max(path.stat().st_size - (0 if compressed else offset), 0),
                   "deflate" if compressed else "raw", max_voxels)
    try:
        data = np.asanyarray(img.dataobj)
    except MemoryError:
        raise
    except Exception as exc:  # nibabel/gzip/zlib raise many types for corrupt files
        raise LabelMapError(path, f"cannot read NIfTI file ({type(exc).__name__}: {exc})") from exc
    if data.dtype.names is not None:
        raise LabelMapError(path, f"RGB/structured image ({data.dtype}) is not a label map")
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise LabelMapError(path, f"image is {data.ndim}-D with shape {data.shape}; a label map must be 3-D")
    header = img.header
    if header.get_sform(coded=True)[1] == 0 and header.get_qform(coded=True)[1] == 0:
        warnings.warn(f"{path}: neither sform nor qform is set; orientation unknown, using voxel sizes only",
                      UserWarning, stacklevel=3)
    meta = {"original_dtype": str(data.dtype)}
    return data, np.asarray(img.affine, dtype=np.float64), meta


def _metaimage_header(path: Path) -> dict:
    """:func:`sitk_io.read_header` with every failure a :class:`LabelMapError` naming the file."""
    from .metaimage import SimpleITKMissing, itk_message, read_header

    try:
        return read_header(path)
    except SimpleITKMissing as exc:
        raise LabelMapError(path, str(exc)) from None
    except MemoryError:
        raise
    except Exception as exc:  # ITK raises RuntimeError with C++ context; the header parse ValueError/OSError
        raise LabelMapError(path, f"cannot read MetaImage header ({itk_message(exc)})") from exc


def _read_metaimage(path: Path, max_voxels=None):
    from .metaimage import check_deflate, itk_message, read_metaimage

    header = _metaimage_header(path)
    if header["components"] != 1 or header["itemsize"] is None:
        raise LabelMapError(path, f"voxel type {header['pixel']!r} ({header['components']} component(s)) is not a "
                                  "label map")
    shape = header["shape"]
    if len(shape) != 3 and not (len(shape) > 3 and all(n == 1 for n in shape[3:])):
        raise LabelMapError(path, f"image is {len(shape)}-D with shape {shape}; a label map must be 3-D")
    _check_promise(path, shape, header["itemsize"], header["data_bytes"], header["encoding"], max_voxels)
    try:
        if header["encoding"] == "deflate" and header["data_path"] is not None:
            check_deflate(header["data_path"], header["data_offset"], int(np.prod(shape)) * header["itemsize"])
        data, ijk_to_ras = read_metaimage(path)
    except MemoryError:
        raise
    except Exception as exc:  # truncated or corrupt data: ITK RuntimeError
        raise LabelMapError(path, f"cannot read MetaImage file ({itk_message(exc)})") from exc
    return data, ijk_to_ras, {"original_dtype": str(data.dtype)}


def _integer_values(path: Path, data: np.ndarray) -> np.ndarray:
    """Integer label array, or :class:`LabelMapError` for intensity-like data."""
    if data.dtype == bool:
        return data.astype(np.int16)
    if np.issubdtype(data.dtype, np.floating):
        if not np.all(np.isfinite(data)) or not np.array_equal(data, np.round(data)):
            raise LabelMapError(path, f"float image ({data.dtype}) with non-integer values is not a label map")
        data = data.astype(np.int64)
    elif not np.issubdtype(data.dtype, np.integer):
        raise LabelMapError(path, f"voxel type {data.dtype} is not a label map")
    if data.size and data.min() < 0:
        raise LabelMapError(path, f"negative values (min {int(data.min())}): an intensity image, not a label map")
    if data.size and data.max() > MAX_LABEL_VALUE:
        raise LabelMapError(path, f"values up to {int(data.max())}: an intensity image, not a label map")
    return data


def _plain_labels(path, data, table, convention) -> np.ndarray:
    data = _integer_values(path, data)
    if convention in (None, "", "default") and (data.size == 0 or int(data.max()) <= len(table)):
        return c_order(data, np.int16)  # already table values: skip the lookup (a CT-sized map is 70M voxels)
    _refuse_intensity_image(path, data, table, convention)
    return apply_convention(data, table, convention, source=str(path)).astype(np.int16, copy=False)


def equal_neighbour_fraction(data: np.ndarray) -> float:
    """Fraction of neighbouring voxel pairs (along every axis) with equal values: ~1 for a label map."""
    equal = total = 0
    for axis in range(data.ndim):
        if data.shape[axis] < 2:
            continue
        for start in range(0, data.shape[0], 32):  # plane blocks: no full-size boolean temporaries
            block = data[start:start + 33] if axis == 0 else data[start:start + 32]
            if axis == 0 and block.shape[0] < 2:
                continue
            a = np.moveaxis(block, axis, 0)
            equal += int(np.count_nonzero(a[1:] == a[:-1]))
            total += (a.shape[0] - 1) * (a[0].size)
    return equal / total if total else 1.0


def _refuse_intensity_image(path, data: np.ndarray, table: StructureTable, convention) -> None:
    """:class:`LabelMapError` for an intensity image (e.g. 8-bit CT or noise) posing as a label map."""
    counts = np.bincount(data.ravel())
    mapping = load_convention(convention, table)
    known = set(table.labels) if mapping is None else {v for v, lab in mapping.items() if lab > 0}
    values = np.flatnonzero(counts)
    nonzero = int(counts[1:].sum())
    if len(values) <= len(known) + 1 or nonzero == 0:
        return
    unknown = int(sum(int(counts[v]) for v in values if v > 0 and v not in known))
    if unknown <= MAX_UNKNOWN_FRACTION * nonzero:
        return
    equal = equal_neighbour_fraction(data)
    if equal >= MIN_EQUAL_NEIGHBOURS:
        return  # piecewise constant: a label map of another numbering (warned about by apply_convention)
    raise LabelMapError(
        path, f"not a label map but an intensity image: {len(values)} distinct values (the structure table "
              f"{'and convention ' if mapping is not None else ''}allow {len(known)} + background), "
              f"{100 * unknown / nonzero:.0f} % of the non-zero voxels have values it lacks, and only "
              f"{100 * equal:.0f} % of neighbouring voxels are equal (a label map is piecewise constant). "
              "Give the segmentation, not the image (or --label_map for another numbering)")


def _nrrd_space_to_ras(path: Path, header: dict) -> np.ndarray:
    """4x4 diagonal matrix mapping the file's NRRD ``space`` to RAS."""
    space = header.get("space")
    if space is None and "space directions" not in header:
        space = "left-posterior-superior"  # no geometry at all: warned about once, by the caller
    elif space is None:
        warnings.warn(f"{path}: NRRD has no 'space' field; assuming left-posterior-superior (ITK default)",
                      UserWarning, stacklevel=4)
        space = "left-posterior-superior"
    words = str(space).strip().lower().split("-")
    if len(words) == 1 and len(words[0]) == 3:
        words = [_SPACE_ABBREVIATIONS.get(c, c) for c in words[0]]
    signs = np.ones(4)
    seen = set()
    for word in words:
        if word not in _AXIS_SIGNS:
            raise LabelMapError(path, f"unsupported NRRD space {space!r} (need an anatomical space such as "
                                      "left-posterior-superior or right-anterior-superior)")
        axis, sign = _AXIS_SIGNS[word]
        seen.add(axis)
        signs[axis] = sign
    if len(words) != 3 or seen != {0, 1, 2}:
        raise LabelMapError(path, f"unsupported NRRD space {space!r}")
    return np.diag(signs)


def _without_trailing_ones(shape) -> tuple:
    """A header's shape without trailing axes of length 1 (a 3-D image stored as 4-D or 5-D)."""
    shape = tuple(int(n) for n in shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def _nrrd_kinds(header: dict, ndim: int) -> list[str]:
    return [str(k).lower() for k in header.get("kinds", ["domain"] * ndim)]


def _nrrd_list_axis(header: dict, ndim: int) -> int:
    """The non-spatial axis of a 4-D NRRD (a segmentation's layers): the first not 'domain'/'space'."""
    return next((i for i, k in enumerate(_nrrd_kinds(header, ndim)) if k not in ("domain", "space")), 0)


def _nrrd_ijk_to_ras(path: Path, header: dict, directions) -> np.ndarray:
    """IJK -> RAS (4x4) of an NRRD header; ``directions``: its space directions (a 4-D image's list
    axis has a row of NaN, left out) or None."""
    if directions is not None:
        directions = np.asarray(directions, dtype=np.float64)
        if directions.shape == (4, 3):
            directions = directions[np.all(np.isfinite(directions), axis=1)]
    space_to_ras = _nrrd_space_to_ras(path, header)
    ijk_to_space = np.eye(4)
    if directions is None:
        spacings = np.asarray(header.get("spacings", [1.0, 1.0, 1.0]), dtype=np.float64)[-3:]
        warnings.warn(f"{path}: NRRD has no 'space directions'; using spacings {spacings.tolist()} and the "
                      "ITK default orientation (LPS axes)", UserWarning, stacklevel=4)
        ijk_to_space[:3, :3] = np.diag(spacings)
    else:
        directions = np.asarray(directions, dtype=np.float64)
        if directions.shape != (3, 3) or not np.all(np.isfinite(directions)):
            raise LabelMapError(path, f"invalid 'space directions' {directions.tolist()}")
        ijk_to_space[:3, :3] = directions.T  # each row of the header is one voxel axis
    ijk_to_space[:3, 3] = np.asarray(header.get("space origin", [0.0, 0.0, 0.0]), dtype=np.float64)
    return space_to_ras @ ijk_to_space


def read_image_geometry(path) -> tuple[tuple[int, int, int], np.ndarray]:
    """``(shape, ijk_to_ras)`` of any 3-D NIfTI, NRRD or MetaImage image (a CT, a label map, a
    Slicer segmentation), from its header alone: the grid of a reference image."""
    path = Path(path)
    suffix = suffix_of(path)
    if not path.is_file():
        raise LabelMapError(path, "file not found" if not path.exists() else "not a regular file")
    try:
        if suffix in (".nii", ".nii.gz"):
            import nibabel as nib

            img = nib.load(str(path))
            shape = _without_trailing_ones(img.shape)
            matrix = np.asarray(img.affine, dtype=np.float64)
        elif suffix in METAIMAGE_SUFFIXES:
            header = _metaimage_header(path)
            shape = _without_trailing_ones(header["shape"])
            if len(shape) != 3 or header["ijk_to_ras"] is None:
                raise LabelMapError(path, f"image of shape {tuple(header['shape'])} is not a 3-D grid")
            matrix = header["ijk_to_ras"]
        else:
            import nrrd

            with open(path, "rb") as handle:
                header = nrrd.read_header(handle)
            shape = tuple(int(n) for n in np.atleast_1d(header.get("sizes", [])))
            if len(shape) == 4:  # a segmentation's list axis
                axis = _nrrd_list_axis(header, len(shape))
                shape = shape[:axis] + shape[axis + 1:]
            matrix = _nrrd_ijk_to_ras(path, header, header.get("space directions"))
    except LabelMapError:
        raise
    except Exception as exc:  # nibabel / pynrrd raise many types for corrupt headers
        raise LabelMapError(path, f"cannot read the image header ({type(exc).__name__}: {exc})") from exc
    if len(shape) != 3 or min(shape) < 1:
        raise LabelMapError(path, f"image of shape {shape} is not a 3-D grid")
    from HeartCompletionLib.geometry.affine import validate_ijk_to_ras

    try:
        matrix = validate_ijk_to_ras(matrix, str(path))
    except ValueError as exc:
        message = str(exc)
        raise LabelMapError(path, message[len(str(path)) + 2:] if message.startswith(str(path)) else message) from None
    return shape, matrix


def _nrrd_promise(path: Path, max_voxels) -> None:
    """Check what the NRRD header promises (see :func:`_check_promise`) before pynrrd reads data."""
    import nrrd
    from nrrd.reader import _determine_datatype

    with open(path, "rb") as handle:
        header = nrrd.read_header(handle)
        data_bytes = max(path.stat().st_size - handle.tell(), 0)
    sizes = header.get("sizes")
    if sizes is None:
        raise LabelMapError(path, "NRRD header has no 'sizes'")
    itemsize = _determine_datatype(header).itemsize
    encoding = str(header.get("encoding", "raw")).lower()
    kind = {"raw": "raw", "gzip": "deflate", "gz": "deflate", "ascii": "text", "text": "text", "txt": "text"}.get(
        encoding, "unknown")
    detached = "data file" in header or "datafile" in header
    _check_promise(path, np.atleast_1d(sizes).tolist(), itemsize, None if detached else data_bytes, kind, max_voxels)


def _read_nrrd(path: Path, table, convention, max_voxels=None):
    import nrrd

    try:
        _nrrd_promise(path, max_voxels)
        data, header = nrrd.read(str(path), index_order="F")
    except (LabelMapError, MemoryError):
        raise
    except Exception as exc:  # NRRDError, gzip/zlib errors, truncated data
        raise LabelMapError(path, f"cannot read NRRD file ({type(exc).__name__}: {exc})") from exc
    kinds = _nrrd_kinds(header, data.ndim)
    is_segmentation = any(key.startswith("Segment0_") for key in header)
    if any(k in ("rgb-color", "rgba-color", "hsv-color", "xyz-color") for k in kinds):
        raise LabelMapError(path, f"colour image (kinds {kinds}) is not a label map")
    directions = header.get("space directions")
    if data.ndim == 4:
        if not is_segmentation:
            raise LabelMapError(path, f"4-D image {data.shape} without Slicer segment fields is not a label map")
        data = np.moveaxis(data, _nrrd_list_axis(header, data.ndim), 0)
    elif data.ndim != 3:
        raise LabelMapError(path, f"image is {data.ndim}-D with shape {data.shape}; a label map must be 3-D")
    ijk_to_ras = _nrrd_ijk_to_ras(path, header, directions)
    meta = {"original_dtype": str(data.dtype), "nrrd_space": header.get("space")}
    if is_segmentation:
        labels, meta["segments"] = _segmentation_labels(path, data, header, table, convention)
        meta["reference_extent_offset"] = header.get("Segmentation_ReferenceImageExtentOffset")
    else:
        labels = _plain_labels(path, data, table, convention)
        grid = _box_grid(path, header, labels.shape, max_voxels)
        if grid is not None:  # a box of a larger grid (write_label_map(box_only=True)): back on that grid
            sizes, offset = grid
            full = np.zeros(sizes, dtype=labels.dtype)
            full[tuple(slice(int(o), int(o) + n) for o, n in zip(offset, labels.shape))] = c_order(labels)
            labels = full
            ijk_to_ras = ijk_to_ras.copy()
            ijk_to_ras[:3, 3] -= ijk_to_ras[:3, :3] @ offset.astype(np.float64)
    return labels, ijk_to_ras, meta


#: NRRD key-value fields of a label map written as the box around its labels
#: (``write_label_map(box_only=True)``): the sizes of the grid it belongs to, and the grid index of
#: the box's first voxel.
GRID_SIZES_FIELD = "HeartCompletion_GridSizes"
GRID_OFFSET_FIELD = "HeartCompletion_GridOffset"


def _box_grid(path: Path, header: dict, box_shape, max_voxels):
    """``(grid sizes, box offset)`` (int64 arrays) from :data:`GRID_SIZES_FIELD` and
    :data:`GRID_OFFSET_FIELD`, checked (the box inside the grid, the grid within the voxel limit);
    None when the header has neither."""
    fields = [header.get(GRID_SIZES_FIELD), header.get(GRID_OFFSET_FIELD)]
    if fields == [None, None]:
        return None
    try:
        sizes, offset = ([int(v) for v in str(f).split()] for f in fields)
    except ValueError:
        sizes = offset = []
    box = [int(n) for n in box_shape]
    if (len(sizes) != 3 or len(offset) != 3 or min(sizes) < 1 or min(offset) < 0
            or any(o + n > s for o, n, s in zip(offset, box, sizes))):
        raise LabelMapError(path, f"the fields {GRID_SIZES_FIELD} {fields[0]!r} and {GRID_OFFSET_FIELD} {fields[1]!r} "
                                  f"do not place this {tuple(box)} box inside a 3-D grid")
    limit, where = voxel_limit(max_voxels)
    if math.prod(sizes) > limit:  # Python integers: no overflow, whatever the header says
        raise LabelMapError(path, f"the grid of {GRID_SIZES_FIELD} ({' x '.join(str(int(n)) for n in sizes)}) has "
                                  f"more voxels than the limit {limit:,} ({where})")
    return np.asarray(sizes, dtype=np.int64), np.asarray(offset, dtype=np.int64)


def _segment_fields(header: dict) -> list[dict]:
    """Segment{i}_* header fields grouped per segment, in file order."""
    segments: dict[int, dict] = {}
    for key, value in header.items():
        if key.startswith("Segment") and "_" in key:
            head, _, field = key.partition("_")
            if head[7:].isdigit():
                segments.setdefault(int(head[7:]), {})[field] = str(value)
    return [segments[i] for i in sorted(segments)]


def _segmentation_labels(path, data, header, table, convention):
    """Table labels from segment metadata: a lookup table per layer (value -> structure label)."""
    data = _integer_values(path, data)
    layers = data[None] if data.ndim == 3 else data
    mapping = load_convention(convention, table) or {}
    luts = np.zeros((layers.shape[0], int(layers.max()) + 1 if layers.size else 1), dtype=np.int16)
    described, unmapped = [], []
    for fields in _segment_fields(header):
        name = fields.get("Name", fields.get("ID", ""))
        tags = dict(t.split(":", 1) for t in fields.get("Tags", "").split("|") if ":" in t)
        terminology = tags.get("TerminologyEntry") or fields.get("Terminology")
        try:
            value, layer = int(fields.get("LabelValue", 1)), int(fields.get("Layer", 0))
        except ValueError as exc:
            raise LabelMapError(path, f"segment {name!r}: invalid LabelValue/Layer ({exc})") from exc
        if not 0 <= layer < layers.shape[0]:
            raise LabelMapError(path, f"segment {name!r}: layer {layer} but the file has {layers.shape[0]} layer(s)")
        structure = _structure_of_segment(table, name, terminology)
        if structure is None and mapping.get(value, 0) > 0:
            structure = table.by_label(mapping[value])
        described.append({"name": name, "label_value": value, "layer": layer, "terminology": terminology,
                          "structure": None if structure is None else structure.name})
        if structure is None:
            unmapped.append(name)
        elif 0 < value < luts.shape[1]:
            luts[layer, value] = structure.label
    labels = luts[0][layers[0]]
    overlaps = []
    for layer in range(1, layers.shape[0]):  # segments overlap only across layers
        above = luts[layer][layers[layer]]
        clash = (above > 0) & (labels > 0) & (above != labels)
        if clash.any():
            pairs = np.unique(np.stack([above[clash], labels[clash]]), axis=1)
            overlaps += [f"{table.by_label(a).name} over {table.by_label(b).name}" for a, b in pairs.T]
            overlaps[-1] += f" ({int(clash.sum())} voxels in layer {layer})"
        labels = np.where(above > 0, above, labels)
    if unmapped:
        warnings.warn(f"{path}: segments {unmapped} match no structure of table {table.name!r} and are ignored",
                      UserWarning, stacklevel=4)
    if overlaps:
        warnings.warn(f"{path}: overlapping segments, the later layer wins: {'; '.join(overlaps)}",
                      UserWarning, stacklevel=4)
    return labels, described


# --- writing -------------------------------------------------------------------------------
def write_label_map(label_map: LabelMap, path, table=None, box_only: bool = False) -> Path:
    """Write ``label_map`` by extension, atomically; returns the path.

    NIfTI: uint8 (int16 above 255), sform and qform = ``ijk_to_ras`` with code 1, units mm.
    NRRD: ``space: left-posterior-superior`` (what Slicer and ITK write), gzip.
    MetaImage (SimpleITK): LPS direction, spacing and origin, zlib; ``.mhd`` puts the voxels in
    ``<name>.zraw`` beside it (:func:`sitk_io.write_metaimage`).
    ``.seg.nrrd``: a 3-D labelmap with one segment per structure present, carrying the table's
    name, colour (0..1), label value and SNOMED CT terminology, readable by Slicer and slicerio.
    ``box_only`` (``.nrrd`` only): the box around the labelled voxels, in place, with the grid it
    belongs to in two header fields (:data:`GRID_SIZES_FIELD`, :data:`GRID_OFFSET_FIELD`);
    :func:`read_label_map` puts it back on that grid, other readers see the box where it lies.
    A CT label map's hand-over (the Slicer panel's input) in a third of the time.
    """
    path = Path(path)
    suffix = suffix_of(path)
    table = StructureTable.from_spec(table)
    grid_fields = None
    if box_only:
        if suffix != ".nrrd":
            raise LabelMapError(path, f"only a .nrrd file can hold a box of its grid, not {suffix}")
        box = labelled_box(label_map.labels)
        if box is not None:  # (an empty map is written whole)
            grid_fields = {GRID_SIZES_FIELD: " ".join(str(int(n)) for n in label_map.shape),
                           GRID_OFFSET_FIELD: " ".join(str(int(o)) for o in box[0])}
            label_map = cropped(label_map, *box)
    labels = np.asarray(label_map.labels)
    if labels.size and labels.min() < 0:
        raise LabelMapError(path, f"cannot write negative label values (min {int(labels.min())})")
    top = int(labels.max()) if labels.size else 0
    if top > 32767:
        raise LabelMapError(path, f"label values up to {top} do not fit int16")
    data = labels.astype(np.uint8 if top <= 255 else np.int16, copy=False)
    if suffix == ".seg.nrrd":
        unknown = [v for v in present_values(data).tolist() if v > len(table)]
        if unknown:
            raise LabelMapError(path, f"label values {unknown} are not in structure table {table.name!r}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LabelMapError(path, f"cannot create the output folder ({exc})") from exc
    # The temporary name ends in .tmp, so a folder scan never mistakes a leftover for a label map.
    try:
        if suffix in METAIMAGE_SUFFIXES:
            from .metaimage import write_metaimage

            return write_metaimage(path, data, label_map.ijk_to_ras)
        with atomic_open(path, "wb") as handle:
            if suffix in (".nii", ".nii.gz"):
                _write_nifti(handle, data, label_map.ijk_to_ras, compress=suffix == ".nii.gz")
            else:
                _write_nrrd(handle, data, label_map.ijk_to_ras, table if suffix == ".seg.nrrd" else None, grid_fields)
    except Exception as exc:
        if isinstance(exc, LabelMapError):
            raise
        from .metaimage import SimpleITKMissing, itk_message

        if isinstance(exc, SimpleITKMissing):
            raise LabelMapError(path, str(exc)) from None
        raise LabelMapError(path, f"cannot write ({type(exc).__name__}: {itk_message(exc)})") from exc
    return path


#: single-file NIfTI-1: the 348-byte header, 4 bytes of (no) extensions, then the voxels
_NIFTI_VOX_OFFSET = 352
#: gzip level of .nii.gz and .nrrd (nibabel's default; level 6 makes a CT label map 2x smaller,
#: 1.0 -> 0.5 MB, and its compression 4x slower, 0.14 -> 0.52 s)
GZIP_LEVEL = 1


def _write_nifti(handle, data: np.ndarray, ijk_to_ras: np.ndarray, compress: bool) -> None:
    """The bytes nibabel's ``Nifti1Image.to_bytes`` writes (tested), voxels in Fortran order
    streamed from a tiled transpose (a CT label map: 0.2 s instead of 0.9 s)."""
    import nibabel as nib

    affine = np.asarray(ijk_to_ras, dtype=np.float64)
    img = nib.Nifti1Image(data, affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    img.header.set_xyzt_units("mm")
    img.header.set_data_dtype(data.dtype)
    img.update_header()
    header = img.header.copy()
    header.set_data_offset(_NIFTI_VOX_OFFSET)
    header.set_slope_inter(1.0, 0.0)  # what nibabel writes for unscaled integer voxels
    head = header.binaryblock + b"\0" * (_NIFTI_VOX_OFFSET - len(header.binaryblock))
    voxels = _fortran_voxels(data)
    if compress:  # no file name or time stamp in the gzip header: same data, same bytes
        with gzip.GzipFile(filename="", mode="wb", fileobj=handle, compresslevel=GZIP_LEVEL, mtime=0) as stream:
            stream.write(head)
            stream.write(memoryview(voxels).cast("B"))
    else:
        handle.write(head)
        handle.write(memoryview(voxels).cast("B"))


def _axes_reversed(data: np.ndarray, dtype=None, tile: int = 32) -> np.ndarray:
    """``data`` (I, J, K) as a C-contiguous (K, J, I) array (cast to ``dtype`` on the way), copied
    tile by tile over (I, J): a C array's Fortran-order voxels, or, given ``a.T``, a Fortran array
    in C order. A whole-array transpose of a CT grid strides through memory: 3-10x slower."""
    ni, nj, _ = data.shape
    out = np.empty(data.shape[::-1], dtype=data.dtype if dtype is None else dtype)
    for i0 in range(0, ni, tile):
        for j0 in range(0, nj, tile):
            out[:, j0:j0 + tile, i0:i0 + tile] = data[i0:i0 + tile, j0:j0 + tile, :].transpose(2, 1, 0)
    return out


def _fortran_voxels(data: np.ndarray) -> np.ndarray:
    """The voxels of ``data`` (I, J, K) in Fortran order (i fastest, what NIfTI and NRRD store) as
    a C-contiguous (K, J, I) array: ``data.T`` itself, or a plain copy of it, when ``data`` is laid
    out that way already (e.g. a crop of a label map in VTK's order), else the tiled transpose."""
    return np.ascontiguousarray(data.T) if i_fastest(data) else _axes_reversed(data)


def c_order(data: np.ndarray, dtype=None) -> np.ndarray:
    """``data`` C-contiguous (and of ``dtype``); a 3-D array laid out i fastest (:func:`.labelmap.i_fastest`:
    what nibabel and pynrrd return, VTK's order) goes through :func:`_axes_reversed` (a CT label map
    to int16: 0.3 s instead of 1.9 s)."""
    if i_fastest(data):
        return _axes_reversed(data.T, dtype)
    return np.ascontiguousarray(data, dtype=dtype)


def _write_nrrd(handle, data: np.ndarray, ijk_to_ras: np.ndarray, table: StructureTable | None,
                extra: dict | None = None) -> None:
    import nrrd

    ijk_to_lps = LPS_TO_RAS @ np.asarray(ijk_to_ras, dtype=np.float64)
    header = {
        "type": "unsigned char" if data.dtype == np.uint8 else "short",
        "dimension": 3,
        "space": "left-posterior-superior",
        "space directions": ijk_to_lps[:3, :3].T,
        "kinds": ["domain", "domain", "domain"],
        "endian": "little",
        "encoding": "gzip",
        "space origin": ijk_to_lps[:3, 3],
    }
    header.update(extra or {})
    if table is not None:
        header.update(_segmentation_header(data, ijk_to_ras, table))
        broken = [k for k, v in header.items() if isinstance(v, str) and any(c in v for c in "\r\n\0")]
        if broken:  # a line break would end the field and garble the header (names come from checkpoints)
            raise ValueError(f"segment fields {broken} contain line breaks")
    # pynrrd writes ``tobytes(order="F")``: a Fortran-contiguous array makes that a plain copy
    nrrd.write(handle, _fortran_voxels(data).T, header, index_order="F", compression_level=GZIP_LEVEL)


def _segmentation_header(data: np.ndarray, ijk_to_ras: np.ndarray, table: StructureTable) -> dict:
    """Slicer ``.seg.nrrd`` fields (as ``vtkMRMLSegmentationStorageNode`` writes them)."""
    ni, nj, nk = data.shape
    extent = f"0 {ni - 1} 0 {nj - 1} 0 {nk - 1}"
    geometry = ";".join(f"{v:.17g}" for v in np.asarray(ijk_to_ras).ravel()) + f";{extent.replace(' ', ';')};"
    fields = {
        "Segmentation_ContainedRepresentationNames": "Binary labelmap|",
        "Segmentation_ConversionParameters": f"Reference image geometry|{geometry}|Image geometry description "
                                             "string determining the geometry of the labelmap that is created in "
                                             "course of conversion.&",
        "Segmentation_MasterRepresentation": "Binary labelmap",
        "Segmentation_SourceRepresentation": "Binary labelmap",
        "Segmentation_ReferenceImageExtentOffset": "0 0 0",
    }
    present = [int(v) for v in present_values(data) if v > 0]
    for i, label in enumerate(present):
        s = table.by_label(label)
        tags = f"Segmentation.Status:inprogress|TerminologyEntry:{terminology_entry(s)}|"
        fields.update({
            f"Segment{i}_Color": " ".join(f"{c:.6g}" for c in s.color_float),
            f"Segment{i}_ColorAutoGenerated": "0",
            f"Segment{i}_Extent": extent,
            f"Segment{i}_ID": f"Segment_{label}",
            f"Segment{i}_LabelValue": str(label),
            f"Segment{i}_Layer": "0",
            f"Segment{i}_Name": s.name,
            f"Segment{i}_NameAutoGenerated": "0",
            f"Segment{i}_Tags": tags,
        })
    return fields
