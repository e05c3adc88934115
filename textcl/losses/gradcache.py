"""GradCache (Gao et al. 2021): exact full-batch contrastive gradients with the activation memory of one chunk.

1. Embed every chunk of every group without a graph, saving the RNG state (CPU and current CUDA
   device) before each chunk.
2. Compute the loss on the full-batch embeddings (detached leaves) and backpropagate it to them: their
   `.grad` is the cache. Any cross-process gathering happens inside the loss, so it composes.
3. Re-embed each chunk with a graph under its saved RNG state, so dropout draws the same masks as in
   step 1 (SimCSE's positives are the dropout noise), and backpropagate the cached gradients through it.

`torch.utils.checkpoint` does not fit here: it recomputes inside one backward of one graph, while the
point of GradCache is that the full-batch graph never exists. So the two passes are written by hand.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor

from textcl.errors import TextclError


@dataclass
class RngState:
    """The CPU RNG state and, when CUDA is in use, the current CUDA device's, taken before one chunk's forward."""

    cpu: Tensor
    cuda: Tensor | None = None
    cuda_device: int | None = None

    @classmethod
    def capture(cls) -> RngState:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            device = torch.cuda.current_device()
            return cls(torch.get_rng_state(), torch.cuda.get_rng_state(device), device)
        return cls(torch.get_rng_state())

    @contextmanager
    def replay(self) -> Iterator[None]:
        """Run the block from this state, then put the RNG back where it was."""
        devices = [] if self.cuda_device is None else [self.cuda_device]
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.cuda_device)
            yield


def rows(batch: dict[str, Tensor]) -> int:
    """Number of rows of a tokenized batch (0 for an empty dict)."""
    return len(next(iter(batch.values()))) if batch else 0


def split_batch(batch: dict[str, Tensor], chunk_size: int) -> list[dict[str, Tensor]]:
    """Cut a tokenized batch `[n, seq]` into chunks of `chunk_size` rows, each trimmed of the padding
    columns that are padding in all of its rows (right padding), so short chunks are embedded narrow."""
    size = rows(batch)
    chunks = []
    for start in range(0, size, chunk_size):
        chunk = {key: value[start : start + chunk_size] for key, value in batch.items()}
        mask = chunk.get("attention_mask")
        if mask is not None and mask.ndim == 2 and mask.any():
            width = mask.shape[1]
            used = int(mask.any(dim=0).nonzero().max()) + 1
            chunk = {key: value[:, :used] if value.ndim >= 2 and value.shape[1] == width else value
                     for key, value in chunk.items()}
        chunks.append(chunk)
    return chunks


def gradcache_backward(
    embed: Callable[..., Tensor],
    groups: list[dict[str, Tensor]],
    loss_fn: Callable[[list[Tensor]], Tensor],
    chunk_size: int,
    backward: Callable[[Tensor], None] | None = None,
    no_sync: Callable[[], AbstractContextManager] | None = None,
    padding: Sequence[dict[str, Tensor]] = (),
) -> Tensor:
    """Accumulate into the parameters' `.grad` the gradient of `loss_fn` over whole `groups`; return the loss, detached.

    Args:
        embed: the model (DDP-wrapped or not), called as `embed(**chunk)` -> embeddings `[rows, dim]`.
        groups: tokenized batches, e.g. anchors `[B, seq]`, positives `[B, seq]`, negatives `[B*k, seq]`.
        loss_fn: the list of full group embeddings (`[rows_g, dim]` each) -> scalar loss.
        chunk_size: rows per forward; peak activation memory is that of one chunk.
        backward: applied once, to the loss (e.g. `accelerator.backward`); its scaling (gradient
            accumulation, fp16 loss scale) then reaches every parameter through the cached gradients.
        no_sync: context that skips DDP's gradient all-reduce (e.g. `lambda: accelerator.no_sync(model)`);
            used for all chunks but the last, whose backward then all-reduces the accumulated gradients.
        padding: extra chunks embedded in both passes after the groups' own; their outputs enter no loss and
            their backward carries zero gradients. Under DDP, FSDP or ZeRO-3 every forward is a collective, so
            every process must make as many as the others: processes with fewer chunks pass the difference here.
    """
    if chunk_size < 1:
        raise TextclError(f"chunk_size must be >= 1, got {chunk_size}")
    if not groups or min(rows(group) for group in groups) == 0:
        raise TextclError(f"GradCache needs non-empty groups; got rows {[rows(group) for group in groups]}")
    chunked = [split_batch(group, chunk_size) for group in groups]
    states, outputs = [], []
    with torch.no_grad():
        for chunks in [*chunked, list(padding)]:
            group_states, group_outputs = [], []
            for chunk in chunks:
                group_states.append(RngState.capture())
                group_outputs.append(embed(**chunk))
            states.append(group_states)
            outputs.append(group_outputs)
    padding_states, padding_outputs = states.pop(), outputs.pop()
    embeddings = [torch.cat(parts).requires_grad_() for parts in outputs]
    with torch.enable_grad():
        loss = loss_fn(embeddings)
    (backward or Tensor.backward)(loss)
    unused = [index for index, group in enumerate(embeddings) if group.grad is None]
    if unused:
        raise TextclError(f"loss_fn did not use the embeddings of group(s) {unused}; pass only the groups it uses")
    jobs = []
    for chunks, group_states, parts, group in zip(chunked, states, outputs, embeddings):
        grads = group.grad.split([len(part) for part in parts])
        jobs.extend(zip(chunks, group_states, grads))
    jobs.extend(zip(padding, padding_states, map(torch.zeros_like, padding_outputs)))
    for index, (chunk, state, grad) in enumerate(jobs):
        sync = nullcontext() if no_sync is None or index == len(jobs) - 1 else no_sync()
        with sync, state.replay(), torch.enable_grad():
            torch.autograd.backward(embed(**chunk), grad)
    return loss.detach()
