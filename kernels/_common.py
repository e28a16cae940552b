"""Helpers the Triton kernels and their launchers share. Like the rest of kernels/, this file imports torch and
triton only: shape checks and layout decisions happen in robust_fast/ops before a launcher runs."""
import contextlib

import torch
import triton
import triton.language as tl


def on_device_of(t: torch.Tensor):
    """Launch on t's GPU: Triton launches on the current device, which may be another one
    (a no-op for CPU tensors, which run under the interpreter)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every narrower floating dtype accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tl_accumulation_dtype(dtype: torch.dtype):
    """accumulation_dtype as the triton.language type a kernel's constexpr takes."""
    return tl.float64 if dtype == torch.float64 else tl.float32


@triton.jit
def program_index(WIDE_INDEX: tl.constexpr):
    """This program's index along axis 0, in int64 when offsets may pass 2**31 - 1."""
    pid = tl.program_id(0)
    if WIDE_INDEX:
        pid = pid.to(tl.int64)
    return pid


@triton.jit
def flat_block(numel, BLOCK: tl.constexpr, WIDE_INDEX: tl.constexpr):
    """The offsets of this program's BLOCK elements of a flat walk over numel, and their mask."""
    offsets = program_index(WIDE_INDEX) * BLOCK + tl.arange(0, BLOCK)
    return offsets, offsets < numel
