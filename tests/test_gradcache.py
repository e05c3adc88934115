"""GradCache gives the gradients of plain backprop through the same forward computations, on a tiny BERT with
dropout ON; it fails without RNG replay; and it composes with the 2-process gather under DDP.

The reference ("plain") embeds the same chunks WITH a graph, in the same order from the same seed, then
backpropagates the full-batch loss once: the textbook gradient for that forward's dropout masks (a
dropout mask is drawn per forward call, so the reference has to make the same calls; with dropout off
the reference is a single forward of each whole group, see the eval test).
"""

from __future__ import annotations

import zlib
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from conftest import SENTENCES
from decoder_models import save_tiny_decoder_encoder
from gloo_processes import run_processes
from torch.nn.parallel import DistributedDataParallel

from textcl import Encoder
from textcl.losses import InfoNCELoss
from textcl.losses.gradcache import RngState, gradcache_backward, split_batch

ROWS = 8


def batch_texts(rows: int = ROWS) -> tuple[list[str], list[str], list[str]]:
    """SimCSE-style rows (the positive is the anchor text) with one hard negative each; rows 1 and 6 repeat a text."""
    anchors = [SENTENCES[i % len(SENTENCES)] for i in range(rows)]
    anchors[6] = anchors[1]
    negatives = [SENTENCES[(i + 5) % len(SENTENCES)] for i in range(rows)]
    return anchors, list(anchors), negatives


def text_ids(texts: list[str]) -> torch.Tensor:
    return torch.tensor([zlib.crc32(text.encode()) for text in texts])


def make_loss_fn(loss: InfoNCELoss, anchors: list[str], negatives: list[str]):
    ids, negative_ids = text_ids(anchors), text_ids(negatives)[:, None]

    def loss_fn(embeddings: list[torch.Tensor]) -> torch.Tensor:
        anchor, positive, negative = embeddings
        return loss(anchor, positive, negative[:, None], positive_ids=ids, negative_ids=negative_ids)

    return loss_fn


def make_setup(model_dir: Path, texts: tuple[list[str], ...]) -> tuple[Encoder, InfoNCELoss, list[dict]]:
    torch.manual_seed(0)
    encoder = Encoder.load(model_dir).train()
    loss = InfoNCELoss(temperature=0.1, symmetric=True, learnable_temperature=True)
    return encoder, loss, [encoder.tokenize(group) for group in texts]


def parameter_grads(*modules: torch.nn.Module) -> dict[str, torch.Tensor]:
    grads = {}
    for index, module in enumerate(modules):
        for name, param in module.named_parameters():
            if param.grad is not None:
                grads[f"{index}.{name}"] = param.grad.clone()
                param.grad = None
    return grads


def plain_chunked_embeddings(encoder: Encoder, groups: list[dict], chunk_size: int) -> list[torch.Tensor]:
    """The reference forward: the same chunks, same order, with a graph."""
    return [torch.cat([encoder(**chunk) for chunk in split_batch(group, chunk_size)]) for group in groups]


def assert_grads_close(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], atol: float = 1e-5) -> None:
    assert got.keys() == expected.keys() and len(got) > 10
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, atol=atol, rtol=0, msg=name)


