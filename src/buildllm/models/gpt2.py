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

The levers of the GPT-2 speedrun (KellerJordan/modded-nanogpt) and nanochat are switches of
``GPTConfig``, each defaulting to GPT-2's behaviour: ``positions="rope"`` (no wpe; queries and keys
rotate), ``norm="rmsnorm"``, ``qk_norm``, ``activation="relu2"`` or ``"swiglu"``, an untied head
(``tie_embeddings=False``), ``zero_init`` output projections, ``logit_softcap`` and
``value_embeddings``. The modern blocks they use live in ``blocks.py``; a model with any of them
is no longer a GPT2LMHeadModel, so it stays in buildllm's own folders.

GPT-2 is one architecture among those in ``models/registry.py``: the last lines of this file
register it, with its presets and its Hugging Face weight map (``gpt2_hf.py``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from buildllm.errors import UserError
from buildllm.files import read_json_object, write_json
from buildllm.models import gpt2_hf, registry
from buildllm.models.blocks import (
    ReLUSquared,
    RMSNorm,
    RotaryEmbedding,
    SwiGLU,
    apply_rope,
)
from buildllm.models.layers import (
    DecodeParts,
    KVCache,
    LayerParts,
    causal_mask,
    positions_and_mask,
)

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
    # Dropout on the attention weights (None: drop_rate). With 0, attention stays one fused kernel
    # while the embeddings and shortcuts drop: a CPU's fused attention kernel has no dropout.
    attention_drop_rate: float | None = None
    qkv_bias: bool = True
    tie_embeddings: bool = True
    attention: Literal["fast", "readable"] = "fast"
    # The speedrun's levers (benchmarks/recipe.py measures each); the defaults are GPT-2's.
    positions: Literal["learned", "rope"] = "learned"  # learned: an embedding per position; rope: rotary
    rope_theta: float = 10000.0  # RoPE's base: the slowest pair of features turns once every ~theta tokens
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"  # the blocks' and the final normalisation
    qk_norm: bool = False  # RMSNorm of each head's queries and keys before attention (Qwen3, the speedrun)
    activation: Literal["gelu", "relu2", "swiglu"] = "gelu"  # the feed-forward's nonlinearity
    zero_init: bool = False  # attention's and the feed-forward's output projections start at zero
    logit_softcap: float | None = None  # logits become softcap * tanh(logits / softcap) (Gemma 2)
    value_embeddings: bool = False  # token embeddings mixed into the attention values of alternate layers

    def __post_init__(self) -> None:
        if self.emb_dim % self.n_heads:
            raise UserError(f"emb_dim {self.emb_dim} is not divisible by n_heads {self.n_heads}")
        for name, choices in (("attention", ("fast", "readable")), ("positions", ("learned", "rope")),
                              ("norm", ("layernorm", "rmsnorm")), ("activation", ("gelu", "relu2", "swiglu"))):
            if getattr(self, name) not in choices:
                raise UserError(f"{name} must be one of {', '.join(map(repr, choices))}, not {getattr(self, name)!r}")
        if self.positions == "rope" and self.head_dim % 2:
            raise UserError(f"positions='rope' needs an even head width (RoPE turns pairs), got {self.head_dim}")
        if self.logit_softcap is not None and not self.logit_softcap > 0:
            raise UserError(f"logit_softcap must be positive or None, got {self.logit_softcap}")
        for name in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be a positive integer, got {getattr(self, name)}")
        for name in ("drop_rate", "attention_drop_rate"):
            if getattr(self, name) is not None and not 0.0 <= getattr(self, name) < 1.0:
                raise UserError(f"{name} must be in [0, 1), got {getattr(self, name)}")

    @property
    def attention_dropout(self) -> float:
        return self.drop_rate if self.attention_drop_rate is None else self.attention_drop_rate

    @property
    def head_dim(self) -> int:
        return self.emb_dim // self.n_heads

    @property
    def swiglu_hidden_dim(self) -> int:
        """SwiGLU's width: three matrices of ``emb_dim x hidden`` hold about what GPT-2's two of
        ``emb_dim x 4 emb_dim`` hold when hidden is 8/3 of emb_dim, here rounded to the nearest
        multiple of 32 (int4 quantizes groups of 32 inputs; int8's kernel needs multiples of 16)."""
        return 32 * max(1, round(self.emb_dim / 12))

    def value_embedding_layers(self) -> list[int]:
        """The layers that get a value embedding: every other one, the last included (nanochat)."""
        if not self.value_embeddings:
            return []
        return [layer for layer in range(self.n_layers) if layer % 2 == (self.n_layers - 1) % 2]

    def non_gpt2_levers(self) -> dict:
        """The levers set to something a GPT-2 (a GPT2LMHeadModel) cannot compute. ``zero_init``
        changes only the starting weights and ``tie_embeddings`` is GPT-2's own option."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name in NON_GPT2_LEVERS and getattr(self, f.name) != f.default}

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


NON_GPT2_LEVERS = ("positions", "norm", "qk_norm", "activation", "logit_softcap", "value_embeddings")

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
    # The best held-out Shakespeare loss that 8.5 minutes of a 2-core CPU bought with GPT-2's own
    # blocks: a smaller model that sees more tokens beats a bigger one (benchmarks/README.md).
    "shakespeare-cpu": GPTConfig(vocab_size=4096, context_length=256, emb_dim=128, n_heads=4, n_layers=4),
    # The default `buildllm train` model: that shape with levers of the GPT-2 speedrun; with Muon it
    # beat the old default (benchmarks/recipe.py has each lever alone). As a set they are Qwen3's
    # blocks (with biases in attention), so transformers' Qwen3 is its twin in benchmarks/run.py. The
    # sized recipe (training/recipe.py) changes its shape.
    "speedrun-cpu": GPTConfig(vocab_size=4096, context_length=256, emb_dim=128, n_heads=4, n_layers=4,
                              positions="rope", norm="rmsnorm", qk_norm=True, activation="swiglu", zero_init=True),
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
    """Expand each token to 4x the width, apply GELU (or ReLU squared), project back."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.emb_dim, 4 * cfg.emb_dim)
        self.activation = ReLUSquared() if cfg.activation == "relu2" else GELU()
        self.proj = nn.Linear(4 * cfg.emb_dim, cfg.emb_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.activation(self.fc(x)))


def make_norm(cfg: GPTConfig) -> nn.Module:
    """GPT-2's LayerNorm, or RMSNorm (blocks.py) with ``norm="rmsnorm"``; the same epsilon."""
    return RMSNorm(cfg.emb_dim, eps=1e-5) if cfg.norm == "rmsnorm" else LayerNorm(cfg.emb_dim)


def make_feed_forward(cfg: GPTConfig) -> nn.Module:
    """GPT-2's feed-forward, or SwiGLU (blocks.py) of about the same size with ``activation="swiglu"``."""
    return SwiGLU(cfg.emb_dim, cfg.swiglu_hidden_dim) if cfg.activation == "swiglu" else FeedForward(cfg)


# KVCache and causal_mask come from layers.py: every architecture uses them.


class MultiHeadAttention(nn.Module):
    """Causal multi-head self-attention: each token looks only at itself and earlier tokens.

    With the levers: ``qk_norm`` RMS-normalises each head's queries and keys, RoPE (``rope``, the
    cos and sin of the positions) then rotates them, and a layer with a value embedding mixes it
    into its values with two learned weights (see ``GPTModel``).
    """

    def __init__(self, cfg: GPTConfig, layer: int = 0):
        super().__init__()
        self.layer = layer  # index into the KV cache
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.fast = cfg.attention == "fast"
        # One projection makes queries, keys and values at once (GPT-2's c_attn): one big matmul
        # instead of three small ones. The readable form splits its output the same way.
        self.qkv = nn.Linear(cfg.emb_dim, 3 * cfg.emb_dim, bias=cfg.qkv_bias)
        self.out_proj = nn.Linear(cfg.emb_dim, cfg.emb_dim)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm:  # one scale per feature of a head, shared by the heads (as Qwen3)
            self.q_norm, self.k_norm = RMSNorm(cfg.head_dim, eps=1e-5), RMSNorm(cfg.head_dim, eps=1e-5)
        # values = mix[0] * values + mix[1] * value embedding, starting half and half (modded-nanogpt).
        self.value_mix = nn.Parameter(torch.full((2,), 0.5)) if layer in cfg.value_embedding_layers() else None
        self.drop_rate = cfg.attention_dropout
        self.dropout = nn.Dropout(cfg.attention_dropout)
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
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        value_embedding: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``blocked``: a ready mask, True where a query may not see a key (given with padding);
        ``rope``: the cos and sin of these positions (``positions="rope"``); ``value_embedding``:
        ``(b, tokens, emb)``, this layer's value embedding of the tokens."""
        b, num_tokens, emb_dim = x.shape
        queries, keys, values = self.qkv(x).split(emb_dim, dim=2)
        if value_embedding is not None:
            values = self.value_mix[0] * values + self.value_mix[1] * value_embedding.to(values.dtype)
        # Split the embedding into heads: (b, tokens, emb) -> (b, heads, tokens, head_dim).
        queries = queries.view(b, num_tokens, self.n_heads, self.head_dim).transpose(1, 2)
        keys = keys.view(b, num_tokens, self.n_heads, self.head_dim).transpose(1, 2)
        values = values.view(b, num_tokens, self.n_heads, self.head_dim).transpose(1, 2)
        if self.qk_norm:
            queries, keys = self.q_norm(queries), self.k_norm(keys)
        if rope is not None:
            queries, keys = apply_rope(queries, *rope), apply_rope(keys, *rope)

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
        self.norm1 = make_norm(cfg)
        self.att = MultiHeadAttention(cfg, layer)
        self.norm2 = make_norm(cfg)
        self.ff = make_feed_forward(cfg)
        self.drop_shortcut = nn.Dropout(cfg.drop_rate)

    def forward(self, x, kv_cache: KVCache | None = None, blocked: torch.Tensor | None = None,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None, value_embedding: torch.Tensor | None = None):
        x = x + self.drop_shortcut(self.att(self.norm1(x), kv_cache, blocked, rope, value_embedding))
        x = x + self.drop_shortcut(self.ff(self.norm2(x)))
        return x


# The model ---------------------------------------------------------------------------------------


class GPTModel(nn.Module):
    """GPT-2. With ``value_embeddings`` (modded-nanogpt's, placed as nanochat places them), every
    other layer, the last included, has a token embedding table of its own (``value_embeds``) whose
    row for each token is mixed into that layer's attention values: ``mix[0] * v + mix[1] * ve``,
    two learned weights starting at 0.5. The speedrun shares three tables between its first and
    last three layers and nanochat gates the mix per token and head; one table per such layer
    and two scalars is the simplest form of both."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.emb_dim)  # token embedding
        if cfg.positions == "learned":
            self.wpe = nn.Embedding(cfg.context_length, cfg.emb_dim)  # position embedding
        else:
            self.rope = RotaryEmbedding(cfg)  # positions rotate queries and keys instead
        self.value_embeds = nn.ModuleDict({str(layer): nn.Embedding(cfg.vocab_size, cfg.emb_dim)
                                           for layer in cfg.value_embedding_layers()})
        self.drop_emb = nn.Dropout(cfg.drop_rate)
        self.blocks = nn.ModuleList(TransformerBlock(cfg, layer) for layer in range(cfg.n_layers))
        self.final_norm = make_norm(cfg)
        self.out_head = nn.Linear(cfg.emb_dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            # GPT-2 reads logits off the token embedding matrix itself (saves vocab x emb weights).
            self.out_head.weight = self.wte.weight
        if cfg.activation == "swiglu":  # LoRA's default targets: SwiGLU's three matrices
            self.lora_targets = ("qkv", "out_proj", "gate", "up", "down")
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2's initialisation: N(0, 0.02), zero biases, residual projections scaled down
        (or zero, with ``zero_init``)."""
        for name, p in self.named_parameters():
            if name.endswith(".value_mix"):
                nn.init.constant_(p, 0.5)
            elif name.endswith((".bias", ".shift")):
                nn.init.zeros_(p)
            elif p.dim() == 1:  # LayerNorm's and RMSNorm's scales
                nn.init.ones_(p)
            elif name.endswith(("att.out_proj.weight", "ff.proj.weight", "ff.down.weight")):
                if self.cfg.zero_init:
                    # The speedrun's: every block starts as the identity, and the gradient
                    # reaches each projection all the same (its input is not zero).
                    nn.init.zeros_(p)
                else:
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
        last_only: bool = False,
    ) -> torch.Tensor:
        """Logits ``(batch, tokens, vocab)`` for token ids ``idx`` of shape ``(batch, tokens)``.

        ``kv_cache``: continue from the positions already in the cache (generation).
        ``padding``: ``(batch, tokens)`` bool, True at left-padding positions, which no token
        attends to and which do not count as positions.
        ``last_only``: the logits of the last position alone, ``(batch, 1, vocab)``: all that a
        prompt's pass in generation needs, without the output head's product for every position.
        """
        num_tokens = idx.shape[1]
        positions, blocked = positions_and_mask(num_tokens, kv_cache, padding, self.cfg.context_length, idx.device)

        x, rope = self.wte(idx), None
        if self.cfg.positions == "learned":
            x = x + self.wpe(positions)
        else:
            rope = self.rope(positions, x.dtype)  # every layer rotates by the same angles
        x = self.drop_emb(x)
        for layer, block in enumerate(self.blocks):
            value_embedding = self.value_embeds[str(layer)](idx) if str(layer) in self.value_embeds else None
            x = block(x, kv_cache, blocked, rope, value_embedding)
        x = self.final_norm(x[:, -1:] if last_only else x)
        if kv_cache is not None:
            kv_cache.length += num_tokens
        logits = self.out_head(x)
        if self.cfg.logit_softcap is not None:
            # Squash the logits smoothly into (-cap, cap) (Gemma 2): none can run away in training.
            logits = self.cfg.logit_softcap * torch.tanh(logits / self.cfg.logit_softcap)
        return logits

    @property
    def device(self) -> torch.device:
        return self.wte.weight.device

    # What the rest of the package asks of a model (models/registry.py lists it) ------------------

    # LoRA adapts these Linear layers by default (attribute names): attention's fused query/key/value
    # projection and its output projection, the feed-forward expansion and projection.
    lora_targets: tuple[str, ...] = ("qkv", "out_proj", "fc", "proj")

    def init_buffers(self, device: torch.device | str | None = None) -> None:
        """Remake the non-persistent buffers (the causal masks, RoPE's frequencies), e.g. after a
        meta-device load."""
        for block in self.blocks:
            block.att.mask = causal_mask(self.cfg.context_length, device=device)
        if self.cfg.positions == "rope":
            self.rope.reset_buffers(device)

    def decode_parts(self) -> DecodeParts | None:
        """This model's one-token step for the C++ decoding path (``generation/fast_decode.py``);
        None with what it does not compute: logit soft-capping, value embeddings, an attention hook."""
        cfg = self.cfg
        if cfg.logit_softcap is not None or cfg.value_embeddings or any(b.att.attention_recorder for b in self.blocks):
            return None
        swiglu = cfg.activation == "swiglu"
        layers = [LayerParts(b.norm1, [b.att.qkv], b.att.out_proj, getattr(b.att, "q_norm", None),
                             getattr(b.att, "k_norm", None), b.norm2, [b.ff.gate, b.ff.up] if swiglu else [b.ff.fc],
                             b.ff.down if swiglu else b.ff.proj) for b in self.blocks]
        learned = cfg.positions == "learned"
        return DecodeParts(cfg.n_heads, cfg.n_heads, cfg.head_dim, "gelu_tanh" if cfg.activation == "gelu" else cfg.activation,
                           self.wte.weight, self.wpe.weight if learned else None, None if learned else self.rope.freqs,
                           layers, self.final_norm, self.out_head)

    def new_kv_cache(self, batch_size: int, max_length: int | None = None, device=None, dtype=torch.float32):
        return KVCache(self.cfg, batch_size, max_length, device=device or self.device, dtype=dtype)

    # For the reader: what a configuration costs (``buildllm.describe`` adds memory) ---------------

    @staticmethod
    def count_parameters(cfg: GPTConfig) -> dict[str, int]:
        """Parameter counts by part, computed from the shapes (no model is built)."""
        d, v, t, n = cfg.emb_dim, cfg.vocab_size, cfg.context_length, cfg.n_layers
        norm = d if cfg.norm == "rmsnorm" else 2 * d  # a scale (and LayerNorm's shift)
        attention = d * 3 * d + (3 * d if cfg.qkv_bias else 0) + d * d + d
        attention += 2 * cfg.head_dim if cfg.qk_norm else 0
        if cfg.activation == "swiglu":
            feed_forward = 3 * d * cfg.swiglu_hidden_dim
        else:
            feed_forward = d * 4 * d + 4 * d + 4 * d * d + d
        block = attention + feed_forward + 2 * norm
        value_layers = len(cfg.value_embedding_layers())
        # Value embeddings are lookups, like the token embedding; their two mixing weights are not.
        embedding = v * d + (t * d if cfg.positions == "learned" else 0) + value_layers * v * d
        head = 0 if cfg.tie_embeddings else v * d
        total = embedding + n * block + 2 * value_layers + norm + head
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


registry.register("gpt2", GPTModel, GPTConfig, PRESETS, hf_format=gpt2_hf, default_preset="speedrun-cpu")
