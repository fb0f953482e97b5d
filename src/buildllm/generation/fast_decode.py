"""Stage 6, at the memory-bandwidth limit: one decoding step in C++ (``fast_decode.cpp``).

A decoding step multiplies every weight matrix by one vector per row of the batch: each weight
is read from memory once and used once, so the step can go no faster than memory streams the
weights. PyTorch spends most of a small model's step elsewhere: about 200 operations per token,
each with its dispatch overhead, and matrix-vector kernels that read the ``(out, in)`` weights at
well under the machine's bandwidth. The C++ step reads the model's own weight tensors (fp32,
bf16, or the int8/int4 codes of ``quantization.py``, turned into numbers in registers) in one
parallel region, with the threads splitting every product by rows and meeting between stages.
``benchmarks/llamacpp.py`` measures it against llama.cpp on the same weights.

The readable model stays the definition: ``tests/test_fast_decode.py`` proves the C++ step gives
the same tokens (fp32) or the same logits within a stated tolerance (bf16, int8, int4: it rounds
where PyTorch's ops round, but sums in another order, and multiplies int8 and int4 codes by its
inputs rounded to int8 numbers per block of 32, as llama.cpp does; ``benchmarks/decode_quality.py``
measures what that costs a trained model). The prompt's pass (the prefill) stays the model's own
forward, as fast as training's; only the one-token steps come here (and a one-token prompt).

    decoder = fast_decoder(model)          # None where the fast path does not apply
    logits = decoder.step(tokens, cache)   # == model(tokens[:, None], kv_cache=cache)[:, -1]
    logits, picks = decoder.step_greedy(tokens, cache)  # and picks == logits.max(-1).indices

The step is compiled on first use for this machine's processor (``native.py``: a C++ compiler
and AVX-512 with BF16); anywhere else, and for model parts it does not know (LoRA layers, fp16, a
GPU), generation takes the readable model's path, as it always did. ``BUILDLLM_FAST_DECODE=0``
turns it off.
"""

from __future__ import annotations

import ctypes
import sys
import time

import torch
from torch import nn

from buildllm.errors import UserError
from buildllm.generation.native import extension
from buildllm.generation.quantization import Int4Linear, Int8Linear
from buildllm.models.layers import DecodeParts, KVCache

F32, BF16, INT8, INT4 = range(4)  # weight formats, as fast_decode.cpp numbers them
ACTIVATIONS = {"gelu_tanh": 0, "swiglu": 1, "relu2": 2}
LAYER_NORM, RMS_NORM = range(2)


