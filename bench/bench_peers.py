"""Throughput of soft_tiny against the backbones people would pick instead, on one CPU in one run.

soft_tiny stages 1-4 (``softcli.create_model(...).forward_features``) against
timm's ``convnext_tiny``, ``swin_tiny_patch4_window7_224`` and ``pvt_v2_b1``
``forward_features``, all with random weights (time does not depend on the
values), float32, batch 1, eval mode, ``torch.inference_mode``. Each model and
side: one warm-up pass, then ``--repeat`` timed passes, median reported. The
models run interleaved per repeat (soft, convnext, swin, pvt, soft, ...) so
load that changes during the run hits all of them alike.

Needs timm (the ``bench`` extra) in a separate venv: see bench/README.md,
"Peer backbones". Never install timm into the project venv: it pulls a
torchvision that can replace the CPU torch.

Usage:
    python bench/bench_peers.py --sides 1024,2048 --repeat 3 --threads 2
    python bench/bench_peers.py --sides 2048 --models soft_tiny,convnext_tiny --json out.json
    # old vs new soft_tiny, side by side (the baseline tree is any softcli checkout):
    mkdir /tmp/base && git archive main softcli | tar -x -C /tmp/base
    python bench/bench_peers.py --sides 2048 --baseline /tmp/base --repeat 5
    # several earlier trees at once (--baseline again; each named soft_tiny@<folder name>):
    python bench/bench_peers.py --sides 2048 --baseline /tmp/v1 --baseline /tmp/v2 --threads 1

Prints a Markdown table and each model's time relative to convnext_tiny.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

#: Our name → timm model name (swin's window-7 224 model: the one people pick).
PEERS = {
    "convnext_tiny": "convnext_tiny",
    "swin_tiny": "swin_tiny_patch4_window7_224",
    "pvt_v2_b1": "pvt_v2_b1",
}
MODELS = ("soft_tiny", *PEERS)
#: soft_tiny from a ``--baseline`` source tree (the code before a change): ``soft_tiny@<folder name>``.
BASELINE_PREFIX = "soft_tiny@"


def _import_timm() -> types.ModuleType:
    """timm, importable where torchvision's compiled ops do not fit the installed torch.

    The torchvision wheels on PyPI for torch 2.13 (0.28.0) are CUDA builds: their
    ``_C.so`` needs ``libtorch_cuda.so``, absent from the CPU torch, so torchvision
    runs without its ops and then fails at import registering fake kernels for
    ``torchvision::nms``/``qnms``, ops it never defined. Defining those two
    schemas (no kernels: calling them would fail loudly) lets its pure-Python
    parts import, which is all timm needs for the three peers; nothing measured
    here touches torchvision ops.
    """
    import torch

    try:
        import torchvision
    except RuntimeError as exc:
        if "torchvision::" not in str(exc):
            raise
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
        lib = torch.library.Library("torchvision", "DEF")
        for op in ("nms", "qnms"):
            lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _KEEP.append(lib)  # the definitions live as long as the Library object
        import torchvision  # noqa: F401
    import timm

    return timm


_KEEP: list[Any] = []


def baseline_name(src: Path) -> str:
    return BASELINE_PREFIX + src.resolve().name


def import_baseline(src: Path) -> types.ModuleType:
    """Another softcli source tree (``src/softcli``), imported as its own package beside ours.

    softcli imports itself relatively, so the other tree loads as a second
    package in this process: old and new code then run side by side, alternating.
    """
    init = src / "softcli" / "__init__.py"
    if not init.is_file():
        raise SystemExit(f"--baseline: no softcli package under {src}")
    package = "softcli_baseline_" + "".join(c if c.isalnum() else "_" for c in src.resolve().name)
    spec = importlib.util.spec_from_file_location(package, init, submodule_search_locations=[str(init.parent)])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[package] = module
    spec.loader.exec_module(module)
    return module


def build(name: str, baselines: dict[str, Path]) -> Callable:
    """The model's ``forward_features`` callable, random weights, eval mode."""
    import torch

    torch.manual_seed(0)
    if name in baselines:
        model = import_baseline(baselines[name]).create_model("soft_tiny")
    elif name == "soft_tiny":
        sys.path.insert(0, str(REPO))
        import softcli

        model = softcli.create_model("soft_tiny")
    else:
        model = _import_timm().create_model(PEERS[name], pretrained=False, num_classes=0)
    return model.eval().forward_features


