"""Measuring one configuration inside the process that runs it, the same way for every configuration.

Attention methods, model stages and the whole model all go through :func:`measure`:
the same fixed thread count, the same warm-up, the same timed calls, and the median
of those calls as the result with min/max and quartiles as its spread. So the
stages of a model add up to the whole model, and two methods differ only by what
they compute.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from ..models.landmarks import LandmarkPolicy
from ..resources import is_oom
from .estimate import estimate_flops, landmark_count
from .jobs import stage_input_sizes
from .methods import build_attention, random_model
from .settings import (
    DTYPES,
    LONG_CALL_S,
    MIN_REPEATS,
    ProfileJob,
    ProfileResult,
    ProfileSettings,
)

__all__ = ["is_oom", "measure", "result_for"]  # is_oom lives in ..resources


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _rss_peak_bytes() -> int | None:
    """This process's peak resident set size so far (None where unmeasurable)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # macOS: bytes; Linux: KiB


def _vm_size_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmSize in /proc/self/status")


def _limit_address_space(extra_bytes: int) -> None:
    """Let this process map at most ``extra_bytes`` more (Linux RLIMIT_AS)."""
    import resource

    limit = _vm_size_bytes() + extra_bytes
    hard = resource.getrlimit(resource.RLIMIT_AS)[1]
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def _prepare(job: ProfileJob, settings: ProfileSettings, device: torch.device
             ) -> tuple[Callable[[], Any], Callable[[], Any]]:
    """(call to measure, tiny call that warms thread pools before limits apply)."""
    dtype = DTYPES[settings.dtype]
    torch.manual_seed(settings.seed)
    b = settings.batch
    if job.model is None:
        mod = build_attention(job.method, settings).requires_grad_(False).to(device=device, dtype=dtype)
        x = torch.randn(b, job.tokens, settings.dim, device=device, dtype=dtype)
        r = settings.sr_ratio
        small = torch.randn(1, 4 * r * r, settings.dim, device=device, dtype=dtype)
        return (lambda: mod(x, job.grid)), (lambda: mod(small, (2 * r, 2 * r)))
    model = random_model(job.model).to(device=device, dtype=dtype)
    model.set_landmark_policy(LandmarkPolicy.parse(settings.landmarks))
    assert job.image_size is not None and job.part is not None
    tiny = torch.randn(1, 3, 64, 64, device=device, dtype=dtype)
    if job.part == "model":
        img = torch.randn(b, 3, job.image_size, job.image_size, device=device, dtype=dtype)
        return (lambda: model(img)), (lambda: model(tiny))
    i = int(job.part[len("stage"):]) - 1
    stage = model.stages[i]
    side = stage_input_sizes(job.image_size)[i]
    channels = 3 if i == 0 else model.config.embed_dims[i - 1]
    act = torch.randn(b, channels, side, side, device=device, dtype=dtype)
    cls = model.cls_token if i == 3 else None
    small = torch.randn(1, channels, 64, 64, device=device, dtype=dtype)  # large enough for every stage
    return (lambda: stage(act, cls)), (lambda: stage(small, cls))


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds of one call: CUDA events on a GPU, a synchronised wall clock elsewhere."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1000.0
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def result_for(job: ProfileJob, settings: ProfileSettings, status: str, message: str | None = None
               ) -> ProfileResult:
    """A result with what is known before measuring: sizes, estimated FLOPs, landmarks."""
    res = ProfileResult(method=job.method, tokens=job.tokens, status=status, grid=list(job.grid),
                        batch=settings.batch, dtype=settings.dtype, part=job.part, image_size=job.image_size,
                        message=message)
    if job.model is None:
        res.dim, res.heads = settings.dim, settings.heads
        res.flops = estimate_flops(job.method, job.grid, settings)
        res.landmarks = landmark_count(job.method, job.grid, settings)
    return res


def measure(job: ProfileJob, settings: ProfileSettings) -> ProfileResult:
    """Run one job in this process: warm up, time, read peak memory. Never raises for OOM."""
    device = torch.device(settings.device)
    res = result_for(job, settings, "ok")
    threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    res.threads = torch.get_num_threads()
    try:
        _measure_into(res, job, settings, device)
    finally:
        torch.set_num_threads(threads)
    return res


def _count_flops(call: Callable[[], Any]) -> float:
    """Matmul and convolution FLOPs of one call, counted by PyTorch (an extra, untimed call)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        call()
    return float(counter.get_total_flops())


def _timed_calls(call: Callable[[], Any], settings: ProfileSettings, device: torch.device
                 ) -> tuple[int, list[float], list[float]]:
    """(warm-up calls made, wall seconds of each timed call, CPU seconds of each): the one harness
    every configuration goes through. CPU seconds (this process's, all threads) only on the CPU.

    Warm-up stops early after a call slower than ``LONG_CALL_S`` (its one-off costs are then noise).
    Timed calls stop at ``repeat``, or once they add up to ``time_budget_s`` and ``MIN_REPEATS`` ran.
    """
    warm = 0
    while warm < settings.warmup:
        warm += 1
        if _timed(call, device) > LONG_CALL_S:
            break
    floor = min(MIN_REPEATS, settings.repeat)
    times: list[float] = []
    cpu_times: list[float] = []
    while len(times) < settings.repeat and (len(times) < floor or sum(times) < settings.time_budget_s):
        cpu0 = time.process_time()
        times.append(_timed(call, device))
        if device.type == "cpu":
            cpu_times.append(time.process_time() - cpu0)
    return warm, times, cpu_times


def _measure_into(res: ProfileResult, job: ProfileJob, settings: ProfileSettings, device: torch.device) -> None:
    times: list[float] = []
    cpu_times: list[float] = []
    with torch.inference_mode():
        try:
            call, prime = _prepare(job, settings, device)
            prime()  # thread pools and allocator arenas exist before any memory limit applies
            _sync(device)
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
                res.base_mem_bytes = int(torch.cuda.memory_allocated(device))
            elif device.type == "cpu" and settings.isolate:
                res.base_mem_bytes = _rss_peak_bytes()
                if settings.max_memory_bytes is not None:
                    _limit_address_space(settings.max_memory_bytes)
            if job.model is not None:
                res.flops = _count_flops(call)
            res.warmup_calls, times, cpu_times = _timed_calls(call, settings, device)
        except Exception as exc:
            if not is_oom(exc):
                raise
            res.status = "oom"
            res.message = " ".join(str(exc).split())[:300]
            times = []
            if device.type == "cuda":
                torch.cuda.empty_cache()  # the next in-process configuration starts clean
        if device.type == "cuda":
            res.peak_mem_bytes = int(torch.cuda.max_memory_allocated(device))
        elif device.type == "cpu" and settings.isolate:
            res.peak_mem_bytes = _rss_peak_bytes()
    if times:
        med = statistics.median(times)
        res.repeats = len(times)
        res.latency_ms, res.latency_min_ms, res.latency_max_ms = med * 1e3, min(times) * 1e3, max(times) * 1e3
        if len(times) >= 2:
            q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive")
            res.latency_q1_ms, res.latency_q3_ms = q1 * 1e3, q3 * 1e3
        if cpu_times:
            res.cpu_ms = statistics.median(cpu_times) * 1e3
            res.cpu_min_ms, res.cpu_max_ms = min(cpu_times) * 1e3, max(cpu_times) * 1e3
        res.tokens_per_s = settings.batch * job.tokens / med
        if job.image_size is not None:
            res.megapixels_per_s = settings.batch * job.image_size ** 2 / 1e6 / med
