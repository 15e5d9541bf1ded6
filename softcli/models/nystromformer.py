"""Nyströmformer attention (Xiong et al., AAAI 2021): a linear attention ``soft profile`` measures for context.

Not part of SOFT; it lives here because it is a pure ``nn.Module`` like the model's own attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["NYSTROM_LANDMARKS", "NYSTROM_PINV_ITERS", "NystromAttention"]

NYSTROM_LANDMARKS = 64  # the paper's default
NYSTROM_PINV_ITERS = 6  # the paper's default


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
