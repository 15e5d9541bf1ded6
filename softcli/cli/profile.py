"""``soft profile``: measured time and memory of SOFT's linear attention against softmax attention."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from ..errors import UsageError
from ..io.atomic import atomic_path, check_output_path
from ..profile.names import DEFAULT_METHODS, DEFAULT_THREADS, DEFAULT_TOKENS, METHODS, MIN_REPEATS
from ..units import SIZE_HELP
from .app import app
from .common import DeviceOpt, JsonOpt, err_console, print_json, progress_bar, size_option

if TYPE_CHECKING:
    from ..profile import ProfileReport, ProfileResult


def _int_list(text: str, option: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{option} takes comma-separated numbers such as 4096,16384, not {text!r}") from None
    if not values or min(values) < 1:
        raise UsageError(f"{option} takes positive numbers, not {text!r}")
    return values


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.0f}"


def _rate(v: float | None) -> str:
    if v is None:
        return "-"
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if v >= div:
            return f"{v / div:.3g}{suffix}"
    return f"{v:.3g}"


def _caption(report: ProfileReport) -> str:
    """How the times were taken, and in model mode how the stages add up to the whole model."""
    text = ("median of the timed runs after warm-up; spread = ±half the min-max range; "
            f"{report.threads} CPU thread{'' if report.threads == 1 else 's'} throughout")
    if report.device == "cpu":
        text += "; CPU ms = this process's CPU time per run (at 1 thread: the wall time a quiet machine shows)"
    for label, key in (("median", "latency_ms"), ("CPU", "cpu_ms")):
        ok = {r.part: getattr(r, key) for r in report.results if r.part and r.status == "ok" and getattr(r, key)}
        stages = [ok.get(f"stage{i}") for i in range(1, 5)]
        if "model" in ok and all(stages):
            total = sum(t for t in stages if t)
            text += (f"\n{label} ms of stages 1-4 add up to {total:.1f}, {100 * total / ok['model']:.0f}% of the "
                     f"whole model's {ok['model']:.1f} (the rest: norm, head and noise)")
    return text


def _table(report: ProfileReport, model_mode: bool) -> Table:
    cpu = report.device == "cpu"
    title = f"soft profile on {report.device} ({report.device_name}, {report.threads} thread"
    title += "" if report.threads == 1 else "s"
    if report.loadavg:
        title += f", load {report.loadavg[0]:.2f}"
        if report.loadavg_end:
            title += f" → {report.loadavg_end[0]:.2f}"
    table = Table(title=title + ")", title_justify="left", box=box.SIMPLE_HEAD, caption=_caption(report),
                  caption_justify="left")
    columns = [("part" if model_mode else "method", "left"), ("tokens", "right")]
    if not model_mode:
        columns.append(("m", "right"))
    columns += [("median ms", "right"), ("spread", "right"), ("runs", "right")]
    if cpu:
        columns.append(("CPU ms", "right"))
    columns += [("MPix/s" if model_mode else "tokens/s", "right"),
                ("peak RSS MiB" if cpu else "peak MiB", "right"), ("+MiB", "right"), ("GFLOP", "right"),
                ("status", "left")]
    for name, justify in columns:
        table.add_column(name, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    for r in report.results:
        spread = "-"
        if r.latency_ms and r.latency_min_ms is not None and r.latency_max_ms is not None:
            spread = f"±{50 * (r.latency_max_ms - r.latency_min_ms) / r.latency_ms:.0f}%"
        row = [r.part if model_mode else r.method, str(r.tokens)]
        if not model_mode:
            row.append("-" if r.landmarks is None else str(r.landmarks))
        row += ["-" if r.latency_ms is None else f"{r.latency_ms:.1f}", spread, str(r.repeats)]
        if cpu:
            row.append("-" if r.cpu_ms is None else f"{r.cpu_ms:.1f}")
        row += [
                f"{r.megapixels_per_s:.2f}" if model_mode and r.megapixels_per_s else _rate(r.tokens_per_s),
                _mib(r.peak_mem_bytes), _mib(r.extra_mem_bytes),
                "-" if r.flops is None else f"{r.flops / 1e9:.2f}",
                r.status if r.status == "ok" else f"[red]{r.status}[/red]"]
        table.add_row(*row)
    return table


CSV_FIELDS = ("method", "part", "tokens", "grid", "landmarks", "status", "latency_ms", "latency_min_ms",
              "latency_max_ms", "latency_q1_ms", "latency_q3_ms", "cpu_ms", "repeats", "warmup_calls", "threads",
              "tokens_per_s", "megapixels_per_s", "peak_mem_bytes", "base_mem_bytes",
              "extra_mem_bytes", "flops", "batch", "dim", "heads", "dtype", "image_size", "message")


def _write_csv(report: ProfileReport, path: Path) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for r in report.results:
            row = r.to_dict()
            row["grid"] = "x".join(map(str, r.grid))
            writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in CSV_FIELDS})


def _write_plot(report: ProfileReport, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cpu = report.device == "cpu"
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    series: dict[str, list[ProfileResult]] = {}
    for r in report.results:
        if r.part != "model":  # model mode: the whole-model row is not a point on the token axis
            series.setdefault(r.method, []).append(r)  # model mode: one line through its stages
    failed = []
    for name, rows in series.items():
        ok = sorted((r for r in rows if r.status == "ok"), key=lambda r: r.tokens)
        failed += [f"{name} {r.tokens}: {r.status}" for r in rows if r.status != "ok"]
        ax_t.plot([r.tokens for r in ok], [r.latency_ms for r in ok], marker="o", label=name)
        mem = [(r.tokens, r.extra_mem_bytes if cpu else r.peak_mem_bytes) for r in ok]
        mem = [(t, m) for t, m in mem if m]
        if mem:
            ax_m.plot(*zip(*mem), marker="o", label=name)
    mem_label = "peak RSS above setup (bytes)" if cpu else "peak memory (bytes)"
    for ax, label in ((ax_t, "median latency (ms)"), (ax_m, mem_label)):
        ax.set_xlabel("tokens")
        ax.set_ylabel(label)
        if ax.lines:
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend()
        else:
            ax.text(0.5, 0.5, "not measured", ha="center", transform=ax.transAxes)
    title = f"soft profile on {report.device} ({report.device_name})"
    if failed:
        title += "\nnot plotted: " + ", ".join(failed)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", dpi=120)
    plt.close(fig)


@app.command()
def profile(
    tokens: Annotated[str | None, typer.Option(
        "--tokens", "-n", help="Comma-separated token counts; each becomes the most square HxW grid "
                               f"(default {','.join(map(str, DEFAULT_TOKENS))}).")] = None,
    methods: Annotated[str | None, typer.Option(
        "--methods", help=f"Comma-separated, from {', '.join(METHODS)} "
                          f"(default {','.join(DEFAULT_METHODS)}).")] = None,
    device: DeviceOpt = "auto",
    dim: Annotated[int, typer.Option("--dim", help="Channels (stage 1 of soft_tiny: 64).")] = 64,
    heads: Annotated[int, typer.Option("--heads", help="Attention heads.")] = 2,
    batch: Annotated[int, typer.Option("--batch", help="Images per call.")] = 1,
    dtype: Annotated[str, typer.Option("--dtype", help="fp32, bf16 or fp16.")] = "fp32",
    sr_ratio: Annotated[int, typer.Option("--sr-ratio", help="SOFT landmark stride r (stage 1: 8).")] = 8,
    landmarks: Annotated[str, typer.Option(
        "--landmarks", help="Landmark policy of 'soft' and of --model: auto, official or a budget.")] = "auto",
    repeat: Annotated[int, typer.Option(
        "--repeats", "--repeat", help="Timed calls per configuration; the median is the result "
                                      f"(at least {MIN_REPEATS} run even past --time-budget).")] = 5,
    warmup: Annotated[int, typer.Option("--warmup", help="Untimed calls first (fewer when one takes > 1 s).")] = 2,
    time_budget: Annotated[float, typer.Option(
        "--time-budget", help="Seconds of timed calls per configuration after which repeats stop "
                              f"(once {MIN_REPEATS} ran).")] = 10.0,
    timeout: Annotated[float, typer.Option("--timeout", help="Wall-clock seconds per configuration.")] = 600.0,
    max_memory: Annotated[str | None, typer.Option(
        "--max-memory", metavar="SIZE", help="CPU, Linux: memory a worker may add beyond its setup, e.g. 8GB; "
                             f"exceeding it is reported as oom. {SIZE_HELP}")] = None,
    threads: Annotated[int, typer.Option(
        "--threads", help="CPU threads torch uses while measuring, the same for every configuration and shown "
                          "in the output. The default, 1, is what a shared or busy machine can reproduce; "
                          "on a dedicated machine give its physical cores.")] = DEFAULT_THREADS,
    in_process: Annotated[bool, typer.Option(
        "--in-process", help="Measure in this process: faster start, no timeout, no CPU memory peak.")] = False,
    model: Annotated[str | None, typer.Option(
        "--model", "-m", help="Whole-model mode: a variant (e.g. soft_tiny); time and memory per stage.")] = None,
    image_size: Annotated[int, typer.Option("--image-size", help="Whole-model mode: square image side.")] = 1024,
    json_out: JsonOpt = False,
    csv_out: Annotated[Path | None, typer.Option("--csv", help="Also write the results as CSV.")] = None,
    plot: Annotated[Path | None, typer.Option(
        "--plot", help="Also write a log-log plot of time and memory against tokens (needs matplotlib).")] = None,
) -> None:
    """Measure latency, throughput and peak memory of SOFT attention against softmax attention.

    Each configuration runs in its own worker process (its peak RSS is the CPU
    memory figure; a timeout or out-of-memory ends only that worker). Every
    configuration, stage and whole model alike, gets the same warm-up, the same
    timed runs (the median is the result, min-max its spread) and the same fixed
    CPU thread count (--threads, default 1). 'soft' is
    the model's own SoftAttention at the default landmark policy;
    'soft-official' the official materialised computation; 'softmax' PyTorch's
    scaled_dot_product_attention; 'nystromformer' a linear attention for context.
    A configuration out of memory or time is a result (status oom / timeout) and
    the sweep goes on; the exit status is 1 only when one fails otherwise.
    --model times each stage of a network instead (--dim, --heads, --sr-ratio,
    --tokens and --methods do not apply there).

    Example: soft profile --tokens 16384,65536 --device cpu --json

    Example: soft profile --model soft_tiny --image-size 4096 --device cuda
    """
    from ..api import resolve_device  # the task modules import torch: only when the command runs
    from ..profile import ProfileSettings, attention_jobs, model_jobs, run_sweep

    dev = resolve_device(device)
    if plot is not None:
        check_output_path(plot)
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UsageError("--plot needs matplotlib: pip install 'softcli[plot]'") from None
    if csv_out is not None:
        check_output_path(csv_out)
    if model is not None and (tokens is not None or methods is not None):
        raise UsageError("--model profiles a whole network; it does not take --tokens or --methods")
    settings = ProfileSettings(
        device=str(dev), dim=dim, heads=heads, batch=batch, dtype=dtype, sr_ratio=sr_ratio, landmarks=landmarks,
        repeat=repeat, warmup=warmup, time_budget_s=time_budget, timeout_s=timeout,
        max_memory_bytes=None if max_memory is None else size_option("--max-memory", max_memory),
        isolate=not in_process,
        threads=threads)
    if model is not None:
        jobs = model_jobs(model, image_size)
    else:
        method_list = [m.strip() for m in (methods or ",".join(DEFAULT_METHODS)).split(",") if m.strip()]
        sizes = _int_list(tokens, "--tokens") if tokens is not None else list(DEFAULT_TOKENS)
        jobs = attention_jobs(method_list, sizes, settings)
    with progress_bar() as bar:  # stderr, and only on a terminal: --json stdout stays clean
        task = bar.add_task("profiling", total=len(jobs))

        def done(r: ProfileResult) -> None:
            bar.update(task, advance=1, description=f"{r.part or r.method} {r.tokens}: {r.status}")

        report = run_sweep(jobs, settings, on_result=done)
    if csv_out is not None:
        _write_csv(report, csv_out)
    if plot is not None:
        _write_plot(report, plot)
    if json_out:
        print_json(report.to_dict())
    else:
        console = Console()
        if not console.is_terminal:
            console = Console(width=130)  # a file or pipe keeps whole rows
        console.print(_table(report, model is not None))
    failed = [r for r in report.results if r.status == "error"]
    if failed:
        err_console.print(f"error: {len(failed)} configuration(s) failed: "
                          + "; ".join(f"{r.part or r.method} {r.tokens}: {r.message}" for r in failed),
                          markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(1)
