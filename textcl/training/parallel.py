"""The process group of a multi-process run: its timeout, failures as one line, and sharded models (FSDP, ZeRO-3).

- `ddp_timeout` bounds every collective (gloo and NCCL alike): when a process dies or stalls, the others
  stop within that time, and `collective_failures` turns the error into one line naming the process and
  the step instead of a stack trace from inside torch.
- accelerate runs an FSDP launch config on CPU as plain DDP, without a word (its FSDP switch lists GPU-like
  devices only), and ignores a DeepSpeed config there. torch's FSDP does shard on CPU over gloo, so
  `apply_launch_config` keeps FSDP on CPU (runs and tests then exercise FSDP itself), and refuses DeepSpeed
  on CPU with a one-line error, as it does what a sharded run cannot do (a momentum encoder, ...).
- Under FSDP or DeepSpeed ZeRO-3 no process holds all the weights: `full_encoder` gathers them for saving,
  `evaluation_encoder` for evaluation.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, InitProcessGroupKwargs
from torch import nn
from torch.utils.data import DataLoader

from textcl.errors import TextclError
from textcl.losses.distributed import world
from textcl.model.encoder import Encoder
from textcl.training.plan import Launch


def process_group_kwargs(ddp_timeout: int) -> list[Any]:
    """accelerate's kwargs handlers that give the process group a timeout of `ddp_timeout` seconds."""
    return [InitProcessGroupKwargs(timeout=timedelta(seconds=ddp_timeout))]


def launch_asks_for(name: str) -> bool:
    """Whether `accelerate launch` was given a config using `name` ("FSDP" or "DEEPSPEED")."""
    return os.environ.get(f"ACCELERATE_USE_{name}", "false").lower() == "true"


def apply_launch_config(accelerator: Accelerator, per_device_train_batch_size: int) -> Launch:
    """Make an FSDP launch config give FSDP on CPU too (see the module docstring), refuse DeepSpeed on CPU, give
    DeepSpeed the batch size; returns the launch for the plan's checks (`textcl.training.plan.check_launch`)."""
    if accelerator.distributed_type == DistributedType.MULTI_CPU and launch_asks_for("DEEPSPEED"):
        raise TextclError("DeepSpeed needs GPUs: accelerate would silently run this DeepSpeed config as plain DDP on "
                          "CPU; launch with recipes/accelerate/ddp.yaml or fsdp.yaml instead")
    if accelerator.distributed_type == DistributedType.MULTI_CPU and launch_asks_for("FSDP"):
        state = accelerator.state
        state.distributed_type = DistributedType.FSDP
        state.fsdp_plugin = FullyShardedDataParallelPlugin()  # read from the launch's FSDP_* environment
        if accelerator.mixed_precision != "no":
            state.fsdp_plugin.set_mixed_precision(accelerator.mixed_precision)
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    if deepspeed:  # the model is prepared without the data, whose batches have no fixed size anyway
        plugin = accelerator.state.deepspeed_plugin
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = per_device_train_batch_size
    return Launch(num_processes=accelerator.num_processes, device_type=accelerator.device.type,
                  gradient_accumulation_steps=accelerator.gradient_accumulation_steps, deepspeed=deepspeed,
                  shards_parameters=shards_parameters(accelerator))


class WholeBatches:
    """The batches of a batch sampler, without its `batch_size` (see `shard_batches`)."""

    def __init__(self, batches: Any) -> None:
        self.batches = batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)

    def set_epoch(self, epoch: int) -> None:
        self.batches.set_epoch(epoch)


def shard_batches(accelerator: Accelerator, loader: DataLoader) -> DataLoader:
    """accelerate's loader for `loader`: each process gets whole batches of its batch sampler in turn, whatever
    their sizes; the last round of an epoch is completed with whole batches from its start.

    accelerate takes a batch sampler with a `batch_size` to yield full batches but the last: a batch that
    closes early (a clash of duplicate texts, the end of a source with `batch_per_source`) made it drop that
    round's batches without a word, and it filled the short last batch with rows of the first. Without the
    attribute it treats batches as having any size. With equal numbers of batches, every process runs the same
    number of steps; 2 processes x B then see exactly the rows of 1 process x 2B.
    """
    whole = DataLoader(loader.dataset, batch_sampler=WholeBatches(loader.batch_sampler), collate_fn=loader.collate_fn,
                       num_workers=loader.num_workers, generator=loader.generator)
    return accelerator.prepare(whole)


def shards_parameters(accelerator: Accelerator) -> bool:
    """True under FSDP and DeepSpeed ZeRO-3: each process holds only a shard of the weights."""
    if accelerator.distributed_type == DistributedType.FSDP:
        return True
    plugin = accelerator.state.deepspeed_plugin if accelerator.distributed_type == DistributedType.DEEPSPEED else None
    return plugin is not None and plugin.zero_stage == 3


def full_encoder(accelerator: Accelerator, model: nn.Module, rebuild: Callable[[], Encoder]) -> Encoder | None:
    """The trained encoder with all its weights on the main process, None on the others.

    Every process must call it: with sharded weights it gathers them (accelerate's full state dict, on the
    main process) and loads them into a fresh copy from `rebuild()` (same architecture: heads, LoRA).
    """
    if not shards_parameters(accelerator):
        return accelerator.unwrap_model(model) if accelerator.is_main_process else None
    state = accelerator.get_state_dict(model)
    if not accelerator.is_main_process:
        return None
    encoder = rebuild()
    encoder.load_state_dict(state)
    return encoder


def evaluation_encoder(accelerator: Accelerator, model: nn.Module, rebuild: Callable[[], Encoder]) -> Encoder:
    """The encoder to evaluate on every process: the trained one, or under FSDP a full copy of it.

    A sharded model gathers its weights in every forward, a collective, but evaluation encodes uneven shards of
    a corpus on each process: every process gets all the weights once instead (one full copy while evaluating).
    """
    if not shards_parameters(accelerator):
        return accelerator.unwrap_model(model)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict  # FSDP runs only

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    encoder = rebuild().to(accelerator.device)
    encoder.load_state_dict(state)
    return encoder


def any_process(accelerator: Accelerator, flag: bool) -> bool:
    """True on every process when `flag` is True on any (all processes must take the same branch)."""
    if accelerator.num_processes == 1:
        return flag
    return bool(accelerator.reduce(torch.tensor(float(flag), device=accelerator.device), reduction="sum") > 0)


def is_collective_failure(error: BaseException) -> bool:
    """A failed or timed-out collective: torch's DistError (NCCL and newer backends) or a gloo transport error."""
    return isinstance(error, dist.DistError) or (isinstance(error, RuntimeError) and "gloo" in str(error))


@contextmanager
def collective_failures(step: Callable[[], int], ddp_timeout: int) -> Iterator[None]:
    """Turn a collective that failed (another process died) or timed out (one stalled for `ddp_timeout` s) into
    one TextclError line naming this process and `step()`, the step it was in."""
    try:
        yield
    except Exception as error:
        rank, size = world()
        if size == 1 or not is_collective_failure(error):
            raise
        raise TextclError(
            f"process {rank} of {size} stopped at step {step()}: a collective failed or waited longer than "
            f"ddp_timeout={ddp_timeout}s, so another process died or stalled (see its output) [{short(error)}]"
        ) from None


def short(error: BaseException) -> str:
    """The gist of a backend error: its first sentence, without gloo's source-location prefix."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return re.sub(r"^\[[^\]]*\]\s*", "", text).split(". ")[0][:200]
