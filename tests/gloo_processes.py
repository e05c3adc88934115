"""Multi-process tests that fail instead of hanging: N CPU processes joined by gloo, under a timeout.

`run_processes` calls a test's worker function in N spawned processes; `launch` runs a command line that
starts them itself (`accelerate launch ...`). Past `timeout` seconds both ask every process for its Python
stacks (faulthandler), kill them, and fail with one line per rank naming the collective it was waiting in
and the textcl code that called it, followed by the full stacks.
"""

from __future__ import annotations

import faulthandler
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

FRAME = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+) in (?P<function>\S+)')
COLLECTIVE_FILES = ("torch/distributed/", "torch/nn/parallel/", "torch/distributed/fsdp/")


def where(stacks: str) -> str:
    """'all_gather (torch/distributed/distributed_c10d.py:4287) <- batch_sizes (textcl/losses/distributed.py:33) ...'
    from a faulthandler dump: the innermost torch.distributed frame of the main thread, then its textcl callers."""
    blocks = re.split(r"\n(?=(?:Current thread|Thread) 0x)", stacks)
    main = [block for block in blocks if "textcl" in block or "<module>" in block] or blocks
    frames = [match.groupdict() for match in FRAME.finditer(main[0])]  # innermost first

    def short(frame: dict) -> str:
        path = frame["file"]
        for root in ("textcl/", "torch/", "tests/"):
            if root in path:
                path = root + path.rsplit(root, 1)[1]
        return f"{frame['function']} ({path}:{frame['line']})"

    collective = next((frame for frame in frames if any(part in frame["file"] for part in COLLECTIVE_FILES)), None)
    ours = [frame for frame in frames if "/textcl/" in frame["file"] and not frame["function"].startswith("<")][:4]
    chain = ([collective] if collective else []) + ours
    return " <- ".join(map(short, chain)) or "no Python frame recognised"


def hang_report(timeout: float, stacks: dict[int, str]) -> str:
    lines = [f"hung for more than {timeout:.0f} s; where each rank was:"]
    lines += [f"  rank {rank}: {where(text)}" for rank, text in sorted(stacks.items())]
    lines += [f"\n--- rank {rank} stacks ---\n{text}" for rank, text in sorted(stacks.items())]
    return "\n".join(lines)


def run_processes(
    worker: Callable[..., None], world_size: int, folder: Path, *args: object, timeout: float = 600
) -> None:
    """Call `worker(rank, folder, *args)` in `world_size` fresh processes; raises if any of them fails, and fails
    the test with every rank's stack if they have not all finished within `timeout` seconds."""
    context = torch.multiprocessing.start_processes(
        _entry, args=(worker, world_size, str(folder), args), nprocs=world_size, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    os.kill(process.pid, signal.SIGUSR1)
            time.sleep(3)
            stacks = {rank: (folder / f"stacks-rank{rank}.txt").read_text() for rank in range(world_size)}
            for process in context.processes:
                process.kill()
            pytest.fail(hang_report(timeout, stacks), pytrace=False)


def _entry(rank: int, worker: Callable[..., None], world_size: int, folder: str, args: tuple) -> None:
    torch.set_num_threads(1)
    dump = open(Path(folder) / f"stacks-rank{rank}.txt", "w")  # noqa: SIM115 (open while the process lives)
    faulthandler.register(signal.SIGUSR1, file=dump, all_threads=True)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world_size)
    try:
        worker(rank, Path(folder), *args)
    finally:
        if dist.is_initialized():  # the worker may have ended it (accelerate's end_training does)
            dist.destroy_process_group()


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (Linux /proc)."""
    found, queue = [], [pid]
    while queue:
        parent = queue.pop()
        try:
            children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
        except OSError:
            continue
        found += map(int, children)
        queue += map(int, children)
    return found


def rank_of(pid: int) -> int | None:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    values = dict(item.split(b"=", 1) for item in environ if b"=" in item)
    return int(values[b"RANK"]) if b"RANK" in values else None


def launch(command: Sequence[str], timeout: float, env: dict[str, str], log_dir: Path) -> subprocess.CompletedProcess:
    """Run `command` (`accelerate launch --tee 3 --log_dir LOG_DIR ...`, which writes each worker's stderr to
    LOG_DIR/<run>/attempt_0/<rank>/stderr.log); past `timeout` seconds, make every worker (a process with RANK in
    its environment) print its stacks (SIGABRT under PYTHONFAULTHANDLER), kill everything and fail naming each
    rank's collective."""
    process = subprocess.Popen(command, env={**env, "PYTHONFAULTHANDLER": "1"}, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout)
        return subprocess.CompletedProcess(command, process.returncode, output, "")
    except subprocess.TimeoutExpired:
        workers = {pid: rank for pid in descendants(process.pid) if (rank := rank_of(pid)) is not None}
        for pid in workers:
            os.kill(pid, signal.SIGABRT)
        time.sleep(3)
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        stacks = {rank: "".join(path.read_text() for path in log_dir.glob(f"*/attempt_*/{rank}/stderr.log"))
                  for rank in workers.values()}
        pytest.fail(hang_report(timeout, stacks) + "\n--- output ---\n" + output[-5000:], pytrace=False)
