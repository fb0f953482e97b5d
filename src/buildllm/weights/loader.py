"""One way to load a model for inference or fine-tuning, whatever form its weights come in.

``load_model(source)`` looks at what ``source`` is and takes the matching route:

    buildllm run or checkpoint folder   model.safetensors + config.json (buildllm's, with "arch")
    classifier folder                   the above + classifier.json (the head has one output per label)
    instruction model                   the above + prompt_template.json (returned as ``.prompt_template``)
    LoRA adapters folder                adapter_config.json + adapter.safetensors, on top of ``base``
    Hugging Face folder or model id     config.json (with "model_type") + model.safetensors / .bin
    OpenAI TensorFlow folder            hparams.json + model.ckpt.*

Every route ends in ``checkpoint.model_from_state_dict``: the model is built on the meta device and
the tensors are moved into place, so a mismatch is an error before anything is half-loaded. Then one
vocabulary rule applies to all: the model's vocabulary may be larger than the tokenizer's (padded to
a multiple of 64, say), never smaller.
"""

from __future__ import annotations

import os
import re
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from buildllm.errors import UserError
from buildllm.files import read_json_object
from buildllm.finetune.lora import ADAPTER_CONFIG, load_adapters
from buildllm.models import registry
from buildllm.tokenizer import Tokenizer
from buildllm.weights.checkpoint import (
    CONFIG,
    TOKENIZER,
    WEIGHTS,
    model_from_state_dict,
    read_model,
    read_weights,
)
from buildllm.weights.huggingface import (
    MODEL_IDS,
    config_from_hf,
    download,
    model_from_hf_state,
    read_hf_weights,
    save_pretrained,
)
from buildllm.weights.huggingface import TOKENIZER as HF_TOKENIZER
from buildllm.weights.openai import read_tf_checkpoint

# Files that mark what a buildllm folder holds beside the model (the adapters' are lora.py's).
CLASSIFIER = "classifier.json"  # a classifier: labels, max_length; the head has one output per label
PROMPT_TEMPLATE = "prompt_template.json"  # an instruction model: its prompt format


class LoadedModel(tuple):
    """``(model, tokenizer)``, so ``model, tokenizer = load_model(...)`` works, plus what else the
    folder held: ``prompt_template`` (the template's JSON object, for instruction models),
    ``classifier`` (classifier.json: labels, max_length, ...) and ``source``."""

    def __new__(cls, model, tokenizer, source: str = "", prompt_template: dict | None = None,
                classifier: dict | None = None):
        self = super().__new__(cls, (model, tokenizer))
        self.model, self.tokenizer, self.source = model, tokenizer, source
        self.prompt_template, self.classifier = prompt_template, classifier
        return self


