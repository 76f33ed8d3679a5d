"""Synthetic hearts: analytic shapes in physical RAS millimetres, rasterised into any grid.

A :class:`SyntheticHeart` is built from a seed: the ten structures of the table, placed roughly
as in a real heart (LV half-ellipsoid inside a myocardium shell, RV crescent on the right and
anterior side, LA posterior-superior, RA to the right, aorta arching up from the LV outflow, PA
from the RV outflow up/left/back, a small LAA lobe off the LA, coronary tubes on the epicardium,
four pulmonary veins into the LA). Sizes jitter by about +-10 %, shapes by a few mm, and the
whole heart gets a random pose (rotations up to +-15 degrees, translations up to +-10 mm).

With ``modes=True`` a heart also draws a few named latent modes (:data:`MODES`: body size, LV
dilation, LV hypertrophy, right-heart load, atrial enlargement, aortic ageing, heart orientation,
coronary dominance; z-scores) that move several structures together, on top of a smaller
independent jitter, so that the structures of one heart covary as in real hearts and the other
nine predict the tenth (``benchmarks/population_stats.py``, docs/synthetic_population.md).
Without modes the generator is the original one, bit for bit.

The heart is defined in RAS mm, independent of any voxel grid, so the *same* heart can be
rasterised into any geometry (isotropic RAS, LPS-like flipped axes, anisotropic, oblique):
:meth:`SyntheticHeart.rasterize` evaluates voxel centres. Structures never overlap: one label
per voxel, resolved by :data:`PRIORITY` (thin and enclosed structures first).

>>> heart = synthetic_heart(seed=0)
>>> labels = heart.inside(heart.structure_centre("LV")[None, :])
>>> int(labels[0]) == heart.table.by_name("LV").label
True
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from HeartCompletionLib.geometry.affine import make_ijk_to_ras, ras_to_ijk_points, rotation_matrix, spacing_of
from HeartCompletionLib.structures.table import StructureTable

from .labelmap import LabelMap

#: Who wins where analytic shapes overlap (first wins): thin vessels on the epicardium, then
#: blood pools enclosed by walls, then the big vessels and chambers.
PRIORITY = ("Coronary", "LV", "Myocardium", "Aorta", "PA", "LA", "LAA", "PV", "RV", "RA")

#: Points evaluated per chunk while rasterising (bounds memory for CT-sized grids).
_CHUNK_POINTS = 1_000_000


@dataclass(frozen=True)
class Ellipsoid:
    """Solid ellipsoid in RAS mm; ``axes`` columns are its unit semi-axis directions.

    ``clip_axis``: keep only the half with a non-positive local coordinate along that semi-axis
    (the LV/RV/myocardium are half-ellipsoids open at the valve plane).
    """

    center: np.ndarray
    axes: np.ndarray
    radii: np.ndarray
    clip_axis: int | None = None

    def local_frame(self) -> tuple[np.ndarray, np.ndarray]:
        """``(A, b)`` with local coordinates ``q = p @ A + b``: the unit ball in the ellipsoid's axes."""
        a = self.axes / self.radii[None, :]
        return a, -self.center @ a

    def contains_local(self, q: np.ndarray) -> np.ndarray:
        inside = np.einsum("...i,...i->...", q, q) <= 1.0
        if self.clip_axis is not None:
            inside &= q[..., self.clip_axis] <= 0.0
        return inside

    def contains(self, points: np.ndarray) -> np.ndarray:
        a, b = self.local_frame()
        return self.contains_local(points @ a + b)

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        half = np.sqrt(((self.axes * self.radii[None, :]) ** 2).sum(axis=1))
        return self.center - half, self.center + half

    def transformed(self, rotation: np.ndarray, translation: np.ndarray, scale: float) -> Ellipsoid:
        return Ellipsoid(rotation @ self.center * scale + translation, rotation @ self.axes, self.radii * scale,
                         self.clip_axis)


@dataclass(frozen=True)
class Capsule:
    """Segment ``a``-``b`` (RAS mm) swept by a ball of ``radius`` mm; tubes are chains of these."""

    a: np.ndarray
    b: np.ndarray
    radius: float

    def local_frame(self) -> tuple[np.ndarray, np.ndarray]:
        """``(A, b)``: local coordinates ``q = p @ A + b`` with ``a`` at 0 and ``b`` on the +x axis."""
        frame = _axes_along(self.b - self.a)
        return frame, -self.a @ frame

    def contains_local(self, q: np.ndarray) -> np.ndarray:
        length = float(np.linalg.norm(self.b - self.a))
        along = q[..., 0] - np.clip(q[..., 0], 0.0, length)  # distance past either end, along the axis
        return along * along + q[..., 1] * q[..., 1] + q[..., 2] * q[..., 2] <= self.radius**2

    def contains(self, points: np.ndarray) -> np.ndarray:
        a, b = self.local_frame()
        return self.contains_local(points @ a + b)

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        return np.minimum(self.a, self.b) - self.radius, np.maximum(self.a, self.b) + self.radius

    def transformed(self, rotation: np.ndarray, translation: np.ndarray, scale: float) -> Capsule:
        return Capsule(rotation @ self.a * scale + translation, rotation @ self.b * scale + translation,
                       self.radius * scale)


