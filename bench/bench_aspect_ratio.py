"""Peak memory of classify's eval preprocessing on elongated images (cut-to-centre before resize).

For each (H, W), a fresh Python process decodes nothing: it makes a random float
RGB array of that size (what :func:`softcli.io.image.load_image` returns), then
runs :func:`softcli.preprocess.eval_transform` once, and reports how much its
peak resident memory grew during the transform. The "uncut" column is the size
the scaled intermediate would have if the whole image were resized before the
centre crop (H', W' from :func:`softcli.preprocess.scale_to_cover`), computed,
not run.

Usage:
    python bench/bench_aspect_ratio.py
    python bench/bench_aspect_ratio.py --shapes 3x100000,100000x3,300x20000,480x640
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_CHILD = r"""
import json, resource, sys, time
import numpy as np
sys.path.insert(0, sys.argv[3])
from softcli.preprocess import Preprocess, eval_transform, scale_to_cover
h, w = int(sys.argv[1]), int(sys.argv[2])
image = np.random.default_rng(0).random((h, w, 3), dtype=np.float32)
pre = Preprocess()
eval_transform(np.zeros((64, 64, 3), np.float32), pre)  # warm up torch's kernels
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
start = time.perf_counter()
out = eval_transform(image, pre)
seconds = time.perf_counter() - start
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
sh, sw = scale_to_cover((h, w), pre.resize_size)
print(json.dumps({"shape": [h, w], "out": list(out.shape), "peak_growth": after - before,
                  "image_bytes": image.nbytes, "uncut_bytes": 12 * sh * sw, "uncut": [sh, sw],
                  "seconds": seconds}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="3x100000,100000x3,30x100000,300x20000,480x640")
    args = ap.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    print(f"load: {os.getloadavg()[0]:.2f}")
    print("| image (H x W) | decoded array | scaled whole, uncut (computed) "
          "| peak RSS growth of eval_transform | time |")
    print("|---|---|---|---|---|")
    for text in args.shapes.split(","):
        h, w = (int(v) for v in text.lower().split("x"))
        proc = subprocess.run([sys.executable, "-c", _CHILD, str(h), str(w), str(REPO)], capture_output=True,
                              text=True, env=env, check=True)
        r = json.loads(proc.stdout)
        sh, sw = r["uncut"]
        print(f"| {h} x {w} | {r['image_bytes'] / 2**20:.1f} MiB | {sh} x {sw}: {r['uncut_bytes'] / 2**30:.2f} GiB | "
              f"{r['peak_growth'] / 2**20:.1f} MiB | {r['seconds'] * 1000:.0f} ms |")


if __name__ == "__main__":
    main()
