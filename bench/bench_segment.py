"""Benchmark: ``soft segment --clusters`` on a 16000² tiled BigTIFF → tiled pyramidal TIFF mask.

Creates the input tile by tile (never whole in memory), a random-weight
checkpoint, runs the command line as a subprocess, and reports wall time and
the child's peak RSS (``getrusage(RUSAGE_CHILDREN).ru_maxrss``), then checks the
mask with tifffile: full size, pyramid levels, labels present.

    python bench/bench_segment.py                      # 16000², soft_tiny, K=4
    python bench/bench_segment.py --size 4096 --keep   # quicker

The checkpoint has random weights (no trained weights are needed to measure
time and memory): ``soft_tiny`` by default, or ``--variant mini``, a smaller
SOFT with the same code paths; or ``--weights`` names one (freshly initialised
weights make SOFT's global term a tile-wide sum, so their clusters follow the
tiles; the golden ``mini_plain`` weights have trained-like scales and show
whether the quadrants come back). The clustering path runs only the stages it
uses (``--cluster-stages``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

#: A smaller SOFT (same code paths) for machines where soft_tiny is too slow to wait for.
MINI_CONFIG = {"embed_dims": [16, 32, 48, 64], "num_heads": [1, 2, 3, 2], "depths": [1, 1, 1, 1],
               "sr_ratios": [8, 4, 2]}


def make_tiff(path: Path, size: int, tile: int = 512) -> None:
    """A size² RGB BigTIFF with four textured regions, written tile by tile (deflate)."""
    import tifffile

    def tiles():
        for y in range(0, size, tile):
            for x in range(0, size, tile):
                yy, xx = np.mgrid[y:y + tile, x:x + tile]
                region = (yy * 2 // size) * 2 + (xx * 2 // size)
                # Quadrants: red stripes, blue checker, green ramp, grey dots.
                out = np.zeros((tile, tile, 3), np.uint8)
                stripes = ((yy // 3) % 2).astype(np.uint8)
                check = (((yy // 8) + (xx // 8)) % 2).astype(np.uint8)
                dots = (((yy % 12) < 4) & ((xx % 12) < 4)).astype(np.uint8)
                looks = [np.stack([200 + 40 * stripes, 40 * stripes, np.full_like(stripes, 20)], -1),
                         np.stack([np.full_like(check, 20), 60 * check, 150 + 100 * check], -1),
                         np.stack([np.full_like(xx, 30), 120 + (xx % 64), np.full_like(xx, 40)], -1),
                         np.stack([110 + 100 * dots] * 3, -1)]
                for r, look in enumerate(looks):
                    m = region == r
                    out[m] = look[m].astype(np.uint8)
                yield out

    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        tif.write(tiles(), shape=(size, size, 3), dtype=np.uint8, tile=(tile, tile), compression="zlib",
                  photometric="rgb")


def quadrant_miou(mask: np.ndarray, k: int) -> float:
    """Mean IoU of a (downsampled) mask against the four quadrants, after the best relabelling."""
    import itertools

    h, w = mask.shape
    yy, xx = np.mgrid[0:h, 0:w]
    gt = (yy * 2 // h) * 2 + (xx * 2 // w)
    best = 0.0
    for perm in itertools.permutations(range(max(k, 4))):
        p = np.asarray(perm)[mask]
        ious = [((p == c) & (gt == c)).sum() / max(1, ((p == c) | (gt == c)).sum()) for c in range(4)]
        best = max(best, float(np.mean(ious)))
    return best


def check_mask(mask: Path, size: int, k: int) -> dict:
    """Read the mask back with tifffile: full size, pyramid, compression, labels, quadrant mIoU."""
    import tifffile

    with tifffile.TiffFile(mask) as tif:
        series = tif.series[0]
        levels = [tuple(lv.shape) for lv in series.levels]
        page = series.levels[0].keyframe
        assert levels[0] == (size, size), levels
        # Level 2 (a quarter of the side) is enough to score the quadrants; never read the whole mask.
        mid = series.levels[min(2, len(levels) - 1)].asarray()
        return {"mask_levels": levels, "mask_tiled": page.is_tiled, "mask_compression": page.compression.name,
                "mask_dtype": str(page.dtype), "labels_present": sorted(int(v) for v in np.unique(mid)),
                "quadrant_miou": round(quadrant_miou(mid, k), 4), "scored_on_level_shape": list(mid.shape)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=16000)
    ap.add_argument("--clusters", type=int, default=4)
    ap.add_argument("--variant", default="soft_tiny",
                    help="a SOFT variant, or 'mini' (embed dims 16/32/48/64, one block per stage)")
    ap.add_argument("--weights", type=Path, default=None,
                    help="an existing checkpoint instead of random weights (e.g. the golden mini_plain)")
    ap.add_argument("--cluster-stages", default="1,2")
    ap.add_argument("--tile", type=int, default=1024)
    ap.add_argument("--workdir", type=Path, default=None, help="where to put the files (default: a temp folder)")
    ap.add_argument("--keep", action="store_true", help="keep the input, checkpoint and mask")
    ap.add_argument("--check-only", action="store_true", help="only verify an existing mask in --workdir")
    args = ap.parse_args()

    import torch

    import softcli
    from softcli.checkpoint import save_pretrained

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-segment-"))
    work.mkdir(parents=True, exist_ok=True)
    src, ckpt, mask = work / f"input_{args.size}.tif", work / f"{args.variant}_random", work / "mask.tif"
    if args.check_only:
        print(json.dumps(check_mask(mask, args.size, args.clusters), indent=2))
        return
    try:
        t0 = time.perf_counter()
        if not src.exists():
            make_tiff(src, args.size)
        t_make = time.perf_counter() - t0
        if args.weights is not None:
            ckpt = args.weights
        else:
            torch.manual_seed(0)
            arch = MINI_CONFIG if args.variant == "mini" else args.variant
            save_pretrained(softcli.create_model(arch, num_classes=0), ckpt)
        cmd = [sys.executable, "-m", "softcli", "segment", str(src), "--weights", str(ckpt),
               "--clusters", str(args.clusters), "--cluster-stages", args.cluster_stages,
               "--tile", str(args.tile), "--device", "cpu", "--out", str(mask),
               "--overlay", str(work / "overlay.jpg"), "--json"]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        wall = time.perf_counter() - t0
        peak_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # KiB on Linux
        if proc.returncode != 0:
            sys.exit(f"soft segment failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        summary = json.loads(proc.stdout)
        result = {
            "size": args.size, "weights": str(args.weights) if args.weights else f"{args.variant} (random)",
            "clusters": args.clusters, "tile": args.tile,
            "cluster_stages": args.cluster_stages,
            "cpu_threads": int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())),
            "make_input_s": round(t_make, 1),
            "input_bytes": src.stat().st_size, "wall_s": round(wall, 1),
            "peak_rss_gb": round(peak_rss / 2**30, 3), "mask_bytes": mask.stat().st_size,
            **check_mask(mask, args.size, args.clusters), "tiles": summary["tiles"],
            "label_s": summary["seconds"]["label"],
            "fractions": [round(e["fraction"], 4) for e in summary["labels"]],
            "command": " ".join(cmd[1:]).replace(str(work), "$WORK"),
        }
        print(json.dumps(result, indent=2))
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