def _tube(control_points, radius: float, smooth_iterations: int = 2) -> list[Capsule]:
    """A smooth tube through control points (Chaikin corner cutting, ends kept)."""
    pts = np.asarray(control_points, dtype=np.float64)
    for _ in range(smooth_iterations):
        if len(pts) < 3:
            break
        q = 0.75 * pts[:-1] + 0.25 * pts[1:]
        r = 0.25 * pts[:-1] + 0.75 * pts[1:]
        pts = np.vstack([pts[:1], np.column_stack([q, r]).reshape(-1, 3), pts[-1:]])
    return [Capsule(pts[i], pts[i + 1], float(radius)) for i in range(len(pts) - 1)]


def _axes_along(direction) -> np.ndarray:
    """Orthonormal columns whose first column is ``direction``."""
    d = np.asarray(direction, dtype=np.float64)
    d = d / np.linalg.norm(d)
    helper = np.array([0.0, 0.0, 1.0]) if abs(d[2]) < 0.9 else np.array([1.0, 0.0, 0.0])
    e1 = np.cross(d, helper)
    e1 /= np.linalg.norm(e1)
    return np.column_stack([d, e1, np.cross(d, e1)])


#: The latent modes of a "modes" heart (``synthetic_heart(seed, modes=True)``), in the order they are
#: drawn. Each is a z-score (standard normal, clipped to +-:data:`MODE_CLIP`); one unit moves several
#: structures together. What a unit does (factors multiply sizes, mm and degrees move shapes in the
#: upright heart frame); see docs/synthetic_population.md for the resulting volumes:
MODES = {
    "body_size": "whole heart scaled by exp(0.05 z): every volume x exp(0.15 z)",
    "lv_dilation": "LV short-axis radius x exp(0.065 z), long axis x exp(0.03 z) (more spherical), LV wall "
                   "x exp(-0.07 z) (thinner), LA radii x exp(0.04 z); the RV is pushed rightwards",
    "lv_hypertrophy": "LV wall x exp(0.13 z) (thicker), LV cavity radius x exp(-0.04 z), long axis x exp(-0.015 z), "
                      "LA radii x exp(0.02 z)",
    "right_heart_load": "RV radii x exp(0.07 z) (long axis 0.03), RV outflow x exp(0.05 z), RA radii x exp(0.07 z), "
                        "PA trunk radius x exp(0.08 z), PA branches x exp(0.07 z)",
    "atrial_enlargement": "LA radii x exp(0.07 z), LAA x exp(0.08 z), PV radius x exp(0.06 z), RA radii x exp(0.03 z); "
                          "PV ostia and the LAA stay on the growing LA",
    "aortic_ageing": "aortic radius x exp(0.05 z); the arch rises by 3 z mm and the descending aorta moves "
                     "3 z mm posterior (elongated, unfolded arch); with age also LV wall x exp(0.03 z), LA radii "
                     "x exp(0.02 z) and the ventricles turn 3 z degrees towards horizontal",
    "heart_orientation": "ventricles (LV, myocardium, RV, coronaries) turn 6 z degrees about the antero-posterior "
                         "axis through the valve plane: + = more horizontal (apex further left), - = more vertical",
    "coronary_dominance": "RCA reaches 10 z degrees further round the RV and its radius x exp(0.06 z); the LCx "
                          "stops 10 z degrees earlier and its radius x exp(-0.06 z): + = right dominant",
}
MODE_NAMES = tuple(MODES)
#: Size factors of the modes population's mean heart relative to the original generator (LV radius
#: and length, RV, LA, RA and LAA radii), so that its medians sit at adult CT values.
_MODE_BASE = {"lv_r": 1.07, "lv_len": 1.05, "rv": 1.04, "la": 1.05, "ra": 1.08, "laa": 1.1}
#: Drawn mode values are clipped to +-MODE_CLIP standard deviations (no 4-sigma hearts).
MODE_CLIP = 2.5
#: With modes, the independent per-structure jitter is this fraction of the old one (sizes +-3.2 %,
#: positions +-1.2 mm instead of +-8 % and +-3 mm; the independent overall scale +-2.5 %).
MODE_JITTER = 0.4

