"""Byte sizes as people write them: the one parser behind every size option, and its inverse for messages.

Units follow huggingface_hub's ``parse_size`` and the SI/IEC standards:
decimal ``kB MB GB TB PB`` are powers of 1000 (``2GB`` = 2·10⁹ bytes, as disks
and download sizes are counted), binary ``KiB MiB GiB TiB PiB`` powers of 1024
(``2GiB`` = 2³¹ bytes, as RAM is). A bare number is bytes. Units are
case-insensitive (``512mb``), a space may separate number and unit, and the
number may have a fraction (``1.5GiB``). Before this module ``soft features``
read ``2GB`` as 2 GiB while ``soft profile`` read it as 2·10⁹ bytes.
"""

from __future__ import annotations

import math
import re

__all__ = ["SIZE_HELP", "format_bytes", "parse_size"]

_DECIMAL = {"k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "p": 10**15}
_BINARY = {"ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40, "pi": 2**50}
#: Unit (lower case, without the trailing "b") → bytes.
UNITS: dict[str, int] = {"": 1, **_DECIMAL, **_BINARY}

_SIZE = re.compile(r"\s*((?:\d+\.?\d*|\.\d+)(?:e[+-]?\d+)?)\s*([a-z]*)\s*", re.IGNORECASE)

#: One sentence for ``--help`` of every size option.
SIZE_HELP = "Sizes: 2GB = 2·10⁹ bytes (decimal kB, MB, GB, TB), 2GiB = 2³¹ bytes (binary KiB, MiB, GiB, TiB); " \
            "a bare number is bytes."


def parse_size(text: str | int) -> int:
    """``"2GB"`` → 2_000_000_000, ``"2GiB"`` → 2**31, ``"1000"`` → 1000; a positive whole number of bytes.

    Raises ValueError with a message that says how to write a size (callers add
    which option or setting it came from).
    """
    if isinstance(text, int) and not isinstance(text, bool):
        value: float = text
    else:
        match = _SIZE.fullmatch(str(text))
        unit = (match.group(2).lower() if match else "").removesuffix("b")
        if match is None or unit not in UNITS:
            raise ValueError(f"cannot read {str(text)!r} as a size in bytes; write e.g. 512MB, 2GB "
                             "(decimal: 2·10⁹ bytes) or 2GiB (binary: 2³¹ bytes)")
        value = float(match.group(1)) * UNITS[unit]
    if math.isinf(value) or value < 1:
        raise ValueError(f"a size must be at least 1 byte, not {text!r}")
    return int(value)


def format_bytes(n: int | float) -> str:
    """1536 → '1.5 KiB'; sizes in messages, binary units."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(value) < 1024 or unit == "PiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} PiB"  # pragma: no cover - loop always returns
