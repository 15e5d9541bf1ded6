"""Synthetic images with known regions, and mask scoring, for the segmentation tests."""

from __future__ import annotations

import itertools

import numpy as np
import pytest


def regions_image(h: int = 256, w: int = 256, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(image float32 (h, w, 3) in [0, 1], labels int64 (h, w)) with three regions.

    Left half: red with horizontal stripes; top right: blue noise; bottom right:
    green checkerboard. Distinct in colour and in texture.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    gt = np.zeros((h, w), np.int64)
    gt[:, w // 2:] = 1
    gt[(yy >= h // 2) & (xx >= w // 2)] = 2
    stripes = (np.sin(yy / 2.0) > 0).astype(np.float32)
    noise = rng.random((h, w)).astype(np.float32)
    check = (((yy // 4) + (xx // 4)) % 2).astype(np.float32)
    zero = np.zeros((h, w), np.float32)
    looks = [np.stack([0.8 + 0.1 * stripes, 0.2 * stripes, zero + 0.1], -1),
             np.stack([0.1 * noise, 0.3 * noise, 0.6 + 0.4 * noise], -1),
             np.stack([zero + 0.1, 0.4 + 0.5 * check, 0.1 + 0.2 * check], -1)]
    img = np.zeros((h, w, 3), np.float32)
    for label, look in enumerate(looks):
        img[gt == label] = look[gt == label]
    return img, gt


def iou_per_class(pred: np.ndarray, gt: np.ndarray, k: int) -> list[float]:
    return [float(((pred == c) & (gt == c)).sum() / max(1, ((pred == c) | (gt == c)).sum())) for c in range(k)]


def best_match_miou(pred: np.ndarray, gt: np.ndarray, k: int) -> float:
    """Mean IoU after the best one-to-one relabelling of ``pred`` (brute force; fine for k ≤ 8)."""
    best = 0.0
    for perm in itertools.permutations(range(k)):
        best = max(best, float(np.mean(iou_per_class(np.asarray(perm)[pred], gt, k))))
    return best


class ArrayReader:
    """The reader interface (height, width, read_region) over an in-memory array."""

    def __init__(self, img: np.ndarray) -> None:
        self.img = img
        self.height, self.width = img.shape[:2]
        self.levels = 1

    def read_region(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        return self.img[y:y + h, x:x + w]


def quantised(img: np.ndarray) -> np.ndarray:
    """The image as it reads back from an 8-bit file."""
    return np.round(img * 255.0).astype(np.uint8).astype(np.float32) / 255.0


def train_head(backbone, img: np.ndarray, gt: np.ndarray, num_classes: int, steps: int = 40, seed: int = 0):
    """A Semantic-FPN head trained for ``steps`` on one image, backbone frozen. Returns a SoftSegmenter (eval)."""
    import torch
    import torch.nn.functional as F

    from softcli.checkpoint import IMAGENET_PRETRAINED_CFG
    from softcli.models.segmentation import HeadConfig, SemanticFPNHead, SoftSegmenter

    torch.manual_seed(seed)
    head = SemanticFPNHead(backbone.config.embed_dims, HeadConfig(num_classes, fpn_channels=32, channels=32,
                                                                  groups=8))
    mean = torch.tensor(IMAGENET_PRETRAINED_CFG["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_PRETRAINED_CFG["std"]).view(1, 3, 1, 1)
    x = (torch.from_numpy(img).permute(2, 0, 1)[None] - mean) / std
    with torch.no_grad():
        maps = backbone.eval().forward_features(x)
    target = torch.from_numpy(gt)[None]
    opt = torch.optim.AdamW(head.parameters(), lr=3e-3)
    head.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: threads only add overhead (a lot of it on a shared machine)
    try:
        for _ in range(steps):
            logits = F.interpolate(head(maps), size=gt.shape, mode="bilinear", align_corners=False)
            loss = F.cross_entropy(logits, target)
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return SoftSegmenter(backbone, head).eval()


def make_trained_checkpoint(backbone, folder):
    """Train a head on a 3-region 128² image, save it as a checkpoint folder and the image as PNG.

    Returns (model, checkpoint folder, png path, ground truth).
    """
    from PIL import Image

    from softcli.segment import save_segmenter

    img, gt = regions_image(128, 128, seed=1)
    img = quantised(img)
    model = train_head(backbone, img, gt, 3, steps=40)
    ckpt = folder / "ckpt"
    save_segmenter(model, ckpt, ["stripes", "noise", "checker"], [[255, 0, 0], [0, 0, 255], [0, 255, 0]])
    png = folder / "train.png"
    Image.fromarray(np.round(img * 255).astype(np.uint8)).save(png)
    return model, ckpt, png, gt


@pytest.fixture
def single_thread():
    """Tiny tensors: one intra-op thread is faster, and far faster on a shared machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


#: For CLI subprocesses, the same as :func:`single_thread` (every thread-pool variable, so that all the
#: one-thread runs share one warm zygote, tests/zygote.py).
ONE_THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


def flat_scene(h: int = 1536, w: int = 1536) -> tuple[np.ndarray, np.ndarray]:
    """(image float32 (h, w, 3), labels (h, w)): a flat grey-blue background (0), a flat orange
    rectangle (1) and a flat green disc (2), no texture at all, placed so that tile seams cross them.

    Flat regions are where tiled context fails: every tile normalises its own
    global term, so the same colour gets different features in different tiles.
    """
    yy, xx = np.mgrid[0:h, 0:w]
    gt = np.zeros((h, w), np.int64)
    gt[(yy >= h * 0.15) & (yy < h * 0.55) & (xx >= w * 0.1) & (xx < w * 0.75)] = 1
    gt[(yy - h * 0.72) ** 2 + (xx - w * 0.6) ** 2 < (0.2 * min(h, w)) ** 2] = 2
    colours = np.array([[0.45, 0.5, 0.6], [0.9, 0.55, 0.15], [0.2, 0.65, 0.3]], np.float32)
    return colours[gt], gt