def make_input(side: int) -> Any:
    import torch

    return torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(side))


def time_once(fn: Callable, x: Any) -> tuple[float, float]:
    """(wall, CPU) seconds of one call. CPU time (all threads of this process) moves less than
    wall time when other work shares the machine; at 1 thread the two agree on a quiet one."""
    import torch

    with torch.inference_mode():
        start, cpu = time.perf_counter(), time.process_time()
        fn(x)
        return time.perf_counter() - start, time.process_time() - cpu


def run(models: list[str], sides: list[int], repeat: int, threads: int, baselines: dict[str, Path]) -> list[dict]:
    import torch

    torch.set_num_threads(threads)
    rows = []
    for side in sides:
        fns = {}
        for name in models:
            fn = build(name, baselines)
            if name == "swin_tiny":
                fn.__self__.set_input_size((side, side))
            fns[name] = fn
            time_once(fn, make_input(side))  # warm-up at this size
        times: dict[str, list[float]] = {name: [] for name in models}
        cpu: dict[str, list[float]] = {name: [] for name in models}
        for _ in range(repeat):
            for name in models:
                wall, used = time_once(fns[name], make_input(side))
                times[name].append(wall)
                cpu[name].append(used)
        for name in models:
            rows.append({"model": name, "side": side, "seconds": times[name],
                         "median": statistics.median(times[name]), "cpu_seconds": cpu[name],
                         "cpu_median": statistics.median(cpu[name])})
        del fns
    return rows


def table(rows: list[dict]) -> str:
    ref = {r["side"]: r for r in rows if r["model"] == "convnext_tiny"}
    out = ["| model | side | median s | runs s | × convnext_tiny | CPU s (median) | CPU × convnext_tiny |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        base = ref.get(r["side"])
        rel = f"{r['median'] / base['median']:.2f}" if base else "–"
        cpu_rel = f"{r['cpu_median'] / base['cpu_median']:.2f}" if base else "–"
        runs = " / ".join(f"{t:.2f}" for t in r["seconds"])
        out.append(f"| {r['model']} | {r['side']}² | {r['median']:.2f} | {runs} | {rel} | {r['cpu_median']:.2f} "
                   f"| {cpu_rel} |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="example: python bench/bench_peers.py --sides 1024,2048 --repeat 3")
    parser.add_argument("--sides", default="1024,2048", help="comma-separated image sides (square)")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {', '.join(MODELS)}")
    parser.add_argument("--repeat", type=int, default=3, help="timed passes per model and side (median)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (fixed, reported)")
    parser.add_argument("--json", type=Path, help="also write the raw times here")
    parser.add_argument("--baseline", type=Path, action="append", default=[],
                        help="a softcli source tree (e.g. `mkdir /tmp/base && git archive main softcli | tar -x -C "
                        f"/tmp/base`): adds {BASELINE_PREFIX}<folder name>, its soft_tiny, run alternating with ours; "
                        "repeat for several")
    args = parser.parse_args()
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    baselines = {baseline_name(src): src for src in args.baseline}
    models = [*baselines, *[m for m in models if m not in baselines]]
    unknown = sorted(set(models) - set(MODELS) - set(baselines))
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(MODELS)}")
    sides = [int(s) for s in args.sides.split(",")]
    import torch

    load = os.getloadavg()
    rows = run(models, sides, args.repeat, args.threads, baselines)
    load_after = os.getloadavg()
    print(f"torch {torch.__version__}, {args.threads} threads, repeat {args.repeat} (median), "
          f"load average before {load[0]:.2f} / after {load_after[0]:.2f}")
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps({"threads": args.threads, "torch": torch.__version__,
                                         "baselines": {k: str(v) for k, v in baselines.items()},
                                         "load": [load, load_after], "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
