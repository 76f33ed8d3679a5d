"""MRML segmentation -> :class:`LabelMap`: reading segments on one exact RAS grid (needs ``slicer``).

Everything here uses the ``slicer`` Python package (MRML and Segmentations libraries) but no
Qt, so it runs in Slicer and in plain Python with the PyPI package ``slicer-core``; tests drive
it on a real MRML scene. Part of the Slicer module's own package (``HeartCompletionLib`` never
imports ``slicer``); :mod:`.results` (result segments, undo, export) and :mod:`.logic` use it.

What lives here: the segmentation converter rules, numpy <-> ``vtkOrientedImageData``, segment
infos and terminology strings, the reference grid, per-segment masks, nearest-neighbour
resampling, and :func:`segmentation_to_label_map`.

Geometry: a label map is read on one *reference grid*, given as ``(shape, ijk_to_ras)`` in RAS
mm: the reference volume's grid when one is chosen, else the segmentation's own reference
image geometry, else the segments' bounding box padded by ``margin_mm``. Segments stored on a
crop or pad of that grid (the same axes, spacing and voxel lattice: what importing a label map
makes) are placed by their integer voxel offset; segments on other grids are resampled onto it
(nearest neighbour).

Usage (inside Slicer, or with slicer-core after setting ``slicer.mrmlScene``)::

    mappings = map_segments(segment_infos(node), table)
    label_map = segmentation_to_label_map(node, segment_labels(mappings), reference_volume)
"""

from __future__ import annotations

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from HeartCompletionLib.io.labelmap import LabelMap, value_lookup
from HeartCompletionLib.io.labelmap_files import c_order
from HeartCompletionLib.structures.segment_mapping import SegmentInfo

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


def oriented_image_from_array(values: np.ndarray, ijk_to_ras: np.ndarray, first=None) -> slicer.vtkOrientedImageData:
    """An oriented image (uint8 scalars) holding ``values[i, j, k]`` on the grid ``ijk_to_ras``;
    ``first``: the grid index of ``values[0, 0, 0]`` (the image's extent starts there; default 0)."""
    values = np.asarray(values)
    image = slicer.vtkOrientedImageData()
    start = [0, 0, 0] if first is None else [int(v) for v in first]
    image.SetExtent(*[bound for a in range(3) for bound in (start[a], start[a] + values.shape[a] - 1)])
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    # VTK stores x (= i) fastest, i.e. a C-ordered (k, j, i) array: copied straight into VTK's
    # buffer (a bool mask as its bytes), no flattened temporary of the whole image
    target = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(values.shape[::-1])
    np.copyto(target, (values.view(np.uint8) if values.dtype == bool else values).transpose(2, 1, 0), casting="unsafe")
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
    # a plain copy of VTK's (k, j, i) buffer (ours to keep), seen as [i, j, k]: a strided copy of a
    # CT-sized image into C order took about 1 s
    return flat.reshape(dims[2], dims[1], dims[0]).copy().transpose(2, 1, 0), ijk_to_ras


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


def segment_mask(segmentation_node, segment_id: str, shape, ijk_to_ras, layers: dict | None = None) -> np.ndarray:
    """Boolean mask ``[i, j, k]`` of one segment on the grid ``(shape, ijk_to_ras)``.

    Works for shared labelmap layers (a layer holds several segments by label value) and
    resamples with nearest neighbour when the segment lives on another grid. ``layers``: a dict
    that keeps each layer's voxels read once for several segments (:func:`segmentation_to_label_map`).
    """
    segmentation_node.CreateBinaryLabelmapRepresentation()
    segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
    if segment is None:
        raise KeyError(f"segmentation {segmentation_node.GetName()!r} has no segment {segment_id!r}")
    layer = _layer_voxels(segmentation_node, segment_id, layers)
    if layer is None:
        return np.zeros(shape, dtype=bool)
    values, layer_ijk_to_ras = layer
    return resample_mask(values == segment.GetLabelValue(), layer_ijk_to_ras, shape, ijk_to_ras)