#: Volume ranges (mL) that every heart of the "modes" population stays in (modes clipped at
#: +-2.5 SD), per structure: adult CT values from normal to moderately enlarged; sources in
#: docs/synthetic_population.md (chambers and myocardium: Fuchs et al. 2016, Kang et al. 2017,
#: Stolzmann et al. 2008 CCTA reference values; vessels: the CT diameters of Wolak et al. 2008 and
#: Truong et al. 2012 over the vessel lengths modelled here). Checked on 50 hearts by the tests.
VOLUME_RANGES_ML = {
    "Myocardium": (60, 240), "LA": (25, 160), "LV": (50, 250), "RA": (35, 190), "RV": (45, 280),
    "Aorta": (35, 170), "PA": (25, 110), "LAA": (2.5, 20), "Coronary": (1.5, 8), "PV": (6, 35),
}


def draw_modes(seed: int) -> dict[str, float]:
    """The mode z-scores of heart ``seed`` (a generator of their own: ``default_rng([seed, 1])``,
    so the old random stream of ``seed`` is untouched), clipped to +-:data:`MODE_CLIP`, rounded to
    4 decimals so that the recorded values rebuild the same heart."""
    rng = np.random.default_rng([int(seed), 1])
    z = np.clip(rng.standard_normal(len(MODE_NAMES)), -MODE_CLIP, MODE_CLIP)
    return {name: round(float(v), 4) for name, v in zip(MODE_NAMES, z)}


def resolve_modes(modes, seed: int) -> dict[str, float] | None:
    """``False``/``None``: no modes (the original generator); ``True``: drawn from ``seed``
    (:func:`draw_modes`); a dict: those values (z-scores), every mode it does not name at 0."""
    if modes is None or modes is False:
        return None
    if modes is True:
        return draw_modes(seed)
    if not isinstance(modes, dict):
        raise TypeError(f"modes must be a bool or a dict of z-scores, got {type(modes).__name__}")
    unknown = sorted(set(modes) - set(MODE_NAMES))
    if unknown:
        raise ValueError(f"unknown synthetic heart mode(s) {unknown}; known: {list(MODE_NAMES)}")
    values = {name: float(modes.get(name, 0.0)) for name in MODE_NAMES}
    bad = [n for n, v in values.items() if not np.isfinite(v)]
    if bad:
        raise ValueError(f"mode value(s) of {bad} are not finite")
    return values


