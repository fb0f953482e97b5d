"""Qwen3 (dense): Llama 3's decoder plus QK-norm, and anything saved as ``Qwen3ForCausalLM``.

    token ids ──► token embedding (wte)
              ──► n × DecoderBlock:  x = x + GroupedQueryAttention(RMSNorm(x), RoPE, QK-norm)
                                     x = x + SwiGLU(RMSNorm(x))
              ──► final RMSNorm ──► output head ──► logits

The one change to the computation is inside attention (``blocks.GroupedQueryAttention``): each
head's queries and keys go through an RMSNorm of their own before the rotation, so the attention
logits cannot grow without bound during training. The shapes differ in one place as well: a
head is ``head_dim`` = 128 wide whatever ``emb_dim`` is, so ``n_heads * head_dim`` may exceed
``emb_dim`` (Qwen3-0.6B projects 1024 features to 16 heads of 128). RoPE is plain, with base
1,000,000.

Everything else, the model class included, is Llama's (``llama.py``); Qwen3 has its own name,
config defaults, presets and Hugging Face map (``qwen3_hf.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

from buildllm.models import qwen3_hf, registry
from buildllm.models.llama import LlamaConfig, LlamaModel


@dataclass(frozen=True)
class Qwen3Config(LlamaConfig):
    arch: str = "qwen3"
    vocab_size: int = 151936
    context_length: int = 40960
    emb_dim: int = 1024
    n_heads: int = 16
    n_kv_heads: int = 8
    n_layers: int = 28
    head_dim: int | None = 128
    hidden_dim: int = 3072
    norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    qk_norm: bool = True


class Qwen3Model(LlamaModel):
    """Llama's model class; the config's ``qk_norm`` gives each attention layer its q/k norms."""


PRESETS: dict[str, Qwen3Config] = {
    # Alibaba's Qwen3 dense models (the published config.json shapes).
    "qwen3-0.6b": Qwen3Config(emb_dim=1024, n_heads=16, n_kv_heads=8, n_layers=28, hidden_dim=3072),
    "qwen3-1.7b": Qwen3Config(emb_dim=2048, n_heads=16, n_kv_heads=8, n_layers=28, hidden_dim=6144),
    "qwen3-4b": Qwen3Config(emb_dim=2560, n_heads=32, n_kv_heads=8, n_layers=36, hidden_dim=9728),
    "qwen3-8b": Qwen3Config(emb_dim=4096, n_heads=32, n_kv_heads=8, n_layers=36, hidden_dim=12288,
                            tie_embeddings=False),
    # Small ones that train on a laptop CPU (the vocabulary comes from your tokenizer).
    "qwen3-nano": Qwen3Config(vocab_size=4096, context_length=128, emb_dim=64, n_heads=4, n_kv_heads=2,
                              n_layers=2, head_dim=16, hidden_dim=192, rope_theta=10000.0),
    "qwen3-cpu": Qwen3Config(vocab_size=4096, context_length=256, emb_dim=128, n_heads=4, n_kv_heads=2,
                             n_layers=4, head_dim=32, hidden_dim=384, rope_theta=10000.0),
}


registry.register("qwen3", Qwen3Model, Qwen3Config, PRESETS, hf_format=qwen3_hf, default_preset="qwen3-cpu")
