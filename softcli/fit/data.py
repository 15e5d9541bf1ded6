"""What ``soft fit`` reads: labelled image folders, checked before any model runs.

Segmentation (``DATA/images/`` + ``DATA/labels/``, matching stems): a label
image is single-channel (PNG/TIFF, 8 or 16 bit, or a palette PNG whose
indices are the labels); 0 = unlabelled, 1..K = classes. Sparse scribbles and
dense masks are the same thing here. ``DATA/classes.json`` (optional) names
the classes and their colours::

    ["stroma", {"name": "tumour", "color": "#e6194b"}, ...]     # class 1, 2, ...

Classification: an ImageFolder layout, one sub-folder per class.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError, UsageError
from ..io.image import DEFAULT_MAX_PIXELS, check_pixels, is_tiff, open_pil
from ..io.inputs import IMAGE_SUFFIXES
from ..models.segmentation import default_palette

CLASSES_FILE = "classes.json"
#: The most classes a fitted head may have (a label PNG and a palette mask hold 256 values, 0 = unlabelled).
MAX_CLASSES = 255
_HEX = re.compile(r"^#?([0-9a-fA-F]{6})$")


@dataclass(frozen=True)
class LabelledImage:
    """One training image and its label image (same size, checked)."""

    image: Path
    labels: Path
    height: int
    width: int


@dataclass
class SegmentationData:
    items: list[LabelledImage]
    class_names: list[str]
    palette: list[list[int]]
    pixel_counts: list[int]  # labelled pixels per class, summed over all images

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                  and p.name.lower().endswith(IMAGE_SUFFIXES))


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def image_size(path: Path, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(height, width) from the file header, without decoding the pixels."""
    from ..io.readers import open_image

    with open_image(path, max_pixels=max_pixels) as reader:
        return reader.height, reader.width


