"""InfoNCE against a direct per-row reference (float64 Python loops), the peer's MNRL, and gradcheck."""

from __future__ import annotations

import math

import pytest
import torch
from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
from torch.func import functional_call

from textcl.losses import InfoNCELoss, MatryoshkaLoss
from textcl.training.statistics import contrastive_stats


def cosine(u: torch.Tensor, v: torch.Tensor) -> float:
    return float(u.double() @ v.double() / (u.double().norm() * v.double().norm()))


def row_loss(positives: list[float], negatives: list[float], temperature: float, tau_plus: float) -> float:
    """-mean_p log(e_p / (sum of positives' e + negatives' term)) with e = exp(score / temperature)."""
    pos = [math.exp(s / temperature) for s in positives]
    neg = [math.exp(s / temperature) for s in negatives]
    negative_term = sum(neg)
    if tau_plus:
        n = len(neg)
        estimate = (sum(neg) - tau_plus * n * sum(pos) / len(pos)) / (1 - tau_plus)
        negative_term = max(estimate, n * math.exp(-1 / temperature))
    return sum(-math.log(e / (sum(pos) + negative_term)) for e in pos) / len(pos)


def reference(a, p, n=None, *, temperature=0.05, symmetric=False, anchor_negatives=False, labels=None,
              positive_ids=None, negative_ids=None, weights=None, queue=None, margin=None, guide=None, tau_plus=0.0):
    """The loss written out row by row: which candidate is a target, a negative, or dropped."""
    batch, k = a.shape[0], 0 if n is None else n.shape[1]
    ga, gp, gn = guide if guide is not None else (a, p, n)

    def same_label(i, j):
        return labels is not None and labels[i] == labels[j]

    def same_id(i, j):
        return positive_ids is not None and positive_ids[i] == positive_ids[j]

    def too_close(judge_query, judge_target, judge_candidate):
        return margin is not None and cosine(judge_query, judge_candidate) - cosine(judge_query, judge_target) > margin

    def forward(i):
        pos, neg = [cosine(a[i], p[i])], []
        for j in range(batch):
            if j != i:
                s = cosine(a[i], p[j])
                if same_label(i, j):
                    pos.append(s)
                elif not same_id(i, j) and not too_close(ga[i], gp[i], gp[j]):
                    neg.append(s)
            for t in range(k):
                dup = negative_ids is not None and positive_ids is not None and negative_ids[j, t] == positive_ids[i]
                if not dup and not too_close(ga[i], gp[i], gn[j, t]):
                    neg.append(cosine(a[i], n[j, t]))
            if anchor_negatives and j != i:
                s = cosine(a[i], a[j])
                if same_label(i, j):
                    pos.append(s)
                elif not same_id(i, j) and not too_close(ga[i], gp[i], ga[j]):
                    neg.append(s)
        for q in [] if queue is None else queue:
            if not too_close(a[i], p[i], q):
                neg.append(cosine(a[i], q))
        return row_loss(pos, neg, temperature, tau_plus)

    def backward(j):
        pos, neg = [cosine(p[j], a[j])], []
        for i in range(batch):
            if i != j:
                s = cosine(p[j], a[i])
                if same_label(i, j):
                    pos.append(s)
                elif not same_id(i, j) and not too_close(gp[j], ga[j], ga[i]):
                    neg.append(s)
        return row_loss(pos, neg, temperature, tau_plus)

    losses = [(forward(i) + backward(i)) / 2 if symmetric else forward(i) for i in range(batch)]
    w = [1.0] * batch if weights is None else [float(x) for x in weights]
    return sum(wi * li for wi, li in zip(w, losses)) / sum(w)


