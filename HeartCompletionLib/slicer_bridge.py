"""MRML segmentation <-> :class:`LabelMap`, result segments, undo and export (needs ``slicer``).

Everything here uses the ``slicer`` Python package (MRML and Segmentations libraries) but no
Qt, so it runs in Slicer and in plain Python with the PyPI package ``slicer-core``; tests drive
it on a real MRML scene. The rest of ``HeartCompletionLib`` never imports this module.

Geometry: a label map is read on one *reference grid*, given as ``(shape, ijk_to_ras)`` in RAS
mm: the reference volume's grid when one is chosen, else the segmentation's own reference
image geometry, else the segments' bounding box padded by ``margin_mm``. Segments stored on
other grids are resampled onto it (nearest neighbour, exact when the grids coincide).

Usage (inside Slicer, or with slicer-core after setting ``slicer.mrmlScene``)::

    mappings = map_segments(segment_infos(node), table)
    label_map = segmentation_to_label_map(node, segment_labels(mappings), reference_volume)
    undo = add_result_segments(node, result.label_map, result.completed_labels, table)
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from .labelmap import LabelMap
from .segment_mapping import SegmentInfo, terminology_entry
from .structures import Structure, StructureTable

BINARY_LABELMAP = "Binary labelmap"
CLOSED_SURFACE = "Closed surface"


def ensure_segmentation_converters() -> None:
    """Register the segmentation conversion rules when nobody did (plain ``slicer-core``).

    Slicer's application registers them at startup; without them a segmentation cannot even
    create an empty binary labelmap.
    """
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    if factory.ConstructRepresentationObjectByRepresentation(BINARY_LABELMAP) is not None:
        return
    for rule in (
        slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule,
        slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule,
        slicer.vtkClosedSurfaceToFractionalLabelmapConversionRule,
        slicer.vtkFractionalLabelmapToClosedSurfaceConversionRule,
    ):
        factory.RegisterConverterRule(rule())


# --- numpy <-> vtkOrientedImageData ----------------------------------------------------------


def oriented_image_from_array(values: np.ndarray, ijk_to_ras: np.ndarray) -> slicer.vtkOrientedImageData:
    """An oriented image (uint8 scalars) holding ``values[i, j, k]`` on the grid ``ijk_to_ras``."""
    values = np.asarray(values)
    image = slicer.vtkOrientedImageData()
    image.SetDimensions(*values.shape)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    # VTK stores x (= i) fastest, i.e. a C-ordered (k, j, i) array.
    numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())[:] = values.transpose(2, 1, 0).ravel().astype(np.uint8)
    image.SetImageToWorldMatrix(slicer.util.vtkMatrixFromArray(ijk_to_ras))
    return image


def array_from_oriented_image(image) -> tuple[np.ndarray, np.ndarray]:
    """``(values[i, j, k], ijk_to_ras)`` of an oriented image; the extent's start is folded
    into the matrix so index 0 is the first stored voxel."""
    extent = image.GetExtent()
    dims = [extent[1] - extent[0] + 1, extent[3] - extent[2] + 1, extent[5] - extent[4] + 1]
    matrix = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(matrix)
    ijk_to_ras = slicer.util.arrayFromVTKMatrix(matrix)
    ijk_to_ras[:3, 3] = ijk_to_ras[:3, :3] @ np.array(extent[0::2], dtype=np.float64) + ijk_to_ras[:3, 3]
    if min(dims) <= 0 or image.GetPointData().GetScalars() is None:
        return np.zeros([max(d, 0) for d in dims], dtype=np.uint8), ijk_to_ras
    flat = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    return flat.reshape(dims[2], dims[1], dims[0]).transpose(2, 1, 0).copy(), ijk_to_ras


def _geometry_image(shape, ijk_to_ras) -> slicer.vtkOrientedImageData:
    image = slicer.vtkOrientedImageData()
    image.SetExtent(0, shape[0] - 1, 0, shape[1] - 1, 0, shape[2] - 1)
    image.SetImageToWorldMatrix(slicer.util.vtkMatrixFromArray(ijk_to_ras))
    return image


# --- reading segments --------------------------------------------------------------------------


def segment_infos(segmentation_node) -> list[SegmentInfo]:
    """ID, name and terminology string of every segment, in the segmentation's order."""
    segmentation = segmentation_node.GetSegmentation()
    out = []
    for index in range(segmentation.GetNumberOfSegments()):
        segment_id = segmentation.GetNthSegmentID(index)
        segment = segmentation.GetSegment(segment_id)
        out.append(SegmentInfo(segment_id, segment.GetName(), segment_terminology(segment)))
    return out


