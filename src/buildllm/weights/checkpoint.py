"""A model on disk: a folder anyone can generate from, with nothing else needed.

    model.safetensors   the weights (the tied output head is stored once, as wte)
    config.json         the GPTConfig
    tokenizer.json      the tokenizer that goes with the weights

Weights load through safetensors, never pickle, and straight into a model built on the meta device,
so loading needs about one copy of the weights in memory.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from buildllm.errors import UserError
from buildllm.files import atomic_write
from buildllm.generation.quantization import refuse_quantized
from buildllm.models.gpt2 import GPTConfig, GPTModel, MultiHeadAttention, causal_mask

WEIGHTS, CONFIG, TOKENIZER = "model.safetensors", "config.json", "tokenizer.json"


def weights_of(model: GPTModel) -> dict[str, torch.Tensor]:
    """The model's state dict, ready for safetensors: contiguous, the tied head left out."""
    refuse_quantized(model, "save")
    state = model.state_dict()
    if model.cfg.tie_embeddings:
        state.pop("out_head.weight")
    return {name: t.detach().contiguous() for name, t in state.items()}


def save_model(directory: str | Path, model: GPTModel, tokenizer=None) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(directory / WEIGHTS, lambda tmp: save_file(weights_of(model), tmp, metadata={"format": "pt"}))
    atomic_write(directory / CONFIG, lambda tmp: model.cfg.save(tmp))
    if tokenizer is not None:
        atomic_write(directory / TOKENIZER, lambda tmp: tokenizer.save(tmp))
    return directory


def model_from_state_dict(
    cfg: GPTConfig, state: dict[str, torch.Tensor], device: torch.device | str = "cpu", source: str = "weights"
) -> GPTModel:
    """Build a GPTModel on the meta device and move ``state``'s tensors straight into place.

    Every name and shape must match: the first mismatch is an error naming the tensor, never a
    silent partial load.
    """
    with torch.device("meta"):
        model = GPTModel(cfg)
    expected = {name: t.shape for name, t in model.state_dict().items()}
    if cfg.tie_embeddings:
        expected.pop("out_head.weight")
    for name, shape in expected.items():
        if name not in state:
            raise UserError(f"{source}: tensor {name!r} is missing")
        if tuple(state[name].shape) != tuple(shape):
            raise UserError(
                f"{source}: tensor {name!r} has shape {tuple(state[name].shape)}, the config needs {tuple(shape)}"
            )
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise UserError(f"{source}: unexpected tensor {unexpected[0]!r} (the config does not use it)")

    model.load_state_dict({k: v.to(device) for k, v in state.items()}, strict=False, assign=True)
    if cfg.tie_embeddings:
        model.out_head.weight = model.wte.weight
    for module in model.modules():
        if isinstance(module, MultiHeadAttention):
            module.mask = causal_mask(cfg.context_length, device=device)
    return model.eval()


def load_model(directory: str | Path, device: torch.device | str = "cpu", with_tokenizer: bool = True):
    """Load a folder written by ``save_model``: returns ``(model, tokenizer)`` (tokenizer may be None)."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise UserError(f"{directory} is a file; give the checkpoint folder (with {WEIGHTS} and {CONFIG})")
    if not directory.is_dir():
        raise UserError(f"checkpoint folder {directory} does not exist")
    for name in (WEIGHTS, CONFIG):
        if not (directory / name).is_file():
            raise UserError(f"{directory} is not a buildllm checkpoint: {name} is missing")
    cfg = GPTConfig.load(directory / CONFIG)
    try:
        state = load_file(directory / WEIGHTS, device=str(device))
    except (SafetensorError, OSError, json.JSONDecodeError) as e:
        raise UserError(f"{directory / WEIGHTS} is corrupt or truncated ({e}); restore it or retrain") from None
    model = model_from_state_dict(cfg, state, device=device, source=str(directory / WEIGHTS))
    tokenizer = None
    if with_tokenizer and (directory / TOKENIZER).is_file():
        from buildllm.tokenizer import get_tokenizer

        tokenizer = get_tokenizer(directory / TOKENIZER)
    return model, tokenizer
