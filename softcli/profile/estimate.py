"""Estimates made before measuring: landmarks per method, FLOPs of one forward, memory a size needs."""

from __future__ import annotations

import torch

from ..models.landmarks import LandmarkPolicy
from ..models.nystromformer import NYSTROM_LANDMARKS, NYSTROM_PINV_ITERS
from ..models.soft import NEWTON_STEPS, SoftAttention
from ..resources import device_memory_available
from .settings import DTYPES, ProfileSettings

__all__ = ["MIN_TOKEN_TENSORS", "estimate_flops", "landmark_count", "memory_limit", "min_attention_bytes"]


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

    Elementwise work (exp, softmax, norms) and LAPACK calls (the eigendecomposition
    of SOFT's closed-form Newton steps, ~9·m³ float64 per head) are left out, as
    FLOP counters do. B batch, N = H·W tokens, C dim, h heads, d = C/h, m landmarks, r sr ratio,
    k local kernel, T Newton steps:

    - softmax: q, kv, proj linears 8·B·N·C² + QKᵀ and PV 4·B·h·N²·d        (quadratic in N)
    - soft: q, v, proj 6·B·N·C² + landmark conv 2·B·h·m·d²·r² (only kept patches are convolved)
      + kernel A 2·B·h·m²·d + Newton in closed form Q·f(Λ)·Qᵀ 2·B·h·m³ + K1 (once, or twice when chunked)
      2·B·h·N·m·d each + K1ᵀV and K1·W 4·B·h·N·m·d + A⁺(K1ᵀV) 2·B·h·m²·d
      + local conv 2·B·C·N·k²                                              (linear in N at fixed m)
    - soft-official: as soft with K1 once and the T Newton steps one by one, 4·T·B·h·m³, and
      K1·A⁺ costs 2·B·h·N·m² (m = N/r² grows with N)
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
    common = 6 * b * n * c * c + 2 * b * h * m * d * d * r * r + 2 * b * h * m * m * d + 2 * b * c * n * k * k
    if method == "soft-official":
        return float(common + 4 * NEWTON_STEPS * b * h * m ** 3
                     + 2 * b * h * n * m * d + 2 * b * h * n * m * m + 4 * b * h * n * m * d)
    k1_evals = SoftAttention.chunk_plan(n, m, b * h).k1_evaluations
    return float(common + 2 * b * h * m ** 3
                 + k1_evals * 2 * b * h * n * m * d + 4 * b * h * n * m * d + 2 * b * h * m * m * d)