def segment_terminology(segment) -> str:
    """A segment's terminology entry string ("" when it has none)."""
    if hasattr(segment, "GetTerminology"):  # Slicer >= 5.8
        return segment.GetTerminology() or ""
    value = vtk.reference("")
    return str(value) if segment.GetTag(segment.GetTerminologyEntryTagName(), value) else ""


def reference_geometry(segmentation_node, reference_volume_node=None, margin_mm: float = 40.0):
    """The grid a completion runs on: ``(shape (I, J, K), ijk_to_ras 4x4)`` in RAS mm.

    Priority: the reference volume; the segmentation's reference image geometry; the union of
    its segments padded by ``margin_mm`` on every side (the missing structures lie outside the
    given ones, so an unpadded box would cut them off).
    """
    if reference_volume_node is not None:
        matrix = vtk.vtkMatrix4x4()
        reference_volume_node.GetIJKToRASMatrix(matrix)
        dims = reference_volume_node.GetImageData().GetDimensions()
        return tuple(int(d) for d in dims), slicer.util.arrayFromVTKMatrix(matrix)
    own = segmentation_geometry(segmentation_node)
    if own is not None:
        return own
    segmentation = segmentation_node.GetSegmentation()
    segmentation_node.CreateBinaryLabelmapRepresentation()
    image = slicer.vtkOrientedImageData()
    serialized = segmentation.DetermineCommonLabelmapGeometry(slicer.vtkSegmentation.EXTENT_UNION_OF_SEGMENTS, None)
    ok = bool(serialized) and slicer.vtkSegmentationConverter.DeserializeImageGeometry(serialized, image, False)
    extent = list(image.GetExtent())
    if not ok or extent[1] < extent[0]:
        raise ValueError(f"segmentation {segmentation_node.GetName()!r}: no segment has voxels and no reference volume is set")
    spacing = np.array(image.GetSpacing(), dtype=np.float64)
    pad = np.ceil(margin_mm / spacing).astype(int)
    for axis in range(3):
        extent[2 * axis] -= int(pad[axis])
        extent[2 * axis + 1] += int(pad[axis])
    image.SetExtent(extent)
    _, ijk_to_ras = array_from_oriented_image(image)
    return (extent[1] - extent[0] + 1, extent[3] - extent[2] + 1, extent[5] - extent[4] + 1), ijk_to_ras


def segmentation_geometry(segmentation_node):
    """The segmentation's own reference image geometry ``(shape, ijk_to_ras)``, or ``None``
    (segmentations imported from a label map often have none)."""
    segmentation = segmentation_node.GetSegmentation()
    name = slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()
    serialized = segmentation.GetConversionParameter(name) if name in _conversion_parameter_names(segmentation) else ""
    image = slicer.vtkOrientedImageData()
    if not serialized or not slicer.vtkSegmentationConverter.DeserializeImageGeometry(serialized, image, False):
        return None
    _, ijk_to_ras = array_from_oriented_image(image)
    extent = image.GetExtent()
    shape = (extent[1] - extent[0] + 1, extent[3] - extent[2] + 1, extent[5] - extent[4] + 1)
    return (shape, ijk_to_ras) if min(shape) > 0 else None


