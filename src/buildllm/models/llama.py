"""Llama 3: GPT-2's decoder with the changes of 2019-2024 (blocks.py), and anything saved as
``LlamaForCausalLM`` (Llama 3.x, SmolLM2, TinyLlama, ...).

The model reads top to bottom, the way the data flows:

    token ids ──► token embedding (wte)               (no position embedding: RoPE, inside attention)
              ──► n × DecoderBlock:  x = x + GroupedQueryAttention(RMSNorm(x), RoPE)
                                     x = x + SwiGLU(RMSNorm(x))
              ──► final RMSNorm ──► output head (tied to wte, or its own) ──► logits

Compared with ``gpt2.py``: RMSNorm instead of LayerNorm; positions rotate queries and keys (RoPE,
with Llama 3's frequency scaling) instead of a learned embedding added to the input; a gated
SwiGLU feed-forward; fewer key/value heads than query heads; no biases anywhere. The forward
contract is GPT-2's: ``model(idx, kv_cache, padding)``, left padding counted out of the positions.

Qwen3 (``qwen3.py``) is this model plus QK-norm; it is registered under its own name.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from buildllm.errors import UserError
from buildllm.files import read_json_object, write_json
from buildllm.models import llama_hf, registry
from buildllm.models.blocks import DecoderBlock, RMSNorm, RotaryEmbedding
from buildllm.models.layers import DecodeParts, KVCache, LayerParts, positions_and_mask

# Configuration -----------------------------------------------------------------------------------

ROPE_SCALING_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclass(frozen=True)
class LlamaConfig:
    arch: str = "llama"  # which model class builds this config (models/registry.py)
    vocab_size: int = 128256
    context_length: int = 131072
    emb_dim: int = 2048
    n_heads: int = 32
    n_kv_heads: int = 8  # key/value heads; n_heads must be a multiple (grouped-query attention)
    n_layers: int = 16
    head_dim: int | None = None  # width of one head; None: emb_dim // n_heads (Qwen3 sets it apart)
    hidden_dim: int = 8192  # SwiGLU's inner width
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0  # RoPE's base: the slowest pair turns once every ~theta tokens
    # Llama 3's stretch of the RoPE frequencies, in Hugging Face's form: {"rope_type": "llama3",
    # "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}; None: plain RoPE.
    rope_scaling: dict | None = None
    qk_norm: bool = False  # RMSNorm of each head's queries and keys (Qwen3)
    tie_embeddings: bool = True
    drop_rate: float = 0.0
    attention: Literal["fast", "readable"] = "fast"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_kv_heads", "n_layers", "hidden_dim"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.head_dim is None:
            if self.emb_dim % self.n_heads:
                raise UserError(f"emb_dim {self.emb_dim} is not divisible by n_heads {self.n_heads}; set head_dim")
            object.__setattr__(self, "head_dim", self.emb_dim // self.n_heads)
        if self.head_dim < 2 or self.head_dim % 2:
            raise UserError(f"head_dim must be even (RoPE turns pairs of features), got {self.head_dim}")
        if self.n_heads % self.n_kv_heads:
            raise UserError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if self.attention not in ("fast", "readable"):
            raise UserError(f"attention must be 'fast' or 'readable', not {self.attention!r}")
        if not 0.0 <= self.drop_rate < 1.0:
            raise UserError(f"drop_rate must be in [0, 1), got {self.drop_rate}")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            missing = [k for k in ROPE_SCALING_KEYS if k not in self.rope_scaling]
            if kind != "llama3" or missing:
                raise UserError(f"rope_scaling must be Llama 3's (rope_type 'llama3' with "
                                f"{', '.join(ROPE_SCALING_KEYS)}), got {self.rope_scaling!r}")

    # As GPTConfig: presets and saved configs may be of any registered architecture.
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


LLAMA3_SCALING = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192}

PRESETS: dict[str, LlamaConfig] = {
    # Meta's Llama 3.2 and 3.1 (the published config.json shapes).
    "llama-3.2-1b": LlamaConfig(emb_dim=2048, n_heads=32, n_kv_heads=8, n_layers=16, hidden_dim=8192,
                                rope_scaling={**LLAMA3_SCALING, "factor": 32.0}),
    "llama-3.2-3b": LlamaConfig(emb_dim=3072, n_heads=24, n_kv_heads=8, n_layers=28, hidden_dim=8192,
                                rope_scaling={**LLAMA3_SCALING, "factor": 32.0}),
    "llama-3.1-8b": LlamaConfig(emb_dim=4096, n_heads=32, n_kv_heads=8, n_layers=32, hidden_dim=14336,
                                rope_scaling={**LLAMA3_SCALING, "factor": 8.0}, tie_embeddings=False),
    # Hugging Face's SmolLM2-135M: a Llama of 30 thin layers.
    "smollm2-135m": LlamaConfig(vocab_size=49152, context_length=8192, emb_dim=576, n_heads=9, n_kv_heads=3,
                                n_layers=30, hidden_dim=1536, rope_theta=100000.0),
    # Small ones that train on a laptop CPU (the vocabulary comes from your tokenizer).
    "llama-nano": LlamaConfig(vocab_size=4096, context_length=128, emb_dim=64, n_heads=4, n_kv_heads=2,
                              n_layers=2, hidden_dim=192, rope_theta=10000.0),
    "llama-cpu": LlamaConfig(vocab_size=4096, context_length=256, emb_dim=128, n_heads=4, n_kv_heads=2,
                             n_layers=4, hidden_dim=384, rope_theta=10000.0),
}


# The model ---------------------------------------------------------------------------------------


class LlamaModel(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.emb_dim)  # token embedding
        self.rope = RotaryEmbedding(cfg)
        self.blocks = nn.ModuleList(DecoderBlock(cfg, layer) for layer in range(cfg.n_layers))
        self.final_norm = RMSNorm(cfg.emb_dim, cfg.norm_eps)
        self.out_head = nn.Linear(cfg.emb_dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.out_head.weight = self.wte.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """N(0, 0.02) for matrices, ones for the norms' scales, the residual projections scaled
        down by depth as in GPT-2 (each block adds two outputs to the residual stream)."""
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p)
            elif name.endswith(("att.out_proj.weight", "ff.down.weight")):
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
        ``last_only``: the logits of the last position alone, ``(batch, 1, vocab)`` (a prompt's
        pass in generation).
        """
        num_tokens = idx.shape[1]
        positions, blocked = positions_and_mask(num_tokens, kv_cache, padding, self.cfg.context_length, idx.device)

        x = self.wte(idx)
        rope = self.rope(positions, x.dtype)  # every layer rotates by the same angles
        for block in self.blocks:
            x = block(x, rope, kv_cache, blocked)
        x = self.final_norm(x[:, -1:] if last_only else x)
        if kv_cache is not None:
            kv_cache.length += num_tokens
        return self.out_head(x)

    @property
    def device(self) -> torch.device:
        return self.wte.weight.device

    # What the rest of the package asks of a model (models/registry.py lists it) ------------------

    # LoRA adapts these Linear layers by default: the four attention projections and the three
    # of the feed-forward.
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "out_proj", "gate", "up", "down")

    def init_buffers(self, device: torch.device | str | None = None) -> None:
        """Remake RoPE's frequencies (which hold no data on the meta device) after a meta-device load."""
        self.rope.reset_buffers(device)

    def decode_parts(self) -> DecodeParts | None:
        """This model's one-token step for the C++ decoding path (``generation/fast_decode.py``)."""
        if any(b.att.attention_recorder for b in self.blocks):
            return None
        layers = [LayerParts(b.norm1, [b.att.q_proj, b.att.k_proj, b.att.v_proj], b.att.out_proj,
                             getattr(b.att, "q_norm", None), getattr(b.att, "k_norm", None), b.norm2,
                             [b.ff.gate, b.ff.up], b.ff.down) for b in self.blocks]
        cfg = self.cfg
        return DecodeParts(cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, "swiglu", self.wte.weight, None, self.rope.freqs,
                           layers, self.final_norm, self.out_head)

    def new_kv_cache(self, batch_size: int, max_length: int | None = None, device=None, dtype=torch.float32):
        """A cache of ``n_kv_heads`` keys and values per layer (not ``n_heads``)."""
        return KVCache(self.cfg, batch_size, max_length, device=device or self.device, dtype=dtype,
                       n_kv_heads=self.cfg.n_kv_heads, head_dim=self.cfg.head_dim)

    # For the reader: what a configuration costs (``buildllm.describe`` adds memory) ---------------

    @staticmethod
    def count_parameters(cfg: LlamaConfig) -> dict[str, int]:
        """Parameter counts by part, computed from the shapes (no model is built)."""
        d, v, n, hd = cfg.emb_dim, cfg.vocab_size, cfg.n_layers, cfg.head_dim
        attention = d * cfg.n_heads * hd + 2 * d * cfg.n_kv_heads * hd + cfg.n_heads * hd * d
        attention += 2 * hd if cfg.qk_norm else 0
        block = attention + 3 * d * cfg.hidden_dim + 2 * d  # two RMSNorm scales
        embedding = v * d
        head = 0 if cfg.tie_embeddings else v * d
        total = embedding + n * block + d + head
        return {"total": total, "embedding": embedding, "head": head, "non_embedding": total - embedding - head}

    @staticmethod
    def flops_per_token(cfg: LlamaConfig) -> dict[str, int]:
        """Training and forward FLOPs per token: 6N and 2N for the matmul parameters (output head
        included, embedding lookup not), plus attention's scores and weighted sum over the context."""
        params = LlamaModel.count_parameters(cfg)
        matmul_params = params["non_embedding"] + cfg.vocab_size * cfg.emb_dim
        attention_flops = 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * cfg.context_length
        return {"train": 6 * matmul_params + attention_flops, "forward": 2 * matmul_params + attention_flops // 3}


registry.register("llama", LlamaModel, LlamaConfig, PRESETS, hf_format=llama_hf, default_preset="llama-cpu")
