"""Which model class builds which architecture.

Every model config carries an ``arch`` field ("gpt2", ...). An architecture registers its model
class, its config class and its presets once, at the bottom of its own file:

    register("gpt2", GPTModel, GPTConfig, PRESETS, hf_format=gpt2_hf)

and the rest of the package works through this table instead of naming a model: training builds
with ``build(cfg)``, checkpoints read configs with ``config_from_dict``, the CLI's ``describe``
asks the arch for its counts. Nothing here imports an architecture; ``buildllm.models`` imports
the built-in ones, which registers them.

What a model class provides (GPT-2's ``GPTModel`` is the reference):

    Model(cfg)                                  build with fresh weights (its own initialisation)
    model.cfg                                   the config it was built from
    model(idx, kv_cache, padding, last_only)    logits; positions are computed inside the model
    model.new_kv_cache(batch, max_length, device, dtype)
    model.init_buffers(device)                  remake non-persistent buffers after a meta-device load
    Model.lora_targets                          names of the Linear layers LoRA adapts by default
    Model.count_parameters(cfg)                 {"total", "embedding", "head", "non_embedding"}
    Model.flops_per_token(cfg)                  {"train": ..., "forward": ...}

Adding an architecture, e.g. Llama 3:

1. ``models/llama.py``: its config (a frozen dataclass with ``arch = "llama"``; fields the package
   reads: vocab_size, context_length, emb_dim, n_heads, n_layers, head_dim, drop_rate,
   tie_embeddings), its model class with the methods above, its presets, and last
   ``registry.register("llama", LlamaModel, LlamaConfig, PRESETS, hf_format=llama_hf,
   default_preset="llama-cpu")`` (the preset ``buildllm train --arch llama`` trains).
2. ``models/llama_hf.py``: its Hugging Face weight map, with the names ``models/gpt2_hf.py`` has.
3. One import line in ``models/__init__.py`` so the built-in arch registers on import (and, if
   wanted, public names in ``buildllm/__init__.py``'s table).

Training, generation, LoRA, quantization, checkpoints and the loader need no change.
``tests/test_architectures.py`` registers a toy architecture and runs it through all of them.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from buildllm.errors import UserError


@dataclass(frozen=True)
class Arch:
    name: str
    model_class: type
    config_class: type
    presets: dict
    hf_format: object = None  # a module like models/gpt2_hf.py: the Hugging Face weight map
    default_preset: str | None = None  # what `buildllm train --arch NAME` trains: a small CPU preset


_ARCHS: dict[str, Arch] = {}


def register(arch: str, model_class: type, config_class: type, presets: dict | None = None,
             hf_format=None, default_preset: str | None = None) -> None:
    """Make ``arch`` buildable: configs with ``arch=arch`` build ``model_class``."""
    presets = dict(presets or {})
    for name, cfg in presets.items():
        owner = next((a.name for a in _ARCHS.values() if name in a.presets and a.name != arch), None)
        if owner is not None:
            raise ValueError(f"preset {name!r} of {arch} is already a preset of {owner}")
        if getattr(cfg, "arch", None) != arch:
            raise ValueError(f"preset {name!r} has arch {getattr(cfg, 'arch', None)!r}, not {arch!r}")
    if default_preset is not None and default_preset not in presets:
        raise ValueError(f"default preset {default_preset!r} of {arch} is not one of its presets")
    _ARCHS[arch] = Arch(arch, model_class, config_class, presets, hf_format, default_preset)


# Under the names ``buildllm`` exports them by (``buildllm.build_model(cfg)``, ...).
def register_arch(*args, **kwargs) -> None:
    register(*args, **kwargs)


def build_model(cfg):
    return build(cfg)


def archs() -> list[str]:
    return list(_ARCHS)


def get(arch: str) -> Arch:
    if arch not in _ARCHS:
        raise UserError(f"unknown architecture {arch!r}; known: {', '.join(_ARCHS)}")
    return _ARCHS[arch]


def hf_format_for(model_type: str):
    """The weight map of the architecture whose Hugging Face ``model_type`` this is."""
    for arch in _ARCHS.values():
        if arch.hf_format is not None and arch.hf_format.MODEL_TYPE == model_type:
            return arch.hf_format
    known = [a.hf_format.MODEL_TYPE for a in _ARCHS.values() if a.hf_format is not None]
    raise UserError(f"model_type {model_type!r} is not one buildllm can load; it reads {', '.join(known)}")


def default_preset(arch: str) -> str:
    """The preset ``buildllm train --arch ARCH`` trains when no preset is named."""
    found = get(arch).default_preset
    if found is None:
        raise UserError(f"architecture {arch!r} has no default preset; name one with --preset")
    return found


def model_class(cfg) -> type:
    return get(getattr(cfg, "arch", "gpt2")).model_class


def build(cfg):
    """A new model of ``cfg``'s architecture, freshly initialised."""
    return model_class(cfg)(cfg)


def all_presets() -> dict:
    return {name: cfg for arch in _ARCHS.values() for name, cfg in arch.presets.items()}


def preset(name: str, **overrides):
    """The config of preset ``name``, whichever architecture it belongs to, with ``overrides``."""
    presets = all_presets()
    if name not in presets:
        raise UserError(f"unknown preset {name!r}; choose one of: {', '.join(presets)}")
    return replace(presets[name], **overrides) if overrides else presets[name]


def config_from_dict(d: dict):
    """The config a ``config.json`` holds, of the class its ``arch`` names ("gpt2" when absent:
    files written before architectures had names)."""
    arch = get(d.get("arch", "gpt2"))
    known = {f.name for f in fields(arch.config_class)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise UserError(
            f"unknown model config key(s) {', '.join(unknown)} for arch {arch.name!r}; "
            f"valid keys: {', '.join(sorted(known))}"
        )
    return arch.config_class(**d)


def count_parameters(cfg) -> dict[str, int]:
    """Parameter counts by part, computed from the shapes by the architecture (no model is built)."""
    return model_class(cfg).count_parameters(cfg)


def describe(cfg) -> dict[str, float]:
    """Parameters, memory for training state, and FLOPs per token of a configuration."""
    params = count_parameters(cfg)
    flops = model_class(cfg).flops_per_token(cfg)
    n = params["total"]
    return {
        **{f"params_{k}": v for k, v in params.items()},
        "weights_fp32_bytes": 4 * n,
        "weights_bf16_bytes": 2 * n,
        "grads_fp32_bytes": 4 * n,
        "grads_bf16_bytes": 2 * n,
        "adamw_state_fp32_bytes": 8 * n,  # first and second moments
        "adamw_state_bf16_bytes": 4 * n,
        "train_flops_per_token": flops["train"],
        "forward_flops_per_token": flops["forward"],
    }
