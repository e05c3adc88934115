"""The numeric precision a forward pass runs in, passed explicitly (`precision="bf16"`), never ambient.

bf16 autocast pays only where bf16 arithmetic is native: CUDA GPUs that support it, and CPUs with AMX or
AVX-512-BF16 (about 1.8x faster than fp32 on AMX). Elsewhere it is emulated: on an AVX2-only CPU a MiniLM
forward and backward ran about 16x SLOWER under bf16 than in fp32. So the setting `bf16` takes "auto" (bf16
only where native), "true" or "false", and `resolve_precision` turns it into "bf16" or "fp32" for a device.
"""

from __future__ import annotations

import contextlib
import logging

import torch

from textcl.errors import TextclError

logger = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16")
BF16_SETTINGS = ("auto", "true", "false")
warned: set[str] = set()


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise TextclError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    return precision


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on `device` for precision "bf16"; nothing for "fp32"."""
    if check_precision(precision) == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def native_bf16(device: torch.device) -> tuple[bool, str]:
    """(whether `device` computes bf16 natively, a few words saying why)."""
    if device.type == "cuda":
        supported = torch.cuda.is_bf16_supported()
        return supported, f"{torch.cuda.get_device_name(device)} {'supports' if supported else 'lacks'} bf16"
    if device.type == "cpu":
        # torch's private CPU probes are the only way to see AMX and AVX-512-BF16 (get_cpu_capability stops at
        # "AVX512"); getattr keeps older or other builds working (they report no native bf16).
        amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
        avx512_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
        features = [torch.backends.cpu.get_cpu_capability()] + ["AMX"] * amx + ["AVX512-BF16"] * avx512_bf16
        native = "with native bf16" if amx or avx512_bf16 else "without native bf16"
        return amx or avx512_bf16, f"CPU {'+'.join(features)} {native}"
    return False, f"{device.type} devices are not checked for bf16"


def resolve_precision(bf16: str | bool, device: torch.device) -> tuple[str, str]:
    """("bf16" or "fp32", why) for the setting `bf16` ("auto", "true", "false" or a bool) on `device`. "auto"
    picks bf16 only where it is native; "true" on a device without native bf16 is honoured, with one warning
    per device type that it is slow."""
    setting = str(bf16).lower()
    if setting not in BF16_SETTINGS:
        raise TextclError(f"bf16 must be auto, true or false; got {bf16!r}")
    native, why = native_bf16(device)
    if setting == "auto":
        return ("bf16" if native else "fp32"), f"bf16: auto; {why}"
    if setting == "true" and not native and device.type not in warned:
        warned.add(device.type)
        logger.warning("textcl: bf16 is set but this %s: bf16 is emulated and can be many times slower than fp32 "
                       "(16x on an AVX2 CPU); use bf16: auto or false", why)
    return ("bf16" if setting == "true" else "fp32"), f"bf16: {setting}; {why}"
