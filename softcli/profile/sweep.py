"""Running a sweep: every configuration in a fresh worker process (or in this one), failures recorded.

A worker per configuration, for three reasons: its peak resident memory is that
configuration's own CPU memory peak (``ru_maxrss`` is a high-water mark, so one
process cannot measure several sizes); a wall-clock limit can stop it
(``timeout``); and an allocation failure (``oom``) or a crash ends only that
worker while the sweep goes on.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ..errors import ParameterError
from .harness import measure, result_for
from .settings import (
    RESULT_TAG,
    ProfileJob,
    ProfileReport,
    ProfileResult,
    ProfileSettings,
)

__all__ = ["run_job", "run_sweep"]


def _wait(proc: subprocess.Popen, timeout: float | None) -> tuple[int, Any, bool]:
    """(exit code, child rusage or None, timed out); kills the worker at the deadline."""
    deadline = None if timeout is None else time.monotonic() + timeout
    if hasattr(os, "wait4"):
        timed_out = False
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if deadline is not None and time.monotonic() > deadline:
                proc.kill()
                _, status, usage = os.wait4(proc.pid, 0)
                timed_out = True
                break
            time.sleep(0.02)
        proc.returncode = os.waitstatus_to_exitcode(status)
        return proc.returncode, usage, timed_out
    try:  # pragma: no cover - platforms without wait4
        return proc.wait(timeout), None, False
    except subprocess.TimeoutExpired:  # pragma: no cover
        proc.kill()
        return proc.wait(), None, True


def _worker_env(settings: ProfileSettings) -> dict[str, str]:
    """This softcli first on the path; OpenMP and MKL pools sized to the thread count from the start."""
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(settings.threads)
    return env


def _run_isolated(job: ProfileJob, settings: ProfileSettings) -> ProfileResult:
    spec = json.dumps({"job": asdict(job), "settings": asdict(settings)})
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen([sys.executable, "-m", "softcli.profile.worker", spec], stdin=subprocess.DEVNULL,
                                stdout=out, stderr=err, env=_worker_env(settings))
        try:
            rc, usage, timed_out = _wait(proc, settings.timeout_s)
        except BaseException:
            if proc.returncode is None:
                proc.kill()
                proc.wait()
            raise
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    lines = [ln for ln in stdout.splitlines() if ln.startswith(RESULT_TAG)]
    if rc == 0 and lines:
        result = ProfileResult.from_dict(json.loads(lines[-1][len(RESULT_TAG):]))
    elif timed_out:
        result = result_for(job, settings, "timeout", f"stopped after {settings.timeout_s:g} s")
    elif rc == -getattr(signal, "SIGKILL", 9):
        result = result_for(job, settings, "oom", "worker killed by SIGKILL (the system's out-of-memory killer)")
    else:
        tail = [ln for ln in stderr.strip().splitlines() if ln.strip()]
        result = result_for(job, settings, "error", f"worker exited with {rc}: " + (tail[-1] if tail else "no message"))
    if usage is not None and torch.device(settings.device).type == "cpu":
        # The worker's own high-water mark, read by the parent: valid for killed workers too.
        result.peak_mem_bytes = int(usage.ru_maxrss if sys.platform == "darwin" else usage.ru_maxrss * 1024)
    return result


def run_job(job: ProfileJob, settings: ProfileSettings) -> ProfileResult:
    """One configuration, in a fresh worker process unless ``settings.isolate`` is False."""
    if settings.isolate:
        return _run_isolated(job, settings)
    try:
        return measure(job, settings)
    except Exception as exc:  # noqa: BLE001 - recorded, and the sweep goes on
        return result_for(job, settings, "error", f"{type(exc).__name__}: {exc}")


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        with contextlib.suppress(OSError):
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
        import platform

        return platform.processor() or platform.machine()
    return device.type


def _loadavg() -> list[float] | None:
    """1, 5 and 15 minute load averages (None where the system has none): how busy the machine was."""
    return [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None


def run_sweep(jobs: Sequence[ProfileJob], settings: ProfileSettings,
              on_result: Callable[[ProfileResult], None] | None = None) -> ProfileReport:
    """Run every job in order; failed configurations are recorded and the sweep goes on."""
    device = torch.device(settings.device)
    if settings.max_memory_bytes is not None and (device.type != "cpu" or not sys.platform.startswith("linux")
                                                  or not settings.isolate):
        raise ParameterError("`max_memory_bytes` works on the CPU under Linux, with isolated workers "
                         "(on a GPU, out-of-memory is the GPU's own limit)")
    loadavg = _loadavg()
    results = []
    for job in jobs:
        res = run_job(job, settings)
        results.append(res)
        if on_result is not None:
            on_result(res)
    settings_dict = asdict(settings)
    return ProfileReport(device=str(device), device_name=_device_name(device), torch_version=torch.__version__,
                         threads=settings.threads, loadavg=loadavg,
                         settings=settings_dict, results=results, loadavg_end=_loadavg())
