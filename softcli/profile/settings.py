"""What one sweep shares (:class:`ProfileSettings`), one configuration (:class:`ProfileJob`) and what it measured."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

from ..errors import ParameterError
from ..models.soft import LOCAL_KERNELS
from .names import DEFAULT_METHODS, DEFAULT_THREADS, DEFAULT_TOKENS, METHODS, MIN_REPEATS

__all__ = [
    "DEFAULT_METHODS",
    "DEFAULT_THREADS",
    "DEFAULT_TOKENS",
    "DTYPES",
    "METHODS",
    "MIN_REPEATS",
    "STATUSES",
    "ProfileJob",
    "ProfileReport",
    "ProfileResult",
    "ProfileSettings",
]

STATUSES = ("ok", "oom", "timeout", "error")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
#: A warm-up call slower than this ends warm-up: one-off costs are then noise.
LONG_CALL_S = 1.0
#: Marks the result line in a worker's stdout.
RESULT_TAG = "SOFTCLI-PROFILE-RESULT "


@dataclass(frozen=True)
class ProfileSettings:
    """What every configuration of one sweep shares."""

    device: str = "cpu"
    dim: int = 64
    heads: int = 2
    batch: int = 1
    dtype: str = "fp32"
    sr_ratio: int = 8
    local_kernel: int = LOCAL_KERNELS[0]
    landmarks: str = "auto"  # LandmarkPolicy.parse text, for ``soft`` and model mode
    repeat: int = 5  # timed calls per configuration; the median is the result
    warmup: int = 2  # untimed calls first (fewer when one takes longer than LONG_CALL_S)
    time_budget_s: float = 10.0  # timed calls stop once they add up to this (at least MIN_REPEATS run)
    timeout_s: float | None = 600.0  # wall-clock limit of one worker
    max_memory_bytes: int | None = None  # CPU: address-space limit of a worker beyond its setup
    isolate: bool = True
    threads: int = DEFAULT_THREADS  # torch CPU threads while measuring, the same for every configuration
    seed: int = 0

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ParameterError(f"`dtype` takes {', '.join(DTYPES)}, not {self.dtype!r}")
        for name in ("dim", "heads", "batch", "sr_ratio", "local_kernel", "repeat", "threads"):
            if getattr(self, name) < 1:
                raise ParameterError(f"`{name}` must be at least 1")
        if self.warmup < 0:
            raise ParameterError("`warmup` must be 0 or more")
        if self.dim % self.heads:
            raise ParameterError(f"`dim` {self.dim} is not divisible by `heads` {self.heads}")
        if self.local_kernel % 2 == 0:
            raise ParameterError("`local_kernel` must be odd (the local term keeps the grid size)")
        if self.timeout_s is not None and not (math.isfinite(self.timeout_s) and self.timeout_s > 0):
            raise ParameterError(f"`timeout_s` must be a positive number of seconds, not {self.timeout_s}")
        if self.max_memory_bytes is not None and self.max_memory_bytes <= 0:
            raise ParameterError("`max_memory_bytes` must be positive")
        from ..api import landmark_policy

        landmark_policy(self.landmarks)  # a bad value is a ParameterError


@dataclass(frozen=True)
class ProfileJob:
    """One configuration: an attention method at a token grid, or one part of a whole model."""

    method: str
    grid: tuple[int, int]  # token grid H x W (model mode: the part's token grid)
    model: str | None = None  # model mode: variant name
    part: str | None = None  # model mode: "stage1".."stage4" or "model"
    image_size: int | None = None

    @property
    def tokens(self) -> int:
        return self.grid[0] * self.grid[1]


@dataclass
class ProfileResult:
    """What one configuration measured. ``status`` is ok, oom, timeout or error."""

    method: str
    tokens: int
    status: str
    latency_ms: float | None = None  # median of the timed calls
    latency_min_ms: float | None = None
    latency_max_ms: float | None = None
    latency_q1_ms: float | None = None  # quartiles of the timed calls (IQR = q3 - q1)
    latency_q3_ms: float | None = None
    # CPU: median (min, max) CPU seconds of this process per timed call. At one thread this is the
    # time the call computed, whatever else ran on the machine: what a quiet machine's wall clock shows.
    cpu_ms: float | None = None
    cpu_min_ms: float | None = None
    cpu_max_ms: float | None = None
    repeats: int = 0  # timed calls the median is of
    warmup_calls: int = 0  # untimed calls before them
    threads: int | None = None  # torch CPU threads the calls ran with
    tokens_per_s: float | None = None
    peak_mem_bytes: int | None = None  # CPU: worker peak RSS; CUDA: max_memory_allocated
    base_mem_bytes: int | None = None  # the same measure after setup, before the first call
    flops: float | None = None  # estimated (attention) or counted matmul/conv FLOPs (model)
    landmarks: int | None = None
    grid: list[int] = field(default_factory=list)
    batch: int = 1
    dim: int | None = None
    heads: int | None = None
    dtype: str = "fp32"
    part: str | None = None
    image_size: int | None = None
    megapixels_per_s: float | None = None
    message: str | None = None

    @property
    def extra_mem_bytes(self) -> int | None:
        """Memory the calls needed beyond setup (inputs, weights, interpreter)."""
        if self.peak_mem_bytes is None or self.base_mem_bytes is None:
            return None
        return max(0, self.peak_mem_bytes - self.base_mem_bytes)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["extra_mem_bytes"] = self.extra_mem_bytes
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ProfileResult:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class ProfileReport:
    """A whole sweep: where it ran, how loaded the machine was, and every configuration's result."""

    device: str
    device_name: str
    torch_version: str
    threads: int
    loadavg: list[float] | None  # 1, 5 and 15 minute load averages when the sweep started
    settings: dict[str, Any]
    results: list[ProfileResult]
    loadavg_end: list[float] | None = None  # the same when it ended

    def to_dict(self) -> dict[str, Any]:
        return {
            "device": self.device, "device_name": self.device_name, "torch": self.torch_version,
            "threads": self.threads, "loadavg": self.loadavg, "loadavg_end": self.loadavg_end,
            "settings": self.settings, "results": [r.to_dict() for r in self.results],
        }
