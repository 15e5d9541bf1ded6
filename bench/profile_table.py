"""Render ``soft profile --json`` output as the Markdown table of bench/README.md, with the ratios
the efficiency claim rests on: how soft's latency grows with tokens, and softmax/soft at the largest size.

Both clocks: ``median ms`` is wall time, ``CPU ms`` the worker's CPU time per call (at one thread the
time the call computed, which a busy machine stretches in wall time but not in CPU time).

Usage: python bench/profile_table.py bench/out/profile_cpu.json
"""

from __future__ import annotations

import json
import sys


def main(path: str) -> None:
    with open(path) as fh:
        doc = json.load(fh)
    print(f"device {doc['device']} ({doc['device_name']}), torch {doc['torch']}, {doc['threads']} threads, "
          f"load average at start {doc['loadavg']}, at end {doc.get('loadavg_end')}\n")
    print("| method | tokens | landmarks | median ms | min-max ms | runs | CPU ms | tokens/s | peak RSS MiB | +MiB "
          "| GFLOP | status |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    clocks: dict[str, dict[tuple[str, int], float]] = {"wall": {}, "CPU": {}}
    for r in doc["results"]:
        def f(key: str, fmt: str, scale: float = 1.0, r: dict = r) -> str:
            return "-" if r.get(key) is None else format(r[key] / scale, fmt)
        spread = "-" if r["latency_min_ms"] is None else f"{r['latency_min_ms']:.0f}-{r['latency_max_ms']:.0f}"
        print(f"| {r['method']} | {r['tokens']} | {r['landmarks'] or '-'} | {f('latency_ms', '.1f')} | {spread} | "
              f"{r.get('repeats', '-')} | {f('cpu_ms', '.1f')} | {f('tokens_per_s', '.3g')} | "
              f"{f('peak_mem_bytes', '.0f', 2**20)} | {f('extra_mem_bytes', '.0f', 2**20)} | "
              f"{f('flops', '.2f', 1e9)} | {r['status']} |")
        if r["status"] == "ok":
            clocks["wall"][(r["method"], r["tokens"])] = r["latency_ms"]
            if r.get("cpu_ms"):
                clocks["CPU"][(r["method"], r["tokens"])] = r["cpu_ms"]
    for clock, lat in clocks.items():
        sizes = sorted({t for _, t in lat})
        if len(sizes) < 2:
            continue
        print()
        if ("soft", sizes[0]) in lat and ("soft", sizes[-1]) in lat:
            print(f"{clock} time: soft grows {lat[('soft', sizes[-1])] / lat[('soft', sizes[0])]:.2f}x "
                  f"from {sizes[0]} to {sizes[-1]} tokens ({sizes[-1] / sizes[0]:.0f}x the tokens)")
        for other in ("softmax", "soft-official", "nystromformer"):
            if (other, sizes[-1]) in lat and ("soft", sizes[-1]) in lat:
                print(f"{clock} time: {other} / soft at {sizes[-1]} tokens: "
                      f"{lat[(other, sizes[-1])] / lat[('soft', sizes[-1])]:.1f}x")


if __name__ == "__main__":
    main(sys.argv[1])
