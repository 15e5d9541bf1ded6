"""Ranks under ``torchrun``: who does which inputs, on which device, and how results meet on rank 0.

``torchrun`` (single node: ``--standalone --nproc-per-node N``; several nodes:
``--nnodes``/``--rdzv-endpoint``, or ``srun torchrun``) sets ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK``. With ``WORLD_SIZE`` > 1 a process group is
started: ``nccl`` when the run uses CUDA (each rank on ``cuda:LOCAL_RANK``),
``gloo`` otherwise. Only three collectives are used: the plan is broadcast from
rank 0 at the start, the records are gathered to rank 0 at the end, and a
barrier lets every rank remove its part file after the merge. Each waits at
most ``timeout`` seconds; a rank that crashes makes ``torchrun`` stop the
others, and a slow rank past the timeout makes the collective fail instead of
hanging (its finished inputs stay in its part file and a rerun skips them).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from ..errors import SoftError

#: Default wait of a collective (the end-of-run gather waits for the slowest rank).
DEFAULT_TIMEOUT_S = 6 * 3600


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


@dataclass
class DistContext:
    """This process's place in the run; a lone process is rank 0 of 1 and uses no process group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    started_group: bool = False

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> DistContext:
        """The rank, world size and local rank ``torchrun`` set (rank 0 of 1 without it)."""
        world = _env_int("WORLD_SIZE", 1)
        if world <= 1:
            return cls()
        return cls(_env_int("RANK", 0), world, _env_int("LOCAL_RANK", 0))

    def device(self, requested: str) -> str:
        """The device of this rank: ``auto``/``cuda`` become ``cuda:LOCAL_RANK`` when CUDA is there."""
        import torch  # here, not at the top: `soft --help` must not import torch

        if self.distributed and requested in ("auto", "cuda") and torch.cuda.is_available():
            return f"cuda:{self.local_rank % torch.cuda.device_count()}"
        return requested

    def start(self, device: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        """Join the process group (nccl for a CUDA device, gloo otherwise); nothing for a lone process."""
        import torch
        import torch.distributed as dist

        if not self.distributed or dist.is_initialized():
            return
        on_cuda = device.startswith("cuda") and torch.cuda.is_available()
        if on_cuda:
            torch.cuda.set_device(torch.device(device))
        try:
            dist.init_process_group("nccl" if on_cuda else "gloo", timeout=timedelta(seconds=timeout_s))
        except (RuntimeError, ValueError) as exc:
            raise SoftError(f"rank {self.rank}: cannot join the torch.distributed process group ({exc})") from exc
        self.started_group = True

    def stop(self) -> None:
        import torch.distributed as dist

        if self.started_group and dist.is_initialized():
            dist.destroy_process_group()
            self.started_group = False

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.distributed:
            return obj
        import torch.distributed as dist

        box = [obj]
        self._collective(lambda: dist.broadcast_object_list(box, src=0), "receiving the plan from rank 0")
        return box[0]

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj`` on rank 0 (a list in rank order); None on the other ranks."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        out: list[Any] | None = [None] * self.world_size if self.is_main else None
        self._collective(lambda: dist.gather_object(obj, out, dst=0), "gathering the results on rank 0")
        return out

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` on every rank."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        self._collective(lambda: dist.all_gather_object(out, obj), "exchanging results between ranks")
        return out

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            self._collective(dist.barrier, "waiting for the other ranks")

    def _collective(self, fn: Any, what: str) -> None:
        try:
            fn()
        except (RuntimeError, ValueError) as exc:  # DistBackendError and timeouts are RuntimeErrors
            raise SoftError(f"rank {self.rank}: {what} failed ({' '.join(str(exc).split())[:300]}); "
                            "finished inputs are in the part files and a rerun skips them") from exc


def split_by_pixels(sizes: list[int], ranks: int) -> list[list[int]]:
    """Indices of ``sizes`` per rank: largest first, each to the rank with the fewest pixels so far.

    Deterministic (ties go to the earlier input and the lower rank); each rank's
    list is in the order it should run (largest first).
    """
    load = [0] * ranks
    plan: list[list[int]] = [[] for _ in range(ranks)]
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(ranks), key=lambda r: (load[r], r))
        plan[r].append(i)
        load[r] += max(1, sizes[i])
    return plan
