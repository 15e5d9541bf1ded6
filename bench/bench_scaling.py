"""Time and peak memory of a whole SOFT backbone against image side.

Compares, on one machine in one run, each configuration in its own worker
process (so peak RSS is that configuration's alone):

- ``soft``: softcli as it runs by default (landmark budget, chunked kernels);
- ``official``: the official computation: official landmark count and the
  official evaluation order with K1 materialised, ``(K1·A⁺)·(K1ᵀ·V)``;
- ``softmax``: the same backbone with the SOFT global term of stages 1-3
  replaced by softmax attention (SDPA, keys = queries as in SOFT);
- ``budget:N``: softcli with an explicit landmark budget N.

Usage:
    python bench/bench_scaling.py --sides 512,1024,2048,4096 --methods soft,official,softmax
    python bench/bench_scaling.py --sides 1024 --methods soft,official --repeat 3

Prints a Markdown table (seconds, seconds in stages 1-3, peak RSS) and the
log-log slope of time against pixels per method; ``--json FILE`` keeps the raw
results. Weights are random (soft_tiny architecture): time and memory do not
depend on the values.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _worker(method: str, side: int, variant: str, repeat: int, threads: int) -> dict:
    import torch

    sys.path.insert(0, str(REPO))
    import softcli
    from softcli.models import LandmarkPolicy
    from softcli.models.soft import SoftAttention
    from softcli.profile import OfficialOrderAttention

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = softcli.create_model(variant)
    if method == "official":
        model.set_landmark_policy(LandmarkPolicy("official"))
        for m in model.soft_attention_modules():
            OfficialOrderAttention.convert(m)
    elif method.startswith("budget:"):
        model.set_landmark_policy(LandmarkPolicy.parse(method.split(":", 1)[1]))
    elif method == "softmax":
        def softmax_global(self, q, v, lm):  # noqa: ANN001 - benchmark patch
            return torch.nn.functional.scaled_dot_product_attention(q, q, v, scale=1.0)
        SoftAttention.global_term = softmax_global
    elif method != "soft":
        raise SystemExit(f"unknown method {method}")

    stage_seconds = [0.0] * 4
    starts = {}

    def pre(i):
        return lambda *_: starts.__setitem__(i, time.perf_counter())

    def post(i):
        def hook(*_):
            stage_seconds[i] += time.perf_counter() - starts[i]
        return hook

    for i, stage in enumerate(model.stages):
        stage.register_forward_pre_hook(pre(i))
        stage.register_forward_hook(post(i))
    with torch.inference_mode():
        model(torch.rand(1, 3, 224, 224))  # warm-up: kernels, allocator
        stage_seconds[:] = [0.0] * 4
        x = torch.rand(1, 3, side, side)
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t0)
    times.sort()
    return {
        "method": method, "side": side, "seconds": times[len(times) // 2],
        "stage_seconds": [s / repeat for s in stage_seconds],
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "status": "ok",
    }


def _run(method: str, side: int, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", method, str(side), "--variant", args.variant,
           "--repeat", str(args.repeat), "--threads", str(args.threads)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"method": method, "side": side, "status": f"timeout >{args.timeout:.0f}s"}
    if out.returncode != 0:
        tail = (out.stderr.strip().splitlines() or ["?"])[-1]
        status = "oom" if out.returncode in (-9, 137) or "memory" in tail.lower() else f"failed: {tail[:80]}"
        return {"method": method, "side": side, "status": status}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _slope(rows: list[dict], key=lambda r: r["seconds"]) -> float | None:
    pts = [(math.log(r["side"] ** 2), math.log(key(r))) for r in rows if r["status"] == "ok"]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    return sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", nargs=2, metavar=("METHOD", "SIDE"), help=argparse.SUPPRESS)
    ap.add_argument("--sides", default="512,1024,2048,4096")
    ap.add_argument("--methods", default="soft,official,softmax")
    ap.add_argument("--variant", default="soft_tiny")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per configuration")
    ap.add_argument("--json", type=Path, help="write raw results here")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(_worker(args.worker[0], int(args.worker[1]), args.variant, args.repeat, args.threads)))
        return
    sides = [int(s) for s in args.sides.split(",")]
    methods = args.methods.split(",")
    results = []
    for method in methods:
        gave_up = False
        for side in sides:
            if gave_up:  # a larger image only takes longer
                results.append({"method": method, "side": side, "status": "skipped (smaller size timed out)"})
                continue
            r = _run(method, side, args)
            results.append(r)
            print(json.dumps(r), file=sys.stderr, flush=True)
            gave_up = r["status"] != "ok"
    print("| method | side | seconds | stages 1-3 s | stage 4 s | peak RSS GB | status |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        if r["status"] == "ok":
            st = r["stage_seconds"]
            print(f"| {r['method']} | {r['side']}² | {r['seconds']:.2f} | {sum(st[:3]):.2f} | {st[3]:.2f} | "
                  f"{r['peak_rss_bytes'] / 1e9:.2f} | ok |")
        else:
            print(f"| {r['method']} | {r['side']}² | – | – | – | – | {r['status']} |")
    print()
    for method in methods:
        rows = [r for r in results if r["method"] == method]
        s = _slope(rows)
        s123 = _slope(rows, key=lambda r: sum(r["stage_seconds"][:3]))
        if s is None:
            print(f"- {method}: too few points for a slope")
        else:
            print(f"- {method}: whole model time ∝ pixels^{s:.2f}; stages 1-3 ∝ pixels^{s123:.2f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