def planted_batch(batch=6, k=2, dim=8, seed=0):
    """Random float64 embeddings, positives near their anchors, with planted duplicates: row 3 is a paraphrase of
    row 0 with the same positive text, a negative of row 2 is row 1's positive, and rows 1 and 4 share a label."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(batch, dim, generator=gen, dtype=torch.float64)
    a[3] = a[0] + 0.3 * torch.randn(dim, generator=gen, dtype=torch.float64)
    p = a + 0.5 * torch.randn(batch, dim, generator=gen, dtype=torch.float64)
    n = torch.randn(batch, k, dim, generator=gen, dtype=torch.float64)
    p[3] = p[0]
    n[2, 1] = p[1]
    positive_ids = torch.arange(100, 100 + batch)
    positive_ids[3] = positive_ids[0]
    negative_ids = torch.arange(200, 200 + batch * k).reshape(batch, k)
    negative_ids[2, 1] = positive_ids[1]
    labels = torch.arange(batch)
    labels[4] = labels[1]
    return a, p, n, positive_ids, negative_ids, labels


CASES = {
    "in_batch": {},
    "hard_negatives": {"n": True},
    "symmetric": {"n": True, "symmetric": True},
    "anchor_negatives": {"n": True, "anchor_negatives": True},
    "ids": {"n": True, "symmetric": True, "anchor_negatives": True, "ids": True},
    "labels": {"n": True, "symmetric": True, "anchor_negatives": True, "labels": True},
    "margin": {"n": True, "anchor_negatives": True, "margin": -0.2},
    "guide": {"n": True, "symmetric": True, "margin": 0.0, "guide": True},
    "debiased": {"n": True, "tau_plus": 0.1, "ids": True},
    "debiased_labels": {"n": True, "tau_plus": 0.2, "labels": True, "temperature": 0.2},
    "weights_queue": {"n": True, "weights": True, "queue": True, "margin": 0.1},
    "everything": {"n": True, "symmetric": True, "anchor_negatives": True, "ids": True, "labels": True,
                   "margin": 0.3, "weights": True, "queue": True, "tau_plus": 0.05, "temperature": 0.1},
}


@pytest.mark.parametrize("case", CASES)
def test_matches_row_by_row_reference(case: str) -> None:
    options = CASES[case]
    a, p, n, positive_ids, negative_ids, labels = planted_batch()
    gen = torch.Generator().manual_seed(1)
    kwargs = {
        "labels": labels if options.get("labels") else None,
        "positive_ids": positive_ids if options.get("ids") else None,
        "negative_ids": negative_ids if options.get("ids") else None,
        "weights": torch.rand(6, generator=gen, dtype=torch.float64) + 0.5 if options.get("weights") else None,
        "queue": torch.randn(5, 8, generator=gen, dtype=torch.float64) if options.get("queue") else None,
        "guide": (torch.randn(6, 4, generator=gen, dtype=torch.float64),
                  torch.randn(6, 4, generator=gen, dtype=torch.float64),
                  torch.randn(6, 2, 4, generator=gen, dtype=torch.float64)) if options.get("guide") else None,
    }
    n = n if options.get("n") else None
    names = ("temperature", "symmetric", "anchor_negatives", "tau_plus")
    settings = {key: options[key] for key in names if key in options}
    loss = InfoNCELoss(**settings, false_negative_margin=options.get("margin"))
    expected = reference(a, p, n, **settings, margin=options.get("margin"), **kwargs)
    assert loss(a, p, n, **kwargs).item() == pytest.approx(expected, rel=1e-7)


def test_masks_change_the_loss() -> None:
    """Guards the reference test: each option really alters the value on the planted batch."""
    a, p, n, positive_ids, negative_ids, labels = planted_batch()
    plain = InfoNCELoss()(a, p, n).item()
    assert InfoNCELoss()(a, p, n, positive_ids=positive_ids, negative_ids=negative_ids).item() != pytest.approx(plain)
    assert InfoNCELoss()(a, p, n, labels=labels).item() != pytest.approx(plain)
    assert InfoNCELoss(false_negative_margin=-0.2)(a, p, n).item() != pytest.approx(plain)
    assert InfoNCELoss(tau_plus=0.1)(a, p, n).item() != pytest.approx(plain)


@pytest.mark.parametrize("options", [{}, {"symmetric": True}, {"anchor_negatives": True}])
@pytest.mark.parametrize("hard", [False, True])
def test_matches_sentence_transformers_mnrl(options: dict, hard: bool) -> None:
    torch.manual_seed(0)
    a, p, n = torch.randn(7, 16), torch.randn(7, 16), torch.randn(7, 3, 16)
    directions = ("query_to_doc", "doc_to_query" if options.get("symmetric") else "query_to_query")
    peer_options = {}
    if options:
        mode = "per_direction" if "symmetric" in options else "joint"
        peer_options = {"directions": directions, "partition_mode": mode}
    columns = [a, p] + ([n[:, t] for t in range(3)] if hard else [])
    peer = MultipleNegativesRankingLoss(None, scale=20.0, **peer_options)
    expected = peer.compute_loss_from_embeddings(columns, None).item()
    got = InfoNCELoss(temperature=0.05, **options)(a, p, n if hard else None).item()
    assert got == pytest.approx(expected, rel=1e-5)


def test_duplicate_positive_is_the_same_as_removing_it() -> None:
    """Row 0's loss with row 3's identical positive masked equals row 0's loss in the batch without row 3."""
    a, p, _, positive_ids, _, _ = planted_batch()
    loss = InfoNCELoss()
    only_row0 = torch.zeros(6, dtype=torch.float64)
    only_row0[0] = 1
    keep = [0, 1, 2, 4, 5]
    masked = loss(a, p, positive_ids=positive_ids, weights=only_row0)
    removed = loss(a[keep], p[keep], weights=only_row0[keep])
    assert masked.item() == pytest.approx(removed.item(), rel=1e-12)
    assert loss(a, p, weights=only_row0).item() != pytest.approx(removed.item())


