"""MoCo-style negatives beyond the batch: a momentum (EMA) copy of the encoder makes keys, a FIFO queue keeps them.

Per step (as in MoCo and ESimCSE): keys = momentum_encoder(**batch); loss(..., queue=queue.negatives);
optimizer step; momentum_encoder.update(encoder); queue.enqueue(keys). Both are `nn.Module`s, so their
`state_dict()` goes into checkpoints and `.to(device)` moves them.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from textcl.errors import TextclError
from textcl.losses.distributed import batch_sizes, gather_rows


class MomentumEncoder(nn.Module):
    """A frozen copy of `encoder` whose parameters follow `momentum * key + (1 - momentum) * online` on `update`."""

    def __init__(self, encoder: nn.Module, momentum: float = 0.999) -> None:
        super().__init__()
        if not 0 <= momentum <= 1:
            raise TextclError(f"momentum must be in [0, 1], got {momentum}")
        self.average = AveragedModel(encoder, multi_avg_fn=get_ema_multi_avg_fn(momentum))
        self.average.update_parameters(encoder)  # the first update copies: keys start equal to the online encoder
        self.average.requires_grad_(False)

    @torch.no_grad()
    def forward(self, **batch: Tensor) -> Tensor:
        """Tokenized batch `[B, seq]` -> keys `[B, dim]`, without gradient."""
        return self.average.module(**batch)

    @torch.no_grad()
    def copy_from(self, encoder: nn.Module) -> None:
        """Make the keys' encoder equal to `encoder` (unwrapped), e.g. once DDP has broadcast rank 0's weights:
        heads initialised fresh (a Dense layer, an MLP head, LoRA) start different on every process until then."""
        self.average.module.load_state_dict(encoder.state_dict())

    def update(self, encoder: nn.Module) -> None:
        """One EMA step towards the online `encoder` (unwrap DDP first: pass the bare Encoder)."""
        self.average.update_parameters(encoder)


class NegativeQueue(nn.Module):
    """FIFO of the last `size` keys `[size, dim]`; `negatives` holds the filled part (oldest overwritten first)."""

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        if size < 1 or dim < 1:
            raise TextclError(f"queue size and dim must be >= 1, got size {size} and dim {dim}")
        self.register_buffer("keys", torch.zeros(size, dim))
        self.register_buffer("position", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))

    @property
    def negatives(self) -> Tensor:
        """The queued keys `[min(filled, size), dim]`, detached."""
        return self.keys[: int(self.filled)]

    @torch.no_grad()
    def enqueue(self, keys: Tensor, gather: bool = True) -> None:
        """Add `keys` `[n, dim]`; with `gather`, those of all processes (rank order), so queues stay identical."""
        size, dim = self.keys.shape
        if keys.ndim != 2 or keys.shape[1] != dim:
            raise TextclError(f"queue keys must be [n, {dim}]; got {tuple(keys.shape)}")
        if gather:
            keys = gather_rows(keys, batch_sizes(keys.shape[0], keys.device))
        keys = keys.detach()[-size:].to(self.keys.dtype)
        slots = (int(self.position) + torch.arange(len(keys), device=self.keys.device)) % size
        self.keys[slots] = keys
        self.position.fill_((int(self.position) + len(keys)) % size)
        self.filled.fill_(min(int(self.filled) + len(keys), size))
