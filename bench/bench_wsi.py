"""Benchmark: whole slides — tissue masking speed-up and classify memory on synthetic Aperio SVS files.

Writes the slides with ``tests/slides.py`` (JPEG tiles, Aperio description, MPP 0.25,
three levels ÷4, about 77 % white glass), a random-weight checkpoint, and runs the
command line as a user would, one child process per run; wall time and that child's
peak RSS (``os.wait4``) are reported.

    python bench/bench_wsi.py                                 # segment 12000x9000, classify 40000x30000
    python bench/bench_wsi.py --segment-size 8000x6000 --classify-size 0x0   # segment only

1. ``soft segment slide.svs --out mask.tif --clusters 3 --mpp 1.0`` with ``--tissue none``
   then ``--tissue auto``, alternating ``--repeats`` times (``--tile 512``): time ratio, tiles skipped,
   background share of the mask.
2. ``soft classify slide.svs`` on a 40000x30000 slide: peak RSS (the level the 224² crop needs is
   read, never level 0).
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def run(args: list[str]) -> tuple[float, float, float, str]:
    """(wall seconds, peak RSS GB, CPU seconds (user + system), stdout) of ``python -m softcli ARGS``, own child."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "softcli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    out = proc.stdout.read() if proc.stdout else b""
    err = proc.stderr.read() if proc.stderr else b""
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"soft {' '.join(args)} failed:\n{err.decode()}")
    return seconds, usage.ru_maxrss / 2**20, usage.ru_utime + usage.ru_stime, out.decode()


def ensure_slide(work: Path, w: int, h: int) -> Path:
    """The synthetic SVS of that size in ``work``, written once."""
    from tests.slides import write_svs

    slide = work / f"slide_{w}x{h}.svs"
    if not slide.exists():
        t = time.perf_counter()
        write_svs(slide, h, w)
        print(f"wrote {slide} ({slide.stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - t:.0f} s",
              file=sys.stderr)
    return slide


def size(text: str) -> tuple[int, int]:
    w, h = (int(v) for v in text.lower().split("x"))
    return w, h


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--segment-size", type=size, default=(12000, 9000), help="WxH of the segmentation slide")
    ap.add_argument("--classify-size", type=size, default=(40000, 30000), help="WxH of the classify slide (0x0: skip)")
    ap.add_argument("--variant", default="soft_tiny")
    ap.add_argument("--tile", type=int, default=512, help="segment --tile (smaller tiles skip more glass)")
    ap.add_argument("--repeats", type=int, default=2, help="segment runs per --tissue setting, alternating")
    ap.add_argument("--in-process", action="store_true", help="segment A/B inside one process, 1 torch thread, "
                    "alternating none/auto (wall and CPU of segment() alone: less noise on a shared machine)")
    ap.add_argument("--work", type=Path, default=None, help="folder for the slides (default: a temporary one)")
    args = ap.parse_args()

    import softcli
    from softcli.checkpoint import save_pretrained

    work = args.work or Path(tempfile.mkdtemp(prefix="bench_wsi_"))
    work.mkdir(parents=True, exist_ok=True)
    backbone, classifier = work / "backbone", work / "classifier"
    if not backbone.exists():
        save_pretrained(softcli.create_model(args.variant, num_classes=0), backbone)
        save_pretrained(softcli.create_model(args.variant, num_classes=1000), classifier)
    rows = []
    w, h = args.segment_size
    if w and h and args.in_process:
        import torch

        from softcli.segment import segment

        torch.set_num_threads(1)
        slide = ensure_slide(work, w, h)
        for tissue in ("none", "auto") * args.repeats:
            wall, cpu = time.perf_counter(), time.process_time()
            summary = segment(slide, work / "mask_ab.tif", weights=backbone, clusters=3, mpp=1.0, tissue=tissue,
                              tile=args.tile)
            rows.append({"run": f"segment() --tissue {tissue}", "slide": f"{w}x{h}",
                         "seconds": round(time.perf_counter() - wall, 1),
                         "cpu_seconds": round(time.process_time() - cpu, 1),
                         "skipped": (summary.get("tissue") or {}).get("tiles_skipped", 0)})
            print(rows[-1], file=sys.stderr)
    elif w and h:
        slide = ensure_slide(work, w, h)
        for tissue in ("none", "auto") * args.repeats:
            out = work / f"mask_{tissue}.tif"
            secs, rss, cpu, stdout = run(["segment", str(slide), "--weights", str(backbone), "--out", str(out),
                                        "--clusters", "3", "--mpp", "1.0", "--tissue", tissue, "--tile", str(args.tile),
                                        "--json"])
            summary = json.loads(stdout)
            t = summary.get("tissue") or {}
            background = summary["labels"][0]["fraction"] if tissue == "auto" else None
            rows.append({"run": f"segment --tissue {tissue}", "slide": f"{w}x{h}", "seconds": round(secs, 1),
                         "cpu_seconds": round(cpu, 1), "label_seconds": summary["seconds"]["label"],
                         "peak_rss_gb": round(rss, 2), "tiles": summary["tiles"]["count"],
                         "skipped": t.get("tiles_skipped", 0), "tissue_fraction": t.get("fraction"),
                         "background_label0": background})
            print(rows[-1], file=sys.stderr)
    w, h = args.classify_size
    if w and h:
        slide = ensure_slide(work, w, h)
        secs, rss, cpu, stdout = run(["classify", str(slide), "--weights", str(classifier), "--json"])
        rows.append({"run": "classify", "slide": f"{w}x{h}", "seconds": round(secs, 1), "cpu_seconds": round(cpu, 1),
                     "peak_rss_gb": round(rss, 2),
                     "input_size": json.loads(stdout)[0]["input_size"]})
        print(rows[-1], file=sys.stderr)
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
