"""Stages 3 and 4: embeddings, causal multi-head attention and the GPT-2 architecture.

The whole model is in this file and reads top to bottom, the way the data flows:

    token ids ──► token embedding (wte) + position embedding (wpe) ──► dropout
              ──► n × TransformerBlock:  x = x + Attention(LayerNorm(x))
                                         x = x + FeedForward(LayerNorm(x))
              ──► final LayerNorm ──► output head ──► logits over the vocabulary

Attention comes in two forms that share the same parameters, chosen by ``GPTConfig.attention``:
``"readable"`` writes out queries, keys, values, the scaled scores, the causal mask and the softmax,
as a textbook would; ``"fast"`` hands the same tensors to PyTorch's fused
``scaled_dot_product_attention``. ``tests/test_model.py`` proves they give the same outputs and
gradients.

GPT-2 is one architecture among those in ``models/registry.py``: the last lines of this file
register it, with its presets and its Hugging Face weight map (``gpt2_hf.py``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from buildllm.errors import UserError
from buildllm.files import read_json_object, write_json
from buildllm.models import gpt2_hf, registry
from buildllm.models.layers import KVCache, causal_mask, positions_and_mask

# Configuration -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class GPTConfig:
    arch: str = "gpt2"  # which model class builds this config (models/registry.py)
    vocab_size: int = 50257
    context_length: int = 1024
    emb_dim: int = 768
    n_heads: int = 12
    n_layers: int = 12
    drop_rate: float = 0.0
    qkv_bias: bool = True
    tie_embeddings: bool = True
    attention: Literal["fast", "readable"] = "fast"

    def __post_init__(self) -> None:
        if self.emb_dim % self.n_heads:
            raise UserError(f"emb_dim {self.emb_dim} is not divisible by n_heads {self.n_heads}")
        if self.attention not in ("fast", "readable"):
            raise UserError(f"attention must be 'fast' or 'readable', not {self.attention!r}")
        for name in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if not 0.0 <= self.drop_rate < 1.0:
            raise UserError(f"drop_rate must be in [0, 1), got {self.drop_rate}")

    @property
    def head_dim(self) -> int:
        return self.emb_dim // self.n_heads

    # Presets and saved configs may belong to any registered architecture: these look them up
    # by name or by their "arch" key, so the config that comes back may be another arch's class.
    @classmethod
    def from_preset(cls, name: str, **overrides):
        return registry.preset(name, **overrides)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        return registry.config_from_dict(d)

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path):
        return cls.from_dict(read_json_object(path, "model config"))


PRESETS: dict[str, GPTConfig] = {
    # OpenAI's GPT-2 family: 124M, 355M, 774M, 1558M parameters.
    "gpt2": GPTConfig(emb_dim=768, n_heads=12, n_layers=12),
    "gpt2-medium": GPTConfig(emb_dim=1024, n_heads=16, n_layers=24),
    "gpt2-large": GPTConfig(emb_dim=1280, n_heads=20, n_layers=36),
    "gpt2-xl": GPTConfig(emb_dim=1600, n_heads=25, n_layers=48),
    # Small models that train in minutes on a laptop CPU (set vocab_size from your tokenizer).
    "nano": GPTConfig(context_length=128, emb_dim=64, n_heads=2, n_layers=2),
    "micro": GPTConfig(context_length=256, emb_dim=128, n_heads=4, n_layers=4),
    "mini": GPTConfig(context_length=256, emb_dim=384, n_heads=6, n_layers=6, drop_rate=0.1),
    # The default `buildllm train` model: the best held-out Shakespeare loss that 8.5 minutes of a
    # 2-core CPU buy: a smaller model that sees more tokens beats a bigger one (benchmarks/README.md).
    "shakespeare-cpu": GPTConfig(vocab_size=4096, context_length=256, emb_dim=128, n_heads=4, n_layers=4),
}


# Building blocks ---------------------------------------------------------------------------------


class LayerNorm(nn.Module):
    """Normalise each token's features to zero mean and unit variance, then scale and shift.

    ``written_out`` is the formula; ``forward`` hands the same computation to PyTorch's fused
    kernel, which makes one pass over memory (forward and backward) instead of one per operation
    (its speed-up is in benchmarks/README.md). The tests check the two agree.
    """

    def __init__(self, emb_dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.scale.shape, self.scale, self.shift, self.eps)

    def written_out(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=-1, keepdim=True)
        var = x.var(dim=-1, keepdim=True, unbiased=False)  # biased, as in the LayerNorm paper
        return self.scale * (x - mean) / torch.sqrt(var + self.eps) + self.shift


class GELU(nn.Module):
    """GELU with GPT-2's tanh approximation.

    ``written_out`` is the formula; ``forward`` is PyTorch's one-kernel version of it, one pass over
    memory instead of eight operations (its speed-up is in benchmarks/README.md).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate="tanh")

    def written_out(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


class FeedForward(nn.Module):
    """Expand each token to 4x the width, apply GELU, project back."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.emb_dim, 4 * cfg.emb_dim)
        self.gelu = GELU()
        self.proj = nn.Linear(4 * cfg.emb_dim, cfg.emb_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.gelu(self.fc(x)))


# KVCache and causal_mask come from layers.py: every architecture uses them.


class MultiHeadAttention(nn.Module):
    """Causal multi-head self-attention: each token looks only at itself and earlier tokens."""

    def __init__(self, cfg: GPTConfig, layer: int = 0):
        super().__init__()
        self.layer = layer  # index into the KV cache
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.fast = cfg.attention == "fast"
        # One projection makes queries, keys and values at once (GPT-2's c_attn): one big matmul
        # instead of three small ones. The readable form splits its output the same way.
        self.qkv = nn.Linear(cfg.emb_dim, 3 * cfg.emb_dim, bias=cfg.qkv_bias)
        self.out_proj = nn.Linear(cfg.emb_dim, cfg.emb_dim)
        self.drop_rate = cfg.drop_rate
        self.dropout = nn.Dropout(cfg.drop_rate)
        self.register_buffer("mask", causal_mask(cfg.context_length), persistent=False)
        # The attention-weights hook (``buildllm.attention_maps``): while a callable is set here,
        # attention takes the readable path and hands it ``(layer, weights)`` after the softmax,
        # weights of shape (batch, heads, queries, keys). Any architecture's attention can offer it.
        self.attention_recorder = None

    def forward(
        self,
        x: torch.Tensor,
        kv_cache: KVCache | None = None,
        blocked: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``blocked``: a ready mask, True where a query may not see a key (given with padding)."""
        b, num_tokens, emb_dim = x.shape
        queries, keys, values = self.qkv(x).split(emb_dim, dim=2)
        # Split the embedding into heads: (b, tokens, emb) -> (b, heads, tokens, head_dim).
        queries = queries.view(b, num_tokens, self.n_heads, self.head_dim).transpose(1, 2)
        keys = keys.view(b, num_tokens, self.n_heads, self.head_dim).transpose(1, 2)
        values = values.view(b, num_tokens, self.n_heads, self.head_dim).transpose(1, 2)

        start = 0
        if kv_cache is not None:
            start = kv_cache.length
            keys, values = kv_cache.update(self.layer, keys, values)

        if self.fast and self.attention_recorder is None:
            context = self._attend_fast(queries, keys, values, start, blocked)
        else:
            if blocked is None:
                # Queries sit at positions start.., keys at 0..: cut the matching part of the mask.
                blocked = self.mask[start : start + num_tokens, : start + num_tokens]
            context = self._attend_readable(queries, keys, values, blocked)
        # Merge the heads back: (b, heads, tokens, head_dim) -> (b, tokens, emb).
        context = context.transpose(1, 2).reshape(b, num_tokens, emb_dim)
        return self.out_proj(context)

    def _attend_readable(self, queries, keys, values, blocked):
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
        if blocked is None and start == 0:
            # Training and a prompt's first pass: the fused kernel applies the causal mask itself.
            return F.scaled_dot_product_attention(queries, keys, values, dropout_p=dropout_p, is_causal=True)
        if blocked is None and num_tokens == 1:
            # One new token may look at every cached position: no mask at all.
            return F.scaled_dot_product_attention(queries, keys, values, dropout_p=dropout_p)
        if blocked is None:
            blocked = self.mask[start : start + num_tokens, : start + num_tokens]
        return F.scaled_dot_product_attention(queries, keys, values, attn_mask=~blocked, dropout_p=dropout_p)


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block: attention then feed-forward, each wrapped in a shortcut connection."""

    def __init__(self, cfg: GPTConfig, layer: int = 0):
        super().__init__()
        self.norm1 = LayerNorm(cfg.emb_dim)
        self.att = MultiHeadAttention(cfg, layer)
        self.norm2 = LayerNorm(cfg.emb_dim)
        self.ff = FeedForward(cfg)
        self.drop_shortcut = nn.Dropout(cfg.drop_rate)

    def forward(self, x, kv_cache: KVCache | None = None, blocked: torch.Tensor | None = None):
        x = x + self.drop_shortcut(self.att(self.norm1(x), kv_cache, blocked))
        x = x + self.drop_shortcut(self.ff(self.norm2(x)))
        return x


# The model ---------------------------------------------------------------------------------------


class GPTModel(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.emb_dim)  # token embedding
        self.wpe = nn.Embedding(cfg.context_length, cfg.emb_dim)  # position embedding
        self.drop_emb = nn.Dropout(cfg.drop_rate)
        self.blocks = nn.ModuleList(TransformerBlock(cfg, layer) for layer in range(cfg.n_layers))
        self.final_norm = LayerNorm(cfg.emb_dim)
        self.out_head = nn.Linear(cfg.emb_dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            # GPT-2 reads logits off the token embedding matrix itself (saves vocab x emb weights).
            self.out_head.weight = self.wte.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2's initialisation: N(0, 0.02), zero biases, residual projections scaled down."""
        for name, p in self.named_parameters():
            if name.endswith(".bias") or name.endswith(".shift"):
                nn.init.zeros_(p)
            elif name.endswith(".scale"):
                nn.init.ones_(p)
            elif name.endswith(("att.out_proj.weight", "ff.proj.weight")):
                # Each block adds two outputs to the residual stream; keep its variance from
                # growing with depth (GPT-2 paper, section 2.3).
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * self.cfg.n_layers))
            else:
                nn.init.normal_(p, mean=0.0, std=0.02)

    def forward(
        self,
        idx: torch.Tensor,
        kv_cache: KVCache | None = None,
        padding: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits ``(batch, tokens, vocab)`` for token ids ``idx`` of shape ``(batch, tokens)``.

        ``kv_cache``: continue from the positions already in the cache (generation).
        ``padding``: ``(batch, tokens)`` bool, True at left-padding positions, which no token
        attends to and which do not count as positions.
        """
        num_tokens = idx.shape[1]
        positions, blocked = positions_and_mask(num_tokens, kv_cache, padding, self.cfg.context_length, idx.device)

        x = self.wte(idx) + self.wpe(positions)
        x = self.drop_emb(x)
        for block in self.blocks:
            x = block(x, kv_cache, blocked)
        x = self.final_norm(x)
        if kv_cache is not None:
            kv_cache.length += num_tokens
        return self.out_head(x)

    @property
    def device(self) -> torch.device:
        return self.wte.weight.device

    # What the rest of the package asks of a model (models/registry.py lists it) ------------------

    # LoRA adapts these Linear layers by default (attribute names): attention's fused query/key/value
    # projection and its output projection, the feed-forward expansion and projection.
    lora_targets: tuple[str, ...] = ("qkv", "out_proj", "fc", "proj")

    def init_buffers(self, device: torch.device | str | None = None) -> None:
        """Remake the non-persistent buffers (the causal masks), e.g. after a meta-device load."""
        for block in self.blocks:
            block.att.mask = causal_mask(self.cfg.context_length, device=device)

    def new_kv_cache(self, batch_size: int, max_length: int | None = None, device=None, dtype=torch.float32):
        return KVCache(self.cfg, batch_size, max_length, device=device or self.device, dtype=dtype)

    # For the reader: what a configuration costs (``buildllm.describe`` adds memory) ---------------

    @staticmethod
    def count_parameters(cfg: GPTConfig) -> dict[str, int]:
        """Parameter counts by part, computed from the shapes (no model is built)."""
        d, v, t, n = cfg.emb_dim, cfg.vocab_size, cfg.context_length, cfg.n_layers
        attention = d * 3 * d + (3 * d if cfg.qkv_bias else 0) + d * d + d
        feed_forward = d * 4 * d + 4 * d + 4 * d * d + d
        block = attention + feed_forward + 2 * (2 * d)  # two LayerNorms (scale and shift)
        embedding = v * d + t * d
        head = 0 if cfg.tie_embeddings else v * d
        total = embedding + n * block + 2 * d + head
        return {"total": total, "embedding": embedding, "head": head, "non_embedding": total - embedding - head}

    @staticmethod
    def flops_per_token(cfg: GPTConfig) -> dict[str, int]:
        """Training and forward FLOPs per token."""
        params = GPTModel.count_parameters(cfg)
        # Parameters that take part in a matmul for every token: everything but the embedding
        # lookups, plus the output head (which is the token embedding again when tied).
        matmul_params = params["non_embedding"] + cfg.vocab_size * cfg.emb_dim
        # Forward 2 FLOPs per multiply-add, backward twice that (Kaplan et al. 2020); attention's
        # scores and weighted sum add 2 * 2 * n_layers * context * emb per token forward.
        attention_flops = 12 * cfg.n_layers * cfg.emb_dim * cfg.context_length
        return {"train": 6 * matmul_params + attention_flops, "forward": 2 * matmul_params + attention_flops // 3}


# Any architecture's counts, by its arch: GPT-2's own are GPTModel.count_parameters/flops_per_token.
count_parameters = registry.count_parameters
describe = registry.describe


registry.register("gpt2", GPTModel, GPTConfig, PRESETS, hf_format=gpt2_hf, default_preset="shakespeare-cpu")
