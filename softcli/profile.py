"""Measure time and memory of linear vs softmax attention, and of whole SOFT models, per size.

Every configuration (method x token count, or model stage) runs in a fresh
worker process by default, for three reasons: the peak resident memory of that
process is the configuration's own CPU memory peak (``ru_maxrss`` is a
high-water mark, so one process cannot measure several sizes); a wall-clock
limit can stop it (``timeout``); and an allocation failure (``oom``) or a crash
ends only that worker while the sweep goes on.

Methods, all at identical dims (``dim`` channels, ``heads`` heads, tokens on an
H x W grid):

- ``soft``: :class:`softcli.models.soft.SoftAttention` itself, the module the
  model runs, at the default landmark policy (or ``landmarks``);
- ``soft-official``: the same module with ``LandmarkPolicy("official")`` as
  :class:`OfficialOrderAttention` (materialised K1, m = N / r² landmarks);
- ``softmax``: the model's own stage-4 softmax attention
  (``scaled_dot_product_attention``: what a user has today);
- ``softmax-math``: the same under the ``MATH`` SDPA backend (the N x N matrix
  materialised, as naive implementations do);
- ``nystromformer``: Nyströmformer (Xiong et al., AAAI 2021) for context.

Nothing here prints; results are dataclasses.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import UsageError
from .resources import device_memory_available, format_bytes
from .models.landmarks import LandmarkPolicy
from .models.soft import LOCAL_KERNELS, NEWTON_STEPS, VARIANTS, SoftAttention, SoftmaxAttention, create_soft
from .models.soft_attention import gaussian_kernel

__all__ = [
    "METHODS", "DEFAULT_METHODS", "DEFAULT_TOKENS", "STATUSES",
    "ProfileSettings", "ProfileJob", "ProfileResult", "ProfileReport",
    "attention_jobs", "model_jobs", "stage_input_sizes", "build_attention", "landmark_count", "estimate_flops",
    "grid_for", "measure", "run_job", "run_sweep", "parse_bytes", "NystromAttention",
]

METHODS = ("soft", "soft-official", "softmax", "softmax-math", "nystromformer")
DEFAULT_METHODS = ("soft", "soft-official", "softmax", "nystromformer")
#: Finishes in well under a minute on a 2-core laptop CPU.
DEFAULT_TOKENS = (1024, 4096, 16384)
STATUSES = ("ok", "oom", "timeout", "error")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
NYSTROM_LANDMARKS = 64  # the paper's default
NYSTROM_PINV_ITERS = 6  # the paper's default

#: A warm-up call slower than this ends warm-up: one-off costs are then noise.
LONG_CALL_S = 1.0
#: Marks the result line in a worker's stdout.
_RESULT_TAG = "SOFTCLI-PROFILE-RESULT "


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
    repeat: int = 5
    warmup: int = 2
    time_budget_s: float = 10.0  # timed calls stop once they add up to this (at least one runs)
    timeout_s: float | None = 600.0  # wall-clock limit of one worker
    max_memory_bytes: int | None = None  # CPU: address-space limit of a worker beyond its setup
    isolate: bool = True
    threads: int | None = None  # torch CPU threads while measuring (None: torch's default)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise UsageError(f"--dtype takes {', '.join(DTYPES)}, not {self.dtype!r}")
        for name in ("dim", "heads", "batch", "sr_ratio", "local_kernel", "repeat"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
        if self.threads is not None and self.threads < 1:
            raise UsageError("--threads must be at least 1")
        if self.warmup < 0:
            raise UsageError("--warmup must be 0 or more")
        if self.dim % self.heads:
            raise UsageError(f"--dim {self.dim} is not divisible by --heads {self.heads}")
        if self.local_kernel % 2 == 0:
            raise UsageError("--local-kernel must be odd (the local term keeps the grid size)")
        if self.timeout_s is not None and not (math.isfinite(self.timeout_s) and self.timeout_s > 0):
            raise UsageError(f"--timeout must be a positive number of seconds, not {self.timeout_s}")
        if self.max_memory_bytes is not None and self.max_memory_bytes <= 0:
            raise UsageError("--max-memory must be positive")
        try:
            LandmarkPolicy.parse(self.landmarks)
        except ValueError as exc:
            raise UsageError(str(exc)) from None


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
    repeats: int = 0
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
    def from_dict(cls, data: dict[str, Any]) -> "ProfileResult":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class ProfileReport:
    """A whole sweep: where it ran and every configuration's result."""

    device: str
    device_name: str
    torch_version: str
    threads: int
    loadavg: list[float] | None
    settings: dict[str, Any]
    results: list[ProfileResult]

    def to_dict(self) -> dict[str, Any]:
        return {
            "device": self.device, "device_name": self.device_name, "torch": self.torch_version,
            "threads": self.threads, "loadavg": self.loadavg, "settings": self.settings,
            "results": [r.to_dict() for r in self.results],
        }


