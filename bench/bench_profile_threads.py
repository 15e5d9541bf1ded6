"""Why ``soft profile`` measures at one CPU thread by default: the same configurations at 1 and at
N threads, side by side in one run, with the machine's load average.

For each round and each configuration (attention method x tokens, or a soft_tiny stage / the whole
model), the 1-thread and the N-thread measurement run back to back in fresh worker processes (the
``soft profile`` harness: warm-up, ``--repeats`` timed runs, median). Printed: a Markdown table of
medians and spreads per thread count, soft/softmax at each size, and in model mode how the stages
add up to the whole model.

Usage:
    python bench/bench_profile_threads.py --tokens 4096,16384 --threads 1,2
    python bench/bench_profile_threads.py --model soft_tiny --image-size 512 --threads 1,2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from softcli.profile import (  # noqa: E402 - after the sys.path line
    ProfileResult,
    ProfileSettings,
    attention_jobs,
    model_jobs,
    run_job,
)


def _load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", default="4096,16384")
    ap.add_argument("--methods", default="soft,softmax")
    ap.add_argument("--model", default=None, help="model mode: a variant, e.g. soft_tiny")
    ap.add_argument("--image-size", type=int, default=512)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None, help="also write every result here")
    args = ap.parse_args()
    thread_counts = [int(t) for t in args.threads.split(",")]
    settings = {t: ProfileSettings(threads=t, repeat=args.repeats) for t in thread_counts}
    if args.model:
        jobs = model_jobs(args.model, args.image_size)
    else:
        jobs = attention_jobs(args.methods.split(","), [int(n) for n in args.tokens.split(",")],
                              settings[thread_counts[0]])
    print(f"load average at start: {_load()}")
    t0 = time.monotonic()
    results: dict[tuple[int, str, int], list[ProfileResult]] = {}
    for _ in range(args.rounds):
        for job in jobs:
            for t in thread_counts:  # back to back: the same moment of the machine's load
                res = run_job(job, settings[t])
                results.setdefault((t, job.part or job.method, job.tokens), []).append(res)
    print(f"load average at end: {_load()} ({time.monotonic() - t0:.0f} s)\n")
    print("| threads | configuration | tokens | median ms | min-max ms | runs | status |")
    print("|---:|---|---:|---:|---:|---:|---|")
    median: dict[tuple[int, str, int], float] = {}
    for (t, name, n), rs in results.items():
        ok = [r for r in rs if r.status == "ok" and r.latency_ms is not None]
        if ok:  # over rounds: the median of the per-round medians, the extremes of every run
            median[(t, name, n)] = statistics.median(r.latency_ms for r in ok if r.latency_ms is not None)
            lo = min(r.latency_min_ms for r in ok if r.latency_min_ms is not None)
            hi = max(r.latency_max_ms for r in ok if r.latency_max_ms is not None)
            print(f"| {t} | {name} | {n} | {median[(t, name, n)]:.1f} | {lo:.1f}-{hi:.1f} | "
                  f"{sum(r.repeats for r in ok)} | ok |")
        else:
            print(f"| {t} | {name} | {n} | - | - | 0 | {rs[-1].status}: {rs[-1].message} |")
    print()
    for t in thread_counts:
        if args.model:
            stages = [median.get((t, f"stage{i}", j.tokens)) for i, j in enumerate(jobs[:4], 1)]
            whole = median.get((t, "model", jobs[4].tokens))
            if whole and all(stages):
                total = sum(s for s in stages if s)
                print(f"{t} thread(s): stages add up to {total:.0f} ms = {100 * total / whole:.0f}% "
                      f"of the whole model's {whole:.0f} ms")
        else:
            for n in sorted({j.tokens for j in jobs}):
                soft, softmax = median.get((t, "soft", n)), median.get((t, "softmax", n))
                if soft and softmax:
                    print(f"{t} thread(s), {n} tokens: softmax / soft = {softmax / soft:.2f}")
    if args.json:
        args.json.write_text(json.dumps({f"{t}|{name}|{n}": [r.to_dict() for r in rs]
                                         for (t, name, n), rs in results.items()}, indent=1))


if __name__ == "__main__":
    main()
