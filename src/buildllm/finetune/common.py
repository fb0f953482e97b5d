"""What both fine-tuning tasks share: the base model, the data split, the optimizer, saving.
"""

from __future__ import annotations

import copy
import json
import math
import random
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from buildllm.errors import UserError
from buildllm.files import atomic_write
from buildllm.finetune.lora import (
    count_parameters,
    merge_lora,
    save_adapters,
)
from buildllm.models.gpt2 import GPTModel
from buildllm.training.optim import param_groups

CLASSIFIER = "classifier.json"  # what makes a checkpoint folder a classifier: labels, max_length


PROMPT_TEMPLATE = "prompt_template.json"  # what makes it an instruction model: its prompt format


METRICS = "metrics.json"


TEST_RESPONSES = "test_responses.json"


IGNORE_INDEX = -100  # cross_entropy skips targets with this value


Log = Callable[[str], None] | None


def load_base_model(spec: str | Path, device: torch.device | str = "cpu"):
    """``(model, tokenizer)`` to fine-tune: a buildllm checkpoint folder, a Hugging Face or OpenAI GPT-2
    folder, or a GPT-2 model id (all through ``pretrained.load_pretrained``)."""
    from buildllm.weights.loader import load_pretrained

    if (Path(spec) / CLASSIFIER).is_file():
        raise UserError(f"{spec} is a classifier; fine-tune from a language model checkpoint")
    model, tokenizer = load_pretrained(spec, device=device)
    if tokenizer is None:
        raise UserError(f"{spec} has no tokenizer saved with it and its vocabulary is not GPT-2's; "
                        "save the tokenizer with the model")
    return model, tokenizer


def split_items(items: Sequence, fractions: Sequence[float], seed: int) -> tuple[list, list, list]:
    """Shuffle (seeded) and cut into train/val/test by ``fractions`` (three numbers summing to 1)."""
    fractions = tuple(float(f) for f in fractions)
    if len(fractions) != 3 or any(f < 0 for f in fractions) or not math.isclose(sum(fractions), 1.0, abs_tol=1e-6):
        raise UserError(f"split must be three fractions train,val,test that sum to 1, got {fractions}")
    items = list(items)
    random.Random(seed).shuffle(items)
    # The book's int(n * fraction), nudged: in floating point 90 * 0.7 is 62.99999999999999.
    train_end = int(len(items) * fractions[0] + 1e-9)
    val_end = train_end + int(len(items) * fractions[1] + 1e-9)
    train, val, test = items[:train_end], items[train_end:val_end], items[val_end:]
    if not train:
        raise UserError(f"the training split is empty ({len(items)} examples, split {fractions}); give more data")
    return train, val, test


def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; weight decay on matrices only (pretraining's groups)."""

    return torch.optim.AdamW([g for g in param_groups(model, weight_decay) if g["params"]], lr=lr)


def log_trainable(model: nn.Module, log: Log) -> tuple[int, int]:
    trainable, total = count_parameters(model)
    if log:
        log(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)")
    return trainable, total


def write_json(path: Path, obj) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n"))


def save_lm(directory: Path, model: GPTModel, tokenizer) -> None:
    """Save a language model; with LoRA, a merged copy (plain GPTModel) plus the adapters alone."""
    from buildllm.finetune.lora import lora_layers
    from buildllm.weights.checkpoint import save_model

    if lora_layers(model):
        save_adapters(directory, model)
        model = merge_lora(copy.deepcopy(model))
    save_model(directory, model, tokenizer)


def pick_model(base, tokenizer, device):
    if isinstance(base, GPTModel):
        if tokenizer is None:
            raise UserError("pass the tokenizer that goes with the model")
        return base.to(device), tokenizer
    return load_base_model(base, device)