# --------------------------------------------------------------------------------------
# Sizes and jobs


def parse_bytes(text: str) -> int:
    """``4GB``, ``512MiB``, ``1e9`` → bytes (decimal and binary units)."""
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([kKmMgGtT]?i?[bB]?)\s*", text)
    units = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
             "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}
    if m:
        unit = m.group(2).lower().rstrip("b")
        try:
            value = float(m.group(1)) * units[unit]
        except (KeyError, ValueError):
            value = -1
        if value >= 1:
            return int(value)
    raise UsageError(f"cannot read {text!r} as a memory size; write e.g. 512MB, 4GB or 4GiB")


#: Token-sized tensors every method holds at once: input, q, k, v and output.
MIN_TOKEN_TENSORS = 5


def min_attention_bytes(tokens: int, settings: ProfileSettings) -> int:
    """Memory any method needs at ``tokens`` (B·N·C activations, :data:`MIN_TOKEN_TENSORS` of them)."""
    itemsize = torch.empty((), dtype=DTYPES[settings.dtype]).element_size()
    return MIN_TOKEN_TENSORS * settings.batch * tokens * settings.dim * itemsize


def memory_limit(settings: ProfileSettings) -> int | None:
    """What one configuration may use: --max-memory, else the device's free memory (None if unknown)."""
    if settings.max_memory_bytes:
        return settings.max_memory_bytes
    return device_memory_available(torch.device(settings.device))


def grid_for(tokens: int) -> tuple[int, int]:
    """The most square H x W with H·W = tokens (H <= W)."""
    if tokens < 1:
        raise UsageError(f"token counts must be positive, not {tokens}")
    h = math.isqrt(tokens)
    while tokens % h:
        h -= 1
    return h, tokens // h