def test_duplicate_hard_negative_is_the_same_as_removing_it() -> None:
    """Row 1's loss with row 2's negative (a copy of row 1's positive) masked equals the loss without it."""
    a, p, n, positive_ids, negative_ids, _ = planted_batch()
    only_row1 = torch.zeros(6, dtype=torch.float64)
    only_row1[1] = 1
    masked = InfoNCELoss()(a, p, n, positive_ids=positive_ids, negative_ids=negative_ids, weights=only_row1)
    others = torch.cat([n.reshape(12, 8)[:5], n.reshape(12, 8)[6:]])  # every negative but n[2, 1]
    removed = InfoNCELoss()(a, p, queue=others, positive_ids=positive_ids, weights=only_row1)
    assert masked.item() == pytest.approx(removed.item(), rel=1e-12)


def test_same_label_rows_are_positives() -> None:
    """Rows 0 and 1 share a label: row 0's loss is the mean of -log softmax over both of their positives."""
    torch.manual_seed(0)
    a, p = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    logits = torch.nn.functional.normalize(a, dim=1) @ torch.nn.functional.normalize(p, dim=1).T / 0.1
    log_softmax = logits.log_softmax(dim=1)
    expected = [-(log_softmax[0, 0] + log_softmax[0, 1]) / 2, -(log_softmax[1, 0] + log_softmax[1, 1]) / 2,
                -log_softmax[2, 2]]
    got = InfoNCELoss(temperature=0.1)(a, p, labels=torch.tensor([7, 7, 3]))
    assert got.item() == pytest.approx(float(sum(expected) / 3), rel=1e-12)


def test_gradcheck_float64() -> None:
    torch.manual_seed(0)
    a, p, n = (torch.randn(*shape, dtype=torch.float64, requires_grad=True) for shape in [(4, 5), (4, 5), (4, 2, 5)])
    labels = torch.tensor([0, 1, 1, 2])
    for loss in [InfoNCELoss(temperature=0.5, symmetric=True, anchor_negatives=True),
                 InfoNCELoss(temperature=0.5, tau_plus=0.1)]:
        assert torch.autograd.gradcheck(lambda x, y, z, loss=loss: loss(x, y, z, labels=labels), (a, p, n))


def test_learnable_temperature_gradient_and_clamp() -> None:
    torch.manual_seed(0)
    a, p, n = (torch.randn(*shape, dtype=torch.float64) for shape in [(4, 5), (4, 5), (4, 2, 5)])
    loss = InfoNCELoss(temperature=0.3, learnable_temperature=True).double()
    assert [name for name, _ in loss.named_parameters()] == ["log_temperature"]
    log_t = torch.tensor(math.log(0.3), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: functional_call(loss, {"log_temperature": t}, (a, p, n)), (log_t,))
    assert loss(a, p, n).item() == pytest.approx(reference(a, p, n, temperature=0.3), rel=1e-9)
    with torch.no_grad():
        loss.log_temperature.fill_(math.log(1e-4))
    assert loss.temperature == pytest.approx(0.01)
    assert loss(a, p, n).item() == pytest.approx(reference(a, p, n, temperature=0.01), rel=1e-9)


def test_debiased_is_finite_at_small_temperature() -> None:
    a, p, n, *_ = planted_batch()
    got = InfoNCELoss(temperature=0.005, tau_plus=0.1)(a.float(), p.float(), n.float())
    assert torch.isfinite(got)
    assert got.item() == pytest.approx(reference(a, p, n, temperature=0.005, tau_plus=0.1), rel=1e-4)


