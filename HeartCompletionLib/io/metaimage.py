"""MetaImage label maps (``.mha``, ``.mhd`` + ``.raw``/``.zraw``) through SimpleITK.

The format mechanics only; :mod:`HeartCompletionLib.io.labelmap_files` holds the policy (which files,
voxel limits, label values, :class:`~HeartCompletionLib.io.labelmap_files.LabelMapError`). SimpleITK is
imported inside the functions: 3D Slicer ships it, pip users install it with ``pip install
SimpleITK`` (the ``formats`` extra), and everything else reads without it.

ITK's physical space is LPS: a voxel ``(i, j, k)`` is at ``origin + D @ diag(spacing) @ (i, j, k)``
(``D`` = ``GetDirection()``, row major). :func:`ijk_to_ras_of` turns that into this project's
4x4 IJK->RAS matrix exactly (``LPS_TO_RAS @ ijk_to_lps``), and :func:`write_metaimage` goes back.
SimpleITK's numpy arrays are indexed ``[k, j, i]``; arrays here are ``[i, j, k]`` like nibabel's.

>>> import numpy as np
>>> m = ijk_to_ras_of(spacing=(0.5, 0.5, 2.0), origin=(10.0, 20.0, 30.0), direction=np.eye(3).ravel())
>>> np.diag(m)[:3].tolist(), m[:3, 3].tolist()   # LPS axes and origin, in RAS
([-0.5, -0.5, 2.0], [-10.0, -20.0, 30.0])
"""

from __future__ import annotations

import re
import zlib
from pathlib import Path

import numpy as np

from HeartCompletionLib.atomic_io import atomic_path, atomic_write_bytes
from HeartCompletionLib.errors import HeartCompletionError
from HeartCompletionLib.geometry.affine import LPS_TO_RAS

METAIMAGE_SUFFIXES = (".mha", ".mhd")
INSTALL_HINT = "pip install SimpleITK"

#: bytes per voxel of SimpleITK's scalar pixel types (vector/complex types are not label maps)
_ITEMSIZE = {"UInt8": 1, "Int8": 1, "UInt16": 2, "Int16": 2, "UInt32": 4, "Int32": 4, "UInt64": 8, "Int64": 8,
             "Float32": 4, "Float64": 8}
#: the MetaImage header is text; no real one is this long (a crafted one is refused, not scanned on)
_MAX_HEADER_BYTES = 1 << 20


class SimpleITKMissing(HeartCompletionError, ImportError):
    """SimpleITK is not installed (``labelmap_io`` turns it into a ``LabelMapError`` naming the file)."""


def import_simpleitk():
    try:
        import SimpleITK as sitk
    except ImportError as exc:
        raise SimpleITKMissing(f"MetaImage (.mha/.mhd) files need SimpleITK, which is not installed here "
                               f"({INSTALL_HINT}; 3D Slicer ships it)") from exc
    return sitk


def itk_message(exc: Exception) -> str:
    """The useful line of an ITK exception (they carry C++ file names and several lines)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in lines:
        if "ERROR" in line or "Error" in line or "error" in line:
            return re.sub(r"^.*?(sitk::)?ERROR:\s*", "", line)[:300]
    return (lines[-1] if lines else type(exc).__name__)[:300]


def ijk_to_ras_of(spacing, origin, direction) -> np.ndarray:
    """4x4 IJK->RAS (mm) from ITK's LPS ``spacing``, ``origin`` and row-major 3x3 ``direction``."""
    ijk_to_lps = np.eye(4)
    ijk_to_lps[:3, :3] = np.asarray(direction, dtype=np.float64).reshape(3, 3) @ np.diag(np.asarray(spacing, float))
    ijk_to_lps[:3, 3] = np.asarray(origin, dtype=np.float64)
    return LPS_TO_RAS @ ijk_to_lps


def read_header(path: Path) -> dict:
    """What a MetaImage header promises, before any voxel is read: ``shape`` (I, J, K...),
    ``itemsize`` (bytes per voxel), ``components``, ``ijk_to_ras`` (None unless 3-D),
    ``data_bytes`` (bytes the data can hold: the rest of a ``.mha``, the size of a ``.mhd``'s data
    file; None when the data lies in several files) and ``encoding`` (``raw``/``deflate``/``text``).

    SimpleITK's ``ReadImageInformation`` gives the grid and pixel type; where the data starts and
    how it is stored are read from the header text (``ElementDataFile``, ``CompressedData``,
    ``BinaryData``), which ITK does not report."""
    sitk = import_simpleitk()
    reader = sitk.ImageFileReader()
    reader.SetImageIO("MetaImageIO")  # the suffix says MetaImage: never let ITK guess another format
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    shape = tuple(int(n) for n in reader.GetSize())
    pixel = sitk.GetPixelIDValueAsString(reader.GetPixelID())
    components = int(reader.GetNumberOfComponents())
    itemsize = {getattr(sitk, f"sitk{name}"): size for name, size in _ITEMSIZE.items()}.get(reader.GetPixelID())
    ijk_to_ras = None
    if len(shape) == 3:
        ijk_to_ras = ijk_to_ras_of(reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection())
    fields, header_bytes = _header_fields(path)
    data_file = fields.get("elementdatafile", "")
    target = path.parent / data_file
    data_path, data_offset = None, 0
    if data_file.upper() == "LOCAL":
        data_path, data_offset = path, header_bytes
        data_bytes = max(path.stat().st_size - header_bytes, 0)
    elif data_file and target.is_file():
        data_path, data_bytes = target, target.stat().st_size
    elif data_file.upper().startswith("LIST") or "%" in data_file:
        data_bytes = None  # one file per slice: bounded by the voxel limit only
    else:
        raise FileNotFoundError(f"its data file {data_file!r} ({target}) is missing or not a regular file")
    if fields.get("binarydata", "true").lower() == "false":
        encoding = "text"
    elif fields.get("compresseddata", "false").lower() == "true":
        encoding = "deflate"
    else:
        encoding = "raw"
    return {"shape": shape, "itemsize": itemsize, "pixel": pixel, "components": components,
            "ijk_to_ras": ijk_to_ras, "data_bytes": data_bytes, "encoding": encoding,
            "data_path": data_path, "data_offset": data_offset}


