"""Speed/fidelity trade-off of the landmark budget.

For each image side and landmark budget, the relative error (Frobenius norm of
the difference over the norm of the official result) of the logits and of each
stage map against the official landmark count, plus the forward time.

Usage:
    python bench/bench_landmarks.py --sides 448,672,896 --budgets 49,100,144,256,400
    python bench/bench_landmarks.py --weights ../shared/reference/golden/soft_tiny.weights.safetensors

The input is a smooth random image (bicubic-upsampled noise), the same for
every budget. Without --weights the golden soft_tiny weights are used when
present (random but structured), else random init.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import softcli  # noqa: E402
from softcli.models import LandmarkPolicy  # noqa: E402

GOLDEN_TINY = REPO.parent / "shared" / "reference" / "golden" / "soft_tiny.weights.safetensors"


def _run(model, x):
    with torch.inference_mode():
        t0 = time.perf_counter()
        cls, maps = model.forward_intermediates(x)
        logits = model.forward_head(cls)
        return maps, logits, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sides", default="448,672,896")
    ap.add_argument("--budgets", default="49,100,144,256,400")
    ap.add_argument("--weights", type=Path, default=GOLDEN_TINY if GOLDEN_TINY.exists() else None)
    args = ap.parse_args()
    model = softcli.load_model(args.weights) if args.weights else softcli.create_model("soft_tiny")
    torch.manual_seed(0)
    print("| side | budget | stage-1 landmarks | logits rel. err | stage 1 | stage 2 | stage 3 | stage 4 | seconds |")
    print("|---|---|---|---|---|---|---|---|---|")
    for side in (int(s) for s in args.sides.split(",")):
        x = F.interpolate(torch.randn(1, 3, side // 16, side // 16), size=(side, side), mode="bicubic")
        model.set_landmark_policy(LandmarkPolicy("official"))
        ref_maps, ref_logits, ref_s = _run(model, x)
        official_m = (side // 4 // 8) ** 2
        print(f"| {side}² | official | {official_m} | 0 | 0 | 0 | 0 | 0 | {ref_s:.2f} |", flush=True)
        for budget in (int(b) for b in args.budgets.split(",")):
            if budget >= official_m:
                continue
            policy = LandmarkPolicy("budget", budget)
            model.set_landmark_policy(policy)
            rows, cols = policy.grid(side // 32, side // 32)
            maps, logits, secs = _run(model, x)
            rel = [float((a - r).norm() / r.norm()) for a, r in zip(maps, ref_maps)]
            lrel = float((logits - ref_logits).norm() / ref_logits.norm())
            print(f"| {side}² | {budget} | {rows * cols} | {lrel:.4f} | " + " | ".join(f"{e:.4f}" for e in rel)
                  + f" | {secs:.2f} |", flush=True)


if __name__ == "__main__":
    main()
