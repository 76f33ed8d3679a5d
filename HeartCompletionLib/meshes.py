"""Surface meshes of label-map structures in RAS millimetres, written as STL, OBJ, PLY or VTK.

Meshes come from :func:`HeartCompletionLib.surface.extract_surface` (one closed surface per
structure, outward normals, vertices in RAS mm from the label map's own ``ijk_to_ras``), optionally
smoothed lightly with Taubin's volume-preserving filter. The four writers are plain numpy (no vtk
needed); every file carries ``SPACE=RAS`` in its header, the tag 3D Slicer reads to load a mesh
without mirroring it (Slicer assumes LPS when the tag is absent). Writes are atomic (temporary
file in the same folder, then ``os.replace``).

>>> import tempfile
>>> v = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=float)
>>> f = np.array([[0, 2, 1], [0, 1, 3], [0, 3, 2], [1, 2, 3]])
>>> path = write_mesh(Path(tempfile.mkdtemp()) / "tetra.stl", v, f)
>>> path.stat().st_size == 80 + 4 + 50 * 4
True
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from .atomic_io import atomic_write_bytes

MESH_FORMATS = ("stl", "obj", "ply", "vtk")
COORDINATE_TAG = "SPACE=RAS"


def taubin_smooth(vertices: np.ndarray, faces: np.ndarray, iterations: int = 10,
                  lam: float = 0.5, mu: float = -0.53) -> np.ndarray:
    """Taubin (lambda/mu) smoothing with uniform neighbour weights; keeps volume, removes voxel steps.

    ``vertices`` (V, 3) in mm; returns a new array. ``iterations`` = lambda/mu pairs.
    """
    from scipy import sparse

    v = np.asarray(vertices, dtype=np.float64).copy()
    if iterations <= 0 or len(faces) == 0:
        return v
    f = np.asarray(faces, dtype=np.int64)
    rows = np.concatenate([f[:, 0], f[:, 1], f[:, 2], f[:, 1], f[:, 2], f[:, 0]])
    cols = np.concatenate([f[:, 1], f[:, 2], f[:, 0], f[:, 0], f[:, 1], f[:, 2]])
    adj = sparse.coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(v), len(v))).tocsr()
    adj.data[:] = 1.0  # duplicate edges count once
    degree = np.asarray(adj.sum(axis=1)).ravel()
    degree[degree == 0] = 1.0
    for _ in range(int(iterations)):
        for factor in (lam, mu):
            v += factor * (adj @ v / degree[:, None] - v)
    return v


def structure_meshes(label_map, labels=None, smoothing_iterations: int = 0) -> dict:
    """``{label: (vertices (V, 3) float64 RAS mm, faces (F, 3) int64)}`` for each present structure.

    ``labels``: which structures (default: all present). Faces are wound so normals point outwards.
    """
    from .surface import extract_surface

    present = label_map.present_labels()
    wanted = present if labels is None else [int(lab) for lab in labels if int(lab) in present]
    out = {}
    for lab in wanted:
        # extract_surface crops and zero-pads, so structures cut by the image border close there
        mesh = extract_surface(label_map.labels == lab, label_map.ijk_to_ras, f"{label_map.source} label {lab}")
        vertices = taubin_smooth(mesh.vertices, mesh.faces, smoothing_iterations)
        out[lab] = (vertices, np.asarray(mesh.faces, dtype=np.int64))
    return out


def _face_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    n = np.cross(vertices[faces[:, 1]] - vertices[faces[:, 0]], vertices[faces[:, 2]] - vertices[faces[:, 0]])
    length = np.linalg.norm(n, axis=1, keepdims=True)
    return n / np.where(length > 0, length, 1.0)


def _stl_bytes(vertices, faces, title: str) -> bytes:
    record = np.dtype([("normal", "<f4", 3), ("v", "<f4", (3, 3)), ("attr", "<u2")])
    data = np.zeros(len(faces), dtype=record)
    data["normal"] = _face_normals(vertices, faces)
    data["v"] = vertices[faces]
    # the tag must survive the 80-byte header, so a long title is cut instead
    header = f"{title[:80 - len(COORDINATE_TAG) - 1]} {COORDINATE_TAG}".encode("ascii", "replace").ljust(80, b" ")
    return header + np.uint32(len(faces)).tobytes() + data.tobytes()


def _obj_bytes(vertices, faces, title: str) -> bytes:
    lines = [f"# {title} {COORDINATE_TAG} (millimetres)", f"o {title}"]
    lines += [f"v {x:.6f} {y:.6f} {z:.6f}" for x, y, z in vertices]
    lines += [f"f {a} {b} {c}" for a, b, c in faces + 1]
    return ("\n".join(lines) + "\n").encode("ascii")


def _ply_bytes(vertices, faces, title: str) -> bytes:
    header = (
        "ply\nformat binary_little_endian 1.0\n"
        f"comment {title}\ncomment {COORDINATE_TAG}\n"
        f"element vertex {len(vertices)}\nproperty float x\nproperty float y\nproperty float z\n"
        f"element face {len(faces)}\nproperty list uchar int vertex_indices\nend_header\n"
    ).encode("ascii")
    face_rec = np.zeros(len(faces), dtype=np.dtype([("n", "u1"), ("idx", "<i4", 3)]))
    face_rec["n"] = 3
    face_rec["idx"] = faces
    return header + vertices.astype("<f4").tobytes() + face_rec.tobytes()


def _vtk_bytes(vertices, faces, title: str) -> bytes:
    # legacy VTK binary is big-endian; version 4.2 is what Slicer itself writes (readable everywhere)
    cells = np.concatenate([np.full((len(faces), 1), 3), faces], axis=1).astype(">i4")
    return b"".join([
        b"# vtk DataFile Version 4.2\n",
        f"{title} {COORDINATE_TAG}\n".encode("ascii", "replace"),
        b"BINARY\nDATASET POLYDATA\n",
        f"POINTS {len(vertices)} float\n".encode(), vertices.astype(">f4").tobytes(), b"\n",
        f"POLYGONS {len(faces)} {cells.size}\n".encode(), cells.tobytes(), b"\n",
    ])


_WRITERS = {"stl": _stl_bytes, "obj": _obj_bytes, "ply": _ply_bytes, "vtk": _vtk_bytes}


def write_mesh(path, vertices, faces, fmt: str | None = None, title: str = "HeartCompletion") -> Path:
    """Write one triangle mesh (vertices in RAS mm) atomically; format from ``fmt`` or the suffix."""
    path = Path(path)
    fmt = (fmt or path.suffix.lstrip(".")).lower()
    if fmt not in _WRITERS:
        raise ValueError(f"{path}: unknown mesh format {fmt!r}; choose one of {MESH_FORMATS}")
    vertices = np.asarray(vertices, dtype=np.float64)
    faces = np.asarray(faces, dtype=np.int64)
    if vertices.ndim != 2 or vertices.shape[1] != 3 or faces.ndim != 2 or faces.shape[1] != 3:
        raise ValueError(f"{path}: a mesh needs vertices (V, 3) and triangles (F, 3)")
    data = _WRITERS[fmt](vertices, faces, re.sub(r"\s+", "_", title))
    return atomic_write_bytes(path, data)


def mesh_file_name(case_name: str, structure_name: str, fmt: str = "stl") -> str:
    """``<case>_<Structure>.<fmt>`` with characters unsafe in file names replaced by ``_``."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{case_name}_{structure_name}")
    return f"{safe}.{fmt.lower()}"


def write_structure_meshes(label_map, output_dir, case_name: str, table=None, fmt: str = "stl",
                           labels=None, smoothing_iterations: int = 0) -> list[Path]:
    """One mesh file per present structure, ``<output_dir>/<case>_<Structure>.<fmt>``; returns the paths."""
    from .structures import StructureTable

    fmt = fmt.lower()
    if fmt not in _WRITERS:
        raise ValueError(f"unknown mesh format {fmt!r}; choose one of {MESH_FORMATS}")
    table = StructureTable.from_spec(table)
    paths = []
    for lab, (vertices, faces) in structure_meshes(label_map, labels, smoothing_iterations).items():
        name = table.by_label(lab).name if 1 <= lab <= len(table) else f"label{lab}"
        path = Path(output_dir) / mesh_file_name(case_name, name, fmt)
        paths.append(write_mesh(path, vertices, faces, fmt, title=f"{case_name}_{name}"))
    return paths
