"""Loading a model for inference or fine-tuning, whatever form its weights come in.
"""

from __future__ import annotations

import os
import re
from dataclasses import replace
from pathlib import Path

import torch

from buildllm.errors import UserError
from buildllm.files import read_json_object
from buildllm.models.gpt2 import GPTConfig, GPTModel
from buildllm.tokenizer import Tokenizer
from buildllm.weights.checkpoint import model_from_state_dict, weights_of
from buildllm.weights.huggingface import (
    HF_CONFIG,
    MODEL_IDS,
    TOKENIZER,
    config_from_hf,
    download,
    model_from_hf_state,
    read_hf_weights,
)
from buildllm.weights.openai import read_tf_checkpoint


def load_pretrained(
    name_or_path: str | os.PathLike,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = torch.float32,
    **overrides,
) -> tuple[GPTModel, Tokenizer | None]:
    """GPT-2 weights as ``(model, tokenizer)``, in eval mode.

    ``name_or_path``: a Hugging Face folder (config.json + model.safetensors or pytorch_model.bin),
    OpenAI's TensorFlow folder (hparams.json + model.ckpt.*), a buildllm checkpoint folder, or a
    model id ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "openai-community/gpt2", ...)
    downloaded with huggingface_hub. ``dtype``: convert the weights (None keeps the stored dtype).
    ``overrides``: GPTConfig fields that do not change shapes, e.g. ``drop_rate=0.1`` to
    fine-tune or ``attention="readable"``.

    The tokenizer is the one saved next to the weights by buildllm, else GPT-2's own when its ids
    fit the vocabulary, else None.
    """
    path = Path(name_or_path)
    if path.is_dir():
        directory = path
    elif path.exists():
        raise UserError(f"{path} is a file: pass the folder that holds config.json and the weights")
    elif str(name_or_path) in MODEL_IDS or re.fullmatch(r"[\w.-]+/[\w.-]+", str(name_or_path)):
        directory = download(str(name_or_path))
    else:
        raise UserError(
            f"{name_or_path} is neither a folder nor a model id; use {', '.join(MODEL_IDS)} "
            "or a Hugging Face GPT-2 folder"
        )

    if (directory / HF_CONFIG).is_file():
        hf = read_json_object(directory / HF_CONFIG)
        if "emb_dim" in hf:  # a buildllm checkpoint, not a Hugging Face folder
            from buildllm.weights.checkpoint import load_model

            model, tokenizer = load_model(directory, device=device)
            if overrides:  # same tensors, new settings
                try:
                    cfg = replace(model.cfg, **overrides)
                except TypeError as e:
                    raise UserError(f"bad config override: {e}") from None
                model = model_from_state_dict(cfg, weights_of(model), device)
            return (model if dtype is None else model.to(dtype)), tokenizer
        cfg = config_from_hf(hf, str(directory / HF_CONFIG), **overrides)
        state, source = read_hf_weights(directory)
    elif (directory / "hparams.json").is_file():
        cfg, state = read_tf_checkpoint(directory, **overrides)
        source = str(directory)
    else:
        raise UserError(
            f"{directory} holds no GPT-2 weights: expected config.json with model.safetensors or "
            "pytorch_model.bin (Hugging Face), or hparams.json with model.ckpt.* (OpenAI)"
        )
    model = model_from_hf_state(cfg, state, device=device, dtype=dtype, source=source)
    return model, tokenizer_for(directory, cfg)


def tokenizer_for(directory: Path, cfg: GPTConfig):
    from buildllm.tokenizer import get_tokenizer

    if (directory / TOKENIZER).is_file():
        return get_tokenizer(directory / TOKENIZER)
    gpt2 = get_tokenizer("gpt2")
    return gpt2 if cfg.vocab_size >= gpt2.vocab_size else None
