"""Benchmark: ``soft fit segment`` head variants on the texture scenes of the tests.

Fits on one 512² scene of three grey textures (scribbles on about 1.2 % of the
pixels, ``tests/fit_synthetic.py``), segments a different scene with
``soft segment --model``, and reports mean IoU against its known layout, for
each variant given, through the command line (subprocesses) as a user runs it:

    python bench/bench_fit.py --weights ../shared/reference/golden/soft_tiny.weights.safetensors

Variants are extra ``soft fit segment`` arguments separated by ``;``
(``--variants "--stages 1; --stages 1,2; --window 1; --head fpn --steps 100"``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.fit_synthetic import scribbles, texture_scene  # noqa: E402 - after the sys.path line
from tests.synthetic import iou_per_class  # noqa: E402

DEFAULT_VARIANTS = "--stages 1; --stages 1,2; --window 1; --head fpn --steps 100"


def soft(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "softcli", *args], check=False, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", required=True, help="Backbone checkpoint for --weights.")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--train-seed", type=int, default=1)
    ap.add_argument("--test-seed", type=int, default=2)
    ap.add_argument("--variants", default=DEFAULT_VARIANTS)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        data = tmp / "data"
        (data / "images").mkdir(parents=True)
        (data / "labels").mkdir()
        img, gt = texture_scene(args.size, args.size, seed=args.train_seed)
        labels = scribbles(gt, seed=args.train_seed, per_class=10, length=60, margin=8)
        Image.fromarray(img).save(data / "images" / "scene.png")
        Image.fromarray(labels).save(data / "labels" / "scene.png")
        test_img, test_gt = texture_scene(args.size, args.size, seed=args.test_seed)
        Image.fromarray(test_img).save(tmp / "test.png")
        print(f"scribbles on {(labels > 0).mean() * 100:.2f} % of {args.size}² pixels; "
              f"train seed {args.train_seed}, test seed {args.test_seed}")
        print("| variant | fit s | segment s | mean IoU | IoU stripes / dots / blotches |")
        print("|---|---|---|---|---|")
        for i, variant in enumerate(v.strip() for v in args.variants.split(";")):
            out = tmp / f"m{i}"
            t0 = time.perf_counter()
            fit = soft("fit", "segment", str(data), "--out", str(out), "--weights", args.weights, "--val", "0",
                       "--device", "cpu", "--json", *variant.split())
            t1 = time.perf_counter()
            if fit.returncode:
                print(f"| {variant} | failed: {fit.stderr.strip()} | | | |")
                continue
            seg = soft("segment", str(tmp / "test.png"), "--model", str(out), "--out", str(tmp / "pred.npy"),
                       "--device", "cpu", "--json")
            t2 = time.perf_counter()
            if seg.returncode:
                print(f"| {variant} | {t1 - t0:.1f} | failed: {seg.stderr.strip()} | | |")
                continue
            json.loads(seg.stdout)
            ious = iou_per_class(np.load(tmp / "pred.npy"), test_gt, 3)
            print(f"| `{variant}` | {t1 - t0:.1f} | {t2 - t1:.1f} | {np.mean(ious):.3f} | "
                  f"{' / '.join(f'{v:.3f}' for v in ious)} |", flush=True)


if __name__ == "__main__":
    main()
