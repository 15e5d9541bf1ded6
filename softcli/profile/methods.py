"""The modules a configuration measures, built the way the model builds them."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..errors import UsageError
from ..models.landmarks import LandmarkPolicy
from ..models.nystromformer import NystromAttention
from ..models.soft import SoftAttention, SoftmaxAttention, SoftModel, create_soft
from ..models.soft_attention import gaussian_kernel
from .settings import METHODS, ProfileSettings

__all__ = ["build_attention", "random_model"]


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
    def convert(cls, module: SoftAttention) -> OfficialOrderAttention:
        """The same module (same parameters) with the official evaluation order; changed in place."""
        module.__class__ = cls
        return module  # type: ignore[return-value]

    def newton_in_closed_form(self, lm: Tensor) -> bool:
        """Never: the 20 Newton steps one by one, as the official code does."""
        return False

    def global_term(self, q: Tensor, v: Tensor, lm: Tensor) -> Tensor:
        out_dtype = v.dtype
        a_pinv = self.landmark_pinv(lm)
        with torch.autocast(device_type=q.device.type, enabled=False):
            q, v, lm = q.float(), v.float(), lm.float()
            k1 = gaussian_kernel(q, lm)
            return ((k1 @ a_pinv) @ (k1.transpose(-1, -2) @ v)).to(out_dtype)


def build_attention(method: str, settings: ProfileSettings) -> nn.Module:
    """The module a method measures, in eval mode on CPU in float32; ``forward(x, hw)``."""
    mod: nn.Module
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
            except ImportError as exc:  # pragma: no cover - torch < 2.3
                raise UsageError("softmax-math needs torch >= 2.3 (torch.nn.attention.sdpa_kernel)") from exc
            backend = SDPBackend.MATH
        mod = _GridFree(SoftmaxAttention(settings.dim, settings.heads), backend)
    elif method == "nystromformer":
        mod = NystromAttention(settings.dim, settings.heads)
    else:
        raise UsageError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    return mod.eval()


def random_model(name: str) -> SoftModel:
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
