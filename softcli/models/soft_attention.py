"""The softmax-free attention of SOFT stages 1-3: Gaussian kernel, Newton pseudo-inverse, local conv.

Split from :mod:`softcli.models.soft` (which re-exports everything here) so the
attention math, the part tuned for speed, lives apart from the network around
it. What it computes is ``shared/reference/SOFT.md`` steps 1-8.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .landmarks import LandmarkPolicy, spread_indices

__all__ = [
    "K1_CHUNK_ELEMENTS",
    "K1_ONCE_ELEMENTS",
    "NEWTON_STEPS",
    "ChunkPlan",
    "SoftAttention",
    "gaussian_kernel",
    "newton_from",
    "newton_pinv_norm",
    "newton_pinv_plain",
    "token_major_empty",
]

NEWTON_STEPS = 20
PLAIN_RIDGE = 0.01  # plain SOFT inverts A + 0.01·I
PLAIN_ALPHA_SCALE = 0.9
NORM_MAX_HALVINGS = 10
NORM_TOLERANCE = 1.01

#: K1 (batch·heads·tokens·landmarks values) up to this size, 32 MB in float32, is
#: evaluated once, whole, and used for both K1ᵀV and K1·W. Beyond it, K1 is
#: evaluated twice in chunks of K1_CHUNK_ELEMENTS (4 MB): two passes over chunks
#: that stay in the CPU cache beat one pass over a K1 that streams from memory
#: (65536 tokens, 196 landmarks, 2 heads, 1 thread: 218 ms in 2048-row chunks vs
#: 264 ms whole; 16384 tokens: 50.7 ms whole vs 52.7 chunked), and memory stays
#: bounded (bench/README.md, "K1 evaluation").
K1_ONCE_ELEMENTS = 1 << 23
K1_CHUNK_ELEMENTS = 1 << 20
#: Fewest K1 rows in a chunk, however many landmarks and heads.
K1_MIN_CHUNK_ROWS = 256


class ChunkPlan(NamedTuple):
    """How the global term walks the N x m kernel K1: rows per chunk, and how often K1 is evaluated."""

    rows: int
    k1_evaluations: int  # 1: whole K1, once; 2: in chunks, once for K1ᵀV and once for K1·W


def gaussian_kernel(a: Tensor, b: Tensor) -> Tensor:
    """exp(-|a_i - b_j|² / 2) for rows of ``a`` (..., n, d) and ``b`` (..., m, d).

    Written as exp(a·b - |a|²/2 - |b|²/2) with in-place steps on the one (n, m)
    buffer the matmul allocates: the kernel is the largest tensor of the
    attention, so every extra pass or temporary over it costs time and memory.
    The exponent is -|a-b|²/2 ≤ 0; clamping it removes rounding above 0.
    """
    k = a @ b.transpose(-1, -2)
    k.sub_(0.5 * (a * a).sum(-1, keepdim=True))
    k.sub_(0.5 * (b * b).sum(-1).unsqueeze(-2))
    return k.clamp_max_(0.0).exp_()


def newton_pinv_plain(a: Tensor, steps: int = NEWTON_STEPS, closed_form: bool = True) -> Tensor:
    """Truncated Newton-Schulz pseudo-inverse of plain SOFT (A + 0.01·I), per (image, head).

    ``closed_form=False`` runs the ``steps`` iterations one by one (the official
    code's way; benchmarks and tests compare against it).
    """
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    p = a + PLAIN_RIDGE * eye
    row_max = a.sum(-1).amax(-1, keepdim=True).unsqueeze(-1)  # (B, h, 1, 1)
    alpha = PLAIN_ALPHA_SCALE * 2.0 / row_max.square()
    return newton_from(p, alpha, steps, closed_form)


def newton_from(p: Tensor, alpha: Tensor, steps: int, closed_form: bool = True) -> Tensor:
    """``steps`` times V ← 2V − V·P·V from V0 = α·P (α broadcast over (..., 1, 1)), for symmetric P.

    Iterated, each step is one matmul and one fused baddbmm. In closed form:
    every V_k is a polynomial in P, so it shares P's eigenvectors, and on an
    eigenvalue λ the error e = 1 − λ·v squares each step from e₀ = 1 − αλ², so
    V = Q·diag((1 − (1 − αλ²)^(2^steps)) / λ)·Qᵀ. One float64 eigendecomposition
    replaces 2·steps matmuls: less work, and closer to the exact iteration than
    float32 steps (bench/README.md, "Forward parts").
    """
    if not closed_form:
        return _newton_steps(alpha * p, p, steps)
    work = p.to("cpu") if p.device.type == "mps" else p  # MPS has no float64
    try:
        lam, vecs = torch.linalg.eigh(work.double())
    except torch.linalg.LinAlgError:  # non-finite P: the iteration propagates it as the official code does
        return _newton_steps(alpha * p, p, steps)
    x = alpha.to(lam).squeeze(-1) * lam * lam  # αλ², (..., m)
    # log|1 − αλ²|, accurate near 0 (log1p) and above 1 (αλ² < 2 by the choice of α: where the steps converge)
    log_e = torch.where(x < 0.5, torch.log1p(-x.clamp_max(0.5)), torch.log((1 - x).abs()))
    one_minus_e = -torch.expm1(float(2 ** steps) * log_e)  # 2^steps is even: e ≥ 0
    zero = lam == 0
    v = torch.where(zero, 0.0, one_minus_e / torch.where(zero, 1.0, lam))
    out = (vecs * v.unsqueeze(-2)) @ vecs.transpose(-1, -2)
    return out.to(device=p.device, dtype=p.dtype)


def _newton_steps(v: Tensor, p: Tensor, steps: int) -> Tensor:
    """``steps`` times V ← 2V − V·P·V, as one matmul and one fused baddbmm per step."""
    shape = v.shape
    v, p = v.reshape(-1, *shape[-2:]), p.reshape(-1, *shape[-2:])
    for _ in range(steps):
        v = torch.baddbmm(v, v @ p, v, beta=2.0, alpha=-1.0)
    return v.reshape(shape)


def newton_pinv_norm(a: Tensor, steps: int = NEWTON_STEPS, closed_form: bool = True) -> Tensor:
    """SOFT-Norm pseudo-inverse D·V·D, with alpha and its halving test taken per image.

    ``a`` is (B, h, m, m). The official code takes alpha over the whole batch; here
    each batch item scales independently, so a prediction never depends on the
    other images in the batch. ``closed_form`` as in :func:`newton_pinv_plain`.
    """
    b = a.shape[0]
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    rows = a.sum(-1)  # (B, h, m)
    alpha = 2.0 / rows.reshape(b, -1).amax(-1).square()  # (B,)
    alpha = alpha.view(b, 1, 1, 1)

    def residual(al: Tensor) -> Tensor:
        r = (eye - a @ (al * a)).abs().sum(-2)  # column sums, (B, h, m)
        return r.reshape(b, -1).amax(-1).view(b, 1, 1, 1)

    for _ in range(NORM_MAX_HALVINGS):
        failing = residual(alpha) > NORM_TOLERANCE
        if not bool(failing.any()):
            break
        alpha = torch.where(failing, alpha * 0.5, alpha)
    v = newton_from(a, alpha, steps, closed_form)
    d = rows.clamp_min(torch.finfo(a.dtype).tiny).rsqrt()
    return d.unsqueeze(-1) * v * d.unsqueeze(-2)


def _matmul_into(a: Tensor, b: Tensor, out: Tensor) -> Tensor:
    """a @ b written into ``out`` (any strides); autograd-safe when gradients flow (training a head)."""
    if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):
        return out.copy_(a @ b)
    return torch.matmul(a, b, out=out)


def token_major_empty(b: int, h: int, n: int, d: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """An uninitialised (B, h, N, d) tensor laid out as (B, N, h, d): heads merge back into tokens as a view."""
    return torch.empty((b, n, h, d), dtype=dtype, device=device).transpose(1, 2)


class SoftAttention(nn.Module):
    """Softmax-free attention of stages 1-3: Gaussian kernel, Newton pseudo-inverse, local conv.

    Parameter names follow our layout; :func:`checkpoint_filter_fn` maps the
    official ``att.mha.*`` names onto them.
    """

    def __init__(self, dim: int, num_heads: int, sr_ratio: int, local_kernel: int, norm: bool) -> None:
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.sr_ratio = sr_ratio
        self.norm = norm
        d = self.head_dim
        self.q = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.landmark_conv = nn.Conv2d(d, d, sr_ratio, sr_ratio, bias=False)
        self.landmark_norm = nn.LayerNorm(d, eps=1e-5)
        self.local_conv = nn.Conv2d(num_heads, num_heads, local_kernel, padding=local_kernel // 2,
                                    groups=num_heads, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.landmark_policy = LandmarkPolicy()
        # Rows of K1 evaluated at once; None lets chunk_plan pick from the size.
        self.chunk_tokens: int | None = None

    def landmark_index(self, hw: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """Token rows and columns of the landmark patches the policy keeps on an H x W map.

        Each kept patch contributes its r consecutive rows (columns); the lists
        are ascending, so patches come out in row-major landmark order. The
        choice depends only on the whole map's size, never on a tile.
        """
        r = self.sr_ratio
        full = (hw[0] // r, hw[1] // r)
        grid = self.landmark_policy.grid(*full)
        offsets = torch.arange(r)
        rows = (spread_indices(full[0], grid[0])[:, None] * r + offsets).flatten()
        cols = (spread_indices(full[1], grid[1])[:, None] * r + offsets).flatten()
        return rows, cols

    def landmarks(self, q: Tensor, hw: tuple[int, int]) -> Tensor:
        """Landmarks L (B, h, m, d) from the scaled queries (B, h, N, d).

        Officially one landmark per r x r patch. When the policy keeps fewer,
        the kept ones are an evenly spaced subset of the official patches (only
        those are convolved): measured far closer to the official output than
        averaging landmarks (bench/README.md, "Landmark policy").
        """
        b, h, n, d = q.shape
        r = self.sr_ratio
        qmap = q.transpose(2, 3).reshape(b * h, d, hw[0], hw[1])
        full = (hw[0] // r, hw[1] // r)
        if self.landmark_policy.grid(*full) != full:
            rows, cols = self.landmark_index(hw)
            qmap = qmap.index_select(2, rows.to(q.device)).index_select(3, cols.to(q.device))
        return self.landmarks_from_patches(qmap, b)

    def landmarks_from_patches(self, qmap: Tensor, batch: int) -> Tensor:
        """(B·h, d, rows, cols) map of kept patches (whole r x r patches) → landmarks (B, h, m, d).

        The r x r conv has stride r and drops a remainder; LayerNorm and GELU
        are per landmark, so a band of patch rows gives exactly its landmarks.
        """
        d = self.head_dim
        lm = self.landmark_conv(qmap)  # (B·h, d, grid rows, grid cols)
        lm = lm.flatten(2).transpose(1, 2).reshape(batch, self.num_heads, -1, d)
        return F.gelu(self.landmark_norm(lm))

    def queries_values(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Tokens (B, N, C) → scaled queries and values, (B, h, N, d) each."""
        b, n, _ = x.shape
        h, d = self.num_heads, self.head_dim
        scale = d ** -0.25  # folded into the (small) weights: no pass over the (large) queries
        q = F.linear(x, self.q.weight * scale, self.q.bias * scale).view(b, n, h, d).transpose(1, 2)
        v = self.v(x).view(b, n, h, d).transpose(1, 2)
        return q, v

    def landmark_pinv(self, lm: Tensor) -> Tensor:
        """A⁺ of the landmark kernel A = k(L, L), float32 (the Newton iteration of the variant)."""
        with torch.autocast(device_type=lm.device.type, enabled=False):
            a = gaussian_kernel(lm.float(), lm.float())
            pinv = newton_pinv_norm if self.norm else newton_pinv_plain
            return pinv(a, closed_form=self.newton_in_closed_form(lm))

    def newton_in_closed_form(self, lm: Tensor) -> bool:
        """Closed form, except when gradients flow into the landmarks: an eigendecomposition's
        gradient blows up at repeated eigenvalues, the steps' gradient does not."""
        return not (torch.is_grad_enabled() and lm.requires_grad)

    @staticmethod
    def chunk_plan(n_tokens: int, n_landmarks: int, batch_heads: int, rows: int | None = None) -> ChunkPlan:
        """Rows of K1 per chunk and the number of K1 evaluations, for N tokens and m landmarks.

        ``rows`` forces a chunk size (``SoftAttention.chunk_tokens``). The one rule
        for both the model and the FLOP estimate of :mod:`softcli.profile`.
        """
        if rows is None:
            if n_tokens * n_landmarks * batch_heads <= K1_ONCE_ELEMENTS:
                return ChunkPlan(n_tokens, 1)
            rows = max(K1_MIN_CHUNK_ROWS, K1_CHUNK_ELEMENTS // max(1, n_landmarks * batch_heads))
        rows = max(1, min(n_tokens, rows))
        return ChunkPlan(rows, 1 if rows >= n_tokens else 2)

    def _chunk(self, q: Tensor, lm: Tensor) -> ChunkPlan:
        return self.chunk_plan(q.shape[-2], lm.shape[-2], q.shape[0] * q.shape[1], self.chunk_tokens)

    def kernel_values(self, q: Tensor, v: Tensor, lm: Tensor) -> Tensor:
        """K1ᵀ·V (B, h, m, d) in float32 over the given tokens; sums over tiles add up exactly."""
        with torch.autocast(device_type=q.device.type, enabled=False):
            q, v, lm = q.float(), v.float(), lm.float()
            n, chunk = q.shape[-2], self._chunk(q, lm).rows
            ktv: Tensor | None = None
            for s in range(0, n, chunk):
                k1 = gaussian_kernel(q[:, :, s:s + chunk], lm)
                part = k1.transpose(-1, -2) @ v[:, :, s:s + chunk]
                ktv = part if ktv is None else ktv.add_(part)
            assert ktv is not None
            return ktv

    def kernel_apply(self, q: Tensor, lm: Tensor, w: Tensor, out_dtype: torch.dtype) -> Tensor:
        """K1·W (B, h, N, d) for W = A⁺·(K1ᵀ·V), chunked over tokens so K1 is never whole.

        The result is a view of token-major (B, N, h, d) memory, like the local
        term, so adding the two and merging the heads copies nothing.
        """
        with torch.autocast(device_type=q.device.type, enabled=False):
            q, lm = q.float(), lm.float()
            n, chunk = q.shape[-2], self._chunk(q, lm).rows
            out = token_major_empty(q.shape[0], q.shape[1], n, w.shape[-1], torch.float32, q.device)
            for s in range(0, n, chunk):
                _matmul_into(gaussian_kernel(q[:, :, s:s + chunk], lm), w, out[:, :, s:s + chunk])
            return out.to(out_dtype)

    def global_term(self, q: Tensor, v: Tensor, lm: Tensor) -> Tensor:
        """K1·(A⁺·(K1ᵀ·V)) in float32, token-major; K1 whole and evaluated once when :meth:`chunk_plan` allows."""
        out_dtype = v.dtype
        a_pinv = self.landmark_pinv(lm)
        with torch.autocast(device_type=q.device.type, enabled=False):
            q, v, lm = q.float(), v.float(), lm.float()
            if self._chunk(q, lm).k1_evaluations == 1:
                k1 = gaussian_kernel(q, lm)
                w = a_pinv @ (k1.transpose(-1, -2) @ v)
                out = token_major_empty(q.shape[0], q.shape[1], q.shape[2], w.shape[-1], torch.float32, q.device)
                return _matmul_into(k1, w, out).to(out_dtype)
            return self.kernel_apply(q, lm, a_pinv @ self.kernel_values(q, v, lm), out_dtype)

    def local_term(self, v: Tensor, hw: tuple[int, int]) -> Tensor:
        """``attn.conv``: one k x k filter per head, shared by the head's d channels.

        The official code convolves V viewed as (B·d, h, H, W) with groups = h; the
        same numbers come from one depthwise conv over the (B, h·d, H, W) map with
        each head's filter repeated d times. The map is taken channels-last, which
        is how the tokens (B, N, h·d) already lie in memory, so no copy is made and
        the depthwise conv runs on its fast channels-last path; its output is
        channels-last too, so the result is again a view of token-major memory
        (2048² stage 1, 262144 tokens, 64 channels, 9 x 9, 1 thread: 62 ms vs 255 ms
        for the NCHW conv with its two transposes; bench/README.md "Forward parts").
        """
        b, h, n, d = v.shape
        weight = self.local_conv.weight.repeat_interleave(d, dim=0)  # (h·d, 1, k, k)
        tokens = v.transpose(1, 2).reshape(b, hw[0], hw[1], h * d)  # a view when v is token-major
        k = weight.shape[-1]
        out = F.conv2d(tokens.permute(0, 3, 1, 2), weight, padding=k // 2, groups=h * d)
        return out.permute(0, 2, 3, 1).reshape(b, n, h, d).transpose(1, 2)

    def merge_heads(self, out: Tensor) -> Tensor:
        """(B, h, N, d) → ``ff`` of the merged (B, N, C) tokens."""
        return self.proj(self.heads_to_tokens(out))

    @staticmethod
    def heads_to_tokens(out: Tensor) -> Tensor:
        """(B, h, N, d) → (B, N, h·d): a view when ``out`` is token-major."""
        b, h, n, d = out.shape
        return out.transpose(1, 2).reshape(b, n, h * d)

    def attend(self, x: Tensor, hw: tuple[int, int]) -> Tensor:
        """Tokens (B, N, C) → global + local term, heads merged (B, N, C), before ``proj``."""
        q, v = self.queries_values(x)
        out = self.global_term(q, v, self.landmarks(q, hw))
        out += self.local_term(v, hw)  # both token-major: merging heads is a view
        return self.heads_to_tokens(out)

    def forward(self, x: Tensor, hw: tuple[int, int]) -> Tensor:
        return self.proj(self.attend(x, hw))
