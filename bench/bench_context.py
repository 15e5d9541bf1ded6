"""Benchmark: ``soft features --context global`` (exact whole-image SOFT, streamed) against one pass and tiles.

Runs the command line as subprocesses, one after the other in one run, and
reports each one's wall time and its own peak RSS (``os.wait4`` rusage of that
child), plus seconds per megapixel:

1. time per MP: ``--context global`` at 8192² vs a whole-image pass at 2048² (auto → whole);
2. ``--context global`` vs ``--context tile --tile 1024`` at 4096²;
3. ``--context global`` on a 16000² tiled BigTIFF, stages 1-3 (goal: peak RSS <= 3 GB).

All runs: golden soft_tiny weights (float16 stored, run in float32), ``--stages 1,2,3``,
``--max-memory 3GB``, output .safetensors. Inputs are BigTIFFs written tile by tile
(bench_segment.make_tiff: four textured quadrants).

    python bench/bench_context.py --out bench/context_results.json
    python bench/bench_context.py --only 1,2        # skip the 16000² run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_segment import make_tiff  # noqa: E402 - the same synthetic BigTIFF as the segment benchmark

WEIGHTS = REPO.parent / "shared" / "reference" / "golden" / "soft_tiny.weights.safetensors"


def run_cli(args: list[str], log: Path) -> dict:
    """Run ``python -m softcli ARGS``; wall time and this child's peak RSS."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "softcli", *args], stdout=fh, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    text = log.read_text()
    if code != 0:
        raise SystemExit(f"soft {' '.join(args)} failed ({code}):\n{text[-2000:]}")
    return {"seconds": round(seconds, 1), "peak_rss_gb": round(usage.ru_maxrss * 1024 / 2**30, 2),
            "summary": [ln for ln in text.splitlines() if ln.startswith(("context", "wrote")) or "image," in ln]}


def features(work: Path, size: int, context: str, extra: list[str] = ()) -> dict:
    img = work / f"in{size}.tif"
    if not img.exists():
        make_tiff(img, size)
    out = work / f"f{size}_{context}.safetensors"
    res = run_cli(["features", str(img), "--out", str(out), "--weights", str(WEIGHTS), "--stages", "1,2,3",
                   "--context", context, "--max-memory", "3GB", *extra], work / f"log{size}_{context}.txt")
    res.update(size=size, context=context, extra=list(extra), mp=round(size * size / 1e6, 2),
               s_per_mp=round(res["seconds"] / (size * size / 1e6), 3))
    out.unlink(missing_ok=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "context_results.json")
    ap.add_argument("--only", default="1,2,3", help="which experiments (1, 2, 3)")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    only = {int(v) for v in args.only.split(",")}
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-context-"))
    work.mkdir(parents=True, exist_ok=True)
    report: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "load_at_start": os.getloadavg(),
                    "runs": []}

    def record(res: dict) -> None:
        res["load_after"] = [round(v, 2) for v in os.getloadavg()]
        report["runs"].append(res)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps(res), flush=True)

    try:
        if 1 in only:
            record(features(work, 2048, "auto"))
            record(features(work, 8192, "global"))
        if 2 in only:
            record(features(work, 4096, "global"))
            record(features(work, 4096, "tile", ["--tile", "1024"]))
        if 3 in only:
            record(features(work, 16000, "global"))
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