def _layer_voxels(segmentation_node, segment_id: str, layers: dict | None):
    """``(voxels [i, j, k], ijk_to_ras)`` of the layer holding a segment, read once per layer into
    ``layers``; None when the segment has no binary labelmap."""
    layer = segmentation_node.GetBinaryLabelmapInternalRepresentation(segment_id)
    if layer is None:
        return None
    layers = {} if layers is None else layers
    key = layer.GetAddressAsString("vtkOrientedImageData")
    if key not in layers:
        layers[key] = array_from_oriented_image(layer)
    return layers[key]


def lattice_offset(mask_ijk_to_ras: np.ndarray, ijk_to_ras: np.ndarray, atol: float = 1e-4):
    """The integer voxel offset ``o`` with ``mask index = grid index - o`` when the two grids share
    orientation, spacing and voxel lattice (one is a crop or pad of the other), else None."""
    a, b = np.asarray(mask_ijk_to_ras, dtype=np.float64), np.asarray(ijk_to_ras, dtype=np.float64)
    if not np.allclose(a[:3, :3], b[:3, :3], atol=1e-6) or not np.allclose(a[3], b[3]):
        return None
    shift = np.linalg.solve(b[:3, :3], a[:3, 3] - b[:3, 3])  # the mask's first voxel in grid indices
    offset = np.rint(shift)
    return offset.astype(int) if np.allclose(shift, offset, atol=atol) else None


def lattice_overlap(first, mask_shape, grid_shape):
    """``(grid slices, mask slices)`` of the voxels that a mask whose first voxel sits at grid index
    ``first`` (e.g. :func:`lattice_offset`) shares with a grid of ``grid_shape``; None when none."""
    first = np.asarray(first, dtype=np.int64)
    lo = np.maximum(first, 0)
    hi = np.minimum(first + np.asarray(mask_shape), np.asarray(grid_shape))
    if not np.all(hi > lo):
        return None
    return (tuple(slice(int(a), int(b)) for a, b in zip(lo, hi)),
            tuple(slice(int(a - f), int(b - f)) for a, b, f in zip(lo, hi, first)))


def resample_mask(mask: np.ndarray, mask_ijk_to_ras: np.ndarray, shape, ijk_to_ras: np.ndarray) -> np.ndarray:
    """A boolean mask moved onto the grid ``(shape, ijk_to_ras)``: nearest neighbour in RAS mm
    (exact copy/crop/pad when the grids share orientation, spacing and voxel lattice)."""
    shape = tuple(int(n) for n in shape)
    offset = lattice_offset(mask_ijk_to_ras, ijk_to_ras)
    if offset is not None:  # a crop or pad of the grid: place the overlap, no resampling
        out = np.zeros(shape, dtype=bool)
        overlap = lattice_overlap(offset, mask.shape, shape)
        if overlap is not None:
            out[overlap[0]] = mask[overlap[1]]
        return out
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


def segmentation_from_label_map(label_map: LabelMap, name: str = "heart", table=None):
    """``(segmentation node, label-map volume node)``: ``label_map`` imported into a new
    segmentation of the scene the way Slicer imports a label map (one segment per value, a
    shared layer cropped to the labels, the volume's grid as reference geometry); with ``table``
    (a :class:`~HeartCompletionLib.structures.table.StructureTable`) each segment is named after
    its structure. For self-tests, benchmarks and scripts."""
    volume = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", f"{name} labels")
    slicer.util.updateVolumeFromArray(volume, np.ascontiguousarray(label_map.labels.transpose(2, 1, 0), dtype=np.int16))
    volume.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(label_map.ijk_to_ras))
    node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(volume, node, ""):
        raise RuntimeError(f"importing {label_map.source or 'the label map'} into a segmentation failed")
    if table is not None:
        segmentation = node.GetSegmentation()
        for index in range(segmentation.GetNumberOfSegments()):
            segment = segmentation.GetNthSegment(index)
            segment.SetName(table.by_label(segment.GetLabelValue()).name)
    return node, volume


