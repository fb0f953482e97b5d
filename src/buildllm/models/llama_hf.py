"""Llama's weights under Hugging Face's names (``LlamaForCausalLM``): the map ``weights/huggingface.py``
reads and writes by, with the names ``models/gpt2_hf.py`` documents.

Hugging Face's Llama stores every linear layer as ``nn.Linear`` does, ``(out, in)``, so nothing is
transposed, and queries, keys and values are separate matrices, as ours are. The rotary
embedding's frequencies (``rotary_emb.inv_freq``), which older files carry, are not weights.

``config.json`` may give RoPE's settings in the form transformers 4 wrote (``rope_theta`` and
``rope_scaling``) or the one transformers 5 writes (``rope_parameters``); both are read, and the
first is written, which every version reads.
"""

from __future__ import annotations

import re
from dataclasses import replace

import torch

from buildllm.errors import UserError
from buildllm.models import registry

MODEL_TYPE = "llama"
ARCHITECTURES = ("LlamaForCausalLM",)

# Inside each block layers.N (HF) / blocks.N (ours).
BLOCK_NAMES = {
    "norm1.weight": "input_layernorm.weight",
    "att.q_proj.weight": "self_attn.q_proj.weight",
    "att.k_proj.weight": "self_attn.k_proj.weight",
    "att.v_proj.weight": "self_attn.v_proj.weight",
    "att.out_proj.weight": "self_attn.o_proj.weight",
    "att.q_norm.weight": "self_attn.q_norm.weight",  # Qwen3 only
    "att.k_norm.weight": "self_attn.k_norm.weight",  # Qwen3 only
    "norm2.weight": "post_attention_layernorm.weight",
    "ff.gate.weight": "mlp.gate_proj.weight",
    "ff.up.weight": "mlp.up_proj.weight",
    "ff.down.weight": "mlp.down_proj.weight",
}

TOP_NAMES = {
    "wte.weight": "model.embed_tokens.weight",
    "final_norm.weight": "model.norm.weight",
    "out_head.weight": "lm_head.weight",
}

_HF_BLOCK = {hf: ours for ours, hf in BLOCK_NAMES.items()}
_HF_TOP = {hf: ours for ours, hf in TOP_NAMES.items()}

_BUFFER = re.compile(r"(model\.)?layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


def to_hf_name(name: str) -> str:
    """Our parameter name -> the HF name."""
    if m := re.fullmatch(r"blocks\.(\d+)\.(.+)", name):
        return f"model.layers.{m[1]}.{BLOCK_NAMES[m[2]]}"
    return TOP_NAMES[name]


def from_hf_name(name: str) -> str | None:
    """HF name (``model.`` prefix optional) -> ours; None if the architecture has no such tensor."""
    short = name.removeprefix("model.")
    if m := re.fullmatch(r"layers\.(\d+)\.(.+)", short):
        return f"blocks.{m[1]}.{_HF_BLOCK[m[2]]}" if m[2] in _HF_BLOCK else None
    return _HF_TOP.get(name if name == "lm_head.weight" else f"model.{short}")


def is_transposed(hf_name: str) -> bool:
    return False


def is_buffer(hf_name: str) -> bool:
    return bool(_BUFFER.fullmatch(hf_name))


def extra_hf_tensors(model) -> dict[str, torch.Tensor]:
    return {}


# config.json -------------------------------------------------------------------------------------


def rope_settings(hf: dict, source: str) -> tuple[float, dict | None]:
    """``(rope_theta, rope_scaling)`` from either form of config.json; refuses scalings we lack."""
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" in params:  # transformers 5
        theta, scaling = params["rope_theta"], dict(params)
        scaling.pop("rope_theta")
    else:
        theta, scaling = hf.get("rope_theta", 10000.0), dict(hf.get("rope_scaling") or {})
    kind = scaling.pop("rope_type", scaling.pop("type", "default"))
    if kind == "default":
        return float(theta), None
    if kind != "llama3":
        raise UserError(f"{source}: rope_scaling type {kind!r} is not supported (buildllm reads 'llama3' "
                        "or none)")
    return float(theta), {"rope_type": "llama3", **scaling}


def read_config(hf: dict, source: str, model_type: str, architectures: tuple[str, ...], defaults: dict,
                **overrides):
    """Our config of ``model_type``'s arch from a Hugging Face ``config.json``.

    ``defaults``: the values transformers assumes for keys the file leaves out. Settings our
    model would not compute the same way are refused by name.
    """
    named = hf.get("architectures") or []
    if named and not set(named) & set(architectures):
        raise UserError(f"{source}: architecture {', '.join(named)} is not one buildllm can load with "
                        f"model_type {model_type!r} (it reads {', '.join(architectures)})")

    def get(key):
        return hf.get(key, defaults.get(key))

    unsupported = [
        ("hidden_act", get("hidden_act") not in ("silu", None), "silu"),
        ("attention_bias", bool(hf.get("attention_bias", False)), False),
        ("mlp_bias", bool(hf.get("mlp_bias", False)), False),
        ("use_sliding_window", bool(hf.get("use_sliding_window", False)), False),
        ("layer_types", any(t != "full_attention" for t in hf.get("layer_types") or [])
         and bool(hf.get("use_sliding_window", True)), "full_attention"),
    ]
    for key, refused, ours in unsupported:
        if refused:
            raise UserError(f"{source}: {key}={hf[key]!r} is not supported (buildllm's {model_type} uses {ours!r})")
    theta, scaling = rope_settings(hf, source)
    n_heads = get("num_attention_heads")
    settings = dict(
        vocab_size=get("vocab_size"),
        context_length=get("max_position_embeddings"),
        emb_dim=get("hidden_size"),
        n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        n_layers=get("num_hidden_layers"),
        head_dim=hf.get("head_dim") or get("hidden_size") // n_heads,
        hidden_dim=get("intermediate_size"),
        norm_eps=get("rms_norm_eps"),
        rope_theta=theta,
        rope_scaling=scaling,
        tie_embeddings=get("tie_word_embeddings"),
    )
    cfg = registry.get(model_type).config_class(**settings)
    try:
        return replace(cfg, **overrides) if overrides else cfg
    except TypeError as e:
        raise UserError(f"bad config override: {e}") from None


def write_config(cfg, architecture: str, model_type: str, eot_id: int | None) -> dict:
    """The ``config.json`` transformers expects for a model of ``cfg``'s shape."""
    config = {
        "architectures": [architecture],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.context_length,
        "hidden_size": cfg.emb_dim,
        "intermediate_size": cfg.hidden_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": cfg.rope_scaling,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": 0.02,
        "use_cache": True,
    }
    if eot_id is not None:
        config["eos_token_id"] = eot_id
    return config


# Transformers' LlamaConfig defaults, for keys a config.json leaves out.
DEFAULTS = dict(vocab_size=32000, max_position_embeddings=2048, hidden_size=4096, intermediate_size=11008,
                num_hidden_layers=32, num_attention_heads=32, rms_norm_eps=1e-6, tie_word_embeddings=False,
                hidden_act="silu")


def config_from_hf(hf: dict, source: str = "config.json", **overrides):
    return read_config(hf, source, MODEL_TYPE, ARCHITECTURES, DEFAULTS, **overrides)


def config_to_hf(cfg, eot_id: int | None = None) -> dict:
    if cfg.qk_norm:
        raise UserError("a llama config with qk_norm has no LlamaForCausalLM form; use arch 'qwen3'")
    return write_config(cfg, "LlamaForCausalLM", MODEL_TYPE, eot_id)
