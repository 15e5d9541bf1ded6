"""How much memory and disk a run may use, measured before anything large is allocated.

Hostile or careless inputs (a 500-byte TIFF declaring 100000², a config with
10⁹ blocks, a zip bomb posing as a checkpoint) must be refused from their
headers, with the numbers, instead of being allowed to exhaust the machine.
The checks here compare an estimate with what is really there:

- memory: the kernel's ``MemAvailable`` (physical RAM not needed by others),
  lowered to what a container's cgroup v2 limit and the process's
  address-space limit (``ulimit -v``) still allow, since an allocation past
  any of them fails or gets the process killed;
- disk: the free space of the folder that will hold outputs and spill files.

Nothing is printed; callers raise their own typed error with :func:`format_bytes`.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .units import format_bytes  # re-exported: the inverse of the size parser lives with it

__all__ = ["available_memory", "device_memory_available", "free_disk", "format_bytes"]


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, OSError, ValueError):
        return None


def _cgroup_left(root: str = "/sys/fs/cgroup") -> int | None:
    """Bytes this container may still use under its cgroup v2 memory limit (None when unlimited or unknown)."""
    try:
        limit = Path(root, "memory.max").read_text().strip()
        if limit == "max":
            return None
        return max(0, int(limit) - int(Path(root, "memory.current").read_text().strip()))
    except (OSError, ValueError):
        return None


def _address_space_left() -> int | None:
    """Bytes this process may still map under RLIMIT_AS (None when unlimited or unknown)."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft == resource.RLIM_INFINITY:
            return None
        with open("/proc/self/status") as fh:
            used = next(int(ln.split()[1]) * 1024 for ln in fh if ln.startswith("VmSize:"))
        return max(0, int(soft) - used)
    except (ImportError, OSError, ValueError, StopIteration):
        return None


def available_memory() -> int | None:
    """Bytes the process can still allocate: free RAM, capped by cgroup and address-space limits; None if unknown."""
    known = [v for v in (_meminfo_available(), _cgroup_left(), _address_space_left()) if v is not None]
    return min(known) if known else None


def device_memory_available(device: object) -> int | None:
    """Free memory where a model runs: :func:`available_memory` on the CPU, the GPU's own free memory on CUDA."""
    kind = getattr(device, "type", str(device).split(":")[0])
    if kind == "cpu":
        return available_memory()
    if kind == "cuda":
        import torch

        try:
            return int(torch.cuda.mem_get_info(device)[0])  # type: ignore[arg-type]
        except (RuntimeError, AssertionError):
            return None
    return None  # MPS and others: unknown


def free_disk(folder: str | os.PathLike[str]) -> int | None:
    """Free bytes on the file system of ``folder`` (its nearest existing parent); None if unknown."""
    p = Path(folder).resolve()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return int(shutil.disk_usage(p).free)
    except OSError:
        return None


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocation that failed: MemoryError, torch's OutOfMemoryError, or the
    RuntimeError a CPU allocation raises under a memory limit."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text
                                              or "not enough memory" in text or "failed to allocate" in text)