def load_model(
    source: str | os.PathLike,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    quantize: str | None = None,
    base: str | os.PathLike | None = None,
    **overrides,
) -> LoadedModel:
    """Any model as ``(model, tokenizer)`` in eval mode (see the module docstring for what loads).

    ``dtype``: convert the weights; None (the default) keeps the dtype the file stores, so a bf16
    Llama or Qwen3 folder loads in bf16 (half the memory of fp32). Training asks for fp32.
    ``quantize``: "int8" or "int4" after loading (CPU kernels). ``base``: the base model a LoRA adapters folder was trained on.
    ``overrides``: config fields that do not change shapes, e.g. ``drop_rate=0.1`` to fine-tune or
    ``attention="readable"``.

    The tokenizer is the one saved with the weights, else GPT-2's when the vocabulary is GPT-2's
    (or padded beyond it), else None. A saved tokenizer larger than the model's vocabulary is an
    error.
    """
    directory = _resolve(source)
    has = lambda name: (directory / name).is_file()  # noqa: E731
    template = read_json_object(directory / PROMPT_TEMPLATE, "prompt template") if has(PROMPT_TEMPLATE) else None

    if has(ADAPTER_CONFIG) and not has(WEIGHTS):
        model, tokenizer = _load_adapters(directory, base, device, dtype, overrides)
        return _finish(model, tokenizer, directory, quantize, prompt_template=template)
    if base is not None:
        raise UserError(f"base is only for a LoRA adapters folder; {directory} holds a whole model")
    if has(CLASSIFIER):
        model, tokenizer, meta = _load_classifier(directory, device, dtype, overrides)
        return _finish(model, tokenizer, directory, quantize, classifier=meta)
    if has(CONFIG):
        config = read_json_object(directory / CONFIG, "model config")
        if "model_type" in config:  # a Hugging Face folder: its tokenizer.json is HF's, not ours
            cfg = config_from_hf(config, str(directory / CONFIG), **overrides)
            state, where = read_hf_weights(directory)
            model = model_from_hf_state(cfg, state, device=device, dtype=dtype, source=where)
            tokenizer_file = HF_TOKENIZER
        else:  # buildllm's own: a run folder, a checkpoint, a fine-tuned model
            model = _model_from_folder(directory, config, device, dtype, overrides)
            tokenizer_file = TOKENIZER
    elif has("hparams.json"):
        cfg, state = read_tf_checkpoint(directory, **overrides)
        model = model_from_hf_state(cfg, state, device=device, dtype=dtype, source=str(directory))
        tokenizer_file = HF_TOKENIZER
    else:
        raise UserError(
            f"{directory} holds no model: expected model.safetensors + config.json (buildllm or Hugging "
            "Face), adapter_config.json (LoRA), or hparams.json + model.ckpt.* (OpenAI)"
        )
    tokenizer = tokenizer_for(directory, model.cfg.vocab_size, tokenizer_file, model.cfg.arch)
    return _finish(model, tokenizer, directory, quantize, prompt_template=template)


def _resolve(source) -> Path:
    """The folder ``source`` names, downloading a Hugging Face model id first."""
    path = Path(source)
    if path.is_dir():
        return path
    if path.exists():
        raise UserError(f"{path} is a file: pass the folder that holds config.json and the weights")
    if path.is_absolute() or str(source).startswith(".") or str(source).count("/") > 1:  # a path, not an id
        raise UserError(f"{path} is neither a folder nor a model id: the folder does not exist")
    if str(source) in MODEL_IDS or re.fullmatch(r"[\w.-]+/[\w.-]+", str(source)):
        return download(str(source))
    raise UserError(f"{source} is neither a folder nor a model id; use {', '.join(MODEL_IDS)} or a model folder")


def _config(config: dict, overrides: dict):
    cfg = registry.config_from_dict(config)
    try:
        return replace(cfg, **overrides) if overrides else cfg
    except TypeError as e:
        raise UserError(f"bad config override: {e}") from None


def _model_from_folder(directory: Path, config: dict, device, dtype, overrides) -> nn.Module:
    if not (directory / WEIGHTS).is_file():
        raise UserError(f"{directory} is not a buildllm model folder: {WEIGHTS} is missing")
    return read_model(directory, _config(config, overrides), device, dtype)


def _load_classifier(directory: Path, device, dtype, overrides):
    """A classifier folder: the base model's config, and a head of one output per label (with bias)."""
    meta = read_json_object(directory / CLASSIFIER, "classifier description")
    labels = meta.get("labels")
    if not isinstance(labels, list) or not labels:
        raise UserError(f"{directory / CLASSIFIER} names no labels; fine-tune the classifier again")
    cfg = _config(read_json_object(directory / CONFIG, "model config"), overrides)
    state = read_weights(directory / WEIGHTS, device)
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    head = {k.removeprefix("out_head."): state.pop(k) for k in list(state) if k.startswith("out_head.")}
    if set(head) != {"weight", "bias"} or tuple(head["weight"].shape) != (len(labels), cfg.emb_dim):
        raise UserError(f"{directory / WEIGHTS}: the classification head does not match {len(labels)} labels")
    # The body loads like any model whose head is tied (no head tensor expected); then the real head.
    model = model_from_state_dict(replace(cfg, tie_embeddings=True), state, device=device,
                                  source=str(directory / WEIGHTS))
    model.cfg = cfg
    model.out_head = nn.Linear(cfg.emb_dim, len(labels), device=device, dtype=head["weight"].dtype)
    model.out_head.load_state_dict(head)
    tokenizer = tokenizer_for(directory, None, TOKENIZER)
    if tokenizer is None:
        raise UserError(f"{directory} has no {TOKENIZER}; fine-tune the classifier again")
    return model, tokenizer, meta


