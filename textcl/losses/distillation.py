"""Distillation losses: a student learns a teacher's judgement of each row's candidates, or its vectors.

A row's candidates are its positive (column 0) and its k hard negatives; the teacher's scores `[B, 1 + k]`
come with the data (`textcl score`, `textcl mine --teacher`). Student scores are cosine similarities.

- `KLDistillationLoss`: KL(teacher || student) between the softmaxes of both score rows at `temperature`
  (Hinton et al. 2015; FlagEmbedding's `kd_loss`, sentence-transformers' `DistillKLDivLoss`), times the
  temperature squared so gradients keep their size across temperatures. Softer targets than one-hot
  InfoNCE where mined negatives are partly false.
- `MarginMSELoss`: mean squared error between the student's and the teacher's margins
  score(positive) - score(negative_j) (Hofstätter et al. 2020).
- `EmbeddingMSELoss`: mean squared error between student and teacher embeddings of the same texts (Reimers &
  Gurevych 2020), for students whose output width equals the teacher's (or is projected to it by a Dense layer).

Each is a mean over the rows (or pairs, or values) of ALL processes, times the world size on each process,
so that DDP's gradient averaging gives the single-process gradient (as `InfoNCELoss` does).
`DistilledLoss` adds one of them, weighted, to a contrastive loss (the `distill_*` settings of a run).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from textcl.errors import TextclError
from textcl.losses.distributed import batch_sizes, gather_rows, world


def candidate_scores(anchor: Tensor, positive: Tensor, negatives: Tensor | None) -> Tensor:
    """Cosine similarity of each anchor `[B, d]` to its positive `[B, d]` and its negatives `[B, k, d]` ->
    `[B, 1 + k]` (float32 or wider, also under autocast)."""
    candidates = positive[:, None] if negatives is None else torch.cat([positive[:, None], negatives], dim=1)
    dtype = torch.promote_types(anchor.dtype, torch.float32)
    with torch.autocast(anchor.device.type, enabled=False):
        a = F.normalize(anchor.to(dtype), dim=-1)
        c = F.normalize(candidates.to(dtype), dim=-1)
        return torch.einsum("bd,bcd->bc", a, c)


def candidate_mask(teacher_scores: Tensor, negative_mask: Tensor | None) -> Tensor:
    """`[B, 1 + k]` bool: the positive and every real negative (`negative_mask` `[B, k]`, False for padding)."""
    mask = torch.ones_like(teacher_scores, dtype=torch.bool)
    if negative_mask is not None:
        mask[:, 1:] = negative_mask
    return mask


def global_mean(values: Tensor, counts: Tensor) -> Tensor:
    """sum(values) / (sum of `counts` over all processes) * world size: the mean over every process's items,
    in the form DDP's gradient averaging turns into the single-process gradient. `counts` `[B]`, local."""
    size = world()[1]
    total = gather_rows(counts.detach(), batch_sizes(counts.shape[0], counts.device)).sum() if size > 1 else counts.sum()
    return values.sum() * size / total.clamp_min(1)


def check_scores(anchor: Tensor, negatives: Tensor | None, teacher_scores: Tensor) -> None:
    k = 0 if negatives is None else negatives.shape[1]
    if teacher_scores.shape != (anchor.shape[0], 1 + k):
        raise TextclError(
            f"teacher scores must be [batch, 1 + negatives] = [{anchor.shape[0]}, {1 + k}] (the positive's, then each "
            f"negative's); got {tuple(teacher_scores.shape)}"
        )


class KLDistillationLoss(nn.Module):
    """KL(softmax(teacher / T) || softmax(student / T)) over each row's candidates, times T^2; rows without a
    real negative have a one-candidate softmax and add nothing (they are not counted)."""

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        if not temperature > 0:
            raise TextclError(f"distill_temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def forward(
        self,
        anchor: Tensor,
        positive: Tensor,
        negatives: Tensor | None,
        teacher_scores: Tensor,
        negative_mask: Tensor | None = None,
    ) -> Tensor:
        """Scalar loss of `anchor`, `positive` `[B, d]`, `negatives` `[B, k, d]` and `teacher_scores` `[B, 1 + k]`."""
        check_scores(anchor, negatives, teacher_scores)
        mask = candidate_mask(teacher_scores, negative_mask)
        student = (candidate_scores(anchor, positive, negatives) / self.temperature).masked_fill(~mask, float("-inf"))
        teacher = (teacher_scores.detach().to(student.dtype) / self.temperature).masked_fill(~mask, float("-inf"))
        target = torch.softmax(teacher, dim=1)
        terms = target * (torch.log_softmax(teacher, dim=1) - torch.log_softmax(student, dim=1))
        per_row = torch.where(mask, terms, 0).sum(dim=1)
        counted = (mask.sum(dim=1) > 1).to(per_row.dtype)
        return global_mean(per_row * counted, counted) * self.temperature**2


