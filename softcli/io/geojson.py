"""Label masks as GeoJSON polygons, for QuPath (File → Import objects) and any GIS tool.

One ``Feature`` per label present (``background``, label 0 of a tissue-masked run,
is left out): a ``MultiPolygon`` of its pixel areas, with QuPath's
``classification`` (``name`` and ``color``) and the label index in ``properties``.
Coordinates are **level-0 pixels** (x right, y down), as QuPath expects, whatever
level or resolution the mask was computed at.

Polygons follow pixel edges exactly (no smoothing), traced on the label grid:
every boundary edge is oriented with the label on its left; at a vertex where two
pixels of the label touch only diagonally the trace turns towards the label, so
diagonal neighbours become separate polygons (4-connectivity), and a ring that
meets itself at a vertex is split there. Every ring is then simple and every
polygon valid (OGC). Holes go to the smallest shell that contains them.

A mask with a side above :data:`MAX_GRID_SIDE` is traced on a subsampled grid
(every ``step``-th pixel) and the coordinates scaled back; the ``step`` is recorded.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UsageError
from .atomic import atomic_path, check_output_path

#: Longest side of the label grid that is traced (a 40000² mask is traced every 20th pixel); tracing is
#: pure numpy + Python, about 1 s per 10^5 boundary edges.
MAX_GRID_SIDE = 2048
SKIP_NAMES = ("background",)


def check_geojson_output(path: str | os.PathLike[str], inputs: Sequence[str | os.PathLike[str]]) -> None:
    """Refuse a GeoJSON output that has the wrong suffix or would overwrite an input, before any work."""
    if Path(path).suffix.lower() not in (".geojson", ".json"):
        raise UsageError(f"{path}: a GeoJSON output needs a .geojson (or .json) name")
    check_output_path(path, list(inputs))


def _boundary_edges(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Directed boundary edges of a bool mask: (start vertex, end vertex, direction), vertex = y * (W + 1) + x.

    Directions: 0 down, 1 right, 2 up, 3 left; the mask is on each edge's left.
    """
    h, w = mask.shape
    p = np.pad(mask, 1)
    inner = p[1:-1, 1:-1]
    vw = w + 1
    starts, ends, dirs = [], [], []
    for d, nb, (sy, sx), (ey, ex) in (
        (0, p[1:-1, :-2], (0, 0), (1, 0)),  # left side of the pixel, going down
        (1, p[2:, 1:-1], (1, 0), (1, 1)),  # bottom side, going right
        (2, p[1:-1, 2:], (1, 1), (0, 1)),  # right side, going up
        (3, p[:-2, 1:-1], (0, 1), (0, 0)),  # top side, going left
    ):
        ys, xs = np.nonzero(inner & ~nb)
        starts.append((ys + sy) * vw + xs + sx)
        ends.append((ys + ey) * vw + xs + ex)
        dirs.append(np.full(ys.shape, d, np.int8))
    return np.concatenate(starts), np.concatenate(ends), np.concatenate(dirs), vw


def _successors(start: np.ndarray, end: np.ndarray, dirs: np.ndarray) -> np.ndarray:
    """The edge that follows each edge: the only one leaving its end vertex, or the left turn at a saddle."""
    order = np.argsort(start, kind="stable")
    sorted_start = start[order]
    first = np.searchsorted(sorted_start, end, side="left")
    count = np.searchsorted(sorted_start, end, side="right") - first
    cand = order[first]
    two = count == 2
    if two.any():
        alt = order[np.minimum(first + 1, len(order) - 1)]
        want = (dirs + 1) % 4  # turning left keeps to the label: diagonal pixels stay apart
        use_alt = two & (dirs[cand] != want)
        cand = np.where(use_alt, alt, cand)
    return cand


def _simple_rings(cycle: list[int]) -> list[list[int]]:
    """Split a closed vertex sequence that meets itself into simple rings."""
    if len(set(cycle)) == len(cycle):
        return [cycle]
    rings: list[list[int]] = []
    stack: list[int] = []
    where: dict[int, int] = {}
    for v in cycle + [cycle[0]]:
        if v in where:
            i = where[v]
            ring = stack[i:]
            for u in ring[1:]:
                del where[u]
            del stack[i + 1:]
            if len(ring) >= 3:
                rings.append(ring)
        else:
            where[v] = len(stack)
            stack.append(v)
    return rings


def _corners(xy: np.ndarray) -> np.ndarray:
    """Drop vertices on straight runs (pixel edges make many collinear points)."""
    prev, nxt = np.roll(xy, 1, axis=0), np.roll(xy, -1, axis=0)
    cross = (xy[:, 0] - prev[:, 0]) * (nxt[:, 1] - xy[:, 1]) - (xy[:, 1] - prev[:, 1]) * (nxt[:, 0] - xy[:, 0])
    return xy[cross != 0]


def _area(xy: np.ndarray) -> float:
    x, y = xy[:, 0], xy[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))


