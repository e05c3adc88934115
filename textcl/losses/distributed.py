"""The only place textcl calls `torch.distributed`: gathering rows across processes with gradients, and
agreeing on a few integers (`max_over_processes`).

Gradient semantics (why N processes x batch B equals 1 process x batch N*B): process r computes
`loss_r` from its local anchors against the candidates of every process. The single-process loss is
the mean `L = (1/N) sum_r loss_r`. The backward of `torch.distributed.nn.functional.all_gather` is a
reduce-scatter SUM, so process r's local embeddings receive `sum_r' d loss_r' / d emb_r`; DDP then
AVERAGES parameter gradients over processes, giving `(1/N) sum_r' d loss_r' / d theta = dL/d theta`.
A gather whose backward keeps only the local slice would drop the cross-process terms and be wrong.
Parameters outside the DDP-wrapped model (the learnable temperature) go through `average_gradient`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.nn.functional import all_gather


def world() -> tuple[int, int]:
    """`(rank, world_size)`; `(0, 1)` when torch.distributed is not initialized."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def batch_sizes(size: int, device: torch.device) -> list[int]:
    """Every process's local batch size (one tiny all_gather); `[size]` when not distributed."""
    if world()[1] == 1:
        return [size]
    local = torch.tensor([size], device=device)
    sizes = [torch.zeros_like(local) for _ in range(world()[1])]
    dist.all_gather(sizes, local)
    return [int(s.item()) for s in sizes]


def max_over_processes(values: list[int], device: torch.device) -> list[int]:
    """The element-wise maximum of `values` over all processes (one tiny all_reduce); `values` when not distributed.

    Every process must call it at the same point with a list of the same length. It is how processes agree on
    work whose amount depends on their local data (e.g. how many forwards a step makes) before doing it.
    """
    if world()[1] == 1:
        return list(values)
    local = torch.tensor(values, dtype=torch.long, device=device)
    dist.all_reduce(local, op=dist.ReduceOp.MAX)
    return [int(value) for value in local.tolist()]


def gather_rows(tensor: Tensor, sizes: list[int]) -> Tensor:
    """Concatenate every process's `tensor` `[sizes[r], ...]` into `[sum(sizes), ...]`, in rank order.

    Tensors that require grad keep it: the backward sums the gradients of all processes into the
    owner's rows (reduce-scatter). Batches of unequal size are padded to the largest, then trimmed.
    Whether `tensor` requires grad must be the same on every process: that backward is a collective too.
    """
    if len(sizes) == 1:
        return tensor
    longest = max(sizes)
    if tensor.shape[0] < longest:
        tensor = torch.cat([tensor, tensor.new_zeros(longest - tensor.shape[0], *tensor.shape[1:])])
    if tensor.requires_grad:
        parts = list(all_gather(tensor.contiguous()))
    else:
        parts = [torch.empty_like(tensor) for _ in sizes]
        dist.all_gather(parts, tensor.contiguous())
    return torch.cat([part[:size] for part, size in zip(parts, sizes)])


class _AverageGradient(torch.autograd.Function):
    """Identity forward; backward averages the gradient over processes (what DDP does for its parameters)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, tensor: Tensor) -> Tensor:
        return tensor.clone()

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad / world()[1]


def average_gradient(tensor: Tensor) -> Tensor:
    """`tensor` unchanged, but its gradient is averaged over processes; a no-op when not distributed.

    Use it for parameters that live outside the DDP-wrapped model. Averaging is idempotent, so a
    parameter that DDP also averages still ends up with the correct gradient.
    """
    if world()[1] == 1 or not tensor.requires_grad:
        return tensor
    return _AverageGradient.apply(tensor)
