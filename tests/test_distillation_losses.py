"""Distillation losses on plain tensors: equal to their formulas, to sentence-transformers' MarginMSELoss /
DistillKLDivLoss / MSELoss on the same tensors, blind to padded negatives, and 2 processes == 1 process."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gloo_processes import run_processes
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from textcl.errors import TextclError
from textcl.losses.distillation import EmbeddingMSELoss, KLDistillationLoss, MarginMSELoss


def batch(rows: int = 6, k: int = 3, dim: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    anchor = torch.randn(rows, dim, generator=gen, dtype=torch.float64)
    return {
        "anchor": anchor,
        "positive": anchor + 0.5 * torch.randn(rows, dim, generator=gen, dtype=torch.float64),
        "negatives": torch.randn(rows, k, dim, generator=gen, dtype=torch.float64),
        "teacher_scores": torch.rand(rows, 1 + k, generator=gen, dtype=torch.float64) * 10,
    }


def cosines(data: dict[str, torch.Tensor]) -> np.ndarray:
    """[rows, 1 + k] cosine of each anchor to its positive and negatives, in numpy."""
    a = data["anchor"].numpy()
    candidates = np.concatenate([data["positive"].numpy()[:, None], data["negatives"].numpy()], axis=1)
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    candidates = candidates / np.linalg.norm(candidates, axis=-1, keepdims=True)
    return np.einsum("bd,bcd->bc", a, candidates)


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_kl_equals_the_formula(temperature: float) -> None:
    data = batch()
    student, teacher = softmax(cosines(data) / temperature), softmax(data["teacher_scores"].numpy() / temperature)
    expected = (teacher * np.log(teacher / student)).sum(axis=1).mean() * temperature**2
    got = KLDistillationLoss(temperature)(data["anchor"], data["positive"], data["negatives"], data["teacher_scores"])
    assert got.item() == pytest.approx(expected, abs=1e-10)


def test_margin_mse_equals_the_formula() -> None:
    data = batch()
    student, teacher = cosines(data), data["teacher_scores"].numpy()
    expected = (((student[:, :1] - student[:, 1:]) - (teacher[:, :1] - teacher[:, 1:])) ** 2).mean()
    got = MarginMSELoss()(data["anchor"], data["positive"], data["negatives"], data["teacher_scores"])
    assert got.item() == pytest.approx(expected, abs=1e-10)


def test_embedding_mse_equals_the_formula_and_names_a_width_mismatch() -> None:
    data = batch()
    got = EmbeddingMSELoss()(data["anchor"], data["positive"])
    assert got.item() == pytest.approx(((data["anchor"] - data["positive"]) ** 2).mean().item(), abs=1e-12)
    with pytest.raises(TextclError, match="student gives 8-dimensional .* teacher 4-dimensional .* dense_dim: 4"):
        EmbeddingMSELoss()(data["anchor"], data["positive"][:, :4])


@pytest.fixture(scope="module")
def st_model(tiny_model_dir: Path):
    st = pytest.importorskip("sentence_transformers")
    return st.SentenceTransformer(str(tiny_model_dir), device="cpu")


def test_losses_equal_sentence_transformers_on_the_same_tensors(st_model) -> None:
    from sentence_transformers.sentence_transformer import losses
    from sentence_transformers.util import pairwise_cos_sim

    data = {key: value.float() for key, value in batch().items()}
    embeddings = [data["anchor"], data["positive"], *data["negatives"].unbind(1)]
    for temperature in (1.0, 2.0):
        theirs = losses.DistillKLDivLoss(st_model, similarity_fct=pairwise_cos_sim, temperature=temperature)
        expected = theirs.compute_loss_from_embeddings(embeddings, data["teacher_scores"])
        ours = KLDistillationLoss(temperature)(data["anchor"], data["positive"], data["negatives"],
                                               data["teacher_scores"])
        torch.testing.assert_close(ours.float(), expected, atol=1e-5, rtol=1e-5)
    theirs = losses.MarginMSELoss(st_model, similarity_fct=pairwise_cos_sim)
    expected = theirs.compute_loss_from_embeddings(embeddings, data["teacher_scores"])
    ours = MarginMSELoss()(data["anchor"], data["positive"], data["negatives"], data["teacher_scores"])
    torch.testing.assert_close(ours.float(), expected, atol=1e-5, rtol=1e-5)
    theirs = losses.MSELoss(st_model)
    expected = theirs.compute_loss_from_embeddings([data["anchor"]], [data["positive"]])
    torch.testing.assert_close(EmbeddingMSELoss()(data["anchor"], data["positive"]).float(), expected)


@pytest.mark.parametrize("loss", [KLDistillationLoss(0.7), MarginMSELoss()])
def test_padded_negatives_count_as_absent(loss: nn.Module) -> None:
    """A row with padded negatives (mask False) gives what the same row gives without those columns; a row
    with no real negative adds nothing to KL (a one-candidate softmax) and nothing to MarginMSE."""
    data = batch(rows=3, k=3)
    mask = torch.tensor([[True, True, True], [True, False, False], [False, False, False]])
    scores = data["teacher_scores"].clone()
    scores[~torch.cat([torch.ones(3, 1, dtype=torch.bool), mask], dim=1)] = 1e6  # padding never leaks in
    padded = data["negatives"].clone()
    padded[~mask] = 1e3
    got = loss(data["anchor"], data["positive"], padded, scores, negative_mask=mask)
    row0 = loss(data["anchor"][:1], data["positive"][:1], data["negatives"][:1], data["teacher_scores"][:1])
    row1 = loss(data["anchor"][1:2], data["positive"][1:2], data["negatives"][1:2, :1], data["teacher_scores"][1:2, :2])
    expected = (row0 + row1) / 2 if isinstance(loss, KLDistillationLoss) else (3 * row0 + row1) / 4
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=0)


def test_wrong_teacher_score_shape_is_one_line() -> None:
    data = batch(rows=4, k=2)
    with pytest.raises(TextclError, match=r"teacher scores must be \[batch, 1 \+ negatives\] = \[4, 3\]"):
        KLDistillationLoss()(data["anchor"], data["positive"], data["negatives"], data["teacher_scores"][:, :2])
    with pytest.raises(TextclError, match="MarginMSE needs hard negatives"):
        MarginMSELoss()(data["anchor"], data["positive"], None, data["teacher_scores"][:, :1])


SIZES = (2, 4)  # uneven local batches: the normalisation must count the rows of every process


def distill_step(model: nn.Module, rows: slice) -> dict[str, torch.Tensor]:
    """Loss values of one forward of rows `rows` of a 6-row batch through `model`, with their backward."""
    data = batch(rows=sum(SIZES), k=2)
    data = {key: value[rows] for key, value in data.items()}
    mask = torch.tensor([[True, True], [True, False], [False, False], [True, True], [True, True], [False, True]])[rows]
    b = data["anchor"].shape[0]
    out = model(torch.cat([data["anchor"], data["positive"], data["negatives"].reshape(2 * b, -1)]))
    anchor, positive, negatives = out[:b], out[b : 2 * b], out[2 * b :].reshape(b, 2, -1)
    values = {
        "kl": KLDistillationLoss(0.5)(anchor, positive, negatives, data["teacher_scores"], negative_mask=mask),
        "margin_mse": MarginMSELoss()(anchor, positive, negatives, data["teacher_scores"], negative_mask=mask),
        "mse": EmbeddingMSELoss()(anchor, positive),
    }
    sum(values.values()).backward()
    return {key: value.detach() for key, value in values.items()}


def linear() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(8, 5).double()


def distill_worker(rank: int, folder: Path) -> None:
    model = linear()
    start = sum(SIZES[:rank])
    values = distill_step(DistributedDataParallel(model), slice(start, start + SIZES[rank]))
    torch.save({"values": values, "grads": [p.grad.clone() for p in model.parameters()]}, folder / f"rank{rank}.pt")


@pytest.mark.slow
def test_two_processes_equal_one_process(tmp_path: Path) -> None:
    run_processes(distill_worker, 2, tmp_path)
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    model = linear()
    expected = distill_step(model, slice(None))
    for name, value in expected.items():
        torch.testing.assert_close(sum(r["values"][name] for r in results) / 2, value, atol=1e-10, rtol=0)
    for result in results:
        for got, want in zip(result["grads"], [p.grad for p in model.parameters()]):
            torch.testing.assert_close(got, want, atol=1e-10, rtol=0)
