"""A model on disk: a folder anyone can generate from, with nothing else needed.

    model.safetensors   the weights (the tied output head is stored once, as wte)
    config.json         the model config (its "arch" names the architecture)
    tokenizer.json      the tokenizer that goes with the weights

Weights load through safetensors, never pickle, and straight into a model built on the meta device,
so loading needs about one copy of the weights in memory. `weights/loader.py` reads these folders
(and every other kind) through `read_model`; this module only writes them and reads their parts.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from buildllm.errors import UserError
from buildllm.files import atomic_write, write_safetensors
from buildllm.generation.quantization import refuse_quantized
from buildllm.models import registry

WEIGHTS, CONFIG, TOKENIZER = "model.safetensors", "config.json", "tokenizer.json"


def tied_parameters(model: nn.Module) -> dict[str, str]:
    """``{alias: name}`` for parameters that are another one under a second name (a tied output
    head is the token embedding): stored once, under ``name``, and tied again after loading."""
    first: dict[int, str] = {}
    aliases = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            aliases[name] = first[id(p)]
        else:
            first[id(p)] = name
    return aliases


def weights_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict, ready for safetensors: contiguous, tied parameters stored once."""
    refuse_quantized(model, "save")
    state = model.state_dict()
    for alias in tied_parameters(model):
        state.pop(alias)
    return {name: t.detach().contiguous() for name, t in state.items()}


def save_model(directory: str | Path, model: nn.Module, tokenizer=None) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_safetensors(directory / WEIGHTS, weights_of(model))
    model.cfg.save(directory / CONFIG)  # atomic itself
    if tokenizer is not None:
        atomic_write(directory / TOKENIZER, lambda tmp: tokenizer.save(tmp))
    return directory


def model_from_state_dict(cfg, state: dict[str, torch.Tensor], device: torch.device | str = "cpu",
                          source: str = "weights") -> nn.Module:
    """Build ``cfg``'s model on the meta device and move ``state``'s tensors straight into place.

    Every name and shape must match: the first mismatch is an error naming the tensor, never a
    silent partial load.
    """
    with torch.device("meta"):
        model = registry.build(cfg)
    tied = tied_parameters(model)
    expected = {name: t.shape for name, t in model.state_dict().items() if name not in tied}
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
    for alias, name in tied.items():  # assign=True put new tensors in place: tie them again
        parent, _, leaf = alias.rpartition(".")
        setattr(model.get_submodule(parent), leaf, model.get_parameter(name))
    model.init_buffers(device)  # the meta model's masks etc. hold no data: the arch remakes them
    return model.eval()


def read_weights(path: Path, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; one error line if the file is damaged."""
    try:
        return load_file(path, device=str(device))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path} is corrupt or truncated ({e}); restore it or retrain") from None


def read_model(directory: Path, cfg, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> nn.Module:
    """The model in a buildllm folder's model.safetensors, built for ``cfg`` (config.json's, or it
    with settings that keep the shapes), its weights converted to ``dtype`` unless None."""
    state = read_weights(directory / WEIGHTS, device)
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    return model_from_state_dict(cfg, state, device=device, source=str(directory / WEIGHTS))