def _conversion_parameter_names(segmentation) -> set[str]:
    # GetConversionParameter logs an error for unknown names; ask what exists first.
    text = segmentation.SerializeAllConversionParameters() or ""
    return {item.split("|")[0] for item in text.split("&") if item}


def segment_mask(segmentation_node, segment_id: str, shape, ijk_to_ras) -> np.ndarray:
    """Boolean mask ``[i, j, k]`` of one segment on the grid ``(shape, ijk_to_ras)``.

    Works for shared labelmap layers (a layer holds several segments by label value) and
    resamples with nearest neighbour when the segment lives on another grid.
    """
    segmentation_node.CreateBinaryLabelmapRepresentation()
    segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
    if segment is None:
        raise KeyError(f"segmentation {segmentation_node.GetName()!r} has no segment {segment_id!r}")
    layer = segmentation_node.GetBinaryLabelmapInternalRepresentation(segment_id)
    if layer is None:
        return np.zeros(shape, dtype=bool)
    values, layer_ijk_to_ras = array_from_oriented_image(layer)
    return resample_mask(values == segment.GetLabelValue(), layer_ijk_to_ras, shape, ijk_to_ras)


def resample_mask(mask: np.ndarray, mask_ijk_to_ras: np.ndarray, shape, ijk_to_ras: np.ndarray) -> np.ndarray:
    """A boolean mask moved onto the grid ``(shape, ijk_to_ras)``: nearest neighbour in RAS mm
    (exact copy/crop/pad when the grids share orientation, spacing and voxel lattice)."""
    if mask.shape == tuple(shape) and np.allclose(mask_ijk_to_ras, ijk_to_ras, atol=1e-6):
        return mask.astype(bool)
    resampled = slicer.vtkOrientedImageData()
    ok = slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
        oriented_image_from_array(mask, mask_ijk_to_ras), _geometry_image(shape, ijk_to_ras), resampled, False, False
    )
    if not ok:
        raise RuntimeError("resampling a segment onto the reference grid failed")
    # The output extent may differ from the reference's (VTK keeps only the overlap): place it
    # by its extent into a full-size mask.
    values, _ = array_from_oriented_image(resampled)
    extent = resampled.GetExtent()
    mask = np.zeros(shape, dtype=bool)
    lo = [max(extent[2 * a], 0) for a in range(3)]
    hi = [min(extent[2 * a + 1] + 1, shape[a]) for a in range(3)]
    if all(h > low for low, h in zip(lo, hi)):
        src = tuple(slice(lo[a] - extent[2 * a], hi[a] - extent[2 * a]) for a in range(3))
        mask[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = values[src] > 0
    return mask


def _segment_binary_image(segmentation_node, segment_id: str):
    """A 0/1 copy of one segment on its layer's grid (a shared layer holds other segments'
    label values too, which a plain copy of the representation would carry along)."""
    segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
    layer = segmentation_node.GetBinaryLabelmapInternalRepresentation(segment_id)
    values, layer_ijk_to_ras = array_from_oriented_image(layer)
    return oriented_image_from_array(values == segment.GetLabelValue(), layer_ijk_to_ras)


def segmentation_to_label_map(
    segmentation_node, segment_labels: dict[str, int], reference_volume_node=None, margin_mm: float = 40.0
) -> LabelMap:
    """A label map of the mapped segments (``{segment ID: table label}``) on the reference grid.

    Where segments overlap, the one later in the segmentation wins (as in Slicer's own
    label-map export); the number of overlapping voxels is kept in ``metadata["overlap_voxels"]``.
    """
    shape, ijk_to_ras = reference_geometry(segmentation_node, reference_volume_node, margin_mm)
    labels = np.zeros(shape, dtype=np.int16)
    written = np.zeros(shape, dtype=bool)
    overlap = 0
    for info in segment_infos(segmentation_node):
        label = segment_labels.get(info.segment_id)
        if not label:
            continue
        mask = segment_mask(segmentation_node, info.segment_id, shape, ijk_to_ras)
        overlap += int(np.count_nonzero(mask & written))
        labels[mask] = label
        written |= mask
    return LabelMap(
        labels,
        ijk_to_ras,
        source=f"segmentation {segmentation_node.GetName()!r}",
        metadata={"overlap_voxels": overlap, "segment_labels": dict(segment_labels)},
    )


# --- writing result segments -------------------------------------------------------------------


def apply_structure_style(segment, structure: Structure) -> None:
    """Name, colour and SNOMED CT terminology of ``structure`` on a segment."""
    segment.SetName(structure.name)
    segment.SetColor(*structure.color_float)
    entry = terminology_entry(structure)
    if hasattr(segment, "SetTerminology"):  # Slicer >= 5.8
        segment.SetTerminology(entry)
    else:
        segment.SetTag(segment.GetTerminologyEntryTagName(), entry)


@dataclass
class CompletionUndo:
    """What one "Complete heart" run changed, so that one call reverts it.

    ``added``: IDs of new segments; ``replaced``: ``{segment ID: (mask image copy)}`` of
    segments whose voxels the run overwrote ("replace" ticked).
    """

    segmentation_node: object
    added: list[str] = field(default_factory=list)
    replaced: dict = field(default_factory=dict)

    def undo(self) -> None:
        segmentation = self.segmentation_node.GetSegmentation()
        was_modifying = self.segmentation_node.StartModify()
        try:
            for segment_id in self.added:
                if segmentation.GetSegment(segment_id) is not None:
                    segmentation.RemoveSegment(segment_id)
            for segment_id, image in self.replaced.items():
                if segmentation.GetSegment(segment_id) is not None:
                    # The saved image covers only the old extent: clear first so that voxels the
                    # completion added outside it go too.
                    logic = slicer.vtkSlicerSegmentationsModuleLogic
                    logic.ClearSegment(self.segmentation_node, segment_id)
                    logic.SetBinaryLabelmapToSegment(image, self.segmentation_node, segment_id, logic.MODE_REPLACE)
        finally:
            self.segmentation_node.EndModify(was_modifying)
        self.added, self.replaced = [], {}


def add_result_segments(
    segmentation_node,
    label_map: LabelMap,
    labels: Sequence[int],
    table: StructureTable,
    replace_segments: dict[int, str] | None = None,
    show_surfaces: bool = True,
) -> CompletionUndo:
    """Put ``labels`` of ``label_map`` into the segmentation as segments, in one modification,
    on the segmentation's own grid (resampled, nearest neighbour, if the label map's differs).

    New segments get the table's name, colour and terminology. ``replace_segments`` maps a
    label to an existing segment ID whose voxels are overwritten instead (the user ticked
    "replace"); every other existing segment is left untouched. Returns the undo record.
    """
    ensure_segmentation_converters()
    replace_segments = dict(replace_segments or {})
    segmentation = segmentation_node.GetSegmentation()
    if segmentation.GetNumberOfSegments() == 0 or segmentation.GetSourceRepresentationName() != BINARY_LABELMAP:
        segmentation_node.SetSourceRepresentationToBinaryLabelmap()
    undo = CompletionUndo(segmentation_node)
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    # Results go into the segmentation's own geometry when it has one (the completion may
    # have run on another reference volume's grid).
    target = segmentation_geometry(segmentation_node) or (label_map.shape, label_map.ijk_to_ras)
    was_modifying = segmentation_node.StartModify()
    try:
        for label in labels:
            structure = table.by_label(int(label))
            mask = resample_mask(label_map.labels == structure.label, label_map.ijk_to_ras, *target)
            image = oriented_image_from_array(mask, target[1])
            segment_id = replace_segments.get(structure.label)
            if segment_id and segmentation.GetSegment(segment_id) is not None:
                undo.replaced[segment_id] = _segment_binary_image(segmentation_node, segment_id)
            else:
                segment_id = segmentation.AddEmptySegment("", structure.name, list(structure.color_float))
                undo.added.append(segment_id)
                apply_structure_style(segmentation.GetSegment(segment_id), structure)
            if not logic.SetBinaryLabelmapToSegment(image, segmentation_node, segment_id, logic.MODE_REPLACE):
                raise RuntimeError(f"could not write {structure.name!r} into segmentation {segmentation_node.GetName()!r}")
    except BaseException:
        segmentation_node.EndModify(was_modifying)
        undo.undo()
        raise
    segmentation_node.EndModify(was_modifying)
    if show_surfaces:
        segmentation_node.CreateClosedSurfaceRepresentation()
        display = segmentation_node.GetDisplayNode()
        if display is not None:
            display.SetPreferredDisplayRepresentationName3D(CLOSED_SURFACE)
    return undo


# --- export ----------------------------------------------------------------------------------


def write_seg_nrrd(segmentation_node, path: str | Path) -> Path:
    """Write the whole segmentation (names, colours, terminology) as ``.seg.nrrd``, atomically.

    Uses Slicer's own segmentation storage node so the file reopens in Slicer unchanged.
    """
    path = Path(path)
    if not path.name.lower().endswith(".seg.nrrd"):
        raise ValueError(f"{path}: a segmentation file must end with .seg.nrrd")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".seg.nrrd", dir=path.parent)
    os.close(fd)
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(tmp)
    storage.SetUseCompression(True)
    try:
        if not storage.WriteData(segmentation_node):
            raise OSError(f"{path}: writing the segmentation failed")
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def export_meshes(
    segmentation_node,
    folder: str | Path,
    segment_ids: Sequence[str] | None = None,
    file_format: str = "STL",
    lps: bool = False,
    file_names: dict[str, str] | None = None,
) -> list[Path]:
    """One closed-surface mesh per segment, ``folder/<name>.stl`` (or ``.obj``), in mm, RAS by
    default (``lps=True`` for tools that expect DICOM's LPS). ``name`` is ``file_names[segment
    ID]`` or else the segment's name. Each file is written to a temporary name and moved into
    place, so a failed export leaves no partial file."""
    file_format = file_format.upper()
    writers = {"STL": vtk.vtkSTLWriter, "OBJ": vtk.vtkOBJWriter}
    if file_format not in writers:
        raise ValueError(f"mesh format must be STL or OBJ, got {file_format!r}")
    ensure_segmentation_converters()
    segmentation_node.CreateClosedSurfaceRepresentation()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    segmentation = segmentation_node.GetSegmentation()
    ids = list(segment_ids) if segment_ids is not None else [s.segment_id for s in segment_infos(segmentation_node)]
    written = []
    for segment_id in ids:
        surface = vtk.vtkPolyData()
        slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentClosedSurfaceRepresentation(segmentation_node, segment_id, surface)
        if surface.GetNumberOfPoints() == 0:
            continue  # an empty segment has no surface to write
        if lps:
            flip = vtk.vtkTransformPolyDataFilter()
            transform = vtk.vtkTransform()
            transform.Scale(-1.0, -1.0, 1.0)
            flip.SetTransform(transform)
            flip.SetInputData(surface)
            flip.Update()
            surface = flip.GetOutput()
        name = (file_names or {}).get(segment_id) or segmentation.GetSegment(segment_id).GetName()
        name = re.sub(r"[^\w\-. ]+", "_", name).strip() or segment_id
        target = folder / f"{name}.{file_format.lower()}"
        tmp = folder / f".{name}.tmp.{file_format.lower()}"
        writer = writers[file_format]()
        writer.SetFileName(str(tmp))
        writer.SetInputData(surface)
        if not writer.Write():
            tmp.unlink(missing_ok=True)
            raise OSError(f"{target}: writing the mesh failed")
        os.replace(tmp, target)
        written.append(target)
    return written


