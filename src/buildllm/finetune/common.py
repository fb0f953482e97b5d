"""What both fine-tuning tasks share: the base model, the data split, saving, and the run.

Both tasks train through the engine (``training/loop.py``): each builds its ``Task`` and its
config (``ClassifyConfig``, ``InstructConfig``, both ``EngineConfig`` plus the task's own keys),
and ``run_finetune`` fits it and reads the per-epoch history back from metrics.jsonl.
"""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from buildllm.errors import UserError
from buildllm.finetune.lora import (
    apply_lora,
    count_parameters,
    merge_lora,
    save_adapters,
)
from buildllm.weights.loader import CLASSIFIER

METRICS = "metrics.json"
TEST_RESPONSES = "test_responses.json"


IGNORE_INDEX = -100  # cross_entropy skips targets with this value


Log = Callable[[str], None] | None


def load_base_model(spec: str | Path, device: torch.device | str = "cpu"):
    """``(model, tokenizer)`` to fine-tune: a buildllm checkpoint folder, a Hugging Face or OpenAI GPT-2
    folder, or a GPT-2 model id (all through the one loader, ``weights.loader.load_model``)."""
    from buildllm.weights.loader import load_model

    if (Path(spec) / CLASSIFIER).is_file():
        raise UserError(f"{spec} is a classifier; fine-tune from a language model checkpoint")
    model, tokenizer = load_model(spec, device=device, dtype=torch.float32)  # trains fp32 weights
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


def log_trainable(model: nn.Module, log: Log) -> tuple[int, int]:
    trainable, total = count_parameters(model)
    if log:
        log(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)")
    return trainable, total


def without_adapters(directory: Path, model: nn.Module) -> nn.Module:
    """The model to save as a plain one: with LoRA, the adapters go into ``directory`` alone (a small
    file) and a merged copy is returned; without, the model itself."""
    from buildllm.finetune.lora import lora_layers

    if not lora_layers(model):
        return model
    save_adapters(directory, model)
    return merge_lora(copy.deepcopy(model))


def save_lm(directory: Path, model: nn.Module, tokenizer) -> None:
    """Save a language model; with LoRA, a merged copy (a plain model) plus the adapters alone."""
    from buildllm.weights.checkpoint import save_model

    save_model(directory, without_adapters(directory, model), tokenizer)


def pick_model(base, cfg, tokenizer, device):
    """``(model, tokenizer)``: ``base`` itself when it is a model object (with ``tokenizer``), else
    the one the config names (``cfg.base``: a folder or model id, loaded by the one loader)."""
    if isinstance(base, nn.Module):
        if tokenizer is None:
            raise UserError("pass the tokenizer that goes with the model")
        return base.to(device), tokenizer
    return load_base_model(cfg.base, device)


def make_trainable(model: nn.Module, cfg) -> None:
    """What a fine-tune trains: LoRA adapters when ``cfg.lora_rank`` is set (on the architecture's
    own targets unless ``cfg.lora_targets`` names others), else every weight."""
    if cfg.lora_rank is not None:
        apply_lora(model, cfg.lora_rank, cfg.lora_alpha or 2 * cfg.lora_rank, cfg.lora_targets or None)
    else:
        model.requires_grad_(True)


def finetune_config(cls, base, data, out_dir, config, options: dict):
    """The config a ``finetune_*`` call asks for: ``config`` (or the defaults), then the keyword
    options, then the positional ``base``, ``data`` and ``out_dir``; checked."""
    from buildllm.training.config import check_engine

    given = dict(options)
    if base is not None and not isinstance(base, nn.Module):
        given["base"] = str(base)
    if data is not None:
        given["data"] = str(data)
    if out_dir is not None:
        given["out"] = str(out_dir)
    if "device" in given:
        given["device"] = str(given["device"])  # a torch.device is welcome too
    cfg = (config if config is not None else cls()).replace(**given)
    check_engine(cfg)
    for name in ("data", "out"):
        if getattr(cfg, name) is None:
            raise UserError(f"fine-tuning needs {name}: give it (--{name})")
    return cfg


def run_finetune(task, cfg, model: nn.Module, rt, resume_from, log: Log):
    """Fit ``task`` for ``cfg.epochs`` epochs, evaluating (and checkpointing) after each one.

    Returns the engine's result, the history per epoch, and the optimizer steps per epoch.
    """
    from buildllm.training.loop import Printer, fit

    steps_per_epoch = math.ceil(task.batches.batches_per_epoch / cfg.grad_accum)
    filled = {"max_steps": cfg.max_steps or cfg.epochs * steps_per_epoch,
              "eval_interval": cfg.eval_interval or steps_per_epoch}
    cfg = cfg.replace(**filled, save_interval=cfg.save_interval or filled["eval_interval"])
    done = fit(task, cfg, model, rt, resume_from, Printer(log is not None and rt.dist.main, log))
    return done, epoch_history(Path(cfg.out), steps_per_epoch), steps_per_epoch


def epoch_history(run: Path, steps_per_epoch: int) -> list[dict]:
    """One record per evaluation after training began: its epoch, metrics and seconds since the last."""
    from buildllm.training.run_folder import METRICS, read_metrics

    history, last_elapsed = [], 0.0
    for r in read_metrics(run / METRICS):
        if r.get("kind") != "eval":
            continue
        if r["step"] > 0:
            epoch = r["step"] / steps_per_epoch
            metrics = {k: v for k, v in r.items()
                       if k not in ("kind", "step", "tokens_seen", "lr", "tokens_per_sec", "elapsed")}
            history.append({"epoch": int(epoch) if epoch.is_integer() else round(epoch, 3), **metrics,
                            "seconds": r["elapsed"] - last_elapsed})
        last_elapsed = r["elapsed"]
    return history


def initial_metrics(run: Path) -> dict:
    """The evaluation before the first step (``Task.evaluate_first``), or {}."""
    from buildllm.training.run_folder import METRICS, read_metrics

    return next((r for r in read_metrics(run / METRICS) if r.get("kind") == "eval" and r["step"] == 0), {})
