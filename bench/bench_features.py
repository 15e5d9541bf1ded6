"""Wall time and peak RSS of ``soft features`` as a user runs it (a subprocess per case).

Cases:
- square PNG images (default 2048² and 4096²), default settings, to check that
  time grows linearly with pixels (ratio 4096²/2048² ≈ 4) and memory stays bounded;
- ``--bigtiff N``: an N x N tiled BigTIFF (RGB uint8, 512² tiles), written tile by
  tile so the generator itself stays small, run through ``soft features``;
- ``--memory-model``: peak RSS of ``forward_features`` alone at a few tile sizes,
  the measurement behind ``softcli.tiling.BYTES_PER_PIXEL_C64``.

Random weights are fine for time and memory: ``create_model(arch)`` +
``save_pretrained`` into a temporary folder. Peak RSS is the child's
``ru_maxrss`` from ``os.wait4``.

Example:
    python bench/bench_features.py --sizes 2048,4096
    python bench/bench_features.py --sizes none --bigtiff 16000 --arch tiny --stages 1
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TINY = {"embed_dims": [16, 32, 48, 64], "num_heads": [1, 2, 3, 2], "depths": [1, 1, 1, 1],
        "sr_ratios": [8, 4, 2], "num_classes": 10}


def make_weights(arch: str, folder: Path) -> Path:
    import torch

    import softcli
    from softcli.checkpoint import save_pretrained

    torch.manual_seed(0)
    model = softcli.create_model(TINY if arch == "tiny" else arch, num_classes=10 if arch == "tiny" else 1000)
    return save_pretrained(model, folder / arch)


def _pattern(y0: int, x0: int, h: int, w: int, seed: int) -> np.ndarray:
    """A deterministic photo-like RGB patch: smooth colour waves plus noise, uint8."""
    yy, xx = np.mgrid[y0:y0 + h, x0:x0 + w].astype(np.float32)
    rng = np.random.default_rng(seed)
    base = np.stack([np.sin(yy / 97.0), np.cos(xx / 131.0), np.sin((yy + xx) / 211.0)], axis=-1)
    noise = rng.normal(0, 0.15, (h, w, 3)).astype(np.float32)
    return np.clip((base * 0.4 + 0.5 + noise) * 255, 0, 255).astype(np.uint8)


def make_png(size: int, path: Path) -> Path:
    from PIL import Image

    Image.fromarray(_pattern(0, 0, size, size, size)).save(path, compress_level=1)
    return path


def make_bigtiff(size: int, path: Path, tile: int = 512) -> Path:
    import tifffile

    def tiles():
        for y in range(0, size, tile):
            for x in range(0, size, tile):
                yield _pattern(y, x, min(tile, size - y), min(tile, size - x), y * size + x)

    tifffile.imwrite(path, tiles(), shape=(size, size, 3), dtype=np.uint8, tile=(tile, tile), bigtiff=True,
                     photometric="rgb", compression="zlib", compressionargs={"level": 1})
    return path


def run_case(image: Path, weights: Path, out: Path, extra: list[str], threads: int | None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    cmd = [sys.executable, "-m", "softcli", "features", str(image), "--out", str(out), "--weights", str(weights),
           "--device", "cpu", "--json", *extra]
    print("$", " ".join(cmd[1:]), file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as out_f, tempfile.TemporaryFile() as err_f:
        proc = subprocess.Popen(cmd, stdout=out_f, stderr=err_f, env=env)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage (peak RSS)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        out_f.seek(0)
        err_f.seek(0)
        stdout, stderr = out_f.read(), err_f.read()
    if proc.returncode:
        raise SystemExit(f"soft features failed:\n{stderr.decode()}")
    doc = json.loads(stdout)
    out_bytes = out.stat().st_size
    out.unlink()
    return {"wall_s": wall, "peak_rss_mb": usage.ru_maxrss / 1024, "doc": doc, "out_mb": out_bytes / 2**20}


def memory_model(arch: str, sides: list[int]) -> None:
    code = (
        "import resource, sys, time, torch, softcli; side=int(sys.argv[1]); arch=sys.argv[2];"
        f"m=softcli.create_model({TINY!r} if arch=='tiny' else arch);"
        "x=torch.randn(1,3,side,side); base=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss;"
        "t=time.perf_counter();\nwith torch.inference_mode(): m.forward_features(x)\n"
        "dt=time.perf_counter()-t; peak=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss;"
        "print(f'| {side}² | {base/1024:.0f} | {peak/1024:.0f} | {(peak-base)*1024/side/side:.0f} | {dt:.1f} |')"
    )
    print("| tile | RSS before (MB) | peak RSS (MB) | bytes / pixel | seconds |\n|---|---|---|---|---|")
    for side in sides:
        subprocess.run([sys.executable, "-c", code, str(side), arch], env={**os.environ, "PYTHONPATH": str(REPO)},
                       check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="2048,4096", help="square PNG sizes, or 'none'")
    ap.add_argument("--bigtiff", type=int, default=0, help="also run an N x N tiled BigTIFF")
    ap.add_argument("--arch", default="soft_tiny", help="soft_tiny (default) or 'tiny' (the test config)")
    ap.add_argument("--stages", default=None, help="--stages for soft features (default: all)")
    ap.add_argument("--format", default="safetensors", help="output suffix")
    ap.add_argument("--threads", type=int, default=None, help="OMP threads for the child")
    ap.add_argument("--extra", default="", help="more soft features arguments, space separated")
    ap.add_argument("--workdir", default=None, help="where inputs/outputs go (default: a temp folder)")
    ap.add_argument("--memory-model", default=None, help="comma-separated tile sides: measure forward_features")
    args = ap.parse_args()
    if args.memory_model:
        memory_model(args.arch, [int(s) for s in args.memory_model.split(",")])
        return
    extra = (["--stages", args.stages] if args.stages else []) + args.extra.split()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        weights = make_weights(args.arch, work)
        rows = []
        print("| image | model | tiles | maps kept in | wall s | in-process s | peak RSS MB | output MB |\n"
              "|---|---|---|---|---|---|---|---|", flush=True)
        cases = [] if args.sizes == "none" else [("png", int(s)) for s in args.sizes.split(",")]
        if args.bigtiff:
            cases.append(("bigtiff", args.bigtiff))
        for kind, size in cases:
            t0 = time.perf_counter()
            image = (make_png(size, work / f"img{size}.png") if kind == "png"
                     else make_bigtiff(size, work / f"img{size}.tif"))
            print(f"made {image.name} ({image.stat().st_size / 2**20:.0f} MB) in {time.perf_counter() - t0:.0f}s",
                  file=sys.stderr, flush=True)
            r = run_case(image, weights, work / f"out{size}.{args.format}", extra, args.threads)
            image.unlink()
            plan = r["doc"]["plan"]
            rows.append((kind, size, r, plan))
            print(f"| {size}² {kind} | {args.arch} | {plan['tiles']} × {plan['tile'][0]}² ({plan['mode']}) | "
                  f"{plan['sink']} | {r['wall_s']:.1f} | {r['doc']['seconds']:.1f} | {r['peak_rss_mb']:.0f} | "
                  f"{r['out_mb']:.0f} |", flush=True)
        pngs = [(s, r["wall_s"], r["doc"]["seconds"]) for k, s, r, _ in rows if k == "png"]
        for (s0, w0, c0), (s1, w1, c1) in zip(pngs, pngs[1:]):
            print(f"time({s1}²)/time({s0}²) = {w1 / w0:.2f} wall, {c1 / c0:.2f} in-process "
                  f"(pixels x{(s1 / s0) ** 2:.1f})")


if __name__ == "__main__":
    main()