def test_similarities_stay_float32_under_bf16_autocast() -> None:
    a, p, n, positive_ids, *_ = planted_batch()
    a, p, n = a.float(), p.float(), n.float()
    loss = InfoNCELoss(symmetric=True, tau_plus=0.05)
    expected = loss(a, p, n, positive_ids=positive_ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = loss(a, p, n, positive_ids=positive_ids)
        bf16 = loss(a.bfloat16(), p.bfloat16(), n.bfloat16(), positive_ids=positive_ids)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(bf16, expected, rtol=0.02, atol=0.02)


def test_matryoshka_is_the_weighted_sum_over_truncations() -> None:
    a, p, n, positive_ids, *_ = planted_batch()
    inner = InfoNCELoss(symmetric=True)
    got = MatryoshkaLoss(inner, dims=[8, 4, 2], weights=[1.0, 0.5, 0.25])(a, p, n, positive_ids=positive_ids)
    expected = sum(w * reference(a[:, :d], p[:, :d], n[..., :d], symmetric=True, positive_ids=positive_ids)
                   for d, w in [(8, 1.0), (4, 0.5), (2, 0.25)])
    assert got.item() == pytest.approx(expected, rel=1e-9)
    with pytest.raises(ValueError, match="exceed the embedding width 8"):
        MatryoshkaLoss(inner, dims=[16])(a, p)


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        (((0, 8), (0, 8)), {}, r"non-empty \[batch, dim\].*\(0, 8\)"),
        (((4, 8), (3, 8)), {}, r"\(4, 8\); got \(3, 8\)"),
        (((4, 8), (4, 8), (4, 8)), {}, r"\[4, k, 8\]; got \(4, 8\)"),
        (((4, 8), (4, 8), (4, 2, 6)), {}, r"\[4, k, 8\]; got \(4, 2, 6\)"),
        (((4, 8), (4, 8)), {"labels": (5,)}, r"labels must be \[batch\] = \(4,\); got \(5,\)"),
        (((4, 8), (4, 8), (4, 2, 8)), {"negative_ids": (4, 3), "positive_ids": (4,)}, r"\(4, 3\); expected \(4, 2\)"),
        (((4, 8), (4, 8), (4, 2, 8)), {"negative_ids": (4, 2)}, r"pass positive_ids too"),
        (((4, 8), (4, 8)), {"queue": (5, 7)}, r"queue must be \[size, 8\]; got \(5, 7\)"),
    ],
)
def test_bad_shapes_name_the_shapes(args: tuple, kwargs: dict, message: str) -> None:
    tensors = [torch.randn(*shape) for shape in args]
    extra = {key: torch.zeros(*shape, dtype=torch.long if "ids" in key or key == "labels" else torch.float)
             for key, shape in kwargs.items()}
    with pytest.raises(ValueError, match=message):
        InfoNCELoss()(*tensors, **extra)


def test_stats_match_direct_formulas() -> None:
    a, p, n, *_ = planted_batch()
    a, p, n = a.float(), p.float(), n.float()
    stats = contrastive_stats(a, p, n)
    sims = [[cosine(a[i], p[j]) for j in range(6)] + [cosine(a[i], x) for x in n.reshape(12, 8)] for i in range(6)]
    negatives = [s for i in range(6) for j, s in enumerate(sims[i]) if j != i]
    assert stats["positive_similarity"] == pytest.approx(sum(sims[i][i] for i in range(6)) / 6, abs=1e-6)
    assert stats["negative_similarity"] == pytest.approx(sum(negatives) / len(negatives), abs=1e-6)
    wins = [any(s > sims[i][i] for j, s in enumerate(sims[i]) if j != i) for i in range(6)]
    assert stats["hard_row_share"] == pytest.approx(sum(wins) / 6)
    unit = [x / x.norm() for x in torch.cat([a, p])]
    alignment = sum(float((unit[i] - unit[6 + i]).norm() ** 2) for i in range(6)) / 6
    assert stats["alignment"] == pytest.approx(alignment, abs=1e-5)
    pairs = [float((unit[i] - unit[j]).norm() ** 2) for i in range(12) for j in range(i + 1, 12)]
    assert stats["uniformity"] == pytest.approx(math.log(sum(math.exp(-2 * d) for d in pairs) / len(pairs)), abs=1e-5)


def test_padded_negatives_are_the_same_as_absent_ones() -> None:
    """Rows with fewer than k negatives: the masked zero padding leaves every softmax, so the loss equals
    the loss with the real negatives given as a shared pool (the queue) and no padding at all."""
    torch.manual_seed(3)
    a, p, n = (torch.randn(shape, dtype=torch.float64) for shape in ((4, 8), (4, 8), (4, 2, 8)))
    mask = torch.tensor([[True, True], [True, False], [False, False], [True, True]])
    loss = InfoNCELoss(temperature=0.05, symmetric=True)
    masked = loss(a, p, n.masked_fill(~mask[..., None], 0.0), negative_mask=mask)
    assert masked.item() == pytest.approx(loss(a, p, queue=n[mask]).item(), rel=1e-12)
    assert masked.item() != pytest.approx(loss(a, p, n).item(), rel=1e-3)
    with pytest.raises(ValueError, match="negative_mask must be"):
        loss(a, p, n, negative_mask=mask[:, :1])