def _canonical_structures(rng: np.random.Generator, modes: dict[str, float] | None = None) -> dict[str, list]:
    """The ten structures in an upright heart frame (x right, y anterior, z superior; origin at
    the centre of the LV valve plane, apex towards -z), sizes and positions jittered.

    ``modes`` (z-scores by name, see :data:`MODES`): move structures together and shrink the
    independent jitter to :data:`MODE_JITTER`; the random numbers drawn from ``rng`` are the same
    ones in the same order either way. Without modes this is the original generator, bit for bit.
    """
    j = 1.0 if modes is None else MODE_JITTER

    def jit(value, rel=0.08):
        return np.asarray(value, dtype=np.float64) * rng.uniform(1 - rel * j, 1 + rel * j, np.shape(value))

    def move(point, mm=3.0):
        return np.asarray(point, dtype=np.float64) + rng.uniform(-mm * j, mm * j, 3)

    z = dict.fromkeys(MODE_NAMES, 0.0) if modes is None else modes

    def f(*terms):
        """exp(sum of coefficient * z): the multiplicative effect of some modes."""
        return float(np.exp(sum(c * z[name] for name, c in terms)))

    eye = np.eye(3)
    lv_r, lv_len = jit(24.0), jit(75.0)
    wall = jit(10.0, 0.1)
    if modes is not None:
        # base sizes of the modes population sit at adult CT medians (docs/synthetic_population.md)
        lv_r = lv_r * _MODE_BASE["lv_r"] * f(("lv_dilation", 0.065), ("lv_hypertrophy", -0.04))
        lv_len = lv_len * _MODE_BASE["lv_len"] * f(("lv_dilation", 0.03), ("lv_hypertrophy", -0.015))
        wall = wall * f(("lv_dilation", -0.07), ("lv_hypertrophy", 0.13), ("aortic_ageing", 0.03))
    myo_r, myo_len = lv_r + wall, lv_len + wall
    s = {}
    s["LV"] = [Ellipsoid(np.zeros(3), eye, np.array([lv_r, lv_r, lv_len]), clip_axis=2)]
    s["Myocardium"] = [Ellipsoid(np.zeros(3), eye, np.array([myo_r, myo_r, myo_len]), clip_axis=2)]
    # RV: a larger half-ellipsoid shifted right/anterior; where it meets the LV shell the
    # myocardium wins (priority), which leaves a crescent wrapped around the septum.
    rv_c = move([18.0, 10.0, 0.0], 2.0)
    rv_c[2] = 0.0
    rv_r = jit([44.0, 36.0, 68.0])
    outflow = [move([8, 30, -12]), move([2, 34, 8])]
    outflow_r = jit(13.0)
    if modes is not None:
        rv_grow = np.array([f(("right_heart_load", 0.07)), f(("right_heart_load", 0.07)), f(("right_heart_load", 0.03))])
        rv_grow = rv_grow * _MODE_BASE["rv"]
        rv_c = rv_c + np.array([0.6, 0.3, 0.0]) * (myo_r - 34.0) + np.array([0.4, 0.2, 0.0]) * rv_r * (rv_grow - 1)
        rv_r = rv_r * rv_grow
        outflow_r = outflow_r * f(("right_heart_load", 0.05))
    s["RV"] = [Ellipsoid(rv_c, eye, rv_r, clip_axis=2), *_tube(outflow, outflow_r)]
    la_base = np.array([-5.0, -32.0, 22.0])
    la_c = move(la_base)
    la_r = jit([30.0, 22.0, 22.0])
    la_grow = 1.0
    if modes is not None:
        la_grow = _MODE_BASE["la"] * f(("atrial_enlargement", 0.07), ("lv_dilation", 0.04), ("lv_hypertrophy", 0.02),
                                       ("aortic_ageing", 0.02))
        # the LA grows away from the valve plane (posterior and up), not into the LV
        la_c = la_c + np.array([0.0, -1.0, 0.4]) * la_r[1] * (la_grow - 1)
        la_r = la_r * la_grow
    s["LA"] = [Ellipsoid(la_c, eye, la_r)]
    ra_c, ra_r = move([38.0, -12.0, 20.0]), jit([24.0, 24.0, 28.0])
    if modes is not None:
        ra_grow = _MODE_BASE["ra"] * f(("right_heart_load", 0.07), ("atrial_enlargement", 0.03))
        ra_c = ra_c + np.array([1.0, -0.3, 0.2]) * ra_r[0] * (ra_grow - 1)  # grows to the right, away from the RV
        ra_r = ra_r * ra_grow
    s["RA"] = [Ellipsoid(ra_c, eye, ra_r)]
    aorta_pts = [[6, 10, -8], [8, 12, 15], [6, 8, 42], [-2, -8, 62], [-18, -28, 68], [-28, -46, 56],
                 [-30, -52, 36]]
    aorta_pts = [move(p, 2.0) for p in aorta_pts]
    aorta_r = jit(13.0, 0.1)
    if modes is not None:
        g = z["aortic_ageing"]
        rise = (0.0, 0.0, 0.5, 1.0, 1.0, 0.8, 0.5)  # the arch rises (ascending aorta elongates) ...
        back = (0.0, 0.0, 0.0, 0.2, 0.6, 1.0, 1.0)  # ... and unfolds: the descending limb moves posterior
        aorta_pts = [p + np.array([0.0, -3.0 * g * b, 3.0 * g * r]) for p, r, b in zip(aorta_pts, rise, back)]
        aorta_r = aorta_r * f(("aortic_ageing", 0.05))
    s["Aorta"] = _tube(aorta_pts, aorta_r)
    trunk = [move([2, 34, 6], 2.0), move([-2, 32, 30], 2.0), move([-12, 18, 48], 2.0)]
    branch_r = jit(9.0, 0.1)
    trunk_r = jit(13.0, 0.1)
    branch_pts = [move([-35, 5, 52]), move([-50, -12, 48]), move([5, -14, 50]), move([30, -20, 46])]
    if modes is not None:
        trunk_r = trunk_r * f(("right_heart_load", 0.08))
        branch_r = branch_r * f(("right_heart_load", 0.07))
    s["PA"] = (_tube(trunk, trunk_r)
               + _tube([trunk[-1], branch_pts[0], branch_pts[1]], branch_r)
               + _tube([trunk[-1], branch_pts[2], branch_pts[3]], branch_r))
    laa_c = move([-36.0, -8.0, 30.0])
    if modes is not None:  # the appendage stays on the LA wall as the atrium grows
        laa_c = la_c + (laa_c - la_base) * la_grow
    laa_r = jit([17.0, 8.0, 9.0], 0.1)
    if modes is not None:
        laa_r = laa_r * _MODE_BASE["laa"] * f(("atrial_enlargement", 0.08))
    s["LAA"] = [Ellipsoid(laa_c, _axes_along(laa_c - la_c), laa_r)]
    pv_r = jit(7.0, 0.1)
    if modes is not None:
        pv_r = pv_r * f(("atrial_enlargement", 0.06))
    s["PV"] = []
    for start, end in (([-22, -42, 32], [-46, -54, 40]), ([-22, -44, 14], [-44, -56, 6]),
                       ([12, -44, 32], [34, -56, 40]), ([12, -46, 14], [32, -58, 6])):
        a, b = move(start, 2.0), move(end, 3.0)
        if modes is not None:  # ostia on the (grown) LA, veins keep their direction and length
            ostium = la_c + (a - la_base) * la_grow
            a, b = ostium, ostium + (b - a)
        s["PV"] += _tube([a, b], pv_r)
    s["Coronary"] = _coronaries(rng, myo_r, myo_len, rv_c, rv_r, None if modes is None else z["coronary_dominance"])
    if modes is not None and (z["heart_orientation"] != 0.0 or z["aortic_ageing"] != 0.0):
        turn = rotation_matrix([0.0, 1.0, 0.0], np.deg2rad(6.0 * z["heart_orientation"] + 3.0 * z["aortic_ageing"]))
        for name in ("LV", "Myocardium", "RV", "Coronary"):
            s[name] = [p.transformed(turn, np.zeros(3), 1.0) for p in s[name]]
    return s