class MarginMSELoss(nn.Module):
    """Mean over (row, negative) pairs of (student margin - teacher margin)^2, margin = score(positive) -
    score(negative_j); padded negatives are left out."""

    def forward(
        self,
        anchor: Tensor,
        positive: Tensor,
        negatives: Tensor | None,
        teacher_scores: Tensor,
        negative_mask: Tensor | None = None,
    ) -> Tensor:
        """Scalar loss; arguments as in `KLDistillationLoss.forward`."""
        check_scores(anchor, negatives, teacher_scores)
        if negatives is None:
            raise TextclError("MarginMSE needs hard negatives: a margin is score(positive) - score(negative)")
        student = candidate_scores(anchor, positive, negatives)
        teacher = teacher_scores.detach().to(student.dtype)
        errors = ((student[:, :1] - student[:, 1:]) - (teacher[:, :1] - teacher[:, 1:])).pow(2)
        mask = candidate_mask(teacher_scores, negative_mask)[:, 1:]
        return global_mean(torch.where(mask, errors, 0).sum(dim=1), mask.sum(dim=1).to(errors.dtype))


class EmbeddingMSELoss(nn.Module):
    """Mean squared error between student embeddings `[N, d]` and the teacher's embeddings of the same texts."""

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        """Scalar loss of `student` and `teacher` `[N, d]` (the mean over every value of every process)."""
        if student.shape != teacher.shape:
            raise TextclError(
                f"the student gives {student.shape[-1]}-dimensional embeddings but the teacher "
                f"{teacher.shape[-1]}-dimensional ones; set dense_dim: {teacher.shape[-1]} to project the student"
            )
        dtype = torch.promote_types(student.dtype, torch.float32)
        errors = (student.to(dtype) - teacher.detach().to(dtype)).pow(2).sum(dim=1)
        return global_mean(errors, torch.full_like(errors, student.shape[1]))


DISTILLATION_LOSSES = {"kl": KLDistillationLoss, "margin_mse": MarginMSELoss, "mse": EmbeddingMSELoss}


def real_rows(anchor: Tensor, positive: Tensor, negatives: Tensor | None, negative_mask: Tensor | None) -> Tensor:
    """Every text's embedding of a batch: anchors, positives, then the real (unpadded) negatives, `[N, d]`."""
    parts = [anchor, positive]
    if negatives is not None:
        parts.append(negatives.flatten(0, 1) if negative_mask is None else negatives[negative_mask])
    return torch.cat(parts)


class DistilledLoss(nn.Module):
    """`contrastive(...) + weight * distillation(...)`: InfoNCE (or any loss with its signature) plus one of the
    losses above. `teacher_scores` `[B, 1 + k]` feed `kl` and `margin_mse`; `teacher_embeddings` (the teacher's
    anchor `[B, d]`, positive `[B, d]` and negatives `[B, k, d]` or None) feed `mse`, which compares every real
    text of the batch. `parts` keeps the last call's two terms (detached) for logging."""

    def __init__(self, contrastive: nn.Module, distillation: nn.Module, weight: float = 1.0) -> None:
        super().__init__()
        self.contrastive, self.distillation, self.weight = contrastive, distillation, weight
        self.parts: dict[str, Tensor] = {}

    def forward(
        self,
        anchor: Tensor,
        positive: Tensor,
        negatives: Tensor | None = None,
        *,
        teacher_scores: Tensor | None = None,
        teacher_embeddings: tuple[Tensor, Tensor, Tensor | None] | None = None,
        negative_mask: Tensor | None = None,
        **options: object,
    ) -> Tensor:
        """Scalar loss; `options` go to the contrastive loss."""
        contrastive = self.contrastive(anchor, positive, negatives, negative_mask=negative_mask, **options)
        if isinstance(self.distillation, EmbeddingMSELoss):
            if teacher_embeddings is None:
                raise TextclError("distill_loss mse needs the teacher's embeddings of the batch (teacher_model)")
            distilled = self.distillation(real_rows(anchor, positive, negatives, negative_mask),
                                          real_rows(*teacher_embeddings, negative_mask))
        else:
            if teacher_scores is None:
                raise TextclError("distill_loss kl and margin_mse need teacher scores in the data (`textcl score`)")
            distilled = self.distillation(anchor, positive, negatives, teacher_scores, negative_mask)
        self.parts = {"contrastive_loss": contrastive.detach(), "distill_loss": distilled.detach()}
        return contrastive + self.weight * distilled
