"""The landmark policy seam and the memory-lean attention: same numbers, bounded work."""

from __future__ import annotations

import pytest
import torch

import softcli
from softcli.models import DEFAULT_LANDMARK_BUDGET, LandmarkPolicy
from softcli.models import soft_attention as soft_module
from softcli.models.landmarks import spread_indices
from softcli.profile import OfficialOrderAttention
from tests.conftest import TINY_CONFIG


def test_parse():
    assert LandmarkPolicy.parse("auto") == LandmarkPolicy()
    assert LandmarkPolicy.parse("official").mode == "official"
    assert LandmarkPolicy.parse("100") == LandmarkPolicy("budget", 100)
    for bad in ("0", "-3", "many", "1.5"):
        with pytest.raises(ValueError):
            LandmarkPolicy.parse(bad)


@pytest.mark.parametrize("rows,cols", [(7, 7), (32, 32), (100, 30), (512, 3), (1, 1000), (17, 16)])
def test_grid_respects_budget_and_shape(rows, cols):
    policy = LandmarkPolicy("budget", 256)
    r, c = policy.grid(rows, cols)
    assert 1 <= r <= rows and 1 <= c <= cols and r * c <= 256
    if rows * cols <= 256:
        assert (r, c) == (rows, cols)
    else:
        assert r * c >= 256 * 0.75  # the budget is used, not wasted
    assert LandmarkPolicy("official").grid(rows, cols) == (rows, cols)


def test_spread_indices_are_distinct_and_cover_the_ends():
    idx = spread_indices(32, 16)
    assert len(set(idx.tolist())) == 16 and idx[0] == 0 and idx[-1] == 31


def _landmark_counts(model, x):
    counts = []
    hooks = [m.landmark_conv.register_forward_hook(lambda mod, i, o: counts.append(o.shape[-2] * o.shape[-1]))
             for m in model.soft_attention_modules()]
    with torch.inference_mode():
        out = model(x)
    for h in hooks:
        h.remove()
    return out, counts


def test_default_policy_is_official_within_the_budget(tiny_model):
    """At default settings, wherever the official count fits the budget, outputs are the faithful model's."""
    side = 8 * 4 * int(DEFAULT_LANDMARK_BUDGET ** 0.5)  # stage 1 has exactly `budget` landmarks
    x = torch.rand(1, 3, side, side)
    auto, counts = _landmark_counts(tiny_model, x)
    assert max(counts) == DEFAULT_LANDMARK_BUDGET
    tiny_model.set_landmark_policy(LandmarkPolicy("official"))
    official, _ = _landmark_counts(tiny_model, x)
    assert torch.equal(auto, official)


def test_budget_caps_landmarks(tiny_model):
    tiny_model.set_landmark_policy(LandmarkPolicy("budget", 16))
    _, counts = _landmark_counts(tiny_model, torch.rand(1, 3, 320, 256))
    assert max(counts) <= 16
    tiny_model.set_landmark_policy(LandmarkPolicy("official"))
    _, official_counts = _landmark_counts(tiny_model, torch.rand(1, 3, 320, 256))
    assert official_counts[0] == (80 // 8) * (64 // 8)


def test_chunked_kernels_equal_whole(tiny_model):
    x = torch.rand(2, 3, 160, 96)
    with torch.inference_mode():
        whole = tiny_model(x)
        for m in tiny_model.soft_attention_modules():
            m.chunk_tokens = 37  # odd, so the last chunk is ragged
        chunked = tiny_model(x)
    assert torch.allclose(whole, chunked, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n,m,bh,rows,plan", [
    (1000, 196, 2, None, (1000, 1)),                 # small K1: whole, once
    (16384, 196, 2, None, (16384, 1)),               # 25 MB: still whole, once
    (65536, 196, 2, None, (2674, 2)),                # 103 MB: 4 MB chunks that stay in cache, twice
    (262144, 196, 2, None, (2674, 2)),               # 2048² stage 1
    (4096, 200000, 1, None, (256, 2)),               # never fewer than 256 rows a chunk
    (1000, 16, 4, 37, (37, 2)),                      # a forced chunk size
    (30, 16, 4, 37, (30, 1)),                        # forced, but one chunk covers all
])
def test_chunk_plan(n, m, bh, rows, plan):
    from softcli.models.soft_attention import SoftAttention

    assert tuple(SoftAttention.chunk_plan(n, m, bh, rows)) == plan


def test_official_order_gives_the_same_numbers(golden):
    model = softcli.load_model(golden / "mini_plain.weights.safetensors")
    x = torch.rand(1, 3, 224, 224)
    with torch.inference_mode():
        ours = model(x)
        for m in model.soft_attention_modules():
            OfficialOrderAttention.convert(m)
        official = model(x)
    assert torch.allclose(ours, official, atol=1e-5, rtol=1e-4)


def test_kernel_and_newton_stay_float32_under_autocast(monkeypatch):
    torch.manual_seed(0)
    model = softcli.create_model(TINY_CONFIG, num_classes=10)
    seen = []
    real = soft_module.gaussian_kernel

    def spy(a, b):
        seen.append((a.dtype, b.dtype))
        return real(a, b)

    monkeypatch.setattr(soft_module, "gaussian_kernel", spy)
    x = torch.rand(1, 3, 96, 96)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert seen and all(d == (torch.float32, torch.float32) for d in seen)
    with torch.inference_mode():
        ref = model(x)
    assert torch.allclose(out.float(), ref, atol=0.1 * ref.abs().max().item())
