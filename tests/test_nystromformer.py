"""softcli.models.nystromformer: the iterative pseudo-inverse converges, and the attention keeps shapes."""

from __future__ import annotations

import torch

from softcli.models.nystromformer import NystromAttention


def test_iterative_pinv_matches_the_exact_pseudo_inverse():
    torch.manual_seed(0)
    a = torch.softmax(torch.randn(2, 3, 16, 16, dtype=torch.float64), -1)  # as the paper's kernel 2
    z = NystromAttention.pinv(a, iters=20)
    torch.testing.assert_close(z, torch.linalg.pinv(a), rtol=1e-6, atol=1e-6)


def test_forward_keeps_the_token_shape_and_caps_landmarks_at_the_tokens():
    torch.manual_seed(0)
    attn = NystromAttention(dim=32, num_heads=4, landmarks=64).eval()
    x = torch.randn(2, 40, 32)  # fewer tokens than landmarks: m becomes 40
    with torch.inference_mode():
        out = attn(x, (5, 8))
    assert out.shape == x.shape and torch.isfinite(out).all()
