"""``soft segment``: dense labels for images of any size, with a trained head or by clustering.

The pipeline, for both modes::

    reader ─ TileGrid ─ per-tile scores at stride 4 ─ Stitcher (blend overlaps) ─ LabelSink ─ LabelRaster ─ writers
                          │                                                         │
                          ├ head:     SoftSegmenter logits                           bilinear ×4, argmax
                          └ clusters: −‖standardised features − centroid‖²

Scores are blended across tile overlaps *before* the argmax (the engine's
normalised weights), then upsampled to pixels row band by row band in
:class:`LabelSink`, so neither the scores nor the labels of the whole image are
ever in memory. Segmentation checkpoints are softcli folders (or safetensors /
``.pth`` files) holding ``backbone.*`` + ``head.*`` weights; their config.json
adds ``task: "segmentation"``, the head config, class names and a palette
(:func:`save_segmenter`, :func:`load_segmenter`).

Modules: :mod:`.segmenter` (checkpoints) and :mod:`.run` (the streamed run).
"""

from __future__ import annotations

from .run import LabelSink, check_model_request, segment
from .segmenter import (
    HEAD_TYPE,
    SCORE_STRIDE,
    SEG_META_KEY,
    TASK,
    SegmenterInfo,
    is_segmentation_checkpoint,
    load_segmenter,
    save_segmenter,
    segmenter_from_checkpoint,
)

__all__ = [
    "HEAD_TYPE",
    "SCORE_STRIDE",
    "SEG_META_KEY",
    "TASK",
    "check_model_request",
    "LabelSink",
    "SegmenterInfo",
    "is_segmentation_checkpoint",
    "load_segmenter",
    "save_segmenter",
    "segment",
    "segmenter_from_checkpoint",
]