def _inside(pt: tuple[float, float], ring: np.ndarray) -> bool:
    """Even-odd rule; ``pt`` is a pixel centre, never on a ring's edge."""
    x, y = pt
    x0, y0 = ring[:, 0], ring[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    cross = (y0 > y) != (y1 > y)
    with np.errstate(divide="ignore", invalid="ignore"):
        xs = x0 + (y - y0) * (x1 - x0) / (y1 - y0)
    return bool(np.count_nonzero(cross & (x < xs)) % 2)


def mask_polygons(mask: np.ndarray) -> list[list[np.ndarray]]:
    """Polygons of a bool mask in pixel-edge coordinates: [[shell (N, 2) xy, hole, ...], ...]."""
    if not mask.any():
        return []
    start, end, dirs, vw = _boundary_edges(mask)
    succ = _successors(start, end, dirs)
    seen = np.zeros(len(start), bool)
    shells: list[np.ndarray] = []
    holes: list[tuple[np.ndarray, tuple[float, float]]] = []
    for e0 in range(len(start)):
        if seen[e0]:
            continue
        cycle = []
        e = e0
        while not seen[e]:
            seen[e] = True
            cycle.append(int(start[e]))
            e = int(succ[e])
        for ring in _simple_rings(cycle):
            v = np.asarray(ring, np.int64)
            xy = np.stack([v % vw, v // vw], axis=1).astype(np.float64)
            area = _area(xy)
            corners = _corners(xy)
            if area < 0:  # edges with the mask on their left run this way round a shell
                shells.append(corners)
            else:  # a hole: the pixel right of its first edge lies inside it
                (ax, ay), (bx, by) = xy[0], xy[1]
                mx, my = (ax + bx) / 2, (ay + by) / 2
                holes.append((corners, (mx - (by - ay) * 0.5, my + (bx - ax) * 0.5)))
    polys: list[list[np.ndarray]] = [[s] for s in shells]
    if holes:
        boxes = np.array([[s[:, 0].min(), s[:, 1].min(), s[:, 0].max(), s[:, 1].max()] for s in shells])
        areas = np.array([-_area(s) for s in shells])
        for hole, (px, py) in holes:
            cand = np.nonzero((boxes[:, 0] < px) & (px < boxes[:, 2]) & (boxes[:, 1] < py) & (py < boxes[:, 3]))[0]
            best = None
            for i in cand[np.argsort(areas[cand])]:
                if _inside((px, py), shells[i]):
                    best = int(i)
                    break
            if best is not None:
                polys[best].append(hole)
    return polys


def labels_geojson(labels: np.ndarray, names: Sequence[str], palette: Sequence[Sequence[int]],
                   scale: tuple[float, float] = (1.0, 1.0), metadata: Mapping[str, str] | None = None
                   ) -> dict[str, Any]:
    """A GeoJSON FeatureCollection of a label grid; ``scale`` = (y, x) grid pixels → level-0 pixels.

    ``metadata`` (string pairs: which model made it) goes into every feature's
    ``properties.metadata`` (QuPath keeps it as the object's metadata) and the collection's ``softcli`` member.
    """
    sy, sx = scale
    features = []
    for index in np.unique(labels):
        index = int(index)
        name = names[index] if index < len(names) else f"label {index}"
        if name in SKIP_NAMES:
            continue
        polys = mask_polygons(labels == index)
        coords = []
        for poly in polys:
            rings = []
            for ring in poly:
                pts = np.column_stack([ring[:, 0] * sx, ring[:, 1] * sy])
                pts = np.vstack([pts, pts[:1]])
                rings.append([[round(float(x), 3), round(float(y), 3)] for x, y in pts])
            coords.append(rings)
        color = [int(c) for c in palette[index]] if index < len(palette) else [128, 128, 128]
        features.append({"type": "Feature", "geometry": {"type": "MultiPolygon", "coordinates": coords},
                         "properties": {"objectType": "annotation", "name": name, "label": index,
                                        "classification": {"name": name, "color": color},
                                        **({"metadata": dict(metadata)} if metadata else {})}})
    doc: dict[str, Any] = {"type": "FeatureCollection", "features": features}
    if metadata:
        doc["softcli"] = dict(metadata)
    return doc


def write_geojson(raster: Any, path: str | os.PathLike[str], names: Sequence[str],
                  palette: Sequence[Sequence[int]], scale: tuple[float, float] = (1.0, 1.0),
                  metadata: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Trace a :class:`~softcli.io.masks.LabelRaster` and write ``path``; returns a summary for ``--json``."""
    step = max(1, math.ceil(max(raster.height, raster.width) / MAX_GRID_SIDE))
    labels = raster.read_rows(0, raster.height, step)
    doc = labels_geojson(labels, names, palette, (scale[0] * step, scale[1] * step), metadata)
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        json.dump(doc, fh, separators=(",", ":"))
    return {"path": str(path), "features": len(doc["features"]), "step": step, "coordinates": "level-0 pixels"}
