"""`textcl train --num_processes N`: N training processes started through accelerate's launcher, reporting a
failure as one line.

The processes are started with accelerate's multi-GPU launcher (`accelerate launch --multi_gpu --num_processes N
-m textcl train ...`), which is also the right one on a CPU-only machine: accelerate joins CPU processes with
gloo, whereas `--cpu --num_processes N` starts a single process. Each child writes a `TextclError` to a file
named for its rank instead of printing it; when a child fails, the launcher's exception (and its traceback) is
replaced by one line naming the rank that failed first and its error, and the exit code is 2.

A child never outlives its launcher (`follow_launcher`): torch starts each in a session of its own, so neither
the launcher's death nor a signal to its process group reaches them, and two runs could write one output_dir.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from textcl.errors import TextclError

# set for the children: the folder where each writes its error as rank-<RANK>.txt
ERRORS_DIR = "TEXTCL_LAUNCH_ERRORS"
PR_SET_PDEATHSIG = 1  # prctl option (linux/prctl.h): the signal this process gets when its parent dies
WATCH_INTERVAL = 0.5  # seconds between the watchdog's looks at the parent


def follow_launcher() -> None:
    """In a process started by a launcher (torchrun, `accelerate launch`, `textcl train --num_processes`: LOCAL_RANK
    is set), die with the launcher however it dies, SIGKILL included.

    On Linux the kernel sends SIGKILL when the parent dies (prctl PR_SET_PDEATHSIG, through ctypes: no library
    wraps it); a watchdog thread that sees the parent PID change covers other systems and a parent that died
    before the prctl. Checkpoints are written atomically, so the one left is the last complete one.
    """
    if "LOCAL_RANK" not in os.environ:
        return
    launcher = int(os.environ.get("TEXTCL_LAUNCHER_PID", os.getppid()))
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)

    def watch() -> None:
        while os.getppid() == launcher:
            time.sleep(WATCH_INTERVAL)
        print(f"textcl: error: the launcher (process {launcher}) is gone; stopping training process "
              f"{os.environ.get('RANK', '?')} (the last complete checkpoint stays)", file=sys.stderr, flush=True)
        os._exit(3)

    threading.Thread(target=watch, name="textcl-launcher-watchdog", daemon=True).start()


def report_error(error: TextclError) -> None:
    """Print `error` as `textcl: error: ...`, or, in a child of `launch_training`, leave it for the parent to
    print (one line for the whole run, naming this child's rank)."""
    folder, rank = os.environ.get(ERRORS_DIR), os.environ.get("RANK")
    if folder and rank is not None and Path(folder).is_dir():
        (Path(folder) / f"rank-{rank}.txt").write_text(str(error), encoding="utf-8")
        return
    print(f"textcl: error: {error}", file=sys.stderr)


def leave_if_distributed(code: int) -> None:
    """In a process of a multi-process run (WORLD_SIZE > 1), exit now with `code`, without running destructors.

    gloo's process-group destructor (run when DDP's reducer is freed at exit) can wait forever on a peer that has
    already exited (seen on CPU, about 1 run in 6), or abort the process (SIGABRT) when a peer stalled mid-
    collective. Every file is written and every error reported before this is called, so nothing is lost.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def free_port() -> int:
    """A TCP port free right now on this machine, for the processes' rendezvous (so that two runs on one machine
    do not both take accelerate's default 29500)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch_training(num_processes: int, train_args: Sequence[str], verbose: bool) -> int:
    """Run `textcl train *train_args` in `num_processes` processes; returns the exit code (0, or 2 after printing
    one line naming the failed rank and its error)."""
    if num_processes < 1:
        raise TextclError(f"--num_processes must be at least 1; got {num_processes}")
    # accelerate's launcher and torch.distributed.run: only when several processes are asked for
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    with tempfile.TemporaryDirectory(prefix="textcl-launch-") as errors:
        launcher = ["--multi_gpu", "--num_processes", str(num_processes), "--num_machines", "1",
                    "--main_process_port", str(free_port()), "--mixed_precision", "no", "--dynamo_backend", "no",
                    "--module", "textcl", *(["--verbose"] if verbose else []), "train", *train_args]
        args = launch_command_parser().parse_args(launcher)
        elastic = logging.getLogger("torch.distributed.elastic")
        level = elastic.level
        if not verbose:
            elastic.setLevel(logging.CRITICAL)  # its "failed (exitcode: 2) ..." lines: the one line below says it
        os.environ[ERRORS_DIR] = errors
        os.environ["TEXTCL_LAUNCHER_PID"] = str(os.getpid())  # the children's parent: see follow_launcher
        try:
            launch_command(args)
        except ChildFailedError as failure:
            print(f"textcl: error: {root_cause(failure.failures, num_processes, Path(errors))}", file=sys.stderr)
            return 2
        except subprocess.CalledProcessError as failure:  # a launcher that runs one command line
            print(f"textcl: error: the training processes failed with exit code {failure.returncode} (output "
                  "above)", file=sys.stderr)
            return 2
        finally:
            os.environ.pop(ERRORS_DIR, None)
            os.environ.pop("TEXTCL_LAUNCHER_PID", None)
            elastic.setLevel(level)
    return 0


def root_cause(failures: dict[int, Any], num_processes: int, errors: Path) -> str:
    """`process R of N: <its error>` for the process that failed first (rank -> torch's ProcessFailure, with
    `timestamp` in seconds and `exitcode`); among those failing in the same second, one whose error is its own
    rather than "a collective failed" (a peer died). A process that left no error file crashed: its exit code
    is given and its output is above."""
    messages = {rank: read_error(errors, rank) for rank in failures}

    def order(rank: int) -> tuple[int, bool, int]:
        return failures[rank].timestamp, "a collective failed" in (messages[rank] or ""), rank

    rank = min(failures, key=order)
    if messages[rank] is not None:
        return f"process {rank} of {num_processes}: {messages[rank]}"
    return f"process {rank} of {num_processes} exited with code {failures[rank].exitcode} (its output is above)"


def read_error(errors: Path, rank: int) -> str | None:
    written = errors / f"rank-{rank}.txt"
    return written.read_text(encoding="utf-8") if written.is_file() else None