def _load_adapters(directory: Path, base, device, dtype, overrides):
    """A LoRA adapters folder on top of its base model (merged by ``merge_lora`` if you want)."""

    if base is None:
        raise UserError(f"{directory} holds LoRA adapters only: pass base=the model they were trained on "
                        "(its folder or model id)")
    model, tokenizer = load_model(base, device=device, dtype=dtype, **overrides)
    load_adapters(directory, model)
    if (directory / TOKENIZER).is_file():
        tokenizer = tokenizer_for(directory, model.cfg.vocab_size, TOKENIZER, model.cfg.arch)
    return model, tokenizer


def _finish(model, tokenizer, directory: Path, quantize, **extra) -> LoadedModel:
    check_vocabulary(model.cfg.vocab_size, tokenizer, directory)
    if quantize:
        from buildllm.generation.quantization import quantize as quantize_model

        quantize_model(model, quantize)
    return LoadedModel(model.eval(), tokenizer, str(directory), **extra)


def tokenizer_for(directory: Path, vocab_size: int | None, name: str = TOKENIZER,
                  arch: str = "gpt2") -> Tokenizer | None:
    """The tokenizer saved with the weights as ``name``; else, in a Hugging Face folder (``name`` is
    buildllm_tokenizer.json), the folder's own tokenizer.json, read with the tokenizer_config.json,
    generation_config.json and chat template beside it; else, for a GPT-2, GPT-2's own when
    ``vocab_size`` has room for it (the vocabulary rule below); else None."""
    from buildllm.tokenizer import get_tokenizer
    from buildllm.tokenizer.huggingface import TOKENIZER_JSON

    names = [name, TOKENIZER_JSON] if name == HF_TOKENIZER else [name]
    for candidate in names:
        if (directory / candidate).is_file():
            return get_tokenizer(directory / candidate)  # buildllm's own or Hugging Face's, by its content
    if vocab_size is None or arch != "gpt2":  # another arch's ids mean nothing to GPT-2's BPE
        return None
    gpt2 = get_tokenizer("gpt2")
    return gpt2 if vocab_size >= gpt2.vocab_size else None


def check_vocabulary(vocab_size: int, tokenizer: Tokenizer | None, source) -> None:
    """The one vocabulary rule: the model may have more token ids than the tokenizer (a padded
    vocabulary), never fewer, or the tokenizer would produce ids the model has no embedding for."""
    if tokenizer is not None and tokenizer.vocab_size > vocab_size:
        raise UserError(f"{source}: the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                        f"{vocab_size}; save the model with the tokenizer it was trained with")


# The name this function had when it loaded GPT-2 weights only; it is the same function.
load_pretrained = load_model


def export_checkpoint(source: str | os.PathLike, out: str | os.PathLike, force: bool = False) -> Path:
    """Any model the loader reads, written as a Hugging Face folder of its architecture
    (``buildllm convert``). An existing folder with files in it is kept unless ``force``."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file; give a folder to write the Hugging Face model into")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserError(f"{out} is not empty; choose another folder or add --force to overwrite its files")
    model, tokenizer = load_model(source)
    return save_pretrained(model, out, tokenizer)
