"""The numeric precision a forward pass runs in, passed explicitly (`precision="bf16"`), never ambient."""

from __future__ import annotations

import contextlib

import torch

from textcl.errors import TextclError

PRECISIONS = ("fp32", "bf16")


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise TextclError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    return precision


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on `device` for precision "bf16"; nothing for "fp32"."""
    if check_precision(precision) == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)
