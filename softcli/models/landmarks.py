"""How many landmarks SOFT attention uses: the seam for high-resolution inference.

The published model takes one landmark per r x r patch of the token map
(m = ⌊H/r⌋·⌊W/r⌋), so m grows with the image and the Newton steps cost O(m³):
the official model is not linear in pixels. A :class:`LandmarkPolicy` caps m at
``budget`` by keeping an evenly spaced sub-grid of the official landmark patches
(aspect ratio kept). Keeping a subset was measured much closer to the official
output than average-pooling the landmark map (bench/README.md).

- ``official``: never pool (the published behaviour, any cost);
- ``budget``: pool whenever the official count exceeds ``budget``;
- ``auto`` (default): ``budget`` with :data:`DEFAULT_LANDMARK_BUDGET`.

At 224² every stage has 49 landmarks, far below the default budget, so default
settings compute exactly what the official checkpoints compute there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

#: Landmarks per head beyond which ``auto`` pools. See bench/README.md for the
#: speed/fidelity measurements behind the number.
DEFAULT_LANDMARK_BUDGET = 196

POLICY_MODES = ("auto", "official", "budget")
#: What a landmark policy may be written as (``--landmarks``, ``landmarks=``).
POLICY_CHOICES = "auto, official or a positive number"


def spread_indices(full: int, keep: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``keep`` evenly spaced indices into ``range(full)``, first and last included."""
    import torch

    if keep >= full:
        return torch.arange(full, device=device)
    return torch.linspace(0, full - 1, keep, device=device, dtype=torch.float64).round().long()


@dataclass(frozen=True)
class LandmarkPolicy:
    mode: str = "auto"
    budget: int = DEFAULT_LANDMARK_BUDGET

    def __post_init__(self) -> None:
        if self.mode not in POLICY_MODES:
            raise ValueError(f"landmark policy must be one of {', '.join(POLICY_MODES)}, not {self.mode!r}")
        if self.budget < 1:
            raise ValueError("landmark budget must be at least 1")

    @classmethod
    def parse(cls, text: str | int | None) -> LandmarkPolicy:
        """``auto``, ``official`` or a number (a budget), as the command line takes it; or ``str(policy)``."""
        if text is None or text == "auto":
            return cls()
        if text == "official":
            return cls(mode="official")
        mode, colon, number = str(text).partition(":")
        if colon and mode in ("auto", "budget") and number.isdigit() and int(number) >= 1:
            return cls(mode=mode, budget=int(number))  # str(policy), as metadata records it
        try:
            budget = int(text)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"a landmark policy is {POLICY_CHOICES}, not {text!r}") from exc
        if budget < 1:
            raise ValueError(f"a landmark policy is {POLICY_CHOICES}, not {text!r}")
        return cls(mode="budget", budget=budget)

    def __str__(self) -> str:
        return "official" if self.mode == "official" else f"{self.mode}:{self.budget}"

    def grid(self, rows: int, cols: int) -> tuple[int, int]:
        """Landmark grid for an official grid of rows x cols."""
        if self.mode == "official" or rows * cols <= self.budget:
            return rows, cols
        scale = math.sqrt(self.budget / (rows * cols))
        if rows * scale < 1:
            r, c = 1, min(cols, self.budget)
        elif cols * scale < 1:
            r, c = min(rows, self.budget), 1
        else:
            r, c = int(rows * scale), int(cols * scale)
            # Grow the relatively coarser side while the budget allows it.
            while True:
                grow_rows = r / rows <= c / cols
                if grow_rows and r < rows and (r + 1) * c <= self.budget:
                    r += 1
                elif c < cols and r * (c + 1) <= self.budget:
                    c += 1
                elif r < rows and (r + 1) * c <= self.budget:
                    r += 1
                else:
                    break
        return r, c
