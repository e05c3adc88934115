"""2 processes (gloo, DDP, float64) x batch B give the loss and parameter gradients of 1 process x batch 2B.

The global batch plants cross-process duplicates (row 1's positive text is also row 6's; a negative of
row 5 is row 2's positive) and a label shared across processes, so the id and label masks are checked
against rows that live on the other process. The `local_slice` scenario replaces the gather's backward
by "keep only the local slice" (what a plain all_gather with the local tensor put back does) and must
NOT match: it drops the gradient the other process's loss sends to this process's embeddings.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from gloo_processes import run_processes
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import textcl.losses.distributed
import textcl.losses.infonce
from textcl.losses import InfoNCELoss, MatryoshkaLoss

SCENARIOS = {
    "pairs": {"sizes": (4, 4), "k": 0, "loss": {}},
    "hard_negatives": {"sizes": (4, 4), "k": 2, "loss": {}},
    "everything_uneven": {
        "sizes": (3, 5), "k": 2, "masks": True,
        "loss": {"symmetric": True, "anchor_negatives": True, "learnable_temperature": True,
                 "false_negative_margin": 0.2, "tau_plus": 0.05, "temperature": 0.1},
    },
    "matryoshka_labels": {"sizes": (4, 4), "k": 1, "masks": True, "matryoshka": [4, 2], "loss": {"symmetric": True}},
    "local_slice": {"sizes": (4, 4), "k": 2, "loss": {}, "local_slice": True},
}


def make_batch(rows: int, k: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    anchor = torch.randn(rows, 6, generator=gen, dtype=torch.float64)
    positive_ids, negative_ids = torch.arange(rows) * 7 + 1, torch.arange(rows * k).reshape(rows, k) * 7 + 2
    positive_ids[6] = positive_ids[1]
    if k:
        negative_ids[5, 0] = positive_ids[2]
    return {
        "anchor": anchor,
        "positive": anchor + 0.3 * torch.randn(rows, 6, generator=gen, dtype=torch.float64),
        "negatives": torch.randn(rows, k, 6, generator=gen, dtype=torch.float64),
        "positive_ids": positive_ids,
        "negative_ids": negative_ids,
        "labels": torch.tensor([0, 1, 2, 3, 1, 4, 5, 6])[:rows],
        "weights": torch.rand(rows, generator=gen, dtype=torch.float64) + 0.5,
    }


def build(scenario: dict) -> tuple[nn.Module, nn.Module, InfoNCELoss]:
    torch.manual_seed(0)
    model = nn.Linear(6, 4).double()
    inner = InfoNCELoss(**scenario["loss"]).double()
    loss = MatryoshkaLoss(inner, scenario["matryoshka"]) if "matryoshka" in scenario else inner
    return model, loss, inner


def step(model: nn.Module, loss: nn.Module, scenario: dict, rows: slice) -> torch.Tensor:
    """One forward + backward of `rows` of the global batch; returns the loss."""
    k = scenario["k"]
    data = {key: value[rows] for key, value in make_batch(sum(scenario["sizes"]), k).items()}
    b = data["anchor"].shape[0]
    embeddings = model(torch.cat([data["anchor"], data["positive"], data["negatives"].reshape(b * k, 6)]))
    negatives = embeddings[2 * b :].reshape(b, k, 4) if k else None
    extra = {}
    if scenario.get("masks"):
        extra = {key: data[key] for key in ("positive_ids", "labels", "weights")}
        extra["negative_ids"] = data["negative_ids"] if k else None
    value = loss(embeddings[:b], embeddings[b : 2 * b], negatives, **extra)
    value.backward()
    return value.detach()


def gradients(model: nn.Module, inner: InfoNCELoss) -> list[torch.Tensor]:
    params = list(model.parameters()) + ([inner.log_temperature] if inner.log_temperature is not None else [])
    return [param.grad.clone() for param in params]


def local_slice_gather(tensor: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """The wrong semantics under test: gather values, but only the local rows keep their gradient."""
    parts = [torch.empty_like(tensor) for _ in sizes]
    dist.all_gather(parts, tensor.detach().contiguous())
    parts[dist.get_rank()] = tensor
    return torch.cat(parts)


def worker(rank: int, folder: Path) -> None:
    results = {}
    for name, scenario in SCENARIOS.items():
        model, loss, inner = build(scenario)
        ddp = DistributedDataParallel(model)
        start = sum(scenario["sizes"][:rank])
        if scenario.get("local_slice"):
            textcl.losses.infonce.gather_rows = local_slice_gather
        value = step(ddp, loss, scenario, slice(start, start + scenario["sizes"][rank]))
        textcl.losses.infonce.gather_rows = textcl.losses.distributed.gather_rows
        results[name] = {"loss": value, "grads": gradients(model, inner)}
    torch.save(results, folder / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    folder = tmp_path_factory.mktemp("gather")
    run_processes(worker, 2, folder)
    return [torch.load(folder / f"rank{rank}.pt") for rank in range(2)]


@pytest.mark.parametrize("name", [name for name in SCENARIOS if name != "local_slice"])
def test_two_processes_equal_one_process_double_batch(two_process_results: list[dict], name: str) -> None:
    scenario = SCENARIOS[name]
    model, loss, inner = build(scenario)
    expected_loss = step(model, loss, scenario, slice(None))
    expected_grads = gradients(model, inner)
    mean_loss = sum(result[name]["loss"] for result in two_process_results) / 2
    torch.testing.assert_close(mean_loss, expected_loss, atol=1e-6, rtol=0)
    for result in two_process_results:
        for got, expected in zip(result[name]["grads"], expected_grads):
            torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_local_slice_backward_gives_wrong_gradients(two_process_results: list[dict]) -> None:
    scenario = SCENARIOS["local_slice"]
    model, loss, inner = build(scenario)
    step(model, loss, scenario, slice(None))
    expected = gradients(model, inner)
    got = two_process_results[0]["local_slice"]["grads"]
    assert max((g - e).abs().max().item() for g, e in zip(got, expected)) > 1e-3
