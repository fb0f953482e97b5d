"""The building blocks of today's open models (Llama 3, Qwen3, SmolLM2, ...), one small class each.

Since GPT-2 (2019) the decoder-only transformer has changed in a handful of places, and every
change is here:

    RMSNorm               LayerNorm without the mean and the shift: scale by the root mean square
    rotary embeddings     positions rotate queries and keys instead of being added to the input,
                          so attention scores depend on how far apart two tokens are (RoPE)
    Llama 3's RoPE        the rotation frequencies stretched for a longer context (rope_scaling)
    SwiGLU                a gated feed-forward: silu(x W_gate) * (x W_up), then W_down
    ReLU squared          relu(x)^2 in a plain feed-forward (Primer; the GPT-2 speedrun, nanochat)
    grouped-query         several query heads share one key/value head, so the KV cache holds
    attention             n_kv_heads heads instead of n_heads
    QK-norm               Qwen3 normalises each head's queries and keys (RMSNorm) before RoPE
    no biases             every Linear layer is bias-free

Where a block has a textbook form and a faster one, both are here and ``tests/test_blocks.py``
proves them equal: ``written_out`` is the formula, ``forward`` what runs.

The configs that use these blocks (``models/llama.py``) provide: emb_dim, n_heads, n_kv_heads,
head_dim, hidden_dim, norm_eps, rope_theta, rope_scaling, qk_norm, drop_rate, attention.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from buildllm.models.layers import KVCache

# Normalisation -----------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """Divide each vector by its root mean square, then scale (Zhang & Sennrich 2019).

    LayerNorm's mean subtraction and shift turned out not to matter; dropping them saves work.
    The statistic is computed in fp32 even for bf16 activations, and the result is rounded back
    before the scale is applied: the order Llama's and Qwen's reference code use, so that bf16
    outputs match theirs bit for bit.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(x.float(), self.weight.shape, eps=self.eps)
        return self.weight * normed.to(x.dtype)

    def written_out(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        rms = torch.sqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return self.weight * (x32 / rms).to(x.dtype)


# Rotary position embeddings ----------------------------------------------------------------------


def rope_frequencies(head_dim: int, theta: float, scaling: dict | None = None) -> torch.Tensor:
    """The ``head_dim / 2`` rotation speeds, ``theta ** (-2i / head_dim)`` for pair ``i``.

    Pair ``i`` of a query or key at position ``p`` turns by the angle ``p * freq[i]``: fast pairs
    tell neighbours apart, slow ones whole paragraphs. Llama 3 (``scaling["rope_type"] ==
    "llama3"``) trained on ``original_max_position_embeddings`` tokens, then stretched the slow
    pairs by ``factor`` so that positions up to ``factor`` times further still look like ones seen
    in training; the fast pairs (wavelength under ``original / high_freq_factor``) stay as they
    were, and the ones in between are blended smoothly.
    """
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
    if scaling is None:
        return freqs
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    original = scaling["original_max_position_embeddings"]
    wavelength = 2 * math.pi / freqs
    stretched = torch.where(wavelength > original / low, freqs / factor, freqs)
    blend = (original / wavelength - low) / (high - low)  # 0 at the slow end, 1 at the fast end
    smoothed = (1 - blend) * stretched / factor + blend * stretched
    in_between = (wavelength >= original / high) & (wavelength <= original / low)
    return torch.where(in_between, smoothed, stretched)


class RotaryEmbedding(nn.Module):
    """The cosines and sines of each position's rotation angles (Su et al. 2021, RoFormer).

    Angles are computed in fp32 for the positions asked for (a table for Llama 3's 131072
    positions would be larger than a small model), then rounded to the activations' dtype. The
    frequencies are a plain fp32 tensor, not a buffer, so that ``model.to(torch.bfloat16)`` cannot
    round them: in bf16, position 1000 would turn by the angle of position 1000 +- 4.
    """

    def __init__(self, cfg):
        super().__init__()
        # GPT-2 with RoPE (gpt2.py's positions="rope") has no rope_scaling: plain RoPE.
        self.head_dim, self.theta = cfg.head_dim, cfg.rope_theta
        self.scaling = getattr(cfg, "rope_scaling", None)
        self.freqs = rope_frequencies(self.head_dim, self.theta, self.scaling)

    def reset_buffers(self, device=None) -> None:
        self.freqs = rope_frequencies(self.head_dim, self.theta, self.scaling).to(device)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``positions``: ``(tokens,)`` or ``(batch, tokens)``. Returns cos and sin shaped to
        broadcast over ``(batch, heads, tokens, head_dim)``."""
        if self.freqs.device != positions.device:  # the model moved (.to(device) skips plain tensors)
            self.freqs = self.freqs.to(positions.device)
        angles = positions[..., None].float() * self.freqs  # (..., tokens, head_dim / 2)
        angles = torch.cat([angles, angles], dim=-1)  # pair i is (x[i], x[i + head_dim/2])
        if angles.dim() == 3:
            angles = angles[:, None]  # one set of angles per row, shared by the heads
        return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each pair ``(x[i], x[i + d/2])`` of ``x`` ``(batch, heads, tokens, d)`` by its angle.

    The 2-D rotation ``(a, b) -> (a cos - b sin, a sin + b cos)`` for all pairs at once: with
    ``rotated = (-b, a)`` it is ``x * cos + rotated * sin``. The pairs are the two halves of the
    head (Hugging Face's layout, which Llama's and Qwen's checkpoints are stored in), not
    neighbours as in the RoFormer paper; the two differ only by a fixed permutation of the
    query and key weights.
    """
    a, b = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-b, a], dim=-1) * sin