def segmentation_to_label_map(
    segmentation_node, segment_labels: dict[str, int], reference_volume_node=None, margin_mm: float = 40.0,
    vtk_order: bool = False,
) -> LabelMap:
    """A label map of the mapped segments (``{segment ID: table label}``) on the reference grid.

    Where segments overlap, the one later in the segmentation wins (as in Slicer's own
    label-map export); the number of overlapping voxels is kept in ``metadata["overlap_voxels"]``.
    ``vtk_order``: the labels ``[i, j, k]`` laid out with i fastest (a transposed view of VTK's
    order, what the NIfTI and NRRD writers store) instead of C order (one transpose of the grid
    less, for a label map that is only written to a file).
    """
    shape, ijk_to_ras = reference_geometry(segmentation_node, reference_volume_node, margin_mm)
    segmentation_node.CreateBinaryLabelmapRepresentation()
    segmentation = segmentation_node.GetSegmentation()
    # the mapped segments by layer (a shared layer holds several, one label value each), with their
    # rank in the segmentation's order: a later segment wins where layers overlap
    layers: dict = {}
    members: dict = {}
    for rank, info in enumerate(segment_infos(segmentation_node), start=1):
        label = segment_labels.get(info.segment_id)
        layer = _layer_voxels(segmentation_node, info.segment_id, layers) if label else None
        if layer is not None:
            value = segmentation.GetSegment(info.segment_id).GetLabelValue()
            members.setdefault(id(layer), (layer, []))[1].append((rank, value, label))
    # built in VTK's order (k, j, i): each layer on the grid's lattice is read in the order it is
    # stored, through one table lookup of its values (not a mask, a transpose and a merge per segment)
    labels = np.zeros(tuple(shape)[::-1], dtype=np.int16)
    ranks = None if len(members) < 2 else np.zeros(labels.shape, dtype=np.int16)
    overlap = 0
    for (values, layer_ijk_to_ras), segments_here in members.values():
        placed = _layer_on_grid(values, layer_ijk_to_ras, segments_here, shape, ijk_to_ras, ranks is not None)
        if placed is None:
            continue
        box, layer_labels, layer_ranks = placed
        if ranks is None:
            labels[box] = layer_labels
            continue
        done = ranks[box]
        overlap += int(np.count_nonzero((layer_ranks > 0) & (done > 0)))
        later = layer_ranks > done
        labels[box][later] = layer_labels[later]
        done[later] = layer_ranks[later]
    return LabelMap(
        labels.T if vtk_order else c_order(labels.T),
        ijk_to_ras,
        source=f"segmentation {segmentation_node.GetName()!r}",
        metadata={"overlap_voxels": overlap, "segment_labels": dict(segment_labels)},
    )


def _layer_on_grid(values, layer_ijk_to_ras, segments_here, shape, ijk_to_ras, with_ranks: bool):
    """``(box, labels, ranks)`` of one layer's mapped segments (``(rank, label value, table label)``)
    on the grid ``(shape, ijk_to_ras)``, all in VTK's order (k, j, i): the part of the grid the
    layer covers when it shares the grid's lattice (a crop or pad of it, what importing a label
    map makes), else the whole grid with each segment resampled (:func:`resample_mask`); None
    when the layer lies outside the grid. ``ranks`` only ``with_ranks`` (else None)."""
    offset = lattice_offset(layer_ijk_to_ras, ijk_to_ras)
    if offset is not None:
        overlap = lattice_overlap(offset, values.shape, shape)
        if overlap is None:
            return None
        on_grid, in_layer = overlap
        stored = values.T[in_layer[::-1]]  # the layer as VTK stores it: (k, j, i), C order
        labels = value_lookup(stored, {value: label for _, value, label in segments_here})
        ranks = value_lookup(stored, {value: rank for rank, value, _ in segments_here}) if with_ranks else None
        return on_grid[::-1], labels, ranks
    labels = np.zeros(tuple(shape)[::-1], dtype=np.int16)
    ranks = np.zeros_like(labels)
    for rank, value, label in segments_here:
        mask = resample_mask(values == value, layer_ijk_to_ras, shape, ijk_to_ras).T
        labels[mask], ranks[mask] = label, rank
    return (slice(None),) * 3, labels, ranks