def read_label_image(path: Path, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """A label image as an (H, W) integer array, values as stored (no scaling, no colour conversion)."""
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    if is_tiff(path):
        import tifffile

        try:
            with tifffile.TiffFile(path) as tif:
                page = tif.pages.first
                check_pixels(path, int(page.imagewidth), int(page.imagelength), max_pixels)
                arr = page.asarray()
        except InputError:
            raise
        except (tifffile.TiffFileError, ValueError, OSError, IndexError) as exc:
            raise InputError(f"{path}: unreadable TIFF ({exc})") from exc
    else:
        from PIL import ImageOps, UnidentifiedImageError

        try:
            with open_pil(path, max_pixels) as img:
                if img.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L", "1"):
                    raise InputError(f"{path}: a label image must be single-channel (0 = unlabelled, 1..K = "
                                     f"classes), not {img.mode}")
                arr = np.asarray(ImageOps.exif_transpose(img) or img)
        except InputError:
            raise
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise InputError(f"{path}: not a readable label image ({exc})") from exc
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2:
        raise InputError(f"{path}: a label image must be single-channel (0 = unlabelled, 1..K = classes), "
                         f"not an array of shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer) and arr.dtype != bool and not np.all(np.mod(arr, 1) == 0):
        raise InputError(f"{path}: label values must be whole numbers (0 = unlabelled, 1..K = classes)")
    arr = arr.astype(np.int64)
    if arr.size and arr.min() < 0:
        raise InputError(f"{path}: label values must be 0 (unlabelled) or 1..K, found {int(arr.min())}")
    return arr


def _colour(value: Any, where: str) -> list[int]:
    if isinstance(value, str) and _HEX.match(value):
        h = _HEX.match(value).group(1)  # type: ignore[union-attr]
        return [int(h[i:i + 2], 16) for i in (0, 2, 4)]
    if isinstance(value, (list, tuple)) and len(value) == 3 and all(isinstance(v, int) and 0 <= v <= 255
                                                                    for v in value):
        return [int(v) for v in value]
    raise InputError(f"{where}: a colour is '#rrggbb' or [r, g, b] with values 0-255, not {value!r}")


def read_classes(path: Path) -> tuple[list[str], list[list[int] | None]]:
    """Names and optional colours from a classes.json (a list; entry i names label i + 1)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: not valid JSON ({exc})") from exc
    if isinstance(data, dict) and isinstance(data.get("classes"), list):
        data = data["classes"]
    if not isinstance(data, list) or not data:
        raise InputError(f"{path}: expected a list of class names or {{\"name\", \"color\"}} objects "
                         "(entry 1 names label 1)")
    names: list[str] = []
    colours: list[list[int] | None] = []
    for i, entry in enumerate(data, 1):
        if isinstance(entry, str):
            names.append(entry)
            colours.append(None)
        elif isinstance(entry, dict) and isinstance(entry.get("name"), str):
            names.append(entry["name"])
            colours.append(_colour(entry["color"], f"{path} class {i}") if "color" in entry else None)
        else:
            raise InputError(f"{path}: class {i} must be a name or {{\"name\": ..., \"color\": ...}}")
    if len(set(names)) != len(names):
        raise InputError(f"{path}: class names must be distinct")
    if len(names) > MAX_CLASSES:
        raise InputError(f"{path}: {len(names)} classes; at most {MAX_CLASSES} are supported")
    return names, colours


def _palette(colours: Sequence[list[int] | None], k: int) -> list[list[int]]:
    default = default_palette(k)
    return [c if c is not None else default[i] for i, c in enumerate(list(colours) + [None] * (k - len(colours)))]


def scan_segmentation(data: str | os.PathLike[str], max_pixels: int | None = DEFAULT_MAX_PIXELS
                      ) -> SegmentationData:
    """Find and check every image/label pair and count labelled pixels per class (labels are decoded once)."""
    root = Path(data)
    if not root.is_dir():
        raise InputError(f"{root}: no such folder (expected DATA/images and DATA/labels)")
    img_dir, lab_dir = root / "images", root / "labels"
    for folder in (img_dir, lab_dir):
        if not folder.is_dir():
            raise InputError(f"{root}: no {folder.name}/ folder (expected DATA/images and DATA/labels with "
                             "matching file names)")
    images = {_stem(p): p for p in _images_in(img_dir)}
    labels = {_stem(p): p for p in _images_in(lab_dir)}
    if not images:
        raise InputError(f"{img_dir}: no images")
    missing = sorted(set(images) - set(labels))
    if missing:
        raise InputError(f"{img_dir / images[missing[0]].name}: no label image {lab_dir}/{missing[0]}.png "
                         f"(or .tif){f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}")
    orphans = sorted(set(labels) - set(images))
    if orphans:
        raise InputError(f"{lab_dir / labels[orphans[0]].name}: no matching image in {img_dir}")
    names: list[str] | None = None
    colours: list[list[int] | None] = []
    if (root / CLASSES_FILE).is_file():
        names, colours = read_classes(root / CLASSES_FILE)
    items: list[LabelledImage] = []
    counts = np.zeros(MAX_CLASSES + 1, np.int64)
    for stem in sorted(images):
        h, w = image_size(images[stem], max_pixels)
        lab = read_label_image(labels[stem], max_pixels)
        if lab.shape != (h, w):
            raise InputError(f"{labels[stem]}: label image is {lab.shape[1]}x{lab.shape[0]}, its image "
                             f"{images[stem].name} is {w}x{h}; they must be the same size")
        top = int(lab.max()) if lab.size else 0
        k_limit = len(names) if names is not None else MAX_CLASSES
        if top > k_limit:
            where = f"{CLASSES_FILE} names {k_limit} classes" if names is not None else \
                f"at most {MAX_CLASSES} classes are supported"
            raise InputError(f"{labels[stem]}: label {top} found, but {where} (0 = unlabelled, 1..K = classes)")
        counts += np.bincount(lab.ravel(), minlength=MAX_CLASSES + 1)[: MAX_CLASSES + 1]
        items.append(LabelledImage(images[stem], labels[stem], h, w))
    k = len(names) if names is not None else int(np.nonzero(counts[1:])[0].max() + 1) if counts[1:].any() else 0
    per_class = [int(c) for c in counts[1:k + 1]]
    if sum(per_class) == 0:
        raise InputError(f"{lab_dir}: no labelled pixels (0 = unlabelled; draw classes as 1, 2, ...)")
    if names is None:
        names = [f"class {i}" for i in range(1, k + 1)]
    empty = [f"{i} ({names[i - 1]})" for i in range(1, k + 1) if per_class[i - 1] == 0]
    if k < 2 or sum(c > 0 for c in per_class) < 2:
        raise UsageError(f"{lab_dir}: only one class is labelled; a classifier needs at least two")
    if empty:
        raise InputError(f"{lab_dir}: class {empty[0]} has no labelled pixels"
                         f"{f' (and {len(empty) - 1} more classes)' if len(empty) > 1 else ''}; label it or "
                         f"remove it from {CLASSES_FILE}")
    return SegmentationData(items, names, _palette(colours, k), per_class)


@dataclass
class ImageFolderData:
    class_names: list[str]
    images: list[Path]
    targets: list[int]


def scan_image_folder(data: str | os.PathLike[str]) -> ImageFolderData:
    """An ImageFolder layout: ``DATA/<class>/*.png``; classes sorted by folder name."""
    root = Path(data)
    if not root.is_dir():
        raise InputError(f"{root}: no such folder (expected one sub-folder of images per class)")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    classes, images, targets = [], [], []
    for folder in folders:
        found = [p for p in sorted(folder.rglob("*")) if p.is_file() and p.name.lower().endswith(IMAGE_SUFFIXES)
                 and not any(part.startswith(".") for part in p.relative_to(folder).parts)]
        if not found:
            continue
        classes.append(folder.name)
        images += found
        targets += [len(classes) - 1] * len(found)
    if len(classes) < 2:
        raise UsageError(f"{root}: {'only one class folder has' if classes else 'no class folder has'} images; "
                         "a classifier needs at least two (one sub-folder of images per class)")
    if len(classes) > 100_000:
        raise InputError(f"{root}: {len(classes)} classes is more than a probe should fit")
    return ImageFolderData(classes, images, targets)
