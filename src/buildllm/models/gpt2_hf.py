"""GPT-2's weights under Hugging Face's names: the map ``weights/huggingface.py`` reads and writes by.

Every architecture with Hugging Face weights has a module like this one, with the same names:

    MODEL_TYPE                     config.json's "model_type" ("gpt2")
    config_from_hf(hf, source, **overrides) / config_to_hf(cfg, eot_id)
    to_hf_name(ours) / from_hf_name(hf)      full HF names, e.g. "transformer.h.0.ln_1.weight"
    is_transposed(hf_name)         stored as (in, out) rather than nn.Linear's (out, in)
    is_buffer(hf_name)             tensors some files carry that are not weights
    extra_hf_tensors(model)        tensors HF's layout needs that ours lacks
    check_config(cfg)              (optional) refuse a config the HF model class cannot hold

OpenAI wrote GPT-2's linear layers as "Conv1D" (``x @ W + b`` with ``W`` of shape ``(in, out)``),
while ``nn.Linear`` computes ``x @ W.T + b`` with ``W`` of shape ``(out, in)``: those weights are
transposed on the way in and back on the way out. ``c_attn`` already holds queries, keys and values
side by side in that order, exactly like our fused ``att.qkv``, so nothing needs splitting.
"""

from __future__ import annotations

import re

import torch

from buildllm.errors import UserError
from buildllm.models import registry

MODEL_TYPE = "gpt2"

# Inside each block h.N (HF) / blocks.N (ours).
BLOCK_NAMES = {
    "norm1.scale": "ln_1.weight",
    "norm1.shift": "ln_1.bias",
    "att.qkv.weight": "attn.c_attn.weight",
    "att.qkv.bias": "attn.c_attn.bias",
    "att.out_proj.weight": "attn.c_proj.weight",
    "att.out_proj.bias": "attn.c_proj.bias",
    "norm2.scale": "ln_2.weight",
    "norm2.shift": "ln_2.bias",
    "ff.fc.weight": "mlp.c_fc.weight",
    "ff.fc.bias": "mlp.c_fc.bias",
    "ff.proj.weight": "mlp.c_proj.weight",
    "ff.proj.bias": "mlp.c_proj.bias",
}

TOP_NAMES = {
    "wte.weight": "transformer.wte.weight",
    "wpe.weight": "transformer.wpe.weight",
    "final_norm.scale": "transformer.ln_f.weight",
    "final_norm.shift": "transformer.ln_f.bias",
    "out_head.weight": "lm_head.weight",
}

_HF_BLOCK = {hf: ours for ours, hf in BLOCK_NAMES.items()}
_HF_TOP = {hf: ours for ours, hf in TOP_NAMES.items()}

# Buffers some HF files carry: the causal mask and the value masked scores get. Not weights.
_BUFFER = re.compile(r"(transformer\.)?h\.\d+\.attn\.(bias|masked_bias)")

CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def to_hf_name(name: str) -> str:
    """Our parameter name -> the HF GPT2LMHeadModel name."""
    if m := re.fullmatch(r"blocks\.(\d+)\.(.+)", name):
        return f"transformer.h.{m[1]}.{BLOCK_NAMES[m[2]]}"
    return TOP_NAMES[name]


def from_hf_name(name: str) -> str | None:
    """HF GPT-2 name (``transformer.`` prefix optional) -> ours; None if GPT-2 has no such tensor."""
    short = name.removeprefix("transformer.")
    if m := re.fullmatch(r"h\.(\d+)\.(.+)", short):
        return f"blocks.{m[1]}.{_HF_BLOCK[m[2]]}" if m[2] in _HF_BLOCK else None
    return _HF_TOP.get(name if name == "lm_head.weight" else f"transformer.{short}")


def is_transposed(hf_name: str) -> bool:
    return hf_name.endswith(CONV1D)


def is_buffer(hf_name: str) -> bool:
    return bool(_BUFFER.fullmatch(hf_name))


def check_config(cfg) -> None:
    """A GPT2LMHeadModel has learned positions, LayerNorm, GELU and plain logits: a GPTConfig with
    any of the speedrun's other levers (``gpt2.py``) has no Hugging Face GPT-2 form, either way."""
    levers = cfg.non_gpt2_levers()
    if levers:
        settings = ", ".join(f"{name}={value!r}" for name, value in levers.items())
        raise UserError(f"a Hugging Face GPT-2 (GPT2LMHeadModel) cannot hold {settings}: keep this model in "
                        "buildllm's own folders (save_model, a run folder), which save every lever")


def config_from_hf(hf: dict, source: str = "config.json", **overrides):
    """A GPTConfig from a Hugging Face GPT-2 ``config.json``; refuses variants our model lacks.

    Missing keys take GPT2Config's defaults (the 124M model), as transformers does.
    """
    n_embd = hf.get("n_embd", 768)
    # Each entry: (key, GPT2Config's default, the values our model computes the same way).
    supported = [
        ("activation_function", "gelu_new", ("gelu_new", "gelu_pytorch_tanh")),  # tanh GELU
        ("layer_norm_epsilon", 1e-5, (1e-5,)),
        ("n_inner", None, (None, 4 * n_embd)),
        ("scale_attn_weights", True, (True,)),
        ("scale_attn_by_inverse_layer_idx", False, (False,)),
    ]
    for key, default, allowed in supported:
        if hf.get(key, default) not in allowed:
            raise UserError(f"{source}: {key}={hf[key]!r} is not supported (buildllm's GPT-2 uses {allowed[0]!r})")
    settings = dict(
        vocab_size=hf.get("vocab_size", 50257),
        context_length=hf.get("n_positions", 1024),
        emb_dim=n_embd,
        n_heads=hf.get("n_head", 12),
        n_layers=hf.get("n_layer", 12),
        qkv_bias=True,  # GPT-2's c_attn always has a bias
        tie_embeddings=hf.get("tie_word_embeddings", True),
    )
    try:
        return registry.get("gpt2").config_class(**{**settings, **overrides})
    except TypeError as e:
        raise UserError(f"bad config override: {e}") from None


def config_to_hf(cfg, eot_id: int | None = None) -> dict:
    """The ``config.json`` transformers expects for a GPT2LMHeadModel of this shape."""
    check_config(cfg)
    if eot_id is None and cfg.vocab_size > 50256:
        eot_id = 50256  # GPT-2's <|endoftext|>
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.context_length,
        "n_ctx": cfg.context_length,  # the older name of n_positions, still read by some tools
        "n_embd": cfg.emb_dim,
        "n_layer": cfg.n_layers,
        "n_head": cfg.n_heads,
        "n_inner": None,  # 4 * n_embd
        "activation_function": "gelu_new",
        "resid_pdrop": cfg.drop_rate,
        "embd_pdrop": cfg.drop_rate,
        "attn_pdrop": cfg.attention_dropout,
        "layer_norm_epsilon": 1e-5,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
        "use_cache": True,
    }


def extra_hf_tensors(model) -> dict[str, torch.Tensor]:
    """GPT-2 always has a c_attn bias: without one, a zero bias computes the same thing."""
    if model.cfg.qkv_bias:
        return {}
    return {
        f"transformer.h.{i}.attn.c_attn.bias": block.att.qkv.weight.new_zeros(3 * model.cfg.emb_dim)
        for i, block in enumerate(model.blocks)
    }
