"""The reader interface every image format implements (see :mod:`softcli.io.readers` for the formats)."""

from __future__ import annotations

from types import TracebackType

import numpy as np

from .slidemeta import SlideInfo


class ImageReader:
    """Base class: a random-access RGB view of one level of an image."""

    path: str
    height: int
    width: int
    level: int = 0
    levels: list[tuple[int, int]]
    #: Level-0 resolution from the file's metadata (empty when it has none); see :mod:`softcli.io.slide`.
    slide: SlideInfo = SlideInfo()

    @property
    def mpp(self) -> float | None:
        """µm per pixel of the pixels this reader delivers (level-0 mpp × this level's downsample), or None."""
        if self.slide.mpp is None:
            return None
        h0, w0 = self.levels[0]
        return self.slide.mpp * 0.5 * (w0 / self.width + h0 / self.height)

    def read_region(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        """Pixels [y, y+h) x [x, x+w) as float32 RGB (h, w, 3) in [0, 1]; outside the image is edge-replicated."""
        if h <= 0 or w <= 0:
            raise ValueError(f"empty region {w}x{h}")
        y0, y1 = max(0, y), min(self.height, y + h)
        x0, x1 = max(0, x), min(self.width, x + w)
        if y0 >= y1 or x0 >= x1:
            # Entirely outside: the nearest edge pixels, replicated.
            yc, xc = min(max(y, 0), self.height - 1), min(max(x, 0), self.width - 1)
            px = self._read(yc, xc, 1, 1)
            return np.ascontiguousarray(np.broadcast_to(px, (h, w, 3)))
        inner = self._read(y0, x0, y1 - y0, x1 - x0)
        pad = ((y0 - y, y + h - y1), (x0 - x, x + w - x1), (0, 0))
        if any(p for pair in pad for p in pair):
            inner = np.pad(inner, pad, mode="edge")
        return inner

    def _read(self, y: int, x: int, h: int, w: int) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def shape(self) -> tuple[int, int]:
        return self.height, self.width

    def close(self) -> None:
        """Release the file; the reader is unusable afterwards."""

    def __enter__(self) -> ImageReader:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r}, level={self.level}, {self.width}x{self.height})"


class ArrayReader(ImageReader):
    """An in-memory float RGB array (H, W, 3) as a reader (whole-decoded files, tests, the Python API)."""

    def __init__(self, array: np.ndarray, path: str = "<array>") -> None:
        if array.ndim != 3 or array.shape[2] != 3:
            raise ValueError(f"expected an (H, W, 3) RGB array, got {array.shape}")
        self.array = np.ascontiguousarray(array, dtype=np.float32)
        self.path = path
        self.height, self.width = int(array.shape[0]), int(array.shape[1])
        self.levels = [(self.height, self.width)]

    def _read(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        return self.array[y:y + h, x:x + w].copy()

    def close(self) -> None:
        self.array = np.empty((0, 0, 3), np.float32)
