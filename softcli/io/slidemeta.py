"""Resolution metadata of image files: microns per pixel and objective power (sources: see softcli.io.slide)."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Any

#: Resolution tags in inches are trusted only for pixels finer than this (µm): 508 dpi and above.
MAX_RESOLUTION_TAG_MPP = 50.0

_UM_PER_UNIT = {"µm": 1.0, "um": 1.0, "\u03bcm": 1.0, "micron": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6,
                "Å": 1e-4, "pm": 1e-6}


@dataclass(frozen=True)
class SlideInfo:
    """Level-0 resolution of an image: ``mpp`` (µm per pixel, x and y averaged) and ``objective_power``."""

    mpp: float | None = None
    objective_power: float | None = None
    source: str = ""  # where the values came from: aperio, ome, ndpi, openslide, tiff-resolution

    def merged(self, other: SlideInfo) -> SlideInfo:
        """Fill what this one lacks from ``other``."""
        return SlideInfo(self.mpp if self.mpp is not None else other.mpp,
                         self.objective_power if self.objective_power is not None else other.objective_power,
                         self.source or other.source)


def _positive(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) and v > 0 else None


def parse_aperio(description: str) -> SlideInfo:
    """``MPP`` and ``AppMag`` from an Aperio image description (``key = value`` fields split by ``|``)."""
    if not description.startswith("Aperio"):
        return SlideInfo()
    fields: dict[str, str] = {}
    for part in description.split("|")[1:]:
        key, sep, value = part.partition("=")
        if sep:
            fields[key.strip()] = value.strip()
    return SlideInfo(_positive(fields.get("MPP")), _positive(fields.get("AppMag")), "aperio")


def parse_ome(xml: str) -> SlideInfo:
    """PhysicalSizeX/Y of the first ``Pixels`` element of OME-XML, in µm; objective nominal magnification."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return SlideInfo()
    pixels = next((el for el in root.iter() if el.tag.rsplit("}", 1)[-1] == "Pixels"), None)
    mpp = None
    if pixels is not None:
        sizes = []
        for axis in ("X", "Y"):
            v = _positive(pixels.get(f"PhysicalSize{axis}"))
            unit = _UM_PER_UNIT.get(pixels.get(f"PhysicalSize{axis}Unit", "µm"))
            if v is not None and unit is not None:
                sizes.append(v * unit)
        mpp = sum(sizes) / len(sizes) if sizes else None
    power = None
    for el in root.iter():
        if el.tag.rsplit("}", 1)[-1] == "Objective":
            power = _positive(el.get("NominalMagnification"))
            if power:
                break
    return SlideInfo(mpp, power, "ome" if mpp or power else "")


def parse_resolution_tags(page: Any) -> SlideInfo:
    """µm per pixel from a TIFF page's X/YResolution and ResolutionUnit (see module docstring)."""
    tags = page.tags
    unit_tag = tags.get("ResolutionUnit")
    unit = int(unit_tag.value) if unit_tag is not None else 2  # TIFF default: inch
    um = {2: 25_400.0, 3: 10_000.0}.get(unit)
    if um is None:
        return SlideInfo()
    sizes = []
    for name in ("XResolution", "YResolution"):
        tag = tags.get(name)
        if tag is None:
            continue
        value = tag.value
        per_unit = value[0] / value[1] if isinstance(value, tuple) and len(value) == 2 and value[1] else value
        ppu = _positive(per_unit)
        if ppu is not None:
            sizes.append(um / ppu)
    if not sizes:
        return SlideInfo()
    mpp = sum(sizes) / len(sizes)
    if unit == 2 and mpp > MAX_RESOLUTION_TAG_MPP:
        return SlideInfo()
    return SlideInfo(mpp, None, "tiff-resolution")


def tiff_slide_info(tif: Any) -> SlideInfo:
    """Resolution of a :class:`tifffile.TiffFile` from its description, OME-XML, NDPI and resolution tags."""
    page = tif.pages.first if hasattr(tif.pages, "first") else tif.pages[0]
    info = SlideInfo()
    try:
        description = page.description or ""
        if description.startswith("Aperio"):
            info = parse_aperio(description)
        if tif.is_ome and tif.ome_metadata:
            info = info.merged(parse_ome(tif.ome_metadata))
        if getattr(tif, "is_ndpi", False):
            ndpi = getattr(page, "ndpi_tags", None) or {}
            info = info.merged(SlideInfo(None, _positive(ndpi.get("Magnification")), "ndpi"))
        if info.mpp is None:
            info = info.merged(parse_resolution_tags(page))
    except Exception:  # noqa: BLE001 - metadata is optional; a malformed tag must not stop a read
        return info
    return info


def openslide_info(properties: Any) -> SlideInfo:
    """Resolution from OpenSlide's standard properties."""
    found = [_positive(properties.get(k)) for k in ("openslide.mpp-x", "openslide.mpp-y")]
    xs = [v for v in found if v is not None]
    return SlideInfo(sum(xs) / len(xs) if xs else None, _positive(properties.get("openslide.objective-power")),
                     "openslide")
