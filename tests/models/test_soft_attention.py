"""The attention's fast paths compute what the slow, literal ones compute."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from softcli.models import layers as soft_model
from softcli.models.soft_attention import (
    SoftAttention,
    _newton_steps,
    gaussian_kernel,
    newton_pinv_norm,
    newton_pinv_plain,
)


def _landmark_kernel(scale: float, heads: int = 3, m: int = 49, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    lm = torch.randn(2, heads, m, 16, generator=gen) * scale
    return gaussian_kernel(lm, lm)


@pytest.mark.parametrize("scale", [0.1, 0.3, 1.0])  # 0.1: near-singular A, eigenvalues clustered at 0
@pytest.mark.parametrize("pinv", [newton_pinv_plain, newton_pinv_norm])
def test_newton_closed_form_equals_the_twenty_steps(pinv, scale):
    a = _landmark_kernel(scale)
    steps64 = pinv(a.double(), closed_form=False)
    closed64 = pinv(a.double())
    closed32 = pinv(a)
    steps32 = pinv(a, closed_form=False)
    ref = steps64.abs().max()
    assert closed32.dtype == torch.float32
    assert (closed64 - steps64).abs().max() <= 1e-5 * ref
    # float32 input: the closed form is at least as close to the exact steps as float32 steps are
    assert (closed32.double() - steps64).abs().max() <= max(1e-5 * ref, 2 * (steps32.double() - steps64).abs().max())


def test_newton_on_non_finite_input_propagates_like_the_steps():
    a = _landmark_kernel(0.3)
    a[0, 0, 3, 3] = float("nan")
    out = newton_pinv_plain(a)
    assert torch.isnan(out[0, 0]).any()
    assert torch.isfinite(out[1]).all()


def _official_local_term(attn: SoftAttention, v: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """SOFT.md's local term as the official code writes it: V as (B·d, h, H, W), groups = h."""
    b, h, n, d = v.shape
    vmap = v.permute(0, 3, 1, 2).reshape(b * d, h, *hw)
    k = attn.local_conv.kernel_size[0]
    out = F.conv2d(vmap, attn.local_conv.weight, padding=k // 2, groups=h)
    return out.reshape(b, d, h, n).permute(0, 2, 3, 1)


@pytest.mark.parametrize("token_major", [True, False])
def test_local_term_equals_the_official_grouping(token_major):
    torch.manual_seed(0)
    attn = SoftAttention(dim=24, num_heads=3, sr_ratio=2, local_kernel=5, norm=False)
    b, hw = 2, (7, 9)
    tokens = torch.randn(b, hw[0] * hw[1], 24)
    v = tokens.view(b, -1, 3, 8).transpose(1, 2)  # how queries_values lays V out
    if not token_major:
        v = v.contiguous()
    with torch.inference_mode():
        assert torch.allclose(attn.local_term(v, hw), _official_local_term(attn, v, hw), atol=1e-6)


def test_attention_terms_are_token_major_so_merging_heads_copies_nothing():
    torch.manual_seed(0)
    attn = SoftAttention(dim=24, num_heads=3, sr_ratio=2, local_kernel=5, norm=False)
    x, hw = torch.randn(1, 8 * 10, 24), (8, 10)
    with torch.inference_mode():
        q, v = attn.queries_values(x)
        lm = attn.landmarks(q, hw)
        for term in (attn.global_term(q, v, lm), attn.local_term(v, hw),
                     attn.kernel_apply(q, lm, torch.randn(1, 3, lm.shape[2], 8), torch.float32)):
            merged = SoftAttention.heads_to_tokens(term)
            assert merged.data_ptr() == term.data_ptr() and merged.is_contiguous()
        assert torch.allclose(attn(x, hw), attn.proj(attn.attend(x, hw)))


def test_per_token_chunks_equal_one_pass(tiny_model, monkeypatch):
    x = torch.rand(2, 3, 160, 96)
    with torch.inference_mode():
        whole = tiny_model.forward_features(x)
        monkeypatch.setattr(soft_model, "TOKEN_CHUNK_MIN_ROWS", 1)
        monkeypatch.setattr(soft_model, "TOKEN_CHUNK_ELEMENTS", 37 * 64)  # ragged chunks in every stage
        chunked = tiny_model.forward_features(x)
    for a, b in zip(whole, chunked):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)


def test_newton_steps_helper_is_the_literal_iteration():
    """The iterated form is V ← 2V − V·P·V, nothing more (the closed form's reference)."""
    p = _landmark_kernel(0.3, heads=1, m=9).double() + 0.01 * torch.eye(9, dtype=torch.float64)
    v0 = 0.1 * p
    v = v0.clone()
    for _ in range(3):
        v = 2 * v - v @ p @ v
    assert torch.allclose(_newton_steps(v0, p, 3), v)


def test_landmark_pinv_takes_the_steps_when_gradients_flow():
    """Training a head through the backbone: the steps' gradient, not an eigendecomposition's."""
    torch.manual_seed(0)
    attn = SoftAttention(dim=24, num_heads=3, sr_ratio=2, local_kernel=5, norm=True)
    lm = torch.randn(1, 3, 12, 8, requires_grad=True)
    pinv = attn.landmark_pinv(lm)
    a = gaussian_kernel(lm.detach(), lm.detach())
    assert torch.equal(pinv.detach(), newton_pinv_norm(a, closed_form=False))
    pinv.sum().backward()
    assert lm.grad is not None and torch.isfinite(lm.grad).all()
    with torch.no_grad():
        assert torch.allclose(attn.landmark_pinv(lm), newton_pinv_norm(a), atol=1e-4 * pinv.abs().max().item())
