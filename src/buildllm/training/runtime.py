"""Where a run executes: device, precision, the torchrun processes, and the hardware's peak speed.
"""

from __future__ import annotations

import atexit
import contextlib
import math
import os
import sys
import time
from dataclasses import dataclass

import torch
from torch import nn

from buildllm.errors import UserError


def pick_device(spec: str = "auto") -> torch.device:
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise UserError(f"unknown device {spec!r}: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {spec} asked for, but CUDA is not available: use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"device {spec} asked for, but there are {torch.cuda.device_count()} CUDA devices: "
                        f"use cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    if device.type == "mps" and not mps_available():
        raise UserError(f"device {spec} asked for, but MPS (Apple GPU) is not available: use --device cpu")
    return device


def mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def pick_dtype(spec: str, device: torch.device) -> torch.dtype:
    """The autocast dtype: bf16 where the hardware has it, fp16 (with loss scaling) on older GPUs."""
    if spec == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return torch.bfloat16  # native bf16 matmuls (AVX512-BF16, AMX): several times fp32's speed
        return torch.float32
    if spec == "fp16" and device.type != "cuda":
        raise UserError("fp16 training needs a CUDA GPU (it relies on a GradScaler): use bf16 or fp32")
    if spec == "bf16" and device.type == "mps":
        raise UserError("bf16 autocast is not supported here on MPS: use fp32")
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[spec]


def autocast(device: torch.device, dtype: torch.dtype):
    """Matmuls in ``dtype``, everything precision-sensitive (softmax, norms, loss) in fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


@dataclass
class Dist:
    """This process's place among the ``torchrun`` processes (rank 0 of 1 when run alone)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: torch.device) -> tuple[Dist, torch.device]:
    """Join the process group when launched by torchrun (it sets RANK, WORLD_SIZE, LOCAL_RANK)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(), device
    import torch.distributed as td

    dist = Dist(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")), world)
    if device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    if not td.is_initialized():
        td.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        # Left to the interpreter's own teardown, gloo's worker threads can still be running when
        # their objects are destroyed, and the process aborts after a run that went well.
        atexit.register(lambda: td.is_initialized() and td.destroy_process_group())
    return dist, device


def broadcast_float(value: float, dist: Dist) -> float:
    """Rank 0's value on every rank (a clock reading must not differ between processes)."""
    if not dist.enabled:
        return value
    import torch.distributed as td

    t = torch.tensor([value], dtype=torch.float64)
    td.broadcast(t, src=0)
    return float(t.item())


def barrier(dist: Dist) -> None:
    if dist.enabled:
        import torch.distributed as td

        td.barrier()


# Dense bf16 tensor-core peaks (FLOP/s) by GPU name, for the MFU estimate.
GPU_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12,
                  "L4": 121e12, "4090": 165e12, "3090": 71e12, "V100": 125e12, "T4": 65e12}


def peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """The device's matmul peak: from the table for known GPUs, else measured on a big matmul."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in GPU_PEAK_FLOPS.items():
            if key in name:
                return value
    n = 1024
    g = torch.Generator(device=device).manual_seed(0)  # leave the global RNG (dropout's) untouched
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    a @ b  # warm up
    best = math.inf
    for _ in range(5):  # the fastest of several tries: other processes only ever slow it down
        synchronize(device)
        t = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def keep_freed_memory() -> None:
    """Let glibc keep big freed blocks for reuse instead of handing them back to the kernel.

    By default glibc serves each allocation above 32 MiB with a fresh ``mmap`` and returns it with
    ``munmap`` when freed, so a tensor like the fp32 logits (batch x context x vocab) is
    page-faulted in anew at every step. On a small CPU that page-faulting is a large share of
    the step time. Raising both thresholds makes steady-state steps reuse the same memory.
    Linux with glibc only; elsewhere (or with another C library) this does nothing.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # from glibc's malloc.h
    mallopt(M_MMAP_THRESHOLD, 1 << 30)
    mallopt(M_TRIM_THRESHOLD, 1 << 30)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA, MPS), so that a timer reads what it ran."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def gather_objects(obj, dist: Dist) -> list:
    if not dist.enabled:
        return [obj]
    import torch.distributed as td

    out = [None] * dist.world_size
    td.all_gather_object(out, obj)
    return out


def sum_over_ranks(value: float, dist: Dist) -> float:
    if not dist.enabled:
        return value
    import torch.distributed as td

    t = torch.tensor([value], dtype=torch.float64)
    td.all_reduce(t)
    return float(t.item())


# FSDP holds a shard of each tensor on each process: these gather or scatter the whole. ----------


def full_model(raw_model: nn.Module, fsdp: bool, dist: Dist) -> nn.Module:
    """The model with all its weights on rank 0 (FSDP holds a shard on each process)."""
    if not fsdp:
        return raw_model
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
    )

    from buildllm.weights.checkpoint import model_from_state_dict

    state = get_model_state_dict(raw_model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not dist.main:
        return raw_model
    if raw_model.cfg.tie_embeddings:
        state.pop("out_head.weight", None)
    return model_from_state_dict(raw_model.cfg, state)


def optimizer_state(raw_model: nn.Module, optimizer, fsdp: bool, dist: Dist) -> dict | None:
    if not fsdp:
        return optimizer.state_dict() if dist.main else None
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
    )

    return get_optimizer_state_dict(raw_model, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(raw_model: nn.Module, optimizer, state: dict, fsdp: bool) -> None:
    if not fsdp:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_optimizer_state_dict,
    )

    set_optimizer_state_dict(raw_model, optimizer, state, options=StateDictOptions(full_state_dict=True))