def apply_rope_written_out(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The same rotation as complex numbers: pair ``(a, b)`` is ``a + ib``, times ``e^(i angle)``."""
    a, b = x.float().chunk(2, dim=-1)
    half = x.shape[-1] // 2
    turn = torch.complex(cos[..., :half].float(), sin[..., :half].float())
    rotated = torch.complex(a, b) * turn
    return torch.cat([rotated.real, rotated.imag], dim=-1).to(x.dtype)


# Feed-forward ------------------------------------------------------------------------------------


class SwiGLU(nn.Module):
    """Gated feed-forward (Shazeer 2020): ``down(silu(gate(x)) * up(x))``.

    The gate decides, per hidden unit, how much of ``up(x)`` passes. Three matrices instead of
    GPT-2's two, so ``hidden_dim`` is usually about 8/3 of ``emb_dim`` rather than 4x, for a
    similar parameter count.
    """

    def __init__(self, emb_dim: int, hidden_dim: int):
        super().__init__()
        self.gate = nn.Linear(emb_dim, hidden_dim, bias=False)
        self.up = nn.Linear(emb_dim, hidden_dim, bias=False)
        self.down = nn.Linear(hidden_dim, emb_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))

    def written_out(self, x: torch.Tensor) -> torch.Tensor:
        g = self.gate(x)
        swish = g * torch.sigmoid(g)  # silu, a.k.a. swish with beta = 1
        return self.down(swish * self.up(x))


class ReLUSquared(nn.Module):
    """``relu(x) ** 2`` (So et al. 2021, Primer), the activation of the GPT-2 speedrun and nanochat.

    Sparse like ReLU (negative inputs give exactly zero), but smooth at zero and growing
    quadratically, which made language models reach a given loss in fewer steps than GELU.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x).square()

    def written_out(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where(x > 0, x * x, torch.zeros_like(x))


# Attention ---------------------------------------------------------------------------------------


def causal_blocked(num_tokens: int, start: int, device=None) -> torch.Tensor:
    """``(tokens, start + tokens)`` bool, True where query ``start + i`` may not see key ``j > start + i``.

    Made for the positions at hand rather than cut from a ``context x context`` buffer, which
    would take gigabytes at Llama 3's context length.
    """
    return torch.ones(num_tokens, start + num_tokens, dtype=torch.bool, device=device).triu(start + 1)


class GroupedQueryAttention(nn.Module):
    """Causal self-attention in which ``n_heads / n_kv_heads`` query heads share each key/value head.

    Multi-head attention (GPT-2) has ``n_kv_heads == n_heads``; multi-query attention has one.
    Fewer key/value heads make the KV cache, which generation reads in full at every step,
    that many times smaller, at little cost in quality (Ainslie et al. 2023).

    ``"readable"`` repeats each key/value head for the query heads of its group and writes the
    attention out; ``"fast"`` gives the ungrouped tensors to PyTorch's fused kernel
    (``enable_gqa``). With ``qk_norm`` (Qwen3), each head's queries and keys are RMS-normalised
    before the rotation, which keeps attention logits from growing during training.
    """

    def __init__(self, cfg, layer: int = 0):
        super().__init__()
        self.layer = layer  # index into the KV cache
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.fast = cfg.attention == "fast"
        self.q_proj = nn.Linear(cfg.emb_dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.emb_dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.emb_dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.out_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.emb_dim, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        self.qk_norm = cfg.qk_norm
        self.drop_rate = cfg.drop_rate
        self.dropout = nn.Dropout(cfg.drop_rate)
        # The attention-weights hook (``buildllm.attention_maps``), as in GPT-2's attention: while a
        # callable is set, the readable path runs and hands it ``(layer, weights)`` after the softmax,
        # one map per query head, (batch, n_heads, queries, keys).
        self.attention_recorder = None

    def forward(self, x, rope: tuple[torch.Tensor, torch.Tensor], kv_cache: KVCache | None = None,
                blocked: torch.Tensor | None = None) -> torch.Tensor:
        """``rope``: the cos and sin of these positions; ``blocked``: True where a query may not
        see a key (given with padding; else the causal mask is implied)."""
        b, num_tokens, _ = x.shape
        # (b, tokens, heads * head_dim) -> (b, tokens, heads, head_dim)
        queries = self.q_proj(x).view(b, num_tokens, self.n_heads, self.head_dim)
        keys = self.k_proj(x).view(b, num_tokens, self.n_kv_heads, self.head_dim)
        values = self.v_proj(x).view(b, num_tokens, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.qk_norm:
            queries, keys = self.q_norm(queries), self.k_norm(keys)
        cos, sin = rope
        queries = apply_rope(queries.transpose(1, 2), cos, sin)  # (b, heads, tokens, head_dim)
        keys = apply_rope(keys.transpose(1, 2), cos, sin)

        start = 0
        if kv_cache is not None:  # only the n_kv_heads keys and values are cached
            start = kv_cache.length
            keys, values = kv_cache.update(self.layer, keys, values)

        if self.fast and self.attention_recorder is None:
            context = self._attend_fast(queries, keys, values, start, blocked)
        else:
            if blocked is None:
                blocked = causal_blocked(num_tokens, start, x.device)
            context = self._attend_readable(queries, keys, values, blocked)
        context = context.transpose(1, 2).reshape(b, num_tokens, self.n_heads * self.head_dim)
        return self.out_proj(context)

    def _attend_readable(self, queries, keys, values, blocked):
        group = self.n_heads // self.n_kv_heads
        # Query head h uses key/value head h // group: repeat each kv head for its group.
        keys = keys.repeat_interleave(group, dim=1)
        values = values.repeat_interleave(group, dim=1)
        attn_scores = queries @ keys.transpose(2, 3)  # (b, heads, tokens, keys)
        attn_scores = attn_scores.masked_fill(blocked, -torch.inf)
        attn_weights = torch.softmax(attn_scores / math.sqrt(self.head_dim), dim=-1)
        if self.attention_recorder is not None:
            self.attention_recorder(self.layer, attn_weights)
        attn_weights = self.dropout(attn_weights)
        return attn_weights @ values

    def _attend_fast(self, queries, keys, values, start, blocked):
        dropout_p = self.drop_rate if self.training else 0.0
        num_tokens = queries.shape[2]

        def attend(**mask):  # enable_gqa: each key/value head serves its group of query heads
            return F.scaled_dot_product_attention(queries, keys, values, dropout_p=dropout_p, enable_gqa=True, **mask)

        if blocked is None and start == 0:
            return attend(is_causal=True)  # training and a prompt's first pass
        if blocked is None and num_tokens == 1:
            return attend()  # one new token may look at every cached position
        if blocked is None:
            blocked = causal_blocked(num_tokens, start, queries.device)
        return attend(attn_mask=~blocked)


class DecoderBlock(nn.Module):
    """Pre-norm block: ``x + attention(norm(x))``, then ``x + feed_forward(norm(x))``."""

    def __init__(self, cfg, layer: int = 0):
        super().__init__()
        self.norm1 = RMSNorm(cfg.emb_dim, cfg.norm_eps)
        self.att = GroupedQueryAttention(cfg, layer)
        self.norm2 = RMSNorm(cfg.emb_dim, cfg.norm_eps)
        self.ff = SwiGLU(cfg.emb_dim, cfg.hidden_dim)
        self.drop_shortcut = nn.Dropout(cfg.drop_rate)

    def forward(self, x, rope, kv_cache: KVCache | None = None, blocked: torch.Tensor | None = None):
        x = x + self.drop_shortcut(self.att(self.norm1(x), rope, kv_cache, blocked))
        return x + self.drop_shortcut(self.ff(self.norm2(x)))
