"""A run that cannot make progress says so: when one of two processes dies or stalls, the other stops within
`ddp_timeout` with one line naming itself and the step, instead of waiting forever.

The two ranks are started by hand with the environment a launcher gives them (RANK, WORLD_SIZE, MASTER_ADDR...),
so no launcher kills the survivor for us: what is tested is textcl's own behaviour.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from textcl.demo.run import demo_rows

pytestmark = pytest.mark.slow

DDP_TIMEOUT = 15
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_ranks(tmp_path: Path, model: Path) -> list[subprocess.Popen]:
    data = tmp_path / "sentences.txt"
    data.write_text("\n".join(row["text"] for row in demo_rows()[:320]) + "\n")
    port = free_port()
    command = [sys.executable, "-m", "textcl", "train", "--model_name_or_path", str(model), "--train_data", str(data),
               "--output_dir", str(tmp_path / "out"), "--per_device_train_batch_size", "4", "--max_steps", "100000",
               "--logging_steps", "1", "--max_seq_length", "16", "--ddp_timeout", str(DDP_TIMEOUT)]
    ranks = []
    for rank in range(2):
        env = {**ENV, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        log = (tmp_path / f"rank{rank}.log").open("w")  # a file, not a pipe: tqdm would fill a pipe and block
        ranks.append(subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=log, text=True))
    return ranks


def wait_for_steps(metrics: Path, ranks: list[subprocess.Popen], steps: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= steps:
            return
        if any(rank.poll() is not None for rank in ranks):
            logs = [path.read_text()[-2000:] for path in sorted(metrics.parents[1].glob("rank*.log"))]
            pytest.fail(f"a rank ended early: {logs}")
        time.sleep(0.2)
    for rank in ranks:
        rank.kill()
    pytest.fail(f"no {steps} logged steps within {timeout} s")


@pytest.mark.parametrize("fault", ["dies", "stalls"])
def test_the_other_process_stops_with_one_line_naming_its_rank_and_step(
    tiny_model_dir: Path, tmp_path: Path, fault: str
) -> None:
    ranks = start_ranks(tmp_path, tiny_model_dir)
    try:
        wait_for_steps(tmp_path / "out" / "metrics.jsonl", ranks, steps=3)
        os.kill(ranks[1].pid, signal.SIGKILL if fault == "dies" else signal.SIGSTOP)
        faulted = time.monotonic()
        try:
            ranks[0].wait(timeout=DDP_TIMEOUT + 60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"rank 0 still running {DDP_TIMEOUT + 60} s after rank 1 {fault}")
        waited = time.monotonic() - faulted
        lines = (tmp_path / "rank0.log").read_text().splitlines()
        errors = [line[line.index("textcl: error:") :] for line in lines if "textcl: error:" in line]  # after tqdm's bar
    finally:
        for rank in ranks:
            rank.kill()
            rank.wait()
    assert ranks[0].returncode == 2 and len(errors) == 1, errors
    assert re.match(r"textcl: error: process 0 of 2 stopped at step \d+: a collective failed or waited longer than "
                    rf"ddp_timeout={DDP_TIMEOUT}s", errors[0]), errors[0]
    step = int(re.search(r"step (\d+)", errors[0]).group(1))
    assert step >= 3
    assert re.search(r"Connection (reset|closed)" if fault == "dies" else r"Timed out", errors[0]), errors[0]
    if fault == "dies":
        assert waited < DDP_TIMEOUT, f"took {waited:.0f} s: a dead peer is noticed at once, not after the timeout"
    else:
        assert DDP_TIMEOUT - 1 < waited < DDP_TIMEOUT + 60, f"took {waited:.0f} s"