def _coronaries(rng, myo_r: float, myo_len: float, rv_c: np.ndarray, rv_r: np.ndarray,
                dominance: float | None = None) -> list[Capsule]:
    """Left main, LAD, LCx and RCA as 1.8 mm-radius tubes just outside the epicardium.

    ``dominance`` (z-score, modes only): + lengthens and widens the RCA and shortens and narrows the LCx.
    """
    radius = 1.8
    offset = radius + 0.7  # centre line outside the myocardium, so the vessel sits on it

    def on_epicardium(phi_deg, z):
        r = myo_r * np.sqrt(max(0.0, 1.0 - (z / myo_len) ** 2)) + offset
        phi = np.deg2rad(phi_deg)
        return np.array([r * np.cos(phi), r * np.sin(phi), z])

    phi_lad = 105.0 + rng.uniform(-5, 5)
    lad = [on_epicardium(phi_lad + 10 * t, -4.0 - t * (myo_len - 12.0)) for t in np.linspace(0, 1, 9)]
    lcx_end = 250.0 + rng.uniform(-10, 10)
    rca_end = -70.0 + rng.uniform(-10, 10)
    lcx_r = rca_r = radius
    if dominance is not None:
        lcx_end, rca_end = lcx_end - 10.0 * dominance, rca_end - 10.0 * dominance
        lcx_r, rca_r = radius * float(np.exp(-0.06 * dominance)), radius * float(np.exp(0.06 * dominance))
    lcx = [on_epicardium(phi, -4.0) for phi in np.linspace(phi_lad, lcx_end, 9)]
    left_main = [np.array([-3.0, 16.0, 4.0]), lad[0]]
    rca = [np.array([20.0, 16.0, 4.0])]
    for ang in np.linspace(60.0, rca_end, 9):
        a = np.deg2rad(ang)
        rca.append(np.array([rv_c[0] + (rv_r[0] + offset) * np.cos(a), rv_c[1] + (rv_r[1] + offset) * np.sin(a),
                             -4.0]))
    return (_tube(left_main, radius, 0) + _tube(lad, radius, 1) + _tube(lcx, lcx_r, 1)
            + _tube(rca, rca_r, 1))


#: Upright frame -> anatomical orientation: the LV apex points left, anterior and inferior.
_TILT = rotation_matrix([1.0, 0.0, 0.0], np.deg2rad(25.0)) @ rotation_matrix([0.0, 1.0, 0.0], np.deg2rad(35.0))


