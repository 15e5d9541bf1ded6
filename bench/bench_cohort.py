"""Bookkeeping cost of a cohort run (softcli.cohort): manifest, resume checks, part files.

The job is a stub that writes a 16-byte file, so what is timed is only what
``run_cohort`` adds per input: the first run (one fsync'd manifest line per
input, the final merge) and a rerun where every input is skipped (reading the
manifest once, one stat per output).

    python bench/bench_cohort.py --inputs 1000,10000
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from softcli.cohort import CohortTask, run_cohort
from softcli.cohort.runner import JobResult
from softcli.io.inputs import InputItem


def _stub(path: str, out: Path, progress: object) -> JobResult:
    out.write_bytes(b"0123456789abcdef")
    return JobResult([out], (1, 1))


def measure(n: int, root: Path) -> tuple[float, float]:
    images = root / f"in{n}"
    images.mkdir()
    items = []
    for i in range(n):
        p = images / f"slide{i:06d}.png"
        p.touch()
        items.append(InputItem(str(p)))
    task = CohortTask("bench", ".bin", {"x": 1}, "stub", "0" * 64, _stub)
    out = root / f"out{n}"
    t0 = time.perf_counter()
    first = run_cohort(items, out, task)
    t1 = time.perf_counter()
    again = run_cohort(items, out, task)
    t2 = time.perf_counter()
    assert first.count("done") == n and again.count("skipped") == n
    return t1 - t0, t2 - t1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--inputs", default="1000,10000")
    args = ap.parse_args()
    print(f"load average: {os.getloadavg()[0]:.1f}")
    print("| inputs | first run s | per input ms | rerun (all skipped) s | per input ms |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for n in (int(v) for v in args.inputs.split(",")):
            first, rerun = measure(n, Path(tmp))
            print(f"| {n} | {first:.2f} | {1000 * first / n:.2f} | {rerun:.2f} | {1000 * rerun / n:.2f} |")


if __name__ == "__main__":
    main()