def check_deflate(data_path: Path, offset: int, promised: int, chunk: int = 1 << 20) -> None:
    """``ValueError`` unless the zlib stream at ``offset`` in ``data_path`` is intact and inflates
    to exactly ``promised`` bytes. ITK's MetaImage reader does not check this: on a damaged or
    short stream it prints "Uncompress failed" and returns an image of whatever was in memory.
    Streams in chunks (the inflated bytes are counted, not kept); about 0.1 s per 100 MB."""
    inflater = zlib.decompressobj()
    total = 0
    with open(data_path, "rb") as handle:
        handle.seek(offset)
        try:
            while not inflater.eof:
                block = inflater.unconsumed_tail or handle.read(chunk)
                if not block:
                    break
                total += len(inflater.decompress(block, chunk))
                if total > promised:
                    break
        except zlib.error as exc:
            raise ValueError(f"compressed voxel data is damaged ({exc})") from None
    if not inflater.eof or total != promised:
        raise ValueError(f"compressed voxel data inflates to {'at least ' if total > promised else ''}{total:,} bytes, "
                         f"the header promises {promised:,}: truncated or damaged")


def _header_fields(path: Path) -> tuple[dict, int]:
    """``({lower-case key: value}, bytes up to and including the ElementDataFile line)``."""
    with open(path, "rb") as handle:
        head = handle.read(_MAX_HEADER_BYTES)
    match = re.search(rb"^[ \t]*ElementDataFile[ \t]*=[^\n]*\n?", head, flags=re.IGNORECASE | re.MULTILINE)
    if match is None:
        raise ValueError("MetaImage header without an ElementDataFile line")
    fields = {}
    for line in head[:match.end()].decode("latin-1").splitlines():
        key, sep, value = line.partition("=")
        if sep:
            fields[key.strip().lower()] = value.strip()
    return fields, match.end()


def read_metaimage(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(voxels (I, J, K) in the file's type, ijk_to_ras 4x4)``; trailing singleton axes dropped.
    Call :func:`read_header` first to check what the header promises."""
    sitk = import_simpleitk()
    reader = sitk.ImageFileReader()
    reader.SetImageIO("MetaImageIO")
    reader.SetFileName(str(path))
    image = reader.Execute()
    while image.GetDimension() > 3 and image.GetSize()[-1] == 1:
        image = image[(slice(None),) * (image.GetDimension() - 1) + (0,)]
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(f"image is {image.GetDimension()}-D with {image.GetNumberOfComponentsPerPixel()} "
                         f"component(s) per voxel and size {image.GetSize()}; a label map is 3-D with one value per voxel")
    ijk_to_ras = ijk_to_ras_of(image.GetSpacing(), image.GetOrigin(), image.GetDirection())
    # one copy: the view's [k, j, i] becomes [i, j, k], C order (the caller keeps this array)
    data = np.ascontiguousarray(sitk.GetArrayViewFromImage(image).transpose(2, 1, 0))
    return data, ijk_to_ras


def write_metaimage(path: Path, data: np.ndarray, ijk_to_ras: np.ndarray) -> Path:
    """Write ``data`` (I, J, K) with its IJK->RAS matrix, zlib-compressed, atomically.

    ``.mha``: one file. ``.mhd``: the voxels go to ``<name>.zraw`` beside it (ITK's name for
    compressed MetaImage data), written first, and the header replaces ``<name>.mhd`` last; each
    file is atomic, and a kill between the two renames (microseconds) could pair an old header
    with new data. ITK writes both so that header fields and orientation follow its conventions:
    the ``.mhd`` header is the one ITK wrote for a ``.mha``, pointed at the data file."""
    sitk = import_simpleitk()
    ijk_to_lps = LPS_TO_RAS @ np.asarray(ijk_to_ras, dtype=np.float64)
    spacing = np.linalg.norm(ijk_to_lps[:3, :3], axis=0)
    image = sitk.GetImageFromArray(np.asarray(data).transpose(2, 1, 0))
    image.SetSpacing(spacing.tolist())
    image.SetDirection((ijk_to_lps[:3, :3] / spacing).ravel().tolist())
    image.SetOrigin(ijk_to_lps[:3, 3].tolist())
    writer = sitk.ImageFileWriter()
    writer.SetImageIO("MetaImageIO")
    writer.SetUseCompression(True)
    with atomic_path(path, ".mha") as tmp:
        writer.SetFileName(str(tmp))
        writer.Execute(image)
        if path.suffix.lower() == ".mhd":
            whole = tmp.read_bytes()
            _fields, header_bytes = _header_fields(tmp)
            data_name = path.stem + ".zraw"
            atomic_write_bytes(path.with_name(data_name), whole[header_bytes:])
            header = re.sub(rb"(?im)^([ \t]*ElementDataFile[ \t]*=).*$", b"\\1 " + data_name.encode("utf-8"),
                            whole[:header_bytes])
            tmp.write_bytes(header)
    return path
