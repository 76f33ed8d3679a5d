"""The normalisation rule: the one place that maps RAS millimetres to network units.

``x_n = (x_ras - c) / S`` and ``d_n = d_mm / S`` with

- ``S`` (``scale_mm``) one fixed physical scale for every case (default 100 mm per unit), stored
  in the checkpoint. Cases are never rescaled to fill [-1, 1]: size is anatomy, and a partial
  input does not reveal the whole heart's extent.
- ``c`` computed from the **input structures only**: the centroid of the input surface points
  (``centre_rule = "input_surface_centroid"``), by the same rule in training and at inference.

Points and signed distances are divided by the same ``S``, so the network sees them in the same
units (a distance in mm next to normalised coordinates gives losses in the hundreds and IoU 0).

>>> norm = Normalization(scale_mm=100.0)
>>> pts = np.array([[10.0, 0, 0], [-10.0, 0, 0]])
>>> c = norm.centre_mm(pts)
>>> norm.points_to_network(pts, c).tolist(), norm.distance_to_network(5.0)
([[0.1, 0.0, 0.0], [-0.1, 0.0, 0.0]], 0.05)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

DEFAULT_SCALE_MM = 100.0
CENTRE_RULES = ("input_surface_centroid",)


@dataclass(frozen=True)
class Normalization:
    scale_mm: float = DEFAULT_SCALE_MM
    centre_rule: str = "input_surface_centroid"

    def __post_init__(self) -> None:
        if not (np.isfinite(self.scale_mm) and self.scale_mm > 0):
            raise ValueError(f"scale_mm must be a positive number of millimetres, got {self.scale_mm}")
        if self.centre_rule not in CENTRE_RULES:
            raise ValueError(f"unknown centre rule {self.centre_rule!r}; known: {CENTRE_RULES}")

    def centre_mm(self, input_surface_points_mm) -> np.ndarray:
        """Centre ``c`` (mm, same frame as the points) from the input structures' surface points.

        Pass only the points of the structures given to the encoder (never the hidden ones).
        Works on numpy arrays (N, 3) and torch tensors (..., N, 3).
        """
        pts = input_surface_points_mm
        if hasattr(pts, "mean") and not isinstance(pts, np.ndarray):  # torch tensor
            return pts.mean(dim=-2)
        pts = np.asarray(pts, dtype=np.float64)
        if pts.ndim != 2 or pts.shape[0] == 0:
            raise ValueError("centre needs at least one input surface point (N, 3)")
        return pts.mean(axis=0)

    def points_to_network(self, points_mm, centre_mm):
        return (points_mm - centre_mm) / self.scale_mm

    def points_to_mm(self, points_n, centre_mm):
        return points_n * self.scale_mm + centre_mm

    def distance_to_network(self, distance_mm):
        return distance_mm / self.scale_mm

    def distance_to_mm(self, distance_n):
        return distance_n * self.scale_mm

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Normalization:
        return cls(scale_mm=float(data["scale_mm"]), centre_rule=str(data["centre_rule"]))
