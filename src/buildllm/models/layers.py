"""Pieces every architecture shares: the KV cache, the causal mask, the positions and mask of a
left-padded batch (``positions_and_mask``, the forward contract every model keeps), and the parts
of a one-token step that the C++ decoding path reads (``DecodeParts``).

They live apart from any one model so that a new architecture (a model file of its own) reuses
them without importing another architecture's file.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from buildllm.errors import UserError


class KVCache:
    """Keys and values of the positions seen so far, for every layer, preallocated once.

    During generation each new token then needs one position's worth of compute instead of the
    whole prefix again. ``length`` counts the positions filled; the model advances it after each
    forward pass. ``valid`` marks, per row, which cached positions hold real tokens rather than
    left padding (batched prompts of different lengths).

    ``n_kv_heads`` and ``head_dim`` are the shape of what one layer caches per position; they are
    read off ``cfg`` (``cfg.n_kv_heads`` when the architecture has fewer key/value heads than query
    heads, else ``cfg.n_heads``) unless given.
    """

    def __init__(
        self,
        cfg,
        batch_size: int,
        max_length: int | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        n_kv_heads: int | None = None,
        head_dim: int | None = None,
    ):
        self.max_length = max_length or cfg.context_length
        n_kv_heads = n_kv_heads or getattr(cfg, "n_kv_heads", None) or cfg.n_heads
        head_dim = head_dim or cfg.head_dim
        shape = (cfg.n_layers, batch_size, n_kv_heads, self.max_length, head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.valid = torch.ones(batch_size, self.max_length, device=device, dtype=torch.bool)
        self.padded = False  # any padding in `valid`? (spares a check at every step)
        self.length = 0

    def update(self, layer: int, keys: torch.Tensor, values: torch.Tensor):
        """Store the new positions' keys and values; return all cached ones for this layer, in the
        new ones' dtype (a cache may hold them rounded to a narrower one: generation's cache_dtype)."""
        start, end = self.length, self.length + keys.shape[2]
        self.keys[layer, :, :, start:end] = keys
        self.values[layer, :, :, start:end] = values
        return self.keys[layer, :, :, :end].to(keys.dtype), self.values[layer, :, :, :end].to(values.dtype)


def causal_mask(context_length: int, device: torch.device | str | None = None) -> torch.Tensor:
    """mask[i, j] is True where query i may NOT look at key j, because j is in i's future."""
    return torch.ones(context_length, context_length, dtype=torch.bool, device=device).triu(1)


def positions_and_mask(num_tokens: int, kv_cache: KVCache | None, padding: torch.Tensor | None,
                       context_length: int, device: torch.device | str | None = None,
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The positions of ``num_tokens`` new tokens and, with left padding, who may attend to whom.

    The new tokens must fit the model's ``context_length`` (and the cache, with one): a longer
    input is a UserError asking to crop it.

    Every architecture follows the same contract: ``padding`` is ``(batch, tokens)`` bool, True at
    left-padding positions; with a cache it is recorded in ``kv_cache.valid``, so later steps still
    see it. Returns ``positions``, ``(tokens,)`` without padding, else ``(batch, tokens)`` counted
    from each row's first real token (so left padding shifts nothing), and ``blocked``, None
    without padding (the causal mask is implied), else ``(batch, 1, tokens, keys)`` bool, True
    where a query may not look at a key: the future, or padding.
    """
    start = kv_cache.length if kv_cache is not None else 0
    end = start + num_tokens
    if end > min(kv_cache.max_length if kv_cache is not None else context_length, context_length):
        raise UserError(f"input of {end} tokens exceeds the context length {context_length}; "
                        "crop it to the most recent tokens")
    if kv_cache is not None:
        if padding is not None and padding.any():
            kv_cache.valid[:, start:end] = ~padding
            kv_cache.padded = True
        padding = ~kv_cache.valid[:, :end] if kv_cache.padded else None
    if padding is None or not padding.any():
        return torch.arange(start, end, device=device), None
    positions = ((~padding).cumsum(dim=1) - 1).clamp(min=0)[:, start:end]
    # Nobody looks at padding or at the future. A padding query would then see no key at all
    # (softmax of only -inf is NaN), so every token may see itself; the outputs at padding
    # positions are never used.
    future = torch.ones(num_tokens, end, dtype=torch.bool, device=device).triu(start + 1)
    blocked = future | padding[:, None, :]  # (b, tokens, keys)
    blocked[:, torch.arange(num_tokens), torch.arange(start, end)] = False
    return positions, blocked[:, None]  # broadcast over heads


@dataclass
class LayerParts:
    """One pre-norm block, as the model's own modules: ``x += attention_out(attend(attention_in(
    norm1(x))))`` (queries and keys through ``q_norm``/``k_norm`` per head when given), then
    ``x += mlp_out(activation(mlp_in(norm2(x))))``."""

    norm1: nn.Module
    attention_in: list[nn.Module]  # [qkv] (one fused projection) or [q, k, v]
    attention_out: nn.Module
    q_norm: nn.Module | None
    k_norm: nn.Module | None
    norm2: nn.Module
    mlp_in: list[nn.Module]  # [fc], or [gate, up] for SwiGLU
    mlp_out: nn.Module


@dataclass
class DecodeParts:
    """What a model's one-token step is made of, for ``generation/fast_decode.py`` (the C++ step).

    A model offers them from ``decode_parts()``, or None when some part of it is something else
    (it then decodes through its own forward, as any model without the method does).
    """

    n_heads: int
    n_kv_heads: int
    head_dim: int
    activation: str  # "gelu_tanh", "relu2" or "swiglu"
    token_embedding: torch.Tensor
    position_embedding: torch.Tensor | None  # learned positions (GPT-2)
    rope_frequencies: torch.Tensor | None  # RoPE's (blocks.rope_frequencies)
    layers: list[LayerParts]
    final_norm: nn.Module
    head: nn.Module
