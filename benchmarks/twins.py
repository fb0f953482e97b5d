"""The transformers model that computes what a buildllm ``GPTModel`` computes, holding its weights.

``benchmarks/run.py`` races buildllm against Hugging Face transformers on the same architecture,
shape and weights. GPT-2's blocks are ``GPT2LMHeadModel``; two combinations of the speedrun's
levers (``GPTConfig``'s switches) are exactly a transformers architecture too:

    positions="rope"                                        GPTNeoXForCausalLM (sequential
                                                            residual, full-width rotary, tanh GELU)
    positions="rope", norm="rmsnorm", qk_norm, "swiglu"     Qwen3ForCausalLM (with biases in attention)

``twin(cfg)`` builds the transformers model and ``copy_weights(ours, hf)`` copies ours into it;
run.py checks the logits agree before it times anything. Any other combination has no twin and is
refused in one line.
"""

from __future__ import annotations

import torch
from torch import nn

from buildllm.models.gpt2 import GPTConfig, GPTModel

NEOX = {"positions": "rope"}
QWEN3 = {"positions": "rope", "norm": "rmsnorm", "qk_norm": True, "activation": "swiglu"}


def kind_of(cfg: GPTConfig) -> str:
    """Which transformers architecture computes ``cfg``: "gpt2", "gpt_neox" or "qwen3"."""
    levers = cfg.non_gpt2_levers()
    if not levers:
        return "gpt2"
    if levers == NEOX:
        return "gpt_neox"
    if levers == QWEN3:
        return "qwen3"
    raise SystemExit(f"error: no transformers model computes a GPT with {levers}: the twins are GPT-2's "
                     f"blocks, {NEOX} (GPT-NeoX) and {QWEN3} (Qwen3)")


def twin(cfg: GPTConfig) -> nn.Module:
    """A freshly initialised transformers model of ``cfg``'s architecture and shape, SDPA attention."""
    kind = kind_of(cfg)
    common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.emb_dim, num_hidden_layers=cfg.n_layers,
                  num_attention_heads=cfg.n_heads, max_position_embeddings=cfg.context_length,
                  tie_word_embeddings=cfg.tie_embeddings)
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if kind == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        from buildllm.weights.huggingface import config_to_hf

        model = GPT2LMHeadModel(GPT2Config(**config_to_hf(cfg)))
    elif kind == "gpt_neox":
        from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

        if not cfg.qkv_bias:
            raise SystemExit("error: GPT-NeoX has biases on queries, keys and values: use qkv_bias=True")
        model = GPTNeoXForCausalLM(GPTNeoXConfig(
            **common, intermediate_size=4 * cfg.emb_dim, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-5,
            use_parallel_residual=False, attention_bias=True, rope_parameters={**rope, "partial_rotary_factor": 1.0}))
    else:
        from transformers import Qwen3Config, Qwen3ForCausalLM

        if not cfg.qkv_bias:
            raise SystemExit("error: Qwen3 with attention_bias has biases on queries, keys and values: use qkv_bias=True")
        model = Qwen3ForCausalLM(Qwen3Config(
            **common, intermediate_size=cfg.swiglu_hidden_dim, num_key_value_heads=cfg.n_heads,
            head_dim=cfg.head_dim, hidden_act="silu", rms_norm_eps=1e-5, attention_bias=True,
            rope_parameters=rope, use_sliding_window=False))
    model.config._attn_implementation = "sdpa"  # transformers' fastest attention on a CPU
    return model


def copy_weights(ours: GPTModel, hf: nn.Module) -> None:
    """Copy ``ours`` into its twin ``hf``; a weight missing on either side stops the run."""
    state = hf_state(ours)
    missing, unexpected = hf.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:  # a tied head is the token embedding
        raise RuntimeError(f"weight copy failed: missing {missing}, unexpected {unexpected}")


def hf_state(ours: GPTModel) -> dict[str, torch.Tensor]:
    """Our weights under the twin's names and layouts."""
    cfg, o = ours.cfg, ours.state_dict()
    kind = kind_of(cfg)
    if kind == "gpt2":
        from buildllm.weights.huggingface import hf_state_of

        return hf_state_of(ours)
    d, h, hd = cfg.emb_dim, cfg.n_heads, cfg.head_dim
    state = {}
    if kind == "gpt_neox":
        def per_head(w):  # our fused rows are [q; k; v] x heads, NeoX's are heads x [q; k; v]
            return w.view(3, h, hd, *w.shape[1:]).transpose(0, 1).reshape(w.shape)

        state["gpt_neox.embed_in.weight"] = o["wte.weight"]
        state["gpt_neox.final_layer_norm.weight"] = o["final_norm.scale"]
        state["gpt_neox.final_layer_norm.bias"] = o["final_norm.shift"]
        for i in range(cfg.n_layers):
            p, q = f"blocks.{i}.", f"gpt_neox.layers.{i}."
            for ours_norm, theirs in (("norm1", "input_layernorm"), ("norm2", "post_attention_layernorm")):
                state[f"{q}{theirs}.weight"], state[f"{q}{theirs}.bias"] = o[f"{p}{ours_norm}.scale"], o[f"{p}{ours_norm}.shift"]
            for part in ("weight", "bias"):
                state[f"{q}attention.query_key_value.{part}"] = per_head(o[f"{p}att.qkv.{part}"])
                state[f"{q}attention.dense.{part}"] = o[f"{p}att.out_proj.{part}"]
                state[f"{q}mlp.dense_h_to_4h.{part}"] = o[f"{p}ff.fc.{part}"]
                state[f"{q}mlp.dense_4h_to_h.{part}"] = o[f"{p}ff.proj.{part}"]
    else:
        state["model.embed_tokens.weight"] = o["wte.weight"]
        state["model.norm.weight"] = o["final_norm.weight"]
        for i in range(cfg.n_layers):
            p, q = f"blocks.{i}.", f"model.layers.{i}."
            state[f"{q}input_layernorm.weight"] = o[f"{p}norm1.weight"]
            state[f"{q}post_attention_layernorm.weight"] = o[f"{p}norm2.weight"]
            for part in ("weight", "bias"):
                for name, rows in zip(("q_proj", "k_proj", "v_proj"), o[f"{p}att.qkv.{part}"].split(d)):
                    state[f"{q}self_attn.{name}.{part}"] = rows
                state[f"{q}self_attn.o_proj.{part}"] = o[f"{p}att.out_proj.{part}"]
            state[f"{q}self_attn.q_norm.weight"] = o[f"{p}att.q_norm.weight"]
            state[f"{q}self_attn.k_norm.weight"] = o[f"{p}att.k_norm.weight"]
            for ours_name, theirs in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
                state[f"{q}mlp.{theirs}.weight"] = o[f"{p}ff.{ours_name}.weight"]
    if not cfg.tie_embeddings:
        state["lm_head.weight"] = o["out_head.weight"]
    return {k: v.clone() for k, v in state.items()}


def muon_matrices(hf: nn.Module) -> list[nn.Parameter]:
    """The twin's counterparts of what ``training.optim.muon_groups`` gives Muon in ours: the
    2-D weights inside the blocks."""
    inside = (".layers.", ".h.")  # Qwen3's and GPT-NeoX's blocks, GPT-2's
    return [p for name, p in hf.named_parameters() if p.dim() == 2 and any(b in f".{name}" for b in inside)]
