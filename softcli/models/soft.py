"""SOFT: softmax-free vision transformers (NeurIPS 2021, IJCV 2024).

One file for the model family, timm style: the architecture as plain config
data (:data:`VARIANTS`), pure ``nn.Module`` classes, and
:func:`checkpoint_filter_fn`, the one place that maps the official key layout to
ours. No file I/O happens here; :mod:`softcli.checkpoint` reads files.

What the modules compute is ``shared/reference/SOFT.md`` to the letter at the
default landmark policy. The one deliberate departure is the Norm variant's
Newton scaling, taken per image so that batching never changes a prediction
(the reference outputs were made that way too).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal, cast, overload

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .landmarks import LandmarkPolicy
from .layers import embed_convs, per_token_chunks
from .positions import resize_pos_embed
from .soft_attention import (  # noqa: F401 - re-exported: the attention lived here before
    NEWTON_STEPS,
    NORM_MAX_HALVINGS,
    NORM_TOLERANCE,
    PLAIN_ALPHA_SCALE,
    PLAIN_RIDGE,
    SoftAttention,
    gaussian_kernel,
    newton_pinv_norm,
    newton_pinv_plain,
)

__all__ = [
    "VARIANTS",
    "SoftConfig",
    "SoftModel",
    "SoftAttention",
    "checkpoint_filter_fn",
    "infer_config",
    "is_official_layout",
    "stage_take_indices",
]

# Local-term kernel sizes of stages 1-3 (attn.conv); fixed by the official code.
LOCAL_KERNELS = (9, 5, 3)



@dataclass(frozen=True)
class SoftConfig:
    """Architecture of one SOFT network; serialised as JSON beside the weights."""

    embed_dims: tuple[int, int, int, int] = (64, 128, 320, 512)
    num_heads: tuple[int, int, int, int] = (2, 4, 10, 16)
    depths: tuple[int, int, int, int] = (1, 2, 3, 2)
    sr_ratios: tuple[int, int, int] = (8, 4, 2)
    mlp_ratios: tuple[int, ...] = (8, 8, 4, 4)  # stored for fidelity; stages use 4·C
    patch_size: int = 4
    num_classes: int = 1000
    norm: bool = False
    variant: str | None = None
    pretrain_grid: tuple[int, int] = field(default=(56, 56))  # pos_embed1 grid (224/4)

    def __post_init__(self) -> None:
        for name in ("embed_dims", "num_heads", "depths", "sr_ratios", "mlp_ratios", "pretrain_grid"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        if len(self.embed_dims) != 4 or len(self.num_heads) != 4 or len(self.depths) != 4:
            raise ValueError("embed_dims, num_heads and depths need four entries (one per stage)")
        if len(self.sr_ratios) < 3:
            raise ValueError("sr_ratios needs at least three entries (stages 1-3)")
        object.__setattr__(self, "sr_ratios", self.sr_ratios[:3])
        for c, h in zip(self.embed_dims, self.num_heads):
            if h <= 0 or c % h:
                raise ValueError(f"embed dim {c} is not divisible by {h} heads")
        if self.patch_size != 4:
            raise ValueError("only patch_size 4 exists in SOFT (a stride-4 convolutional stem)")
        if self.num_classes < 0:
            raise ValueError("num_classes must be >= 0")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SoftConfig:
        """Build from ``{"variant": name, ...overrides}`` or the full official dict."""
        data = dict(data)
        variant = data.pop("variant", None)
        base: dict[str, Any] = {}
        if variant is not None:
            if variant not in VARIANTS:
                raise ValueError(f"unknown SOFT variant {variant!r}; known: {', '.join(VARIANTS)}")
            base = dict(VARIANTS[variant])
            base["variant"] = variant
        known = {f for f in cls.__dataclass_fields__}
        for key, value in data.items():
            if key in known:
                base[key] = value
        return cls(**base)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for k, v in out.items():
            if isinstance(v, tuple):
                out[k] = list(v)
        return out


def _variant(embed_dims, num_heads, depths, norm):  # noqa: ANN001 - table helper
    return dict(
        embed_dims=embed_dims,
        num_heads=num_heads,
        depths=depths,
        sr_ratios=(8, 4, 2),
        mlp_ratios=(8, 8, 4, 4),
        patch_size=4,
        num_classes=1000,
        norm=norm,
    )


_FAMILY = {
    "tiny": ((64, 128, 320, 512), (2, 4, 10, 16), (1, 2, 3, 2)),
    "small": ((64, 128, 320, 512), (2, 4, 10, 16), (1, 3, 20, 4)),
    "medium": ((64, 128, 288, 512), (2, 4, 9, 16), (1, 3, 29, 5)),
    "large": ((64, 128, 320, 512), (2, 4, 10, 16), (1, 3, 40, 5)),
    "huge": ((64, 128, 352, 512), (2, 4, 11, 16), (1, 5, 49, 5)),
}

#: The ten published architectures, as plain data.
VARIANTS: dict[str, dict[str, Any]] = {}
for _size, (_dims, _heads, _depths) in _FAMILY.items():
    VARIANTS[f"soft_{_size}"] = _variant(_dims, _heads, _depths, norm=False)
    VARIANTS[f"soft_norm_{_size}"] = _variant(_dims, _heads, _depths, norm=True)


# --------------------------------------------------------------------------------------
# Building blocks


def _conv_bn_relu(cin: int, cout: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride, 1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, approximate: str) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.approximate = approximate

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate=self.approximate))


class SoftBlock(nn.Module):
    """Post-norm block of stages 1-3 (MLP width 4·C, tanh GELU)."""

    def __init__(self, dim: int, num_heads: int, sr_ratio: int, local_kernel: int, norm: bool) -> None:
        super().__init__()
        self.attn = SoftAttention(dim, num_heads, sr_ratio, local_kernel, norm)
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.mlp = Mlp(dim, 4 * dim, approximate="tanh")
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)

    def forward(self, x: Tensor, hw: tuple[int, int]) -> Tensor:
        # ``proj`` joins the per-token chunks: its output never exists at full size.
        return per_token_chunks(self._project_finish, x, self.attn.attend(x, hw), width=self.mlp.fc1.out_features)

    def _project_finish(self, x: Tensor, heads: Tensor) -> Tensor:
        return self._finish_tokens(x, self.attn.proj(heads))

    def finish(self, x: Tensor, attn_out: Tensor) -> Tensor:
        """Everything after attention (residual, norms, MLP): per token, so any tile of tokens works."""
        return per_token_chunks(self._finish_tokens, x, attn_out, width=self.mlp.fc1.out_features)

    def _finish_tokens(self, x: Tensor, attn_out: Tensor) -> Tensor:
        x = self.norm1(x + attn_out)
        return self.norm2(x + self.mlp(x))


class SoftmaxAttention(nn.Module):
    """Stage-4 multi-head softmax attention, through ``scaled_dot_product_attention``."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        h = self.num_heads
        q = self.q(x).view(b, n, h, c // h).transpose(1, 2)
        k, v = self.kv(x).view(b, n, 2, h, c // h).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class SoftmaxBlock(nn.Module):
    """Pre-norm ViT block of stage 4 (LayerNorm eps 1e-6, exact GELU)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = SoftmaxAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, 4 * dim, approximate="none")

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return per_token_chunks(self._mlp_tokens, x, width=self.mlp.fc1.out_features)

    def _mlp_tokens(self, x: Tensor) -> Tensor:
        return x + self.mlp(self.norm2(x))


class SoftStage(nn.Module):
    """Patch embedding + resized positional embedding + blocks; one pyramid level."""

    def __init__(self, index: int, cfg: SoftConfig) -> None:
        super().__init__()
        self.index = index
        dim = cfg.embed_dims[index]
        if index == 0:
            layers = _conv_bn_relu(3, 32, 2) + _conv_bn_relu(32, 32, 1) + _conv_bn_relu(32, dim, 2)
        else:
            layers = _conv_bn_relu(cfg.embed_dims[index - 1], dim, 2)
        self.patch_embed = nn.Sequential(*layers)
        scale = 2 ** index
        self.grid = (max(1, cfg.pretrain_grid[0] // scale), max(1, cfg.pretrain_grid[1] // scale))
        extra = 1 if index == 3 else 0  # stage 4's first row is the class token's
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid[0] * self.grid[1] + extra, dim))
        if index < 3:
            self.blocks = nn.ModuleList(
                SoftBlock(dim, cfg.num_heads[index], cfg.sr_ratios[index], LOCAL_KERNELS[index], cfg.norm)
                for _ in range(cfg.depths[index])
            )
        else:
            self.blocks = nn.ModuleList(SoftmaxBlock(dim, cfg.num_heads[index]) for _ in range(cfg.depths[index]))

    def forward(self, x: Tensor, cls_token: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Map (B, C_in, H, W) → map (B, C, H', W'), channels-last; stage 4 also returns the class token.

        The patch embedding runs channels-last (with its BatchNorms folded, 1.5-2.6x faster than NCHW on
        CPU, bench/README.md "Forward parts"), which is also how tokens (B, N, C)
        lie in memory: map → tokens → map are views, not copies.
        """
        x = self.embed(x.contiguous(memory_format=torch.channels_last))
        b, c, hh, ww = x.shape
        tokens = x.permute(0, 2, 3, 1).reshape(b, hh * ww, c) + resize_pos_embed(
            self.grid_pos_embed, self.grid, (hh, ww))
        if cls_token is None:
            for blk in self.blocks:
                tokens = blk(tokens, (hh, ww))
            cls_out = None
        else:
            tokens, cls_out = self.attend_with_class(tokens, cls_token)
        return tokens.reshape(b, hh, ww, c).permute(0, 3, 1, 2), cls_out

    def embed(self, x: Tensor) -> Tensor:
        """``patch_embed``; in eval mode each BatchNorm is folded into the conv before it (:func:`embed_convs`)."""
        for conv, weight, bias, after in embed_convs(self.patch_embed):
            x = after(F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups))
        return x

    @property
    def grid_pos_embed(self) -> Tensor:
        """The positional grid (1, gh·gw, C) without stage 4's class-token row."""
        return self.pos_embed[:, 1:] if self.index == 3 else self.pos_embed

    def attend_with_class(self, tokens: Tensor, cls_token: Tensor) -> tuple[Tensor, Tensor]:
        """Stage 4's softmax blocks over the class token + all grid tokens (positions already added)."""
        b = tokens.shape[0]
        tokens = torch.cat([cls_token.expand(b, -1, -1) + self.pos_embed[:, :1], tokens], dim=1)
        for blk in self.blocks:
            tokens = blk(tokens)
        return tokens[:, 1:], tokens[:, 0]


class SoftModel(nn.Module):
    """The SOFT pyramid backbone with its ImageNet head.

    ``forward(x)`` maps (B, 3, H, W) float images to logits (B, classes), at any
    H, W (positional grids are resized). ``forward_features(x)`` returns the four
    stage maps (B, C_i, H_i, W_i) at strides 4, 8, 16, 32 for dense tasks;
    ``forward_intermediates(x, indices)`` only some, stopping after the deepest.
    """

    def __init__(self, cfg: SoftConfig) -> None:
        super().__init__()
        self.config = cfg
        self.stages = nn.ModuleList(SoftStage(i, cfg) for i in range(4))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dims[3]))
        self.norm = nn.LayerNorm(cfg.embed_dims[3], eps=1e-6)
        self.head = nn.Linear(cfg.embed_dims[3], cfg.num_classes) if cfg.num_classes else nn.Identity()
        self.reset_parameters()

    @property
    def num_features(self) -> int:
        return self.config.embed_dims[3]

    def reset_parameters(self) -> None:
        """Truncated-normal init (as the official code) so a fresh model is usable in tests."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for stage in self.stages:
            nn.init.trunc_normal_(cast(Tensor, stage.pos_embed), std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def soft_attention_modules(self) -> list[SoftAttention]:
        return [m for m in self.modules() if isinstance(m, SoftAttention)]

    def set_landmark_policy(self, policy: LandmarkPolicy) -> None:
        """Choose how many landmarks stages 1-3 use (see :mod:`softcli.models.landmarks`)."""
        for m in self.soft_attention_modules():
            m.landmark_policy = policy

    @property
    def landmark_policy(self) -> LandmarkPolicy:
        mods = self.soft_attention_modules()
        return mods[0].landmark_policy if mods else LandmarkPolicy()

    @overload
    def forward_intermediates(self, x: Tensor, indices: int | Sequence[int] | None = ..., *,
                              stop_early: bool = ..., intermediates_only: Literal[True]) -> list[Tensor]: ...

    @overload
    def forward_intermediates(self, x: Tensor, indices: int | Sequence[int] | None = ..., *,
                              stop_early: bool = ..., intermediates_only: Literal[False] = ...
                              ) -> tuple[Tensor, list[Tensor]]: ...

    def forward_intermediates(self, x: Tensor, indices: int | Sequence[int] | None = None, *,
                              stop_early: bool = True, intermediates_only: bool = False
                              ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """Stage maps (B, C_i, H_i, W_i), NCHW, for the stage ``indices``, in stage order (timm's convention).

        ``indices`` are 0-based stages: None takes all four, an int n the last n,
        a sequence those stages (negative counts from the end). With
        ``intermediates_only`` the list of maps is returned, and ``stop_early``
        skips the stages after the deepest one asked for (stage 1 alone runs
        stage 1 only). Otherwise all stages run and the result is
        ``(class token, maps)``: the stage-4 class token before the final norm,
        what :meth:`forward_head` takes.
        """
        take, deepest = stage_take_indices(len(self.stages), indices)
        if not (intermediates_only and stop_early):
            deepest = len(self.stages) - 1
        maps: list[Tensor] = []
        cls_out: Tensor | None = None
        for i, stage in enumerate(self.stages[:deepest + 1]):
            x, cls_out = stage(x, self.cls_token if i == 3 else None)
            if i in take:
                maps.append(x.contiguous())  # NCHW, as callers and writers expect; x stays channels-last
        if intermediates_only:
            return maps
        assert cls_out is not None
        return cls_out, maps

    def forward_features(self, x: Tensor) -> list[Tensor]:
        """All four stage maps (the dense tasks' input); :meth:`forward_intermediates` picks fewer."""
        return self.forward_intermediates(x, intermediates_only=True)

    def forward_class_token(self, x: Tensor) -> Tensor:
        """The stage-4 class token before the final norm (keeps no stage map)."""
        return self.forward_intermediates(x, indices=[])[0]

    def forward_head(self, cls_out: Tensor) -> Tensor:
        return self.head(self.norm(cls_out))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_class_token(x))


def stage_take_indices(num_stages: int, indices: int | Sequence[int] | None) -> tuple[list[int], int]:
    """timm's ``feature_take_indices``: (sorted absolute 0-based stages to take, the deepest of them).

    None → all; an int n → the last n; a sequence → those, negative ones counted
    from the end. An empty sequence takes none (deepest -1). Raises ValueError
    for a stage out of range.
    """
    if indices is None:
        indices = num_stages
    if isinstance(indices, int):
        if not 0 <= indices <= num_stages:
            raise ValueError(f"can take the last 0-{num_stages} stages, not {indices}")
        take = list(range(num_stages - indices, num_stages))
    else:
        take = []
        for i in indices:
            idx = num_stages + int(i) if int(i) < 0 else int(i)
            if not 0 <= idx < num_stages:
                raise ValueError(f"stage index {i} is out of range (0 to {num_stages - 1}, or negative from the end)")
            take.append(idx)
        take = sorted(set(take))
    return take, max(take, default=-1)


# --------------------------------------------------------------------------------------
# Official checkpoints

# (official regex, our replacement); applied in order, first match wins.
_OFFICIAL_RULES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(p), r)
    for p, r in [
        (r"^patch_embed(\d)\.proj\.(.*)$", "stages.{0}.patch_embed.\\2"),
        (r"^pos_embed(\d)$", "stages.{0}.pos_embed"),
        (r"^block([123])\.(\d+)\.att\.mha\.W_q\.(.*)$", "stages.{0}.blocks.\\2.attn.q.\\3"),
        (r"^block([123])\.(\d+)\.att\.mha\.W_v\.(.*)$", "stages.{0}.blocks.\\2.attn.v.\\3"),
        (r"^block([123])\.(\d+)\.att\.mha\.attn\.Qlandmark_op\.(.*)$", "stages.{0}.blocks.\\2.attn.landmark_conv.\\3"),
        (r"^block([123])\.(\d+)\.att\.mha\.attn\.Qnorm_act\.0\.(.*)$", "stages.{0}.blocks.\\2.attn.landmark_norm.\\3"),
        (r"^block([123])\.(\d+)\.att\.mha\.attn\.conv\.(.*)$", "stages.{0}.blocks.\\2.attn.local_conv.\\3"),
        (r"^block([123])\.(\d+)\.att\.mha\.ff\.(.*)$", "stages.{0}.blocks.\\2.attn.proj.\\3"),
        (r"^block([123])\.(\d+)\.att\.norm([12])\.(.*)$", "stages.{0}.blocks.\\2.norm\\3.\\4"),
        (r"^block([123])\.(\d+)\.att\.ff([12])\.(.*)$", "stages.{0}.blocks.\\2.mlp.fc\\3.\\4"),
        (r"^block4\.(\d+)\.(.*)$", "stages.3.blocks.\\1.\\2"),
        (r"^(cls_token|norm\.weight|norm\.bias|head\.weight|head\.bias)$", "\\1"),
    ]
]

