"""InfoNCE on embeddings: in-batch and hard negatives, a queue, and false negatives kept out of the softmax.

For local anchor i the candidates are every positive and every hard negative of the whole batch
(all processes), optionally every other anchor and a queue of past keys; the score is cosine
similarity over the temperature. Row i's own positive is the target. False negatives are taken out
of the softmax: candidates whose text id equals the row's positive id, candidates more similar than
the positive by `false_negative_margin` (judged by a frozen guide model when given), and, with
labels, same-label positives and anchors become extra targets (multi-positive InfoNCE, SupCon's
L_out: the mean over targets of their log-softmax). `tau_plus` > 0 gives debiased InfoNCE
(Chuang et al. 2020). The loss is sum_i w_i * loss_i / sum_i w_i over the rows of ALL processes,
times the world size on each process, so that DDP's gradient averaging gives the 1-process gradient.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from textcl.errors import TextclError
from textcl.losses.distributed import average_gradient, batch_sizes, gather_rows, world

POSITIVE, NEGATIVE, ANCHOR, QUEUE = range(4)


@dataclass
class Views:
    """Embeddings after gathering: `anchor` `[b, d]` local; `positive`, `anchors` `[M, d]`, `negatives` `[M*k, d]`
    for the `M` rows of all processes (row j's hard negatives at `j*k .. j*k+k-1`); `anchors` only when needed."""

    anchor: Tensor
    positive: Tensor
    negatives: Tensor
    anchors: Tensor | None

    def truncate(self, dim: int) -> Views:
        cut = None if self.anchors is None else self.anchors[:, :dim]
        return Views(self.anchor[:, :dim], self.positive[:, :dim], self.negatives[:, :dim], cut)

    def block(self, kind: int) -> Tensor:
        return {POSITIVE: self.positive, NEGATIVE: self.negatives, ANCHOR: self.anchors}[kind]


@dataclass
class Pool:
    """Everything one loss evaluation needs. Local row i is global row `offset + i`."""

    views: Views
    guide: Views | None
    queue: Tensor | None  # [K, d], no gradient
    offset: int
    k: int
    labels: Tensor | None  # [M]
    positive_ids: Tensor | None  # [M]
    negative_ids: Tensor | None  # [M*k]
    negative_mask: Tensor | None  # [M*k], False where a row has fewer than k negatives (zero padding)
    weights: Tensor  # [b]
    weight_scale: Tensor  # world size / sum of the weights of all processes

    def truncate(self, dim: int) -> Pool:
        queue = None if self.queue is None else self.queue[:, :dim]
        return replace(self, views=self.views.truncate(dim), queue=queue)


class InfoNCELoss(nn.Module):
    """InfoNCE over cosine similarities; see the module docstring for the candidate pool and the masks.

    Args:
        temperature: softmax temperature (initial value when learnable).
        symmetric: also the positive -> anchor direction (candidates: all anchors); the two are averaged.
        anchor_negatives: other anchors are candidates too (never the row's own anchor).
        learnable_temperature: learn log(temperature), clamped to `temperature_range`.
        false_negative_margin: drop candidates whose similarity exceeds the positive's by more than this
            (may be negative); judged by `guide` embeddings when given, else by the model's own (detached).
        tau_plus: class prior of debiased InfoNCE (Chuang et al. 2020); 0 is plain InfoNCE.
        gather_across_processes: under torch.distributed, contrast against the candidates of all processes.
    """

    def __init__(
        self,
        temperature: float = 0.05,
        symmetric: bool = False,
        anchor_negatives: bool = False,
        learnable_temperature: bool = False,
        false_negative_margin: float | None = None,
        tau_plus: float = 0.0,
        gather_across_processes: bool = True,
        temperature_range: tuple[float, float] = (0.01, 1.0),
    ) -> None:
        super().__init__()
        if not temperature > 0:
            raise TextclError(f"temperature must be > 0, got {temperature}")
        if not 0 <= tau_plus < 1:
            raise TextclError(f"tau_plus must be in [0, 1), got {tau_plus}")
        self.symmetric = symmetric
        self.anchor_negatives = anchor_negatives
        self.false_negative_margin = false_negative_margin
        self.tau_plus = tau_plus
        self.gather_across_processes = gather_across_processes
        self.temperature_range = temperature_range
        self.fixed_temperature = temperature
        self.log_temperature = nn.Parameter(torch.tensor(math.log(temperature))) if learnable_temperature else None

    @property
    def temperature(self) -> float:
        if self.log_temperature is None:
            return self.fixed_temperature
        return float(self.log_temperature.detach().exp().clamp(*self.temperature_range))

    def scale(self) -> Tensor | float:
        """1 / temperature; the learnable one is averaged over processes in the backward (see `average_gradient`)."""
        if self.log_temperature is None:
            return 1 / self.fixed_temperature
        return average_gradient(self.log_temperature).exp().clamp(*self.temperature_range).reciprocal()

    def forward(self, anchor: Tensor, positive: Tensor, negatives: Tensor | None = None, **options: object) -> Tensor:
        """Scalar loss of `anchor`, `positive` `[B, d]` and hard `negatives` `[B, k, d]`; `options` as in `prepare`."""
        return self.compute(self.prepare(anchor, positive, negatives, **options))

    def prepare(
        self,
        anchor: Tensor,
        positive: Tensor,
        negatives: Tensor | None = None,
        *,
        labels: Tensor | None = None,
        positive_ids: Tensor | None = None,
        negative_ids: Tensor | None = None,
        negative_mask: Tensor | None = None,
        weights: Tensor | None = None,
        queue: Tensor | None = None,
        guide: Sequence[Tensor | None] | None = None,
    ) -> Pool:
        """Validate the inputs and gather them across processes (once, even for several Matryoshka dims).

        `labels`, `positive_ids`, `weights` `[B]`; `negative_ids` `[B, k]` (int64 text hashes); `negative_mask`
        `[B, k]` bool, False for padding where a row has fewer than k negatives (those leave every softmax);
        `queue` `[K, d]` extra negatives (no gradient); `guide`: a frozen guide model's embeddings of the same texts,
        `(anchor [B, g], positive [B, g], negatives [B, k, g] | None)`, used by `false_negative_margin`.
        Under torch.distributed every process must pass the same options (each one is a collective).
        """
        check_shapes(anchor, positive, negatives, labels, positive_ids, negative_ids, weights, queue, guide)
        if negative_mask is not None and (negatives is None or negative_mask.shape != negatives.shape[:2]):
            raise TextclError(f"negative_mask must be [batch, k] like the negatives; got {tuple(negative_mask.shape)}")
        if guide is not None and self.false_negative_margin is None:
            raise TextclError("guide embeddings are only used with false_negative_margin; set it or drop guide")
        rank, size = world() if self.gather_across_processes else (0, 1)
        sizes = batch_sizes(anchor.shape[0], anchor.device) if size > 1 else [anchor.shape[0]]

        def gather(tensor: Tensor | None) -> Tensor | None:
            return None if tensor is None else gather_rows(tensor, sizes)

        k = 0 if negatives is None else negatives.shape[1]
        need_anchors = self.symmetric or self.anchor_negatives
        views = gather_views(anchor, positive, negatives, need_anchors, gather)
        guide_views = None if guide is None else gather_views(*guide, need_anchors, gather)
        if weights is not None and not (weights >= 0).all():
            raise TextclError("row weights must be >= 0")
        weights = torch.ones_like(anchor[:, 0]) if weights is None else weights.to(anchor.dtype)
        return Pool(
            views=views,
            guide=guide_views,
            queue=None if queue is None else queue.detach(),
            offset=sum(sizes[:rank]),
            k=k,
            labels=gather(labels),
            positive_ids=gather(positive_ids),
            negative_ids=None if negative_ids is None else gather(negative_ids).reshape(-1),
            negative_mask=None if negative_mask is None else gather(negative_mask.to(torch.uint8)).reshape(-1).bool(),
            weights=weights,
            weight_scale=len(sizes) / gather(weights.detach()).sum(),
        )

    def compute(self, pool: Pool) -> Tensor:
        """The scalar loss of a prepared pool (see `prepare`)."""
        scale = self.scale()
        views, guide = pool.views, pool.guide
        kinds = [POSITIVE, NEGATIVE, ANCHOR] if self.anchor_negatives else [POSITIVE, NEGATIVE]
        blocks = [(views.block(kind), kind) for kind in kinds]
        if pool.queue is not None:
            blocks.append((pool.queue, QUEUE))
        guided = None if guide is None else (guide.anchor, torch.cat([guide.block(kind) for kind in kinds]))
        per_row = self.direction(pool, views.anchor, blocks, scale, self_kind=ANCHOR, guide=guided)
        if self.symmetric:
            own = pool.offset + torch.arange(views.anchor.shape[0], device=views.anchor.device)
            backward = self.direction(
                pool, views.positive[own], [(views.anchors, ANCHOR)], scale, self_kind=None,
                guide=None if guide is None else (guide.positive[own], guide.anchors),
            )
            per_row = (per_row + backward) / 2
        return (pool.weights * per_row).sum() * pool.weight_scale

    def direction(
        self,
        pool: Pool,
        query: Tensor,
        blocks: list[tuple[Tensor, int]],
        scale: Tensor | float,
        self_kind: int | None,
        guide: tuple[Tensor, Tensor] | None,
    ) -> Tensor:
        """Per-row losses `[b]` of local `query` `[b, d]` against candidate `blocks` of the given kinds.

        The target is the first block's row `offset + i`; a block of `self_kind` loses that row.
        """
        b, device = query.shape[0], query.device
        own = (pool.offset + torch.arange(b, device=device))[:, None]
        candidates = torch.cat([block for block, _ in blocks])
        sim = cosine(query, candidates)
        kind, owner, ids = candidate_table(pool, blocks)
        same_row = owner[None, :] == own
        is_self = same_row & (kind == self_kind)[None, :] if self_kind is not None else torch.zeros_like(same_row)
        positive = same_row & (kind == blocks[0][1])[None, :]
        if pool.labels is not None:
            labeled = (kind == POSITIVE) | (kind == ANCHOR)
            same_label = pool.labels[owner.clamp(min=0)][None, :] == pool.labels[own]
            positive = positive | same_label & labeled[None, :] & ~is_self
        exclude = is_self
        if pool.negative_mask is not None and (kind == NEGATIVE).any():
            padding = torch.zeros_like(kind, dtype=torch.bool)
            padding[kind == NEGATIVE] = ~pool.negative_mask
            exclude = exclude | padding[None, :]
        if pool.positive_ids is not None:
            has_id = (kind != QUEUE) & ((kind != NEGATIVE) | (pool.negative_ids is not None))
            exclude = exclude | (ids[None, :] == pool.positive_ids[own]) & has_id[None, :] & ~positive
        if self.false_negative_margin is not None:
            excess = sim.detach() - sim.detach().gather(1, own)
            if guide is not None:  # the queue has no guide embeddings: it stays judged by the model itself
                guided = cosine(*guide)
                excess = torch.cat([guided - guided.gather(1, own), excess[:, guided.shape[1] :]], dim=1)
            exclude = exclude | (excess > self.false_negative_margin) & ~positive
        return contrastive_nll(sim * scale, positive, exclude, scale, self.tau_plus)


def gather_views(anchor: Tensor, positive: Tensor, negatives: Tensor | None, need_anchors: bool, gather) -> Views:
    """Views of one embedding set, gathered with gradients; negatives `[B, k, d]` flattened to `[M*k, d]`."""
    dim = anchor.shape[-1]
    flat = anchor.new_zeros(0, dim) if negatives is None else gather(negatives).reshape(-1, dim)
    return Views(anchor, gather(positive), flat, gather(anchor) if need_anchors else None)


def cosine(x: Tensor, y: Tensor) -> Tensor:
    """Cosine similarities `[n, m]` of `x` `[n, d]` and `y` `[m, d]`, in float32 or wider even under autocast
    (bf16 similarities over a temperature of 0.05 would be off by about 0.1 in the logits)."""
    dtype = torch.promote_types(torch.promote_types(x.dtype, y.dtype), torch.float32)
    with torch.autocast(x.device.type, enabled=False):
        return F.normalize(x.to(dtype), dim=-1) @ F.normalize(y.to(dtype), dim=-1).T


def candidate_table(pool: Pool, blocks: list[tuple[Tensor, int]]) -> tuple[Tensor, Tensor, Tensor]:
    """Per candidate column: its kind, its global row (-1 for the queue) and its text id (0 when none)."""
    kinds, owners, ids = [], [], []
    for block, kind in blocks:
        device, n = block.device, block.shape[0]
        rows = torch.arange(n, device=device)
        owner = {NEGATIVE: rows // max(pool.k, 1), QUEUE: torch.full_like(rows, -1)}.get(kind, rows)
        if kind == NEGATIVE and pool.negative_ids is not None:
            text_ids = pool.negative_ids
        elif kind in (POSITIVE, ANCHOR) and pool.positive_ids is not None:
            text_ids = pool.positive_ids
        else:
            text_ids = torch.zeros_like(rows)
        kinds.append(torch.full_like(rows, kind))
        owners.append(owner)
        ids.append(text_ids)
    return torch.cat(kinds), torch.cat(owners), torch.cat(ids)


def contrastive_nll(
    logits: Tensor, positive: Tensor, exclude: Tensor, scale: Tensor | float, tau_plus: float
) -> Tensor:
    """Per-row multi-positive InfoNCE `[b]` from `logits` `[b, C]` and boolean masks `[b, C]`.

    Excluded columns leave the softmax; positives never are excluded. Debiased (Chuang et al. 2020):
    the negatives' sum becomes max((sum_neg - tau_plus * n_neg * mean_pos) / (1 - tau_plus), n_neg * e^(-scale)),
    computed shifted by each row's largest logit so that small temperatures do not overflow.
    """
    keep = positive | ~exclude
    n_positive = positive.sum(1)
    mean_positive = torch.where(positive, logits, 0).sum(1) / n_positive
    masked = logits.masked_fill(~keep, float("-inf"))
    if tau_plus == 0:
        return torch.logsumexp(masked, dim=1) - mean_positive
    negative = keep & ~positive
    shift = masked.max(dim=1).values.detach()
    scores = (masked - shift[:, None]).exp()
    positive_sum = torch.where(positive, scores, 0).sum(1)
    negative_sum = torch.where(negative, scores, 0).sum(1)
    n_negative = negative.sum(1)
    estimate = (negative_sum - tau_plus * n_negative * positive_sum / n_positive) / (1 - tau_plus)
    floor = n_negative * torch.exp(-scale - shift)
    total = (positive_sum + torch.maximum(estimate, floor)).clamp_min(torch.finfo(logits.dtype).tiny)
    return total.log() + shift - mean_positive


def check_shapes(
    anchor: Tensor,
    positive: Tensor,
    negatives: Tensor | None,
    labels: Tensor | None,
    positive_ids: Tensor | None,
    negative_ids: Tensor | None,
    weights: Tensor | None,
    queue: Tensor | None,
    guide: Sequence[Tensor | None] | None,
) -> None:
    """Raise TextclError naming the shapes when the inputs do not fit together."""
    shape = tuple(anchor.shape)
    if anchor.ndim != 2 or shape[0] == 0 or shape[1] == 0:
        raise TextclError(f"anchor must be a non-empty [batch, dim] tensor; got shape {shape}")
    if tuple(positive.shape) != shape:
        raise TextclError(f"positive must have the anchor's shape {shape}; got {tuple(positive.shape)}")
    if negatives is not None and (negatives.ndim != 3 or negatives.shape[::2] != anchor.shape):
        expected = f"[batch, k, dim] = [{shape[0]}, k, {shape[1]}]"
        raise TextclError(f"negatives must be {expected}; got {tuple(negatives.shape)}")
    for name, tensor in (("labels", labels), ("positive_ids", positive_ids), ("weights", weights)):
        if tensor is not None and tuple(tensor.shape) != shape[:1]:
            raise TextclError(f"{name} must be [batch] = ({shape[0]},); got {tuple(tensor.shape)}")
    if negative_ids is not None and positive_ids is None:
        raise TextclError("negative_ids are compared with the rows' positive_ids; pass positive_ids too")
    if negative_ids is not None and (negatives is None or negative_ids.shape != negatives.shape[:2]):
        expected = "no negatives were given" if negatives is None else f"expected {tuple(negatives.shape[:2])}"
        raise TextclError(f"negative_ids has shape {tuple(negative_ids.shape)}; {expected}")
    if queue is not None and (queue.ndim != 2 or queue.shape[1] != shape[1]):
        raise TextclError(f"queue must be [size, {shape[1]}]; got {tuple(queue.shape)}")
    if guide is not None:
        if len(guide) != 3 or guide[0] is None or guide[1] is None:
            raise TextclError("guide must be (anchor, positive, negatives or None) guide-model embeddings")
        g_anchor, g_positive, g_negatives = guide
        g_shape = (shape[0], g_anchor.shape[-1])
        bad = tuple(g_anchor.shape) != g_shape or tuple(g_positive.shape) != g_shape
        bad = bad or (g_negatives is None) != (negatives is None)
        bad = bad or (g_negatives is not None and tuple(g_negatives.shape) != (*negatives.shape[:2], g_shape[1]))
        if bad:
            shapes = [None if t is None else tuple(t.shape) for t in guide]
            raise TextclError(f"guide embeddings {shapes} do not match the batch {shape} and negatives")
