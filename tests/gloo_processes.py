"""Run a test's worker function in N CPU processes joined by a gloo process group (torch.multiprocessing)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist


def run_processes(worker: Callable[..., None], world_size: int, folder: Path, *args: object) -> None:
    """Call `worker(rank, folder, *args)` in `world_size` fresh processes; raises if any of them fails."""
    torch.multiprocessing.spawn(_entry, args=(worker, world_size, str(folder), args), nprocs=world_size, join=True)


def _entry(rank: int, worker: Callable[..., None], world_size: int, folder: str, args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world_size)
    try:
        worker(rank, Path(folder), *args)
    finally:
        dist.destroy_process_group()