_WRAPPER_PREFIXES = ("module.", "model.", "_orig_mod.")


def is_official_layout(keys: Any) -> bool:
    """True when keys follow the official layout (``block1.0.att.mha...``)."""
    return any(re.match(r"^(module\.)?(block[1-4]\.|patch_embed[1-4]\.|pos_embed[1-4]$)", k) for k in keys)


def map_official_key(key: str) -> str | None:
    """Our parameter name for an official key, or None when it is not ours to load."""
    for pattern, repl in _OFFICIAL_RULES:
        m = pattern.match(key)
        if m:
            stage = int(m.group(1)) - 1 if "{0}" in repl else None
            return m.expand(repl.format(stage))
    return None


def strip_wrappers(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Drop DataParallel / torch.compile prefixes (``module.``, ``_orig_mod.``)."""
    out: dict[str, Tensor] = {}
    for k, v in state_dict.items():
        changed = True
        while changed:
            changed = False
            for p in _WRAPPER_PREFIXES:
                if k.startswith(p):
                    k, changed = k[len(p):], True
        out[k] = v
    return out


def checkpoint_filter_fn(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Map an official (or already-ours) state dict to this module's names.

    Wrapper prefixes are stripped; unknown official keys (e.g. the training
    script's ``head_dist``) are dropped so that ``load_state_dict`` reports only
    what is really missing.
    """
    sd = strip_wrappers(state_dict)
    if not is_official_layout(sd.keys()):
        return sd
    out: dict[str, Tensor] = {}
    for k, v in sd.items():
        new = map_official_key(k)
        if new is not None:
            out[new] = v
    return out


def infer_config(state_dict: Mapping[str, Tensor], stage4_head_dim: int = 32) -> SoftConfig:
    """Architecture from a state dict (ours or official): depths from block counts,
    dims and heads from shapes. Stage-4 heads = C4/32 unless told otherwise.
    Raises ValueError when the keys do not describe a SOFT network.
    """
    sd = checkpoint_filter_fn(state_dict)

    def shape(key: str) -> tuple[int, ...]:
        if key not in sd:
            raise ValueError(f"not a SOFT checkpoint: no {key!r}")
        return tuple(sd[key].shape)

    dims, heads, depths, srs = [], [], [], []
    for i in range(4):
        blocks = {int(m.group(1)) for k in sd if (m := re.match(rf"^stages\.{i}\.blocks\.(\d+)\.", k))}
        if not blocks:
            raise ValueError(f"not a SOFT checkpoint: stage {i + 1} has no blocks")
        depths.append(max(blocks) + 1)
        dim = shape(f"stages.{i}.patch_embed.{6 if i == 0 else 0}.weight")[0]
        dims.append(dim)
        if i < 3:
            h = shape(f"stages.{i}.blocks.0.attn.local_conv.weight")[0]
            heads.append(h)
            srs.append(shape(f"stages.{i}.blocks.0.attn.landmark_conv.weight")[-1])
        else:
            heads.append(max(1, dim // stage4_head_dim))
    pos = shape("stages.0.pos_embed")[1]
    side = math.isqrt(pos)
    grid = (side, side) if side * side == pos else (56, 56)
    classes = shape("head.weight")[0] if "head.weight" in sd else 0
    return SoftConfig.from_dict({"embed_dims": dims, "num_heads": heads, "depths": depths, "sr_ratios": srs,
                                 "num_classes": classes, "norm": False, "pretrain_grid": grid})


def create_soft(cfg: SoftConfig | str | Mapping[str, Any], **overrides: Any) -> SoftModel:
    """A fresh SOFT model from a variant name, a config dict or a :class:`SoftConfig`."""
    if isinstance(cfg, str):
        cfg = SoftConfig.from_dict({"variant": cfg})
    elif not isinstance(cfg, SoftConfig):
        cfg = SoftConfig.from_dict(cfg)
    if overrides:
        cfg = replace(cfg, **overrides)
    return SoftModel(cfg)
