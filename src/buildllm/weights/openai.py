"""OpenAI's original GPT-2 release: a TensorFlow checkpoint (hparams.json + model.ckpt.*), read into
Hugging Face names so it takes the same path into the model as a Hugging Face folder.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from buildllm.errors import UserError
from buildllm.files import read_json_object
from buildllm.models.gpt2 import GPTConfig


def read_tf_checkpoint(directory: Path, **overrides) -> tuple[GPTConfig, dict[str, torch.Tensor]]:
    """OpenAI's original release: ``hparams.json`` and a TensorFlow checkpoint ``model.ckpt``.

    Variables are named like ``model/h0/attn/c_attn/w``; they become HF names
    (``h.0.attn.c_attn.weight``) and then follow the Hugging Face route. Conv1D weights are stored
    as ``(1, in, out)``: the leading 1 is dropped, which gives HF's ``(in, out)``.
    """
    try:
        import tensorflow as tf
    except ImportError:
        raise UserError(
            f"{directory} is OpenAI's TensorFlow checkpoint; reading it needs TensorFlow: "
            "pip install 'buildllm[tf]' (or load the Hugging Face copy, e.g. --pretrained gpt2)"
        ) from None
    hp = read_json_object(directory / "hparams.json")
    try:
        cfg = GPTConfig(
            vocab_size=hp["n_vocab"], context_length=hp["n_ctx"], emb_dim=hp["n_embd"],
            n_heads=hp["n_head"], n_layers=hp["n_layer"], **overrides,
        )
    except (KeyError, TypeError) as e:
        raise UserError(f"{directory / 'hparams.json'}: missing or bad setting {e}") from None
    checkpoint = tf.train.latest_checkpoint(str(directory)) or str(directory / "model.ckpt")
    state = {}
    for name, _shape in tf.train.list_variables(checkpoint):
        if not name.startswith("model/"):
            continue  # e.g. the optimizer's step counter
        array = tf.train.load_variable(checkpoint, name)
        if array.ndim == 3 and array.shape[0] == 1:
            array = array.reshape(array.shape[1:])  # Conv1D: (1, in, out) -> (in, out)
        state[tf_to_hf_name(name)] = torch.from_numpy(array.copy())
    return cfg, state


def tf_to_hf_name(name: str) -> str:
    """``model/h0/attn/c_attn/w`` -> ``h.0.attn.c_attn.weight``; ``model/wte`` -> ``wte.weight``."""
    parts = name.removeprefix("model/").split("/")
    if re.fullmatch(r"h\d+", parts[0]):
        parts[0:1] = ["h", parts[0][1:]]
    if parts[-1] in ("w", "g"):  # weight (w) and LayerNorm gain (g)
        parts[-1] = "weight"
    elif parts[-1] == "b":
        parts[-1] = "bias"
    else:  # wte, wpe
        parts.append("weight")
    return ".".join(parts)
