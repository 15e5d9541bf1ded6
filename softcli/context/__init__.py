"""Exact whole-image ("global context") SOFT inference, streamed over tiles with bounded memory.

A SOFT layer of stages 1-3 is local except for two small global quantities per
head: the landmarks L (an r x r conv at landmark patches chosen on the whole
map's grid) and K1ᵀ·V summed over all tokens (m x d). So each layer runs as::

    landmarks: the kept patch rows of the layer input, band by band  → L, A⁺
    pass A:    every tile: q, v → K1ᵀ·V, summed                      → W = A⁺·(K1ᵀ·V)
    pass B:    every tile + a k//2 halo: K1·W + local k x k term → ff, norms, MLP → next store

and gives the numbers of one whole-image forward (up to float summation order).
Patch embeddings run tile by tile with the halo their 3x3 convs need (zeros
exactly where the whole-image conv pads); positional embeddings are the
whole-grid bilinear resize evaluated on each tile (:func:`pos_embed_region`).
Activations between layers live in :class:`ActivationStore` objects: numpy
arrays when they fit the budget, raw files written with ``pwrite`` and read
with ``pread`` in a temporary ``.soft-context-*`` folder when they don't (so
stored rows never count towards resident memory); the folder is removed when
the run ends, also on an exception or Ctrl-C. A resumable run
(:mod:`.resume`) keeps them instead in ``OUT.partial-state/`` with a record of
every finished pass, and can split each pass's tiles across torchrun ranks.

Stage 4 (softmax attention with a class token) has no such decomposition: it
runs once over all stage-4 tokens (N/1024 of them) held in memory, through the
same ``scaled_dot_product_attention`` call as the whole-image forward — exact,
O(N) memory on CPU, quadratic time. Ask for it only when you need it (the
class token of ``classify --full-res`` sees the whole image this way).

API::

    with run_global(model, source, upto=3, keep=(1, 2, 3), tile=1024, spill_dir=...) as result:
        result.maps[1].read(y0, y1, x0, x1)     # (h, w, C) float32 of stage 1, channels last
"""

from .modes import (
                    CONTEXT_MODES,
                    GLOBAL_TILE_CAP,
                    ContextChoice,
                    check_context_mode,
                    choose_context,
                    default_max_memory,
                    memory_budget,
                    plan_global,
                    tissue_context,
)
from .resume import LayerCheckpoints, count_passes, open_checkpoints
from .run import GlobalResult, StepCallback, count_steps, run_global, stage_sizes
from .sources import ImageSource, ReaderSource, TensorSource, embed_region, embed_sizes
from .stores import ActivationStore, FileStore, MemoryStore, StoreFactory, export_map, resized_rows, store_rows

__all__ = [
    "CONTEXT_MODES", "GLOBAL_TILE_CAP", "ActivationStore", "ContextChoice", "FileStore", "GlobalResult",
    "ImageSource", "LayerCheckpoints", "MemoryStore", "ReaderSource", "StepCallback", "StoreFactory", "TensorSource",
    "check_context_mode",
    "choose_context", "tissue_context", "count_passes", "count_steps", "default_max_memory", "embed_region",
    "embed_sizes", "memory_budget",
    "export_map", "open_checkpoints", "plan_global", "resized_rows", "run_global", "stage_sizes", "store_rows",
]
