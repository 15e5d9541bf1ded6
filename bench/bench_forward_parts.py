"""The parts of a soft_tiny forward at 2048² that the speed work changed, each old way vs new way.

One process, one thread, CPU time (``time.process_time``), median of ``--repeat``
after a warm-up, old and new alternating, random weights:

- local term: NCHW depthwise conv with the two transposes around it vs the
  channels-last conv on the token-major values (stage 1, 2, 3 shapes);
- patch embedding: NCHW vs channels-last, BatchNorm as a module vs folded;
- Newton: 20 steps one by one (float32) vs the closed form (float64 eigendecomposition);
- block tail (proj, residuals, norms, MLP): whole vs per-token chunks.

Usage:
    python bench/bench_forward_parts.py --repeat 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from softcli.models import layers as soft_model  # noqa: E402
from softcli.models.soft import create_soft  # noqa: E402
from softcli.models.soft_attention import gaussian_kernel, newton_pinv_plain  # noqa: E402

SIDE = 2048


def cpu_ms(fn: Callable[[], object], repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return statistics.median(times) * 1e3


def local_nchw(v: torch.Tensor, weight: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """The previous local term: (B, h, N, d) → NCHW map → conv → back to (B, h, N, d), contiguous."""
    b, h, n, d = v.shape
    vmap = v.transpose(2, 3).reshape(b, h * d, *hw)
    out = F.conv2d(vmap, weight, padding=weight.shape[-1] // 2, groups=h * d)
    return out.reshape(b, h, d, n).transpose(2, 3).contiguous()


def unchunked(fn: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``fn`` with the per-token tail in one pass (the chunk size set beyond any token count)."""
    chunk = soft_model.TOKEN_CHUNK_ELEMENTS
    soft_model.TOKEN_CHUNK_ELEMENTS = 1 << 40
    try:
        return fn()
    finally:
        soft_model.TOKEN_CHUNK_ELEMENTS = chunk


def rows(repeat: int) -> list[tuple[str, str, float, float]]:
    torch.manual_seed(0)
    model = create_soft("soft_tiny").eval()
    out: list[tuple[str, str, float, float]] = []
    with torch.inference_mode():
        for i, side in enumerate((SIDE // 4, SIDE // 8, SIDE // 16)):
            attn = model.stages[i].blocks[0].attn
            c, h = attn.dim, attn.num_heads
            tokens = torch.randn(1, side * side, c)
            v = tokens.view(1, -1, h, c // h).transpose(1, 2)
            weight = attn.local_conv.weight.repeat_interleave(c // h, dim=0)
            out.append((f"local term, stage {i + 1} ({side}², {c} ch)", "NCHW + transposes → channels-last",
                        cpu_ms(partial(local_nchw, v, weight, (side, side)), repeat),
                        cpu_ms(partial(attn.local_term, v, (side, side)), repeat)))
        for i, side in enumerate((SIDE, SIDE // 4, SIDE // 8, SIDE // 16)):
            stage = model.stages[i]
            cin = 3 if i == 0 else model.config.embed_dims[i - 1]
            x = torch.randn(1, cin, side, side)
            x_last = x.contiguous(memory_format=torch.channels_last)
            out.append((f"patch embedding, stage {i + 1} ({side}² in)", "NCHW + BN → channels-last, BN folded",
                        cpu_ms(partial(stage.patch_embed, x), repeat), cpu_ms(partial(stage.embed, x_last), repeat)))
        for i, heads in enumerate((2, 4, 10)):
            lm = torch.randn(1, heads, 196, 32) * 0.3
            a = gaussian_kernel(lm, lm)
            out.append((f"Newton, {heads} heads x 196 landmarks (stage {i + 1})", "20 steps → closed form",
                        cpu_ms(partial(newton_pinv_plain, a, closed_form=False), repeat),
                        cpu_ms(partial(newton_pinv_plain, a), repeat)))
        for i, side in enumerate((SIDE // 4, SIDE // 8, SIDE // 16)):
            blk = model.stages[i].blocks[0]
            c = blk.attn.dim
            x, heads = torch.randn(1, side * side, c), torch.randn(1, side * side, c)
            tail = partial(soft_model.per_token_chunks, blk._project_finish, x, heads, width=4 * c)
            out.append((f"block tail, stage {i + 1} ({side * side} tokens)", "whole → per-token chunks",
                        cpu_ms(partial(unchunked, tail), repeat), cpu_ms(tail, repeat)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    load = os.getloadavg()[0]
    table = rows(args.repeat)
    print(f"torch {torch.__version__}, 1 thread, CPU ms, median of {args.repeat}, "
          f"load average {load:.2f} → {os.getloadavg()[0]:.2f}")
    print("| part | change | before ms | after ms | after / before |")
    print("|---|---|---|---|---|")
    for name, change, before, after in table:
        print(f"| {name} | {change} | {before:.1f} | {after:.1f} | {after / before:.2f} |")


if __name__ == "__main__":
    main()
