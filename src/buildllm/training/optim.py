"""The optimizer and the learning-rate schedule.

``optimizer="adamw"``: AdamW for every parameter, weight decay on matrices only. ``"muon"``: Muon
(Jordan et al. 2024, PyTorch's ``torch.optim.Muon``) for the 2-D weights inside the blocks, AdamW
for the embeddings, the output head, norms and biases, as the GPT-2 speedrun and nanochat train.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from buildllm.training.config import TrainConfig


def param_groups(model: nn.Module, weight_decay: float, no_decay: tuple[str, ...] = ()) -> list[dict]:
    """Weight decay for matrices (the weights of matmuls and embeddings) only.

    Decaying biases and LayerNorm scales pulls them towards zero for no benefit; ``no_decay`` names
    further parameters to spare (by default the position embedding ``wpe``).
    """
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    return decay_groups(named, weight_decay, no_decay)


def decay_groups(named: list[tuple[str, nn.Parameter]], weight_decay: float, no_decay: tuple[str, ...] = ()):
    """``param_groups`` for a list of named parameters: matrices decay, the rest and ``no_decay`` do not."""
    decay, keep = [], []
    for name, p in named:
        spared = any(name == n or name.startswith(n + ".") for n in no_decay)
        (decay if p.dim() >= 2 and not spared else keep).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": keep, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device):
    """AdamW for every parameter, or with ``optimizer="muon"`` Muon for the blocks' weight matrices
    and AdamW for the rest (``muon_groups``)."""
    if cfg.optimizer == "muon":
        matrices, rest = muon_groups(model)
        adamw = _adamw([g for g in decay_groups(rest, cfg.weight_decay, cfg.no_decay) if g["params"]], cfg, device)
        # The schedule sets each group's lr to its lr_scale times the scheduled lr.
        muon = torch.optim.Muon([{"params": matrices, "lr_scale": cfg.muon_lr / cfg.lr}], lr=cfg.muon_lr,
                                weight_decay=cfg.muon_weight_decay, momentum=cfg.muon_momentum)
        return Optimizers(muon=muon, adamw=adamw)
    return _adamw([g for g in param_groups(model, cfg.weight_decay, cfg.no_decay) if g["params"]], cfg, device)


def muon_groups(model: nn.Module) -> tuple[list[nn.Parameter], list[tuple[str, nn.Parameter]]]:
    """Muon's parameters (the 2-D weights inside the transformer blocks: attention and feed-forward
    projections) and everything else, named (embeddings, output head, norms, biases, scalars).

    Muon replaces each update matrix by its nearest orthogonal matrix (Newton-Schulz iterations):
    right for the blocks' linear maps, wrong for an embedding (a lookup table, one row per token)
    or the output head, which the speedrun and nanochat leave to AdamW.
    """
    matrices, rest = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.dim() == 2 and name.startswith("blocks."):
            matrices.append(p)
        else:
            rest.append((name, p))
    return matrices, rest


def _adamw(groups: list[dict], cfg, device: torch.device) -> torch.optim.AdamW:
    betas = (cfg.beta1, cfg.beta2)
    # The fused kernel updates all parameters in one pass (CPU, CUDA, MPS); foreach otherwise.
    try:
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, fused=device.type in ("cpu", "cuda", "mps"))
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, foreach=True)


class Optimizers:
    """Several optimizers stepped as one: what the engine asks of an optimizer (``param_groups``,
    ``step``, ``zero_grad``, ``state_dict``, ``load_state_dict``)."""

    def __init__(self, **named: torch.optim.Optimizer):
        self.named = named

    @property
    def param_groups(self) -> list[dict]:
        return [group for optimizer in self.named.values() for group in optimizer.param_groups]

    def step(self) -> None:
        for optimizer in self.named.values():
            optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.named.values():
            optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {name: optimizer.state_dict() for name, optimizer in self.named.items()}

    def load_state_dict(self, state: dict) -> None:
        for name, optimizer in self.named.items():
            optimizer.load_state_dict(state[name])


def learning_rate(step: int, cfg: TrainConfig, max_steps: int, time_fraction: float = 0.0) -> float:
    """Linear warmup over ``warmup_steps``, then cosine decay to ``lr * min_lr_ratio`` (or constant).

    ``step`` counts optimizer steps from 1. With a time limit the decay follows whichever budget,
    steps or minutes, is further spent, so the run ends on the floor either way.
    """
    if step <= cfg.warmup_steps:
        return cfg.lr * step / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    progress = (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps)
    progress = min(1.0, max(progress, time_fraction))
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
