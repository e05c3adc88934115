"""Training processes never outlive their launcher: `textcl train --num_processes 2` is killed with SIGKILL in the
middle of a long run, and both workers stop within seconds, leaving the last complete checkpoint."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import SENTENCES

from textcl.training.checkpoint import checkpoints, resolve_resume

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT),
       "OMP_NUM_THREADS": "1"}
STOP_WITHIN = 15.0  # seconds the workers may take to notice (the kernel's parent-death signal is immediate)


def children(pid: int) -> list[int]:
    """The PIDs whose parent is `pid` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    """Running (a zombie left for an init that does not reap counts as stopped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc to find the workers")
def test_workers_stop_when_the_launcher_is_killed(tmp_path: Path, tiny_model_dir: Path) -> None:
    pairs = tmp_path / "pairs.tsv"
    with pairs.open("w", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t")
        writer.writerow(["anchor", "positive"])
        writer.writerows((s, " ".join(s.split()[:4])) for s in SENTENCES)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "textcl", "train", "--num_processes", "2", "--model_name_or_path",
               str(tiny_model_dir), "--train_data", str(pairs), "--max_steps", "100000", "--save_steps", "2",
               "--per_device_train_batch_size", "2", "--max_seq_length", "16", "--output_dir", str(out)]
    log = (tmp_path / "launcher.log").open("w")
    launcher = subprocess.Popen(command, env=ENV, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 300
        while not list(out.glob("checkpoint-*")):  # the run is under way: at least one checkpoint written
            assert launcher.poll() is None, (tmp_path / "launcher.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.5)
        workers = children(launcher.pid)
        assert len(workers) == 2, workers
        launcher.send_signal(signal.SIGKILL)
        launcher.wait(30)
        killed = time.monotonic()
        while any(alive(pid) for pid in workers) and time.monotonic() - killed < STOP_WITHIN:
            time.sleep(0.2)
        survivors = [pid for pid in workers if alive(pid)]
        assert not survivors, f"workers {survivors} outlived their launcher by {STOP_WITHIN} s"
    finally:
        for pid in [launcher.pid, *workers]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        log.close()
    written = sorted(path.name for path in out.glob("checkpoint-*"))
    time.sleep(2)
    assert sorted(path.name for path in out.glob("checkpoint-*")) == written, "nobody writes the folder any more"
    assert resolve_resume(out, "latest") == checkpoints(out)[-1], "the newest checkpoint is complete and verifies"
