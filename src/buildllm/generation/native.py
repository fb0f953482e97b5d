"""The compiled part of generation (``fast_decode.cpp``): built for this processor, loaded once.

It holds the C++ decoding step (``fast_decode.py`` reads a model into it) and the dequantization
of int4 weights for a prompt's pass (``quantization.Int4Linear``). It is compiled on first use with
PyTorch's extension builder (``scripts/install.sh`` does it at install time, ``python -m
buildllm.generation.fast_decode`` by hand) and cached across runs. It needs a C++ compiler and
AVX-512 with BF16 (the kernels are written with its instructions); ``extension()`` is None anywhere
else, and where ``BUILDLLM_FAST_DECODE=0``, and its callers then take PyTorch's own path.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import warnings
from pathlib import Path

SOURCES = [Path(__file__).with_name("fast_decode.cpp"), Path(__file__).with_name("fast_decode_kernels.h")]
CPU_FEATURES = ("avx512f", "avx512bw", "avx512vl", "avx512_bf16")  # the kernels' instructions


def _cpu_flags() -> set[str]:
    """The processor's feature flags, as Linux's cpuinfo lists them (empty elsewhere)."""
    try:
        line = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return set()
    return set(line.split(":", 1)[1].split())


def cpu_supported() -> bool:
    """Whether this processor has the instructions the kernels are written with."""
    return set(CPU_FEATURES) <= _cpu_flags()


@functools.cache
def extension():
    """The compiled module, built once per machine into PyTorch's extension cache; None where it
    cannot be (no AVX-512 BF16, no compiler: a warning says why) or is turned off."""
    if os.environ.get("BUILDLLM_FAST_DECODE", "1") == "0" or platform.machine() not in ("x86_64", "AMD64"):
        return None
    if not cpu_supported():
        return None
    try:
        import ninja  # PyTorch's extension builder runs the ninja program: use the one pip installed
        from torch.utils.cpp_extension import load

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        flags = ["-O3", "-march=native", "-fopenmp", "-fvisibility=hidden"]
        # -march=native: one build per kind of processor (a home folder may be shared by several).
        # -fvisibility=hidden: the module exports only its entry point, so the calls between its
        # own functions are direct, not through the dynamic linker's table (as pybind11 advises).
        key = hashlib.sha256(" ".join([platform.processor(), *flags, *sorted(_cpu_flags())]).encode()).hexdigest()[:10]
        return load(f"buildllm_fast_decode_{key}", [str(p) for p in SOURCES if p.suffix == ".cpp"],
                    extra_cflags=flags, extra_ldflags=["-fopenmp"], extra_include_paths=[str(SOURCES[0].parent)])
    except Exception as e:  # no compiler, no ninja, a compile error: the readable path still works
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        warnings.warn(f"buildllm's fast decoding step could not be built ({reason}); generation uses the "
                      "readable model (install a C++ compiler for the fast path)", stacklevel=2)
        return None
