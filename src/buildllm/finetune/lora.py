"""Low-rank adaptation (LoRA, Hu et al. 2021): fine-tune a few million numbers instead of all of them.

A frozen ``Linear`` layer computes ``x W^T + b``. LoRA adds a trainable low-rank update beside it,

    y = x W^T + b + (alpha / rank) * x A B        A: (in, rank)   B: (rank, out)

with ``A`` random and ``B`` zero, so at the start the update is exactly zero and the adapted model
computes exactly what the base model did. Only ``A`` and ``B`` train. After training the update can
be folded into ``W`` (``merge_lora``), which leaves a plain model of the original size and architecture.

Scaling: this module multiplies by ``alpha / rank`` as the LoRA paper does, so changing the rank does
not change the update's size. The book's appendix E multiplies by ``alpha`` alone; its setting
``rank=16, alpha=16`` is ``rank=16, alpha=256`` here.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from buildllm.errors import UserError

# Which Linear layers LoRA adapts by default is the architecture's choice: each model class names
# them in ``lora_targets`` (GPT-2's are below, kept under their old name). ``apply_lora`` without
# targets asks the model.
DEFAULT_TARGETS: tuple[str, ...] = ("qkv", "out_proj", "fc", "proj")
ALL_TARGETS: tuple[str, ...] = (*DEFAULT_TARGETS, "out_head")

ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter.safetensors", "adapter_config.json"


class LoRALayer(nn.Module):
    """The low-rank update ``(alpha / rank) * x A B`` on its own."""

    def __init__(self, in_dim: int, out_dim: int, rank: int, alpha: float):
        super().__init__()
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / rank
        self.A = nn.Parameter(torch.empty(in_dim, rank))
        # The same init nn.Linear gives its weights, so x A starts at a sensible scale ...
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        # ... and B = 0 makes the whole update zero at the start: training begins at the base model.
        self.B = nn.Parameter(torch.zeros(rank, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scaling * (x @ self.A @ self.B)

    def delta_weight(self) -> torch.Tensor:
        """The update in ``nn.Linear``'s weight layout ``(out, in)``."""
        return self.scaling * (self.A @ self.B).T