# --- the module's workflow (what its Logic calls) ------------------------------------------------


def replace_targets(mappings, labels: Sequence[int]) -> dict[int, str]:
    """``{label: segment ID}`` of the first segment that provides each of ``labels``."""
    out: dict[int, str] = {}
    for mapping in mappings:
        if mapping.structure is not None and mapping.label in labels and mapping.label not in out:
            out[mapping.label] = mapping.segment.segment_id
    return out


def import_completion_result(
    segmentation_node,
    mappings,
    result_label_map: LabelMap,
    completed_labels: Sequence[int],
    table: StructureTable,
    replace: bool = False,
    show_surfaces: bool = True,
) -> CompletionUndo:
    """Add the completed structures to the segmentation (one undo record).

    With ``replace`` a completed structure that a segment already provides overwrites that
    segment's voxels (its name, colour and terminology stay); without it such structures are
    never touched, even if the result holds them.
    """
    from .segment_mapping import mapped_labels

    given = set(mapped_labels(mappings))
    labels = [int(v) for v in completed_labels if replace or int(v) not in given]
    targets = replace_targets(mappings, labels) if replace else {}
    return add_result_segments(segmentation_node, result_label_map, labels, table, targets, show_surfaces)


def complete_segmentation(
    segmentation_node,
    mappings,
    checkpoint,
    structures=None,
    replace: bool = False,
    device: str = "auto",
    reference_volume_node=None,
    progress=None,
    show_surfaces: bool = True,
):
    """Complete in this process (self-test, scripts): segments -> label map -> model -> segments.

    ``checkpoint`` is a path or a loaded ``InferenceCheckpoint``. Returns
    ``(CompletionResult, CompletionUndo)``. The module itself runs the model in a background
    process (:mod:`HeartCompletionLib.completion_process`) and then calls
    :func:`import_completion_result`.
    """
    from .checkpoint import load_inference_checkpoint
    from .completion import complete_label_map
    from .segment_mapping import segment_labels

    if not hasattr(checkpoint, "model"):
        checkpoint = load_inference_checkpoint(checkpoint, device="cpu")
    label_map = segmentation_to_label_map(segmentation_node, segment_labels(mappings), reference_volume_node)
    result = complete_label_map(
        label_map, checkpoint, structures=structures, replace=replace, device=device, progress=progress
    )
    undo = import_completion_result(
        segmentation_node, mappings, result.label_map, result.completed_labels, checkpoint.table, replace, show_surfaces
    )
    return result, undo