@dataclass
class SyntheticHeart:
    """Ten analytic structures in RAS mm. ``primitives[name]`` is a union of shapes."""

    primitives: dict[str, list]
    table: StructureTable
    seed: int = 0
    params: dict = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return [n for n in self.table.names if n in self.primitives]

    def _priority_order(self) -> list[str]:
        known = [n for n in PRIORITY if n in self.primitives]
        return known + [n for n in self.names if n not in known]

    def structure_bounds(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """Axis-aligned RAS box (mm) that contains the structure (conservative)."""
        lows, highs = zip(*(p.bounds() for p in self.primitives[self.table.by_name(name).name]))
        return np.min(lows, axis=0), np.max(highs, axis=0)

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """RAS box (mm) containing the whole heart."""
        lows, highs = zip(*(self.structure_bounds(n) for n in self.names))
        return np.min(lows, axis=0), np.max(highs, axis=0)

    def structure_centre(self, name: str) -> np.ndarray:
        """A point inside the structure (centre of its first primitive), RAS mm."""
        first = self.primitives[self.table.by_name(name).name][0]
        if isinstance(first, Ellipsoid) and first.clip_axis is not None:
            return first.center - 0.5 * first.radii[first.clip_axis] * first.axes[:, first.clip_axis]
        return first.center if isinstance(first, Ellipsoid) else 0.5 * (first.a + first.b)

    def inside(self, points_ras) -> np.ndarray:
        """Label value (int16, 0 = outside every structure) at each RAS point (N, 3) in mm."""
        pts = np.asarray(points_ras, dtype=np.float64)
        flat = pts.reshape(-1, 3)
        out = np.zeros(len(flat), dtype=np.int16)
        x, y, z = (np.ascontiguousarray(flat[:, i]) for i in range(3))
        for name in reversed(self._priority_order()):  # higher priority painted last, so it wins
            value = self.table.by_name(name).label
            for prim in self.primitives[name]:
                low, high = prim.bounds()  # cheap box test first: most shapes are small
                near = np.nonzero((x >= low[0]) & (x <= high[0]) & (y >= low[1]) & (y <= high[1])
                                  & (z >= low[2]) & (z <= high[2]))[0]
                out[near[prim.contains(flat[near])]] = value
        return out.reshape(pts.shape[:-1])

    def rasterize(self, shape, ijk_to_ras, source: str = "<synthetic>") -> LabelMap:
        """Label map of this heart on a grid: a voxel gets the label at its centre.

        Each shape is evaluated only inside its own bounding box, in chunks, so a 160^3 grid takes
        well under a second and a CT-sized 512x512x256 grid stays within memory.
        """
        shape = tuple(int(n) for n in shape)
        m = np.asarray(ijk_to_ras, dtype=np.float64)
        labels = np.zeros(shape, dtype=np.int16)
        for name in reversed(self._priority_order()):
            value = self.table.by_name(name).label
            for prim in self.primitives[name]:
                box = _ijk_box(*prim.bounds(), m, shape)
                if box is not None:
                    _paint(labels, prim, box, m, value)
        meta = {"synthetic": {"seed": self.seed, **self.params}}
        return LabelMap(labels, m, source=source, metadata=meta)

    def default_grid(self, spacing_mm=(1.0, 1.0, 1.0), direction=None, flip_axes=(), margin_mm: float = 10.0):
        """``(shape, ijk_to_ras)`` of a grid covering the heart plus ``margin_mm``, centred on it.

        ``direction``: 3x3, columns = unit voxel-axis directions in RAS (identity = RAS-aligned);
        ``flip_axes``: voxel axes whose direction is negated (e.g. ``(0, 1)`` stores it as LPS).
        """
        direction = np.eye(3) if direction is None else np.array(direction, dtype=np.float64)
        for axis in flip_axes:
            direction[:, axis] = -direction[:, axis]
        spacing = np.asarray(spacing_mm, dtype=np.float64) * np.ones(3)
        low, high = self.bounds()
        low, high = low - margin_mm, high + margin_mm
        corners = np.array([[x, y, z] for x in (low[0], high[0]) for y in (low[1], high[1]) for z in (low[2], high[2])])
        along = corners @ direction  # coordinates along each voxel axis, mm
        extent = along.max(axis=0) - along.min(axis=0)
        shape = tuple(int(np.ceil(e / s)) + 1 for e, s in zip(extent, spacing))
        return shape, centred_grid(shape, spacing, 0.5 * (low + high), direction)


def centred_grid(shape, spacing_mm, centre_ras, direction=None) -> np.ndarray:
    """IJK->RAS of a grid of ``shape`` whose centre (mid-voxel) is at ``centre_ras`` (mm)."""
    m = make_ijk_to_ras(spacing_mm, (0.0, 0.0, 0.0), direction)
    mid = m[:3, :3] @ ((np.asarray(shape, dtype=np.float64) - 1.0) / 2.0)
    m[:3, 3] = np.asarray(centre_ras, dtype=np.float64) - mid
    return m


def _ijk_box(low, high, ijk_to_ras, shape):
    """Index ranges (inclusive start, exclusive stop) of voxels whose centres may lie in a RAS box."""
    corners = np.array([[x, y, z] for x in (low[0], high[0]) for y in (low[1], high[1]) for z in (low[2], high[2])])
    ijk = ras_to_ijk_points(corners, ijk_to_ras)
    start = np.maximum(np.floor(ijk.min(axis=0)).astype(int), 0)
    stop = np.minimum(np.ceil(ijk.max(axis=0)).astype(int) + 1, shape)
    if np.any(stop <= start):
        return None
    return start, stop


def _paint(labels, prim, box, ijk_to_ras, value) -> None:
    """Set ``value`` where voxel centres in ``box`` lie inside ``prim``. Local coordinates are an
    affine function of the voxel indices, built by broadcasting (no RAS point array, no matmul)."""
    start, stop = box
    frame, offset = prim.local_frame()
    per_index = ijk_to_ras[:3, :3].T @ frame  # row i: local step per voxel step along axis i
    base = ijk_to_ras[:3, 3] @ frame + offset
    jj = np.arange(start[1], stop[1], dtype=np.float64)
    kk = np.arange(start[2], stop[2], dtype=np.float64)
    plane = jj[:, None, None] * per_index[1] + kk[None, :, None] * per_index[2] + base  # (nj, nk, 3)
    step = max(1, _CHUNK_POINTS // max(1, plane.shape[0] * plane.shape[1]))
    for i0 in range(start[0], stop[0], step):
        ii = np.arange(i0, min(i0 + step, stop[0]), dtype=np.float64)
        inside = prim.contains_local(ii[:, None, None, None] * per_index[0] + plane[None])
        block = labels[i0 : i0 + len(ii), start[1] : stop[1], start[2] : stop[2]]
        block[inside] = value


def synthetic_heart(seed: int = 0, table: StructureTable | None = None, scale: float | None = None,
                    centre_ras=(0.0, 0.0, 0.0), max_rotation_deg: float = 15.0,
                    max_translation_mm: float = 10.0, modes: bool | dict = False) -> SyntheticHeart:
    """A random heart from ``seed`` (same seed, same heart), in RAS mm.

    ``scale``: overall size factor (default random in 0.9..1.1); the heart is rotated by up to
    ``max_rotation_deg`` about each axis and its valve-plane centre placed within
    ``max_translation_mm`` of ``centre_ras``. Structures of ``table`` that the generator does not
    know (extended tables) are simply absent.

    ``modes``: ``False`` (default) is the original population, each structure jittered on its own
    (unchanged, bit for bit, for every seed). ``True`` draws the latent modes of :data:`MODES`
    (z-scores, from a generator of their own, :func:`draw_modes`) that move several structures
    together, on top of a smaller independent jitter; the overall scale is then
    ``exp(0.05 * body_size)`` times an independent +-2.5 % (times ``scale`` when given). A dict
    ``{"lv_dilation": 2.0, ...}`` sets the modes explicitly (unnamed ones at 0). The values used
    are recorded in ``params["modes"]``; passing them back rebuilds the same heart.

    >>> heart = synthetic_heart(seed=3, modes=True)
    >>> sorted(heart.params["modes"]) == sorted(MODE_NAMES)
    True
    >>> synthetic_heart(seed=3, modes=heart.params["modes"]).params == heart.params
    True
    """
    table = StructureTable.from_spec(table)
    mode_values = resolve_modes(modes, seed)
    rng = np.random.default_rng(seed)
    canonical = _canonical_structures(rng, mode_values)
    if mode_values is None:
        scale = float(rng.uniform(0.9, 1.1)) if scale is None else float(scale)
    else:
        independent = float(rng.uniform(0.9, 1.1))  # drawn either way: the pose below stays the same stream
        base = 1.0 + 0.25 * (independent - 1.0) if scale is None else float(scale)  # +-2.5 %
        scale = base * float(np.exp(0.05 * mode_values["body_size"]))
    angles = np.deg2rad(rng.uniform(-max_rotation_deg, max_rotation_deg, 3))
    pose = (rotation_matrix([0, 0, 1], angles[2]) @ rotation_matrix([0, 1, 0], angles[1])
            @ rotation_matrix([1, 0, 0], angles[0]))
    translation = np.asarray(centre_ras, dtype=np.float64) + rng.uniform(-max_translation_mm, max_translation_mm, 3)
    rotation = pose @ _TILT
    primitives = {}
    for name, prims in canonical.items():
        structure = table.match_name(name)
        if structure is not None:
            primitives[structure.name] = [p.transformed(rotation, translation, scale) for p in prims]
    params = {"scale": scale, "rotation_deg": np.rad2deg(angles).round(3).tolist(),
              "translation_mm": translation.round(3).tolist()}
    if mode_values is not None:
        params["modes"] = dict(mode_values)
    return SyntheticHeart(primitives, table, seed=seed, params=params)


def check_grid_size(shape, max_voxels: float | None) -> None:
    """Raise ``ValueError`` naming the grid when ``shape`` has more than ``max_voxels`` voxels."""
    voxels = int(np.prod([int(n) for n in shape], dtype=object))
    if max_voxels is not None and voxels > max_voxels:
        dims = " x ".join(str(int(n)) for n in shape)
        raise ValueError(f"grid {dims} = {voxels:.3g} voxels ({voxels * 2 / 1e9:.1f} GB of int16 labels) is above "
                         f"the limit of {float(max_voxels):.3g} voxels; use a coarser spacing or raise --max_voxels")


def crop_label_map(label_map: LabelMap, start, stop) -> LabelMap:
    """Sub-grid ``[start, stop)`` of a label map; the IJK->RAS origin moves so voxels stay put."""
    start = np.asarray(start, dtype=int)
    sl = tuple(slice(int(a), int(b)) for a, b in zip(start, stop))
    m = label_map.ijk_to_ras.copy()
    m[:3, 3] = m[:3, :3] @ start + m[:3, 3]
    return LabelMap(label_map.labels[sl].copy(), m, source=label_map.source, metadata=dict(label_map.metadata))


def truncate_structure(label_map: LabelMap, label: int, depth: float = 0.4) -> LabelMap:
    """Cut the field of view so that structure ``label`` touches the border.

    The face of the grid nearest to the structure moves inwards until ``depth`` (0..1) of the
    structure's extent along that axis lies outside, like a CT field of view that cuts the LAA.
    """
    if not 0.0 < depth < 1.0:
        raise ValueError(f"truncation depth must be in (0, 1), got {depth}")
    idx = np.argwhere(label_map.labels == label)
    if idx.size == 0:
        raise ValueError(f"{label_map.source}: label {label} is absent, cannot truncate it")
    lo, hi = idx.min(axis=0), idx.max(axis=0)
    shape = np.asarray(label_map.shape)
    gaps = np.concatenate([lo, shape - 1 - hi])  # distance (voxels) from the structure to each face
    face = int(np.argmin(gaps))
    axis = face % 3
    cut = int(round(depth * (hi[axis] - lo[axis] + 1)))
    start, stop = np.zeros(3, dtype=int), shape.copy()
    if face < 3:
        start[axis] = lo[axis] + max(cut, 1)
    else:
        stop[axis] = hi[axis] + 1 - max(cut, 1)
    return crop_label_map(label_map, start, stop)


def synthetic_grid(heart: SyntheticHeart, spacing_mm=(1.0, 1.0, 1.0), shape=None, direction=None, flip_axes=(),
                   margin_mm: float = 10.0) -> tuple[tuple[int, int, int], np.ndarray]:
    """``(shape, ijk_to_ras)`` of the grid :func:`synthetic_label_map` rasterises ``heart`` into
    (nothing is allocated: callers can check the size first)."""
    spacing = np.asarray(spacing_mm, dtype=np.float64) * np.ones(3)
    grid_shape, m = heart.default_grid(spacing, direction, flip_axes, margin_mm)
    if shape is not None:
        low, high = heart.bounds()
        grid_shape = tuple(int(d if n is None else n) for n, d in zip(shape, grid_shape))
        m = centred_grid(grid_shape, spacing_of(m), 0.5 * (low + high), m[:3, :3] / spacing_of(m)[None, :])
    return grid_shape, m


def synthetic_label_map(seed: int = 0, spacing_mm=(1.0, 1.0, 1.0), shape=None, direction=None, flip_axes=(),
                        truncate=None, truncate_depth: float = 0.4, table=None, margin_mm: float = 10.0,
                        heart: SyntheticHeart | None = None, modes: bool | dict = False,
                        max_voxels: float | None = None) -> LabelMap:
    """A synthetic heart rasterised into a grid (labels = table values, int16).

    - ``spacing_mm``: voxel size (a number or three); CT-like is ``(0.4, 0.4, 0.5)``.
    - ``shape``: grid size; default (or ``None`` per axis) covers the heart plus ``margin_mm``.
      The grid is centred on the heart either way.
    - ``direction`` / ``flip_axes``: voxel-axis directions in RAS (columns) and axes to negate.
    - ``truncate``: a structure name/label whose side of the field of view is cut
      (:func:`truncate_structure`, ``truncate_depth`` of its extent removed).
    - ``heart``: rasterise this heart instead of ``synthetic_heart(seed, table, modes=modes)``.
    - ``modes``: passed to :func:`synthetic_heart` (``True``: correlated population; a dict: explicit
      mode z-scores); recorded in ``metadata["synthetic"]["modes"]``.
    - ``max_voxels``: refuse (``ValueError`` naming the grid) a grid of more voxels, before allocating it.

    ``metadata["synthetic"]`` records the seed, pose and the structures touching the border.

    >>> lm = synthetic_label_map(seed=1, spacing_mm=3.0)
    >>> len(lm.present_labels())
    10
    """
    heart = heart if heart is not None else synthetic_heart(seed, table=table, modes=modes)
    grid_shape, m = synthetic_grid(heart, spacing_mm, shape, direction, flip_axes, margin_mm)
    check_grid_size(grid_shape, max_voxels)
    label_map = heart.rasterize(grid_shape, m, source=f"<synthetic seed={heart.seed}>")
    info = label_map.metadata["synthetic"]
    if truncate is not None:
        structure = heart.table.by_label(truncate) if isinstance(truncate, (int, np.integer)) \
            else heart.table.by_name(str(truncate))
        label_map = truncate_structure(label_map, structure.label, truncate_depth)
        info["truncated_structure"] = structure.name
    info["touching_border"] = [heart.table.by_label(v).name for v in label_map.border_labels()]
    label_map.metadata["synthetic"] = info
    return label_map