class LinearWithLoRA(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable ``LoRALayer`` beside it."""

    def __init__(self, linear: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.linear = linear
        self.lora = LoRALayer(linear.in_features, linear.out_features, rank, alpha)
        self.lora.to(device=linear.weight.device, dtype=linear.weight.dtype)
        self.enabled = True  # False: the frozen layer alone (see adapters_disabled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return self.linear(x)
        return self.linear(x) + self.lora(x)

    @property
    def weight(self) -> torch.Tensor:  # so code that reads `layer.weight` keeps working
        return self.linear.weight


def default_targets(model: nn.Module) -> tuple[str, ...]:
    """The Linear layers the model's architecture adapts by default (its ``lora_targets``)."""
    return tuple(getattr(model, "lora_targets", DEFAULT_TARGETS))


def _check(model, rank, alpha, targets) -> tuple[str, ...]:
    if not isinstance(rank, int) or rank < 1:
        raise UserError(f"LoRA rank must be a positive integer, got {rank!r}")
    if not alpha > 0:
        raise UserError(f"LoRA alpha must be positive, got {alpha!r}")
    if targets is None:
        targets = default_targets(model)
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    # Any Linear layer of this model may be a target (its attribute name); the model says which exist.
    linear_names = {name.rpartition(".")[2] for name, m in model.named_modules()
                    if isinstance(m, (nn.Linear, LinearWithLoRA))}
    choices = sorted(linear_names | set(default_targets(model)))
    unknown = [t for t in targets if t not in linear_names]
    if unknown or not targets:
        raise UserError(
            f"unknown LoRA target(s) {', '.join(unknown) or '(none given)'}; choose from: {', '.join(choices)}"
        )
    return targets


def apply_lora(
    model: nn.Module,
    rank: int,
    alpha: float,
    targets: tuple[str, ...] | list[str] | str | None = None,
) -> nn.Module:
    """Freeze every parameter of ``model``, then wrap each ``nn.Linear`` named in ``targets``.

    Works in place and returns the model. Names are attribute names: ``"qkv"`` wraps every
    ``blocks[i].att.qkv``. ``targets=None`` takes the architecture's defaults
    (``model.lora_targets``; GPT-2's are ``DEFAULT_TARGETS``). Parameters you want to train fully besides the adapters (a new
    classification head, say) must be unfrozen afterwards.
    """
    targets = _check(model, rank, alpha, targets)
    for p in model.parameters():
        p.requires_grad = False
    replaced = 0
    # Collect first, then replace: never mutate a module tree while iterating over it.
    chosen = [
        (parent, child_name, child)
        for parent in model.modules()
        for child_name, child in parent.named_children()
        if child_name in targets and isinstance(child, nn.Linear)
    ]
    for parent, child_name, child in chosen:
        setattr(parent, child_name, LinearWithLoRA(child, rank, alpha))
        replaced += 1
    if not replaced:
        raise UserError(f"no Linear layer named {', '.join(targets)} in the model; nothing to adapt")
    return model


def lora_layers(model: nn.Module) -> dict[str, LinearWithLoRA]:
    """The adapted layers by their module name (e.g. ``blocks.0.att.qkv``)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LinearWithLoRA)}


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the ``with`` block the model computes what its base model computes: every adapted
    layer runs its frozen ``Linear`` alone. The base model without a second copy of its weights
    (DPO's reference model)."""
    layers = list(lora_layers(model).values())
    before = [layer.enabled for layer in layers]
    for layer in layers:
        layer.enabled = False
    try:
        yield model
    finally:
        for layer, enabled in zip(layers, before):
            layer.enabled = enabled


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts; tied weights count once."""
    params = list(model.parameters())  # nn.Module.parameters() already skips shared tensors
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put plain ``nn.Linear`` layers back (in place).

    The result has the original architecture, so ``save_model`` writes it like any other model.
    If the output head is adapted while tied to the token embedding, merging it would change the
    embedding too; the head gets its own weight instead and the config says untied.
    """
    for name, layer in lora_layers(model).items():
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = layer.linear
        delta = layer.lora.delta_weight().to(linear.weight.dtype)
        # Shared with another parameter (a head tied to the token embedding, whatever the arch calls it)?
        tied = any(p is linear.weight for n, p in model.named_parameters(remove_duplicate=False)
                   if n != f"{name}.linear.weight")
        if tied:
            linear.weight = nn.Parameter(linear.weight + delta, requires_grad=linear.weight.requires_grad)
            from dataclasses import replace

            model.cfg = replace(model.cfg, tie_embeddings=False)
        else:
            linear.weight += delta
        setattr(parent, child_name, linear)
    return model


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors (e.g. ``blocks.0.att.qkv.lora.A``) plus any other parameter that trains
    fully beside them (a new classification head): everything fine-tuning changed, nothing else."""
    state = {
        f"{name}.lora.{p}": getattr(layer.lora, p).detach().contiguous()
        for name, layer in lora_layers(model).items()
        for p in ("A", "B")
    }
    for name, p in model.named_parameters():
        if p.requires_grad and ".lora." not in f".{name}":
            state[name] = p.detach().contiguous()
    return state


def adapter_config(model: nn.Module) -> dict:
    layers = lora_layers(model)
    if not layers:
        raise UserError("the model has no LoRA adapters to save; call apply_lora first")
    first = next(iter(layers.values())).lora
    targets = sorted({name.rpartition(".")[2] for name in layers})
    return {"rank": first.rank, "alpha": first.alpha, "targets": targets}


def save_adapters(directory: str | Path, model: nn.Module) -> Path:
    """Write ``adapter.safetensors`` (``adapter_state``: a small file) and ``adapter_config.json``.

    Together with the base model they rebuild the fine-tuned one (``load_adapters``)."""
    from buildllm.files import write_json, write_safetensors

    directory = Path(directory)
    config = adapter_config(model)
    write_safetensors(directory / ADAPTER_WEIGHTS, adapter_state(model))
    write_json(directory / ADAPTER_CONFIG, config)
    return directory / ADAPTER_WEIGHTS


def load_adapters(directory: str | Path, model: nn.Module) -> nn.Module:
    """Add the adapters saved by ``save_adapters`` to a base ``model`` (which they must fit)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    config_path, weights_path = directory / ADAPTER_CONFIG, directory / ADAPTER_WEIGHTS
    from buildllm.files import read_json_object

    config = read_json_object(config_path, "LoRA adapter config")
    try:
        rank, alpha, targets = int(config["rank"]), float(config["alpha"]), tuple(config["targets"])
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"cannot read LoRA adapter config {config_path}: {e}") from None
    try:
        state = load_file(weights_path, device=str(next(model.parameters()).device))
    except (SafetensorError, OSError) as e:
        raise UserError(f"cannot read LoRA adapters {weights_path}: {e}") from None
    apply_lora(model, rank, alpha, targets)
    params = dict(model.named_parameters())
    lora_names = {f"{name}.lora.{p}" for name in lora_layers(model) for p in ("A", "B")}
    missing = sorted(lora_names - set(state))
    unexpected = sorted(set(state) - lora_names - set(params))
    if missing or unexpected:
        which = f"missing {missing[0]!r}" if missing else f"unexpected {unexpected[0]!r}"
        raise UserError(f"{weights_path} does not fit this model: {which}")
    for name, tensor in state.items():
        target = params[name]
        if tensor.shape != target.shape:
            raise UserError(
                f"{weights_path}: {name} has shape {tuple(tensor.shape)}, the model needs {tuple(target.shape)}"
            )
        with torch.no_grad():
            target.copy_(tensor)
        target.requires_grad = True  # the file holds what was trained: it trains again if you go on
    return model