class FastDecoder:
    """One model's decoding step in C++; ``step`` is ``model(tokens[:, None], kv_cache=cache)[:, -1]``."""

    def __init__(self, native, context_length: int):
        self.native = native
        self.context_length = context_length

    def step(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits ``(batch, vocab)`` fp32 after one new token per row; the cache gains its position."""
        return self._step(tokens, cache, pick=False)[0]

    def step_greedy(self, tokens: torch.Tensor, cache: KVCache) -> tuple[torch.Tensor, torch.Tensor]:
        """``step``'s logits, and each row's greedy pick ``(batch,)``: ``logits.max(-1).indices``,
        found by each thread in the logits it computed (a pass over them afterwards reads half
        from the other core's cache: benchmarks/README.md)."""
        return self._step(tokens, cache, pick=True)

    def _step(self, tokens: torch.Tensor, cache: KVCache, pick: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if cache.length + 1 > min(cache.max_length, self.context_length):
            raise UserError(f"input of {cache.length + 1} tokens exceeds the context length "
                            f"{min(cache.max_length, self.context_length)}; crop it to the most recent tokens")
        out = self.native.step(tokens, cache.keys, cache.values, cache.valid, cache.length, cache.padded, pick)
        cache.length += 1
        return out


def fast_decoder(model: nn.Module) -> FastDecoder | None:
    """The C++ step for ``model`` as its weights are now, or None where it does not apply (see above).

    Cheap to make (the weights are shared, not copied): make one per generation, so that a model
    trained or changed since is read as it is.
    """
    if getattr(model, "device", torch.device("cpu")).type != "cpu":
        return None
    if any(type(p.data) is not torch.Tensor for p in model.parameters()):  # sharded (FSDP's DTensors)
        return None
    parts = model.decode_parts() if hasattr(model, "decode_parts") else None
    native = extension() if parts is not None else None
    if native is None:
        return None
    try:
        return FastDecoder(_decoder(native, parts), model.cfg.context_length)
    except _Unsupported:
        return None


# Reading a model into the C++ decoder ------------------------------------------------------------


class _Unsupported(Exception):
    """A part the C++ step does not implement: the readable model decodes instead."""


_HUGE_PAGE = 1 << 21
_MADV_HUGEPAGE, _MADV_COLLAPSE = 14, 25
_on_huge_pages: set[tuple[int, int]] = set()


def _huge_pages(weight: torch.Tensor) -> torch.Tensor:
    """Back ``weight`` with 2 MiB pages where Linux allows it (``madvise``; best effort, once per tensor).

    A step reads every weight page once, and with 4 KiB pages each of them costs the processor a
    page-table walk (a 124M model is 60,000 pages in bf16); the gain is in benchmarks/README.md.
    """
    start, size = weight.data_ptr(), weight.numel() * weight.element_size()
    first, end = -(-start // _HUGE_PAGE) * _HUGE_PAGE, (start + size) // _HUGE_PAGE * _HUGE_PAGE
    if end > first and (first, end) not in _on_huge_pages and sys.platform == "linux":
        _on_huge_pages.add((first, end))
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            for advice in (_MADV_HUGEPAGE, _MADV_COLLAPSE):  # an old kernel refuses: nothing lost
                libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(end - first), advice)
        except (OSError, AttributeError):
            pass
    return weight


def _linear(native, layer: nn.Module, bf16: bool):
    if type(layer) is nn.Linear:  # not subclasses (LoRA), whose forward does more
        kind = {torch.float32: F32, torch.bfloat16: BF16}.get(layer.weight.dtype)
        if kind is None or (kind == BF16) != bf16:
            raise _Unsupported(layer.weight.dtype)
        return native.Linear(kind, _huge_pages(layer.weight.detach()), None, None, _detached(layer.bias), 0, bf16,
                             layer.in_features, layer.out_features)
    if type(layer) is Int8Linear:
        return native.Linear(INT8, _huge_pages(layer.weight), layer.scale, None, layer.bias, 0, bf16,
                             layer.in_features, layer.out_features)
    if type(layer) is Int4Linear:
        return native.Linear(INT4, _huge_pages(layer.weight), layer.scale, layer.zero, layer.bias, layer.group_size, bf16,
                             layer.in_features, layer.out_features)
    raise _Unsupported(type(layer).__name__)


def _norm(native, norm: nn.Module):
    from buildllm.models.blocks import RMSNorm
    from buildllm.models.gpt2 import LayerNorm

    if type(norm) is LayerNorm:
        return native.Norm(LAYER_NORM, norm.eps, norm.scale.detach(), norm.shift.detach())
    if type(norm) is RMSNorm:
        return native.Norm(RMS_NORM, norm.eps, norm.weight.detach(), None)
    raise _Unsupported(type(norm).__name__)


def _detached(t: torch.Tensor | None) -> torch.Tensor | None:
    return t.detach() if t is not None else None


def _decoder(native, parts: DecodeParts):
    """The C++ decoder of a model's ``decode_parts`` (models/layers.py), over the same tensors."""
    embedding = parts.token_embedding.detach()
    if embedding.dtype not in (torch.float32, torch.bfloat16):
        raise _Unsupported(embedding.dtype)
    bf16 = embedding.dtype == torch.bfloat16
    if parts.activation not in ACTIVATIONS:
        raise _Unsupported(parts.activation)
    decoder = native.Decoder(parts.n_heads, parts.n_kv_heads, parts.head_dim, ACTIVATIONS[parts.activation], bf16,
                             embedding, _detached(parts.position_embedding), parts.rope_frequencies,
                             _norm(native, parts.final_norm), _linear(native, parts.head, bf16))
    for layer in parts.layers:
        decoder.add_layer(_norm(native, layer.norm1), [_linear(native, p, bf16) for p in layer.attention_in],
                          _linear(native, layer.attention_out, bf16),
                          *(_norm(native, n) if n is not None else None for n in (layer.q_norm, layer.k_norm)),
                          _norm(native, layer.norm2), [_linear(native, p, bf16) for p in layer.mlp_in],
                          _linear(native, layer.mlp_out, bf16))
    return decoder


def main() -> int:
    """``python -m buildllm.generation.fast_decode``: build the step now (install does this)."""
    start = time.perf_counter()
    native = extension()
    if native is None:
        print("fast decoding step: not available here (needs x86-64 with AVX-512 BF16 and a C++ compiler); "
              "generation uses the readable model", file=sys.stderr)
        return 0
    print(f"fast decoding step: ready ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
