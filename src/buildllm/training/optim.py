"""The optimizer and the learning-rate schedule.
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
    decay, keep = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        spared = any(name == n or name.startswith(n + ".") for n in no_decay)
        (decay if p.dim() >= 2 and not spared else keep).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": keep, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    groups = [g for g in param_groups(model, cfg.weight_decay, cfg.no_decay) if g["params"]]
    betas = (cfg.beta1, cfg.beta2)
    # The fused kernel updates all parameters in one pass (CPU, CUDA, MPS); foreach otherwise.
    try:
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, fused=device.type in ("cpu", "cuda", "mps"))
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, foreach=True)


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