def attention_jobs(methods: Sequence[str], tokens: Sequence[int], settings: ProfileSettings) -> list[ProfileJob]:
    """Method x size jobs, sizes ascending; refuses grids the SOFT landmark conv cannot take."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise UsageError(f"unknown method {unknown[0]!r}; known: {', '.join(METHODS)}")
    if not methods or not tokens:
        raise UsageError("give at least one method and one token count")
    limit = memory_limit(settings)
    jobs = []
    for n in sorted(set(tokens)):
        need = min_attention_bytes(n, settings)
        if limit is not None and need > limit:
            raise UsageError(f"--tokens {n}: the inputs and outputs alone of one attention call at {n:,} tokens "
                             f"need {format_bytes(need)}, more than the {format_bytes(limit)} "
                             f"{'--max-memory allows' if settings.max_memory_bytes else 'available'}")
        grid = grid_for(n)
        if any(m.startswith("soft-") or m == "soft" for m in methods) and grid[0] < settings.sr_ratio:
            raise UsageError(
                f"{n} tokens make a {grid[0]}x{grid[1]} grid, narrower than --sr-ratio {settings.sr_ratio}; "
                f"SOFT needs both sides >= the sr ratio (square counts work, e.g. {(4 * settings.sr_ratio) ** 2})")
        jobs.extend(ProfileJob(method=m, grid=grid) for m in dict.fromkeys(methods))
    return jobs


def _conv_out(size: int) -> int:
    return (size - 1) // 2 + 1  # 3x3, stride 2, padding 1


def stage_input_sizes(image_size: int) -> list[int]:
    """Input side of each stage for a square image (stage 1 has two stride-2 stem convs)."""
    sizes = [image_size]
    s = _conv_out(_conv_out(image_size))
    for _ in range(3):
        sizes.append(s)
        s = _conv_out(s)
    return sizes


def model_jobs(model: str, image_size: int) -> list[ProfileJob]:
    """One job per stage (random activations of the stage's input shape) and one whole forward."""
    if model not in VARIANTS:
        raise UsageError(f"unknown model {model!r}; known: {', '.join(VARIANTS)}")
    if image_size < 32:
        raise UsageError("--image-size must be at least 32 (four stride-2 levels below the stem)")
    sizes = stage_input_sizes(image_size)
    outs = sizes[1:] + [_conv_out(sizes[3])]  # each stage's token grid side
    jobs = [ProfileJob(method=model, grid=(o, o), model=model, part=f"stage{i + 1}", image_size=image_size)
            for i, o in enumerate(outs)]
    jobs.append(ProfileJob(method=model, grid=(outs[0], outs[0]), model=model, part="model", image_size=image_size))
    return jobs


# --------------------------------------------------------------------------------------
# Methods


class NystromAttention(nn.Module):
    """Nyströmformer attention (Xiong et al., AAAI 2021), written from the paper for context.

    softmax(Q K̃ᵀ)·pinv(softmax(Q̃ K̃ᵀ))·softmax(Q̃ Kᵀ)·V with landmarks Q̃, K̃ the
    means of m token segments and the iterative Moore-Penrose inverse of the
    paper (no depthwise-conv skip, which the paper lists as optional).
    """

    def __init__(self, dim: int, num_heads: int, landmarks: int = NYSTROM_LANDMARKS,
                 pinv_iters: int = NYSTROM_PINV_ITERS) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_landmarks = landmarks
        self.pinv_iters = pinv_iters
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    @staticmethod
    def pinv(a: Tensor, iters: int) -> Tensor:
        """Z ← ¼ Z (13I − AZ(15I − AZ(7I − AZ))), Z₀ = Aᵀ / (‖A‖₁ ‖A‖∞)."""
        eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
        scale = a.abs().sum(-2).amax(-1) * a.abs().sum(-1).amax(-1)
        z = a.transpose(-1, -2) / scale[..., None, None]
        for _ in range(iters):
            az = a @ z
            z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
        return z

    def forward(self, x: Tensor, hw: tuple[int, int]) -> Tensor:
        b, n, c = x.shape
        h, d = self.num_heads, c // self.num_heads
        m = min(self.num_landmarks, n)
        q, k, v = self.qkv(x).view(b, n, 3, h, d).permute(2, 0, 3, 1, 4)
        q = q * d ** -0.5

        def segment_means(t: Tensor) -> Tensor:
            return F.adaptive_avg_pool1d(t.reshape(b * h, n, d).transpose(1, 2), m).transpose(1, 2).reshape(b, h, m, d)

        ql, kl = segment_means(q), segment_means(k)
        k1 = torch.softmax(q @ kl.transpose(-1, -2), -1)  # (b, h, n, m)
        k2 = torch.softmax(ql @ kl.transpose(-1, -2), -1)  # (b, h, m, m)
        k3 = torch.softmax(ql @ k.transpose(-1, -2), -1)  # (b, h, m, n)
        out = (k1 @ self.pinv(k2, self.pinv_iters)) @ (k3 @ v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class _GridFree(nn.Module):
    """Gives a token-only attention the ``forward(x, hw)`` signature; optional SDPA backend."""

    def __init__(self, inner: nn.Module, sdpa_backend: Any = None) -> None:
        super().__init__()
        self.inner = inner
        self.sdpa_backend = sdpa_backend

    def forward(self, x: Tensor, hw: tuple[int, int]) -> Tensor:
        if self.sdpa_backend is None:
            return self.inner(x)
        from torch.nn.attention import sdpa_kernel

        with sdpa_kernel(self.sdpa_backend):
            return self.inner(x)


class OfficialOrderAttention(SoftAttention):
    """SoftAttention evaluating (K1·A⁺)·(K1ᵀ·V) with K1 materialised, as the official code does.

    Same numbers as :class:`SoftAttention`, O(N·m²) cost: the baseline that
    ``soft-official`` and bench/bench_scaling.py measure. Benchmark code only,
    so the production module carries no switch for it.
    """

    @classmethod
    def convert(cls, module: SoftAttention) -> "OfficialOrderAttention":
        """The same module (same parameters) with the official evaluation order; changed in place."""
        module.__class__ = cls
        return module  # type: ignore[return-value]

    def global_term(self, q: Tensor, v: Tensor, lm: Tensor) -> Tensor:
        out_dtype = v.dtype
        a_pinv = self.landmark_pinv(lm)
        with torch.autocast(device_type=q.device.type, enabled=False):
            q, v, lm = q.float(), v.float(), lm.float()
            k1 = gaussian_kernel(q, lm)
            return ((k1 @ a_pinv) @ (k1.transpose(-1, -2) @ v)).to(out_dtype)


def build_attention(method: str, settings: ProfileSettings) -> nn.Module:
    """The module a method measures, in eval mode on CPU in float32; ``forward(x, hw)``."""
    if method in ("soft", "soft-official"):
        mod = SoftAttention(settings.dim, settings.heads, settings.sr_ratio, settings.local_kernel, norm=False)
        if method == "soft":
            mod.landmark_policy = LandmarkPolicy.parse(settings.landmarks)
        else:
            mod = OfficialOrderAttention.convert(mod)
            mod.landmark_policy = LandmarkPolicy(mode="official")
    elif method in ("softmax", "softmax-math"):
        backend = None
        if method == "softmax-math":
            try:
                from torch.nn.attention import SDPBackend
            except ImportError:  # pragma: no cover - torch < 2.3
                raise UsageError("softmax-math needs torch >= 2.3 (torch.nn.attention.sdpa_kernel)") from None
            backend = SDPBackend.MATH
        mod = _GridFree(SoftmaxAttention(settings.dim, settings.heads), backend)
    elif method == "nystromformer":
        mod = NystromAttention(settings.dim, settings.heads)
    else:
        raise UsageError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    return mod.eval()


def landmark_count(method: str, grid: tuple[int, int], settings: ProfileSettings) -> int | None:
    """Landmarks per head a method uses at a grid (None for softmax)."""
    if method in ("soft", "soft-official"):
        policy = LandmarkPolicy.parse(settings.landmarks) if method == "soft" else LandmarkPolicy("official")
        r = settings.sr_ratio
        gh, gw = policy.grid(grid[0] // r, grid[1] // r)
        return gh * gw
    if method == "nystromformer":
        return min(NYSTROM_LANDMARKS, grid[0] * grid[1])
    return None


def estimate_flops(method: str, grid: tuple[int, int], settings: ProfileSettings) -> float:
    """Multiply-add FLOPs (2 per MAC) of one forward: matmuls, linears and convolutions only.

    Elementwise work (exp, softmax, norms) is left out, as FLOP counters do.
    B batch, N = H·W tokens, C dim, h heads, d = C/h, m landmarks, r sr ratio,
    k local kernel, T Newton steps:

    - softmax: q, kv, proj linears 8·B·N·C² + QKᵀ and PV 4·B·h·N²·d        (quadratic in N)
    - soft: q, v, proj 6·B·N·C² + landmark conv 2·B·h·m·d²·r² (only kept patches are convolved)
      + kernel A 2·B·h·m²·d + Newton 4·T·B·h·m³ + K1 (once, or twice when chunked)
      2·B·h·N·m·d each + K1ᵀV and K1·W 4·B·h·N·m·d + A⁺(K1ᵀV) 2·B·h·m²·d
      + local conv 2·B·C·N·k²                                              (linear in N at fixed m)
    - soft-official: as soft with K1 once, but K1·A⁺ costs 2·B·h·N·m² (m = N/r² grows with N)
    - nystromformer: qkv, proj 8·B·N·C² + three kernels 4·B·h·N·m·d + 2·B·h·m²·d
      + pinv 6·4·2·B·h·m³ (6 iterations of 4 m x m products) + K1·Z 2·B·h·N·m² + Z₃V, (K1Z)(Z₃V) 4·B·h·N·m·d
    """
    b, c, h = settings.batch, settings.dim, settings.heads
    d = c // h
    n = grid[0] * grid[1]
    if method in ("softmax", "softmax-math"):
        return float(8 * b * n * c * c + 4 * b * h * n * n * d)
    m = landmark_count(method, grid, settings)
    assert m is not None
    if method == "nystromformer":
        return float(8 * b * n * c * c + 4 * b * h * n * m * d + 2 * b * h * m * m * d
                     + 2 * NYSTROM_PINV_ITERS * 4 * b * h * m ** 3 + 2 * b * h * n * m * m + 4 * b * h * n * m * d)
    r, k = settings.sr_ratio, settings.local_kernel
    common = (6 * b * n * c * c + 2 * b * h * m * d * d * r * r + 2 * b * h * m * m * d
              + 4 * NEWTON_STEPS * b * h * m ** 3 + 2 * b * c * n * k * k)
    if method == "soft-official":
        return float(common + 2 * b * h * n * m * d + 2 * b * h * n * m * m + 4 * b * h * n * m * d)
    k1_evals = SoftAttention.chunk_plan(n, m, b * h).k1_evaluations
    return float(common + k1_evals * 2 * b * h * n * m * d + 4 * b * h * n * m * d + 2 * b * h * m * m * d)


# --------------------------------------------------------------------------------------
# Measuring, inside the process that runs the job


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _rss_peak_bytes() -> int | None:
    """This process's peak resident set size so far (None where unmeasurable)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # macOS: bytes; Linux: KiB


def _vm_size_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmSize in /proc/self/status")


def _limit_address_space(extra_bytes: int) -> None:
    """Let this process map at most ``extra_bytes`` more (Linux RLIMIT_AS)."""
    import resource

    limit = _vm_size_bytes() + extra_bytes
    hard = resource.getrlimit(resource.RLIMIT_AS)[1]
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text
                                              or "not enough memory" in text or "failed to allocate" in text)


def _random_model(name: str) -> nn.Module:
    """A SOFT variant with cheap random weights: the work does not depend on the values,
    and the model's own truncated-normal init takes seconds for the bigger variants."""
    with torch.device("meta"):
        model = create_soft(name)
    model = model.to_empty(device="cpu").eval()
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, (nn.LayerNorm, nn.BatchNorm2d)):
                mod.weight.fill_(1.0)
                mod.bias.zero_()
                if isinstance(mod, nn.BatchNorm2d):
                    mod.reset_running_stats()
            else:
                for param in mod.parameters(recurse=False):
                    param.normal_(0.0, 0.02)
    # No parameter needs a gradient: FlopCounterMode's module hooks trip over ones that do.
    return model.requires_grad_(False)


def _prepare(job: ProfileJob, settings: ProfileSettings, device: torch.device
             ) -> tuple[Callable[[], Any], Callable[[], Any]]:
    """(call to measure, tiny call that warms thread pools before limits apply)."""
    dtype = DTYPES[settings.dtype]
    torch.manual_seed(settings.seed)
    b = settings.batch
    if job.model is None:
        mod = build_attention(job.method, settings).requires_grad_(False).to(device=device, dtype=dtype)
        x = torch.randn(b, job.tokens, settings.dim, device=device, dtype=dtype)
        r = settings.sr_ratio
        small = torch.randn(1, 4 * r * r, settings.dim, device=device, dtype=dtype)
        return (lambda: mod(x, job.grid)), (lambda: mod(small, (2 * r, 2 * r)))
    model = _random_model(job.model).to(device=device, dtype=dtype)
    model.set_landmark_policy(LandmarkPolicy.parse(settings.landmarks))
    assert job.image_size is not None and job.part is not None
    tiny = torch.randn(1, 3, 64, 64, device=device, dtype=dtype)
    if job.part == "model":
        img = torch.randn(b, 3, job.image_size, job.image_size, device=device, dtype=dtype)
        return (lambda: model(img)), (lambda: model(tiny))
    i = int(job.part[len("stage"):]) - 1
    stage = model.stages[i]
    side = stage_input_sizes(job.image_size)[i]
    channels = 3 if i == 0 else model.config.embed_dims[i - 1]
    act = torch.randn(b, channels, side, side, device=device, dtype=dtype)
    cls = model.cls_token if i == 3 else None
    small = torch.randn(1, channels, 64, 64, device=device, dtype=dtype)  # large enough for every stage
    return (lambda: stage(act, cls)), (lambda: stage(small, cls))


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds of one call: CUDA events on a GPU, a synchronised wall clock elsewhere."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1000.0
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def _result_for(job: ProfileJob, settings: ProfileSettings, status: str, message: str | None = None
                ) -> ProfileResult:
    """A result with what is known before measuring: sizes, estimated FLOPs, landmarks."""
    res = ProfileResult(method=job.method, tokens=job.tokens, status=status, grid=list(job.grid),
                        batch=settings.batch, dtype=settings.dtype, part=job.part, image_size=job.image_size,
                        message=message)
    if job.model is None:
        res.dim, res.heads = settings.dim, settings.heads
        res.flops = estimate_flops(job.method, job.grid, settings)
        res.landmarks = landmark_count(job.method, job.grid, settings)
    return res


def measure(job: ProfileJob, settings: ProfileSettings) -> ProfileResult:
    """Run one job in this process: warm up, time, read peak memory. Never raises for OOM."""
    device = torch.device(settings.device)
    res = _result_for(job, settings, "ok")
    threads = torch.get_num_threads()
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    try:
        _measure_into(res, job, settings, device)
    finally:
        torch.set_num_threads(threads)
    return res


def _measure_into(res: ProfileResult, job: ProfileJob, settings: ProfileSettings, device: torch.device) -> None:
    with torch.inference_mode():
        try:
            call, prime = _prepare(job, settings, device)
            prime()  # thread pools and allocator arenas exist before any memory limit applies
            _sync(device)
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
                res.base_mem_bytes = int(torch.cuda.memory_allocated(device))
            elif device.type == "cpu" and settings.isolate:
                res.base_mem_bytes = _rss_peak_bytes()
                if settings.max_memory_bytes is not None:
                    _limit_address_space(settings.max_memory_bytes)
            for i in range(settings.warmup):
                if job.model is not None and i == 0:
                    from torch.utils.flop_counter import FlopCounterMode

                    with FlopCounterMode(display=False) as counter:
                        took = _timed(call, device)
                    res.flops = float(counter.get_total_flops())
                else:
                    took = _timed(call, device)
                if took > LONG_CALL_S:
                    break
            times: list[float] = []
            while len(times) < settings.repeat and (not times or sum(times) < settings.time_budget_s):
                times.append(_timed(call, device))
        except Exception as exc:  # noqa: BLE001 - every failure is a recorded result
            if not _is_oom(exc):
                raise
            res.status = "oom"
            res.message = " ".join(str(exc).split())[:300]
            times = []
            if device.type == "cuda":
                torch.cuda.empty_cache()  # the next in-process configuration starts clean
        if device.type == "cuda":
            res.peak_mem_bytes = int(torch.cuda.max_memory_allocated(device))
        elif device.type == "cpu" and settings.isolate:
            res.peak_mem_bytes = _rss_peak_bytes()
    if times:
        med = statistics.median(times)
        res.repeats = len(times)
        res.latency_ms, res.latency_min_ms, res.latency_max_ms = med * 1e3, min(times) * 1e3, max(times) * 1e3
        res.tokens_per_s = settings.batch * job.tokens / med
        if job.image_size is not None:
            res.megapixels_per_s = settings.batch * job.image_size ** 2 / 1e6 / med


def _worker_main() -> None:
    """Entry point of a worker process: job and settings as JSON in argv[1], result on stdout."""
    spec = json.loads(sys.argv[1])
    job = ProfileJob(**{**spec["job"], "grid": tuple(spec["job"]["grid"])})
    settings = ProfileSettings(**spec["settings"])
    result = measure(job, settings)
    sys.stdout.write(_RESULT_TAG + json.dumps(result.to_dict()) + "\n")
    sys.stdout.flush()


# --------------------------------------------------------------------------------------
# Running jobs in isolated workers


def _wait(proc: subprocess.Popen, timeout: float | None) -> tuple[int, Any, bool]:
    """(exit code, child rusage or None, timed out); kills the worker at the deadline."""
    deadline = None if timeout is None else time.monotonic() + timeout
    if hasattr(os, "wait4"):
        timed_out = False
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if deadline is not None and time.monotonic() > deadline:
                proc.kill()
                _, status, usage = os.wait4(proc.pid, 0)
                timed_out = True
                break
            time.sleep(0.02)
        proc.returncode = os.waitstatus_to_exitcode(status)
        return proc.returncode, usage, timed_out
    try:  # pragma: no cover - platforms without wait4
        return proc.wait(timeout), None, False
    except subprocess.TimeoutExpired:  # pragma: no cover
        proc.kill()
        return proc.wait(), None, True


def _worker_env() -> dict[str, str]:
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _run_isolated(job: ProfileJob, settings: ProfileSettings) -> ProfileResult:
    spec = json.dumps({"job": asdict(job), "settings": asdict(settings)})
    code = "from softcli.profile import _worker_main; _worker_main()"
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen([sys.executable, "-c", code, spec], stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                env=_worker_env())
        try:
            rc, usage, timed_out = _wait(proc, settings.timeout_s)
        except BaseException:
            if proc.returncode is None:
                proc.kill()
                proc.wait()
            raise
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    lines = [ln for ln in stdout.splitlines() if ln.startswith(_RESULT_TAG)]
    if rc == 0 and lines:
        result = ProfileResult.from_dict(json.loads(lines[-1][len(_RESULT_TAG):]))
    elif timed_out:
        result = _result_for(job, settings, "timeout", f"stopped after {settings.timeout_s:g} s")
    elif rc == -getattr(signal, "SIGKILL", 9):
        result = _result_for(job, settings, "oom", "worker killed by SIGKILL (the system's out-of-memory killer)")
    else:
        tail = [ln for ln in stderr.strip().splitlines() if ln.strip()]
        result = _result_for(job, settings, "error", f"worker exited with {rc}: " + (tail[-1] if tail else "no message"))
    if usage is not None and torch.device(settings.device).type == "cpu":
        # The worker's own high-water mark, read by the parent: valid for killed workers too.
        result.peak_mem_bytes = int(usage.ru_maxrss if sys.platform == "darwin" else usage.ru_maxrss * 1024)
    return result


def run_job(job: ProfileJob, settings: ProfileSettings) -> ProfileResult:
    """One configuration, in a fresh worker process unless ``settings.isolate`` is False."""
    if settings.isolate:
        return _run_isolated(job, settings)
    try:
        return measure(job, settings)
    except Exception as exc:  # noqa: BLE001 - recorded, and the sweep goes on
        return _result_for(job, settings, "error", f"{type(exc).__name__}: {exc}")


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        with contextlib.suppress(OSError):
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
        import platform

        return platform.processor() or platform.machine()
    return device.type


def run_sweep(jobs: Sequence[ProfileJob], settings: ProfileSettings,
              on_result: Callable[[ProfileResult], None] | None = None) -> ProfileReport:
    """Run every job in order; failed configurations are recorded and the sweep goes on."""
    device = torch.device(settings.device)
    if settings.max_memory_bytes is not None and (device.type != "cpu" or not sys.platform.startswith("linux")
                                                  or not settings.isolate):
        raise UsageError("--max-memory works on the CPU under Linux, with isolated workers "
                         "(on a GPU, out-of-memory is the GPU's own limit)")
    loadavg = [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None
    results = []
    for job in jobs:
        res = run_job(job, settings)
        results.append(res)
        if on_result is not None:
            on_result(res)
    settings_dict = asdict(settings)
    return ProfileReport(device=str(device), device_name=_device_name(device), torch_version=torch.__version__,
                         threads=settings.threads or torch.get_num_threads(), loadavg=loadavg,
                         settings=settings_dict, results=results)