@pytest.fixture(scope="module")
def tiny_decoder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Qwen3 decoder embedder (left padding, EOS appended, last-token pooling) with attention dropout."""
    return save_tiny_decoder_encoder(tmp_path_factory.mktemp("qwen3"), "qwen3", dropout=0.1)


@pytest.fixture(params=["bert", "decoder"])
def model_dir(request: pytest.FixtureRequest) -> Path:
    return request.getfixturevalue("tiny_model_dir" if request.param == "bert" else "tiny_decoder_dir")


@pytest.mark.parametrize("chunk_size", [3, 4, 100])
def test_gradcache_equals_plain_backprop_with_dropout(tiny_model_dir: Path, chunk_size: int) -> None:
    texts = batch_texts()
    encoder, loss, groups = make_setup(tiny_model_dir, texts)
    loss_fn = make_loss_fn(loss, texts[0], texts[2])
    torch.manual_seed(1)
    cached = gradcache_backward(encoder, groups, loss_fn, chunk_size)
    after_cached = torch.rand(3)
    got = parameter_grads(encoder, loss)
    torch.manual_seed(1)
    plain = loss_fn(plain_chunked_embeddings(encoder, groups, chunk_size))
    plain.backward()
    assert torch.equal(torch.rand(3), after_cached), "GradCache must leave the RNG where plain training does"
    torch.testing.assert_close(cached, plain.detach())
    assert_grads_close(got, parameter_grads(encoder, loss))


def test_gradcache_without_rng_replay_is_wrong(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same check with the replay switched off: dropout masks differ between the passes, gradients too."""
    texts = batch_texts()
    encoder, loss, groups = make_setup(tiny_model_dir, texts)
    loss_fn = make_loss_fn(loss, texts[0], texts[2])
    monkeypatch.setattr(RngState, "replay", lambda self: nullcontext())
    torch.manual_seed(1)
    gradcache_backward(encoder, groups, loss_fn, 3)
    got = parameter_grads(encoder, loss)
    torch.manual_seed(1)
    loss_fn(plain_chunked_embeddings(encoder, groups, 3)).backward()
    expected = parameter_grads(encoder, loss)
    assert max((got[name] - expected[name]).abs().max().item() for name in expected) > 1e-3


def test_gradcache_equals_one_full_forward_without_dropout(model_dir: Path) -> None:
    texts = batch_texts()
    encoder, loss, groups = make_setup(model_dir, texts)
    encoder.eval()
    loss_fn = make_loss_fn(loss, texts[0], texts[2])
    gradcache_backward(encoder, groups, loss_fn, 3)
    got = parameter_grads(encoder, loss)
    loss_fn([encoder(**group) for group in groups]).backward()
    assert_grads_close(got, parameter_grads(encoder, loss))


def test_bad_chunk_size_and_unused_group(tiny_model_dir: Path) -> None:
    texts = batch_texts()
    encoder, loss, groups = make_setup(tiny_model_dir, texts)
    with pytest.raises(ValueError, match="chunk_size must be >= 1, got 0"):
        gradcache_backward(encoder, groups, make_loss_fn(loss, texts[0], texts[2]), 0)
    with pytest.raises(ValueError, match=r"non-empty groups; got rows \[8, 0\]"):
        empty = {key: value[:0] for key, value in groups[1].items()}
        gradcache_backward(encoder, [groups[0], empty], lambda e: e[0].sum(), 4)
    with pytest.raises(ValueError, match=r"group\(s\) \[2\]"):
        gradcache_backward(encoder, groups, lambda e: loss(e[0], e[1]), 4)


def worker(rank: int, folder: Path, model_dir: Path) -> None:
    """Rank r holds rows r*4 .. r*4+3 and runs GradCache (chunk 3) under DDP with the gathering loss."""
    texts = [group[rank * 4 : rank * 4 + 4] for group in batch_texts()]
    encoder, loss, groups = make_setup(model_dir, texts)
    model = DistributedDataParallel(encoder, find_unused_parameters=True)
    torch.manual_seed(100 + rank)
    value = gradcache_backward(model, groups, make_loss_fn(loss, texts[0], texts[2]), 3,
                               no_sync=model.no_sync)
    torch.save({"loss": value, "grads": parameter_grads(encoder, loss)}, folder / f"rank{rank}.pt")


def test_gradcache_with_two_process_gather_equals_one_process(tiny_model_dir: Path, tmp_path: Path) -> None:
    run_processes(worker, 2, tmp_path, tiny_model_dir)
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    texts = batch_texts()
    encoder, loss, _ = make_setup(tiny_model_dir, texts)
    per_rank = []
    for rank in range(2):  # each process's dropout masks come from its own seed, as in the workers
        torch.manual_seed(100 + rank)
        groups = [encoder.tokenize(group[rank * 4 : rank * 4 + 4]) for group in texts]
        per_rank.append(plain_chunked_embeddings(encoder, groups, 3))
    full = [torch.cat([per_rank[0][g], per_rank[1][g]]) for g in range(3)]
    expected_loss = make_loss_fn(loss, texts[0], texts[2])(full)
    expected_loss.backward()
    expected = parameter_grads(encoder, loss)
    torch.testing.assert_close((results[0]["loss"] + results[1]["loss"]) / 2, expected_loss.detach())
    for result in results:
        assert_grads_close(result["grads"], expected)