def export_label_map(
    segmentation_node, path: str | Path, table: StructureTable, reference_volume_node=None, mappings=None
) -> Path:
    """Write the segmentation as a label map with the table's values (``.nii.gz``, ``.nrrd``, or
    ``.seg.nrrd`` through :mod:`labelmap_io`). Unmapped segments are left out."""
    from .labelmap_io import write_label_map
    from .segment_mapping import map_segments, segment_labels

    mappings = mappings if mappings is not None else map_segments(segment_infos(segmentation_node), table)
    label_map = segmentation_to_label_map(segmentation_node, segment_labels(mappings), reference_volume_node)
    return write_label_map(label_map, path, table)


def export_structure_meshes(
    segmentation_node, folder: str | Path, table: StructureTable, file_format: str = "STL", mappings=None
) -> list[Path]:
    """One mesh per mapped segment named by its structure (``LV.stl``); unmapped segments are
    left out; a second segment of the same structure gets ``_2``."""
    from .segment_mapping import map_segments

    mappings = mappings if mappings is not None else map_segments(segment_infos(segmentation_node), table)
    names: dict[str, str] = {}
    used: dict[str, int] = {}
    for mapping in mappings:
        if mapping.structure is None:
            continue
        used[mapping.structure.name] = used.get(mapping.structure.name, 0) + 1
        count = used[mapping.structure.name]
        names[mapping.segment.segment_id] = mapping.structure.name + (f"_{count}" if count > 1 else "")
    return export_meshes(segmentation_node, folder, list(names), file_format, file_names=names)
