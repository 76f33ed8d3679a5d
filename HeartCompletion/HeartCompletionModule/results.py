"""Completion results into an MRML segmentation, undo, and export (needs ``slicer``).

The result side of the Slicer module, on top of :mod:`.segments` (which reads segments into
a :class:`LabelMap`): structure styling of segments (name, colour, SNOMED CT terminology),
:func:`add_result_segments` with its one-call :class:`CompletionUndo`, the module's workflow
(:func:`import_completion_result` after the background process, :func:`complete_segmentation`
in-process), and the exports (``.seg.nrrd``, label map, one mesh per segment or structure).
Like :mod:`.segments` it needs the ``slicer`` package but no Qt.

Usage (inside Slicer, or with slicer-core after setting ``slicer.mrmlScene``)::

    mappings = map_segments(segment_infos(node), table)
    label_map = segmentation_to_label_map(node, segment_labels(mappings), reference_volume)
    undo = add_result_segments(node, result.label_map, result.completed_labels, table)
    undo.undo()  # removes the added segments, restores replaced ones
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from HeartCompletionLib.atomic_io import atomic_path
from HeartCompletionLib.io.labelmap import LabelMap, labelled_box, value_lookup
from HeartCompletionLib.io.meshes import MESH_FORMATS, write_mesh
from HeartCompletionLib.structures.segment_mapping import terminology_entry
from HeartCompletionLib.structures.table import Structure, StructureTable

from .segments import (
    BINARY_LABELMAP,
    CLOSED_SURFACE,
    array_from_oriented_image,
    ensure_segmentation_converters,
    lattice_offset,
    lattice_overlap,
    oriented_image_from_array,
    resample_mask,
    segment_infos,
    segmentation_geometry,
    segmentation_to_label_map,
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


def _segment_binary_image(segmentation_node, segment_id: str):
    """A 0/1 copy of one segment on its layer's grid (a shared layer holds other segments'
    label values too, which a plain copy of the representation would carry along)."""
    segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
    layer = segmentation_node.GetBinaryLabelmapInternalRepresentation(segment_id)
    values, layer_ijk_to_ras = array_from_oriented_image(layer)
    return oriented_image_from_array(values == segment.GetLabelValue(), layer_ijk_to_ras)


def _new_segments_layer(label_map: LabelMap, labels: Sequence[int], shape, offset):
    """``(values [i, j, k], first grid index)`` of the layer that holds the new structures
    ``labels``: each as 1, 2, ... (their order) in the box around all of them, on a grid of
    ``shape`` whose lattice the label map shares (``offset``, :func:`.segments.lattice_offset`),
    clipped to it; None when none of them has a voxel there."""
    values = value_lookup(label_map.labels, {label: i + 1 for i, label in enumerate(labels)}, np.uint8)
    box = labelled_box(values)
    if box is None:
        return None
    lo, hi = box
    overlap = lattice_overlap(lo + np.asarray(offset), hi - lo, shape)
    if overlap is None:
        return None
    on_grid, in_box = overlap
    crop = values[tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))][in_box]
    return crop, [s.start for s in on_grid]


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

    When the label map shares the grid's voxel lattice (the panel's case: a crop of it), the new
    segments share one new labelmap layer that covers only the box around them, added as it is;
    the existing layers are not written. Merging each new structure into the given segments'
    layer cost Slicer 0.1-0.2 s per structure at CT size, and each new segment's 3D surface was
    then made from that whole layer (docs/benchmarks.md, session 18). On another lattice each new
    segment is resampled onto the whole grid and merged.
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
    structures = [table.by_label(int(label)) for label in labels]
    replaced = {s.label: replace_segments[s.label] for s in structures
                if replace_segments.get(s.label) and segmentation.GetSegment(replace_segments[s.label]) is not None}
    new = [s.label for s in structures if s.label not in replaced]
    offset = lattice_offset(label_map.ijk_to_ras, target[1])
    layer = None  # the new segments' layer (structure new[i] as value i + 1), when the lattices agree
    if new and offset is not None:
        found = _new_segments_layer(label_map, new, target[0], offset)
        layer = None if found is None else oriented_image_from_array(found[0], target[1], first=found[1])
    was_modifying = segmentation_node.StartModify()
    try:
        for structure in structures:
            segment_id = replaced.get(structure.label)
            if segment_id is None and offset is not None:
                undo.added.append(_add_layer_segment(segmentation, structure, layer, 1 + new.index(structure.label)))
                continue
            # a replaced segment (the whole grid: its old voxels go), or another lattice (resampled)
            mask = resample_mask(label_map.labels == structure.label, label_map.ijk_to_ras, *target)
            image = oriented_image_from_array(mask, target[1])
            if segment_id is not None:
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


def _add_layer_segment(segmentation, structure: Structure, layer, value: int) -> str:
    """A new segment for ``structure`` holding the voxels of ``value`` in the labelmap ``layer``
    (shared by every segment given the same image), or an empty one when ``layer`` is None;
    returns its ID."""
    if layer is None:  # no new structure has a voxel on the grid
        segment_id = segmentation.AddEmptySegment("", structure.name, list(structure.color_float))
        apply_structure_style(segmentation.GetSegment(segment_id), structure)
        return segment_id
    segment = slicer.vtkSegment()
    apply_structure_style(segment, structure)
    segment.SetLabelValue(value)
    segment.AddRepresentation(BINARY_LABELMAP, layer)
    if not segmentation.AddSegment(segment):
        raise RuntimeError(f"could not add segment {structure.name!r}")
    return segmentation.GetSegmentIdBySegment(segment)


# --- export ----------------------------------------------------------------------------------


def write_seg_nrrd(segmentation_node, path: str | Path) -> Path:
    """Write the whole segmentation (names, colours, terminology) as ``.seg.nrrd``, atomically.

    Uses Slicer's own segmentation storage node so the file reopens in Slicer unchanged.
    """
    path = Path(path)
    if not path.name.lower().endswith(".seg.nrrd"):
        raise ValueError(f"{path}: a segmentation file must end with .seg.nrrd")
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetUseCompression(True)
    # the storage node picks the format by the name: the temporary keeps the .seg.nrrd ending
    with atomic_path(path, type_suffix=".seg.nrrd") as tmp:
        storage.SetFileName(str(tmp))
        if not storage.WriteData(segmentation_node):
            raise OSError(f"{path}: writing the segmentation failed")
    return path


def _triangle_arrays(surface) -> tuple[np.ndarray, np.ndarray]:
    """``(vertices (V, 3) float64 mm, faces (F, 3) int64)`` of a vtkPolyData, strips and polygons
    split into triangles."""
    triangles = vtk.vtkTriangleFilter()
    triangles.SetInputData(surface)
    triangles.PassVertsOff()
    triangles.PassLinesOff()
    triangles.Update()
    mesh = triangles.GetOutput()
    vertices = numpy_support.vtk_to_numpy(mesh.GetPoints().GetData()).astype(np.float64)
    faces = numpy_support.vtk_to_numpy(mesh.GetPolys().GetConnectivityArray()).astype(np.int64).reshape(-1, 3)
    return vertices, faces


def export_meshes(
    segmentation_node,
    folder: str | Path,
    segment_ids: Sequence[str] | None = None,
    file_format: str = "STL",
    file_names: dict[str, str] | None = None,
) -> list[Path]:
    """One closed-surface mesh per segment, ``folder/<name>.stl`` (or ``.obj``, ``.ply``,
    ``.vtk``, ``.glb``), vertices in RAS mm. ``name`` is ``file_names[segment ID]`` or else the
    segment's name. The files are written by :func:`HeartCompletionLib.io.meshes.write_mesh`, the
    project's one mesh writer: STL, OBJ, PLY and VTK carry the ``SPACE=RAS`` tag without which
    Slicer reads a mesh as LPS and shows it mirrored (a GLB says RAS in its extras); each is
    written atomically, so a failed export leaves no partial file."""
    fmt = file_format.lower()
    if fmt not in MESH_FORMATS:
        raise ValueError(f"mesh format must be one of {', '.join(f.upper() for f in MESH_FORMATS)}, got {file_format!r}")
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
        vertices, faces = _triangle_arrays(surface)
        name = (file_names or {}).get(segment_id) or segmentation.GetSegment(segment_id).GetName()
        name = re.sub(r"[^\w\-. ]+", "_", name).strip() or segment_id
        written.append(write_mesh(folder / f"{name}.{fmt}", vertices, faces, fmt, title=name))
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
    from HeartCompletionLib.structures.segment_mapping import mapped_labels

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
    process (:mod:`HeartCompletionLib.inference.completion_process`) and then calls
    :func:`import_completion_result`.
    """
    from HeartCompletionLib.inference.completion import complete_label_map
    from HeartCompletionLib.model.checkpoint import load_inference_checkpoint
    from HeartCompletionLib.structures.segment_mapping import segment_labels

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
    from HeartCompletionLib.io.labelmap_files import write_label_map
    from HeartCompletionLib.structures.segment_mapping import map_segments, segment_labels

    mappings = mappings if mappings is not None else map_segments(segment_infos(segmentation_node), table)
    label_map = segmentation_to_label_map(segmentation_node, segment_labels(mappings), reference_volume_node,
                                          vtk_order=True)  # only written to the file
    return write_label_map(label_map, path, table)


def export_structure_meshes(
    segmentation_node, folder: str | Path, table: StructureTable, file_format: str = "STL", mappings=None
) -> list[Path]:
    """One mesh per mapped segment named by its structure (``LV.stl``); unmapped segments are
    left out; a second segment of the same structure gets ``_2``."""
    from HeartCompletionLib.structures.segment_mapping import map_segments

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
