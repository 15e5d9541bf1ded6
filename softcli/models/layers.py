"""Layer helpers the SOFT blocks share: per-token chunking and the eval-mode conv + BatchNorm fold.

Kept apart from :mod:`softcli.models.soft` (the architecture) as timm keeps its
``layers/``: they change how a computation walks memory, never what it computes.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

__all__ = ["TOKEN_CHUNK_ELEMENTS", "TOKEN_CHUNK_MIN_ROWS", "EmbedStep", "embed_convs", "per_token_chunks"]

#: The per-token tail of a block (residuals, norms, MLP) walks the tokens in row
#: chunks whose MLP hidden activations hold about this many values (4 MB in
#: float32): the hidden layer stays in the CPU cache instead of streaming a
#: full-size temporary (256 MB at 2048², stage 1) through memory, and no
#: full-size temporaries are allocated (bench/README.md, "Forward parts").
TOKEN_CHUNK_ELEMENTS = 1 << 20
#: Fewest rows in a chunk, whatever the width.
TOKEN_CHUNK_MIN_ROWS = 256


def per_token_chunks(fn: Callable[..., Tensor], *tensors: Tensor, width: int) -> Tensor:
    """``fn`` over aligned row chunks of (B, N, ·) tensors, written into one (B, N, ·) result.

    Only for ``fn`` that treat each token on its own (norms, MLPs, residuals):
    then the result equals ``fn(*tensors)``. ``width`` is the widest
    intermediate per token, which sets the chunk size.
    """
    n = tensors[0].shape[1]
    rows = max(TOKEN_CHUNK_MIN_ROWS, TOKEN_CHUNK_ELEMENTS // max(1, width))
    if rows >= n:
        return fn(*tensors)
    out: Tensor | None = None
    for s in range(0, n, rows):
        part = fn(*(t[:, s:s + rows] for t in tensors))
        if out is None:
            out = part.new_empty((part.shape[0], n, part.shape[-1]))
        out[:, s:s + rows] = part
    assert out is not None
    return out


#: One conv of a patch embedding: the conv, the weight and bias to run it with, and what follows it.
EmbedStep = tuple[nn.Conv2d, Tensor, Tensor | None, Callable[[Tensor], Tensor]]


def embed_convs(patch_embed: nn.Sequential) -> list[EmbedStep]:
    """A patch embedding (conv [, BatchNorm], activation, ...) as (conv, weight, bias, what follows) steps.

    In eval mode a BatchNorm after a conv is folded into that conv's weight and
    bias (BN in eval is a per-channel affine map): same numbers to float32
    rounding, one pass and one full-size temporary fewer per conv. In training
    BN stays a module (it updates its statistics).
    """
    layers = list(patch_embed)
    steps: list[EmbedStep] = []
    i = 0
    while i < len(layers):
        conv = layers[i]
        assert isinstance(conv, nn.Conv2d), "a patch embedding is conv [, BatchNorm], activation, ..."
        weight, bias = conv.weight, conv.bias
        i += 1
        after: list[nn.Module] = []
        if i < len(layers) and isinstance(layers[i], nn.BatchNorm2d):
            bn = layers[i]
            assert isinstance(bn, nn.BatchNorm2d)
            if not bn.training and bn.running_mean is not None and bn.running_var is not None:
                scale = bn.weight * (bn.running_var + bn.eps).rsqrt()
                weight = weight * scale.view(-1, 1, 1, 1)
                bias = bn.bias - bn.running_mean * scale + (bias * scale if bias is not None else 0)
            else:
                after.append(bn)
            i += 1
        while i < len(layers) and not isinstance(layers[i], nn.Conv2d):
            after.append(layers[i])
            i += 1
        steps.append((conv, weight, bias, nn.Sequential(*after)))
    return steps
