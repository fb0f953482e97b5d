"""Qwen3's weights under Hugging Face's names (``Qwen3ForCausalLM``).

The layout is Llama's (``llama_hf.py``) plus each attention layer's ``q_norm`` and ``k_norm``, so
the name map is Llama's; what differs is the config: its type, its defaults, and a refusal of
sliding-window attention, which buildllm's Qwen3 does not implement.
"""

from __future__ import annotations

from buildllm.errors import UserError
from buildllm.models.llama_hf import (  # noqa: F401 - the same weight names as Llama's
    extra_hf_tensors,
    from_hf_name,
    is_buffer,
    is_transposed,
    read_config,
    to_hf_name,
    write_config,
)

MODEL_TYPE = "qwen3"
ARCHITECTURES = ("Qwen3ForCausalLM",)

# Transformers' Qwen3Config defaults, for keys a config.json leaves out.
DEFAULTS = dict(vocab_size=151936, max_position_embeddings=32768, hidden_size=4096, intermediate_size=22016,
                num_hidden_layers=32, num_attention_heads=32, rms_norm_eps=1e-6, tie_word_embeddings=False,
                hidden_act="silu")


def config_from_hf(hf: dict, source: str = "config.json", **overrides):
    hf = {"head_dim": 128, **hf}  # Qwen3Config's default, not hidden_size // heads
    return read_config(hf, source, MODEL_TYPE, ARCHITECTURES, DEFAULTS, **overrides)


def config_to_hf(cfg, eot_id: int | None = None) -> dict:
    if not cfg.qk_norm:
        raise UserError("a qwen3 config without qk_norm has no Qwen3ForCausalLM form; use arch 'llama'")
    return {**write_config(cfg, "Qwen3ForCausalLM", MODEL_TYPE, eot_id), "use_sliding_window": False}
