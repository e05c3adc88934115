"""Momentum encoder (EMA) and negative queue: update rule, FIFO contents, checkpoints, cross-process identity."""

from __future__ import annotations

from collections import deque
from pathlib import Path

import pytest
import torch
from conftest import SENTENCES
from gloo_processes import run_processes

from textcl import Encoder
from textcl.losses.queue import MomentumEncoder, NegativeQueue


def test_momentum_encoder_starts_equal_and_follows_the_ema(tiny_model_dir: Path) -> None:
    encoder = Encoder.load(tiny_model_dir).eval()
    keys = MomentumEncoder(encoder, momentum=0.9).eval()
    batch = encoder.tokenize(SENTENCES[:4])
    with torch.no_grad():
        torch.testing.assert_close(keys(**batch), encoder(**batch))
    before = {name: p.detach().clone() for name, p in keys.average.module.named_parameters()}
    with torch.no_grad():
        for param in encoder.parameters():
            param.add_(torch.randn_like(param))
    keys.update(encoder)
    online = dict(encoder.named_parameters())
    for name, param in keys.average.module.named_parameters():
        torch.testing.assert_close(param, 0.9 * before[name] + 0.1 * online[name].detach())
        assert not param.requires_grad
    assert not keys(**batch).requires_grad


def test_momentum_encoder_state_dict_round_trip(tiny_model_dir: Path) -> None:
    encoder = Encoder.load(tiny_model_dir)
    keys = MomentumEncoder(encoder, momentum=0.5)
    with torch.no_grad():
        for param in encoder.parameters():
            param.mul_(2)
    keys.update(encoder)
    restored = MomentumEncoder(Encoder.load(tiny_model_dir), momentum=0.5)
    restored.load_state_dict(keys.state_dict())
    for a, b in zip(keys.parameters(), restored.parameters()):
        assert torch.equal(a, b)


def test_queue_keeps_the_last_size_keys() -> None:
    queue, expected = NegativeQueue(size=5, dim=3), deque(maxlen=5)
    assert queue.negatives.shape == (0, 3)
    start = 0
    for n in [2, 2, 3, 7, 1]:
        keys = torch.arange(start, start + n, dtype=torch.float32)[:, None].repeat(1, 3)
        queue.enqueue(keys)
        expected.extend(range(start, start + n))
        start += n
        assert sorted(queue.negatives[:, 0].tolist()) == sorted(expected)
    assert queue.negatives.shape == (5, 3)


def test_queue_state_dict_round_trip_continues_identically() -> None:
    queue = NegativeQueue(size=4, dim=2)
    queue.enqueue(torch.randn(3, 2))
    restored = NegativeQueue(size=4, dim=2)
    restored.load_state_dict(queue.state_dict())
    more = torch.randn(2, 2)
    queue.enqueue(more)
    restored.enqueue(more)
    assert torch.equal(queue.negatives, restored.negatives)


def test_queue_rejects_wrong_width() -> None:
    with pytest.raises(ValueError, match=r"queue keys must be \[n, 4\]; got \(2, 3\)"):
        NegativeQueue(size=8, dim=4).enqueue(torch.zeros(2, 3))


def worker(rank: int, folder: Path) -> None:
    queue = NegativeQueue(size=6, dim=2)
    queue.enqueue(torch.full((2 + rank, 2), float(rank)))  # uneven: rank 0 adds 2 keys, rank 1 adds 3
    torch.save(queue.negatives, folder / f"rank{rank}.pt")


def test_queue_gathers_keys_of_all_processes(tmp_path: Path) -> None:
    run_processes(worker, 2, tmp_path)
    queues = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    assert torch.equal(queues[0], queues[1])
    assert queues[0][:, 0].tolist() == [0.0, 0.0, 1.0, 1.0, 1.0]
