"""Synthetic data for the ``soft fit`` tests: texture scenes with scribbles, and small image classes."""

from __future__ import annotations

import numpy as np


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cell: int) -> np.ndarray:
    """Low-frequency noise in [0, 1]: random values on a coarse grid, bilinearly upsampled."""
    gh, gw = h // cell + 2, w // cell + 2
    grid = rng.random((gh, gw))
    ys = np.arange(h) / cell
    xs = np.arange(w) / cell
    y0, x0 = ys.astype(int), xs.astype(int)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    a = grid[y0][:, x0]
    b = grid[y0][:, x0 + 1]
    c = grid[y0 + 1][:, x0]
    d = grid[y0 + 1][:, x0 + 1]
    return (a * (1 - fy) * (1 - fx) + b * (1 - fy) * fx + c * fy * (1 - fx) + d * fy * fx)


def texture_scene(h: int = 256, w: int = 256, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 RGB image (h, w, 3), labels int64 (h, w) in 0..2): three grey textures of close brightness.

    0: oriented stripes (period 20 px), 1: scattered small dots, 2: coarse blotches.
    All three stay within about 20 grey levels of each other; the layout (three
    smooth random regions) and texture phases change with ``seed``.
    """
    rng = np.random.default_rng(seed)
    while True:  # a layout where every texture covers at least a fifth of the image
        fields = np.stack([_smooth_noise(rng, h, w, max(h, w) // 3) for _ in range(3)])
        gt = fields.argmax(0).astype(np.int64)
        if np.bincount(gt.ravel(), minlength=3).min() >= 0.2 * h * w:
            break
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    angle = 0.7
    phase = rng.uniform(0, 2 * np.pi)
    stripes = np.where(np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / 20.0 + phase) > 0, 138.0, 120.0)
    dots = np.full((h, w), 122.0)
    for cy, cx in rng.random((h * w // 24, 2)) * (h, w):  # irregular dots: the same texture at every phase
        dots[int(cy):int(cy) + 2, int(cx):int(cx) + 2] = 140.0
    blotches = 118 + 22 * _smooth_noise(rng, h, w, 32)
    img = np.choose(gt, [stripes, dots, blotches]) + rng.normal(0, 2.0, (h, w))
    grey = np.clip(np.round(img), 0, 255).astype(np.uint8)
    return np.repeat(grey[:, :, None], 3, axis=2), gt


def _eroded(mask: np.ndarray, r: int) -> np.ndarray:
    """Pixels whose whole (2r+1)² box lies inside ``mask`` (an integral-image erosion)."""
    h, w = mask.shape
    ii = np.pad(mask.astype(np.int64), ((1, 0), (1, 0))).cumsum(0).cumsum(1)
    y0, y1 = np.clip(np.arange(h) - r, 0, h), np.clip(np.arange(h) + r + 1, 0, h)
    x0, x1 = np.clip(np.arange(w) - r, 0, w), np.clip(np.arange(w) + r + 1, 0, w)
    box = ii[y1][:, x1] - ii[y0][:, x1] - ii[y1][:, x0] + ii[y0][:, x0]
    return box == (y1 - y0)[:, None] * (x1 - x0)[None, :]  # the image edge does not erode


def scribbles(gt: np.ndarray, seed: int = 0, per_class: int = 3, length: int = 40, margin: int = 12) -> np.ndarray:
    """Sparse labels (0 = unlabelled, 1..K): a few short 2-px strokes inside each region, away from borders."""
    rng = np.random.default_rng(seed)
    h, w = gt.shape
    out = np.zeros((h, w), np.uint8)
    for c in range(int(gt.max()) + 1):
        inside = _eroded(gt == c, margin)
        ys, xs = np.nonzero(inside)
        if len(ys) == 0:
            continue
        for _ in range(per_class):
            i = rng.integers(len(ys))
            y, x = ys[i], xs[i]
            t = rng.uniform(0, np.pi)
            for s in range(length):
                py, px = round(y + s * np.sin(t)), round(x + s * np.cos(t))
                if 0 <= py < h - 1 and 0 <= px < w - 1 and inside[py, px]:
                    out[py:py + 2, px:px + 2] = c + 1
    return out


CLASSIFY_CLASSES = ("stripes", "dots", "blotches", "checks")
#: Each class also has its own colour cast (stains differ between tissue types too).
CLASS_TINTS = ((40, -20, -20), (-20, 40, -20), (-20, -20, 40), (30, 30, -40))


def class_image(cls: int, seed: int, size: int | None = None) -> np.ndarray:
    """A uint8 RGB image of class ``cls`` (:data:`CLASSIFY_CLASSES`, :data:`CLASS_TINTS`): random size,
    brightness, tint jitter and phase."""
    rng = np.random.default_rng(seed)
    h = w = size or int(rng.integers(96, 161))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    base = rng.uniform(100, 150)
    if cls == 0:
        a = rng.uniform(0, np.pi)
        grey = base + 15 * np.sign(np.sin(2 * np.pi * (xx * np.cos(a) + yy * np.sin(a)) / 12.0))
    elif cls == 1:
        grey = np.full((h, w), base - 8)
        for cy, cx in rng.random((h * w // 30, 2)) * (h, w):
            grey[int(cy):int(cy) + 2, int(cx):int(cx) + 2] = base + 12
    elif cls == 2:
        grey = base - 15 + 30 * _smooth_noise(rng, h, w, 24)
    else:
        p = int(rng.integers(6, 10))
        grey = base + 15 * np.where(((yy // p) + (xx // p)) % 2 == 0, 1.0, -1.0)
    tint = np.asarray(CLASS_TINTS[cls]) + rng.uniform(-8, 8, 3)
    rgb = grey[:, :, None] + tint + rng.normal(0, 3.0, (h, w, 3))
    return np.clip(np.round(rgb), 0, 255).astype(np.uint8)


def write_image_folder(root, per_class: int = 20, seed: int = 0) -> None:
    """``root/<class>/<i>.png``: ``per_class`` images of each of :data:`CLASSIFY_CLASSES`."""
    from PIL import Image

    for c, name in enumerate(CLASSIFY_CLASSES):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(class_image(c, seed * 100_000 + c * 1000 + i)).save(root / name / f"{i:03d}.png")
