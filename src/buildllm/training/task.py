"""What a training run learns: a ``Task`` supplies the data, the loss and the metrics.

The engine (``training/engine.py``) runs the same loop for every task: autocast, gradient
accumulation, clipping, the learning-rate schedule, evaluation, checkpoints and resume, many
processes. A task says only what is particular to it:

* ``batches``: a batch source (``next_batch``, ``eval_batches``, ``state_dict``, ``load_state_dict``);
* ``loss(model, batch)``: the *summed* loss of a batch, and ``items(batch)``: how many items
  (tokens, examples) that sum is over. The engine divides by the items of the whole optimizer
  step, over every micro-batch and process, so the gradient is the mean over the step's items
  however the step is cut into micro-batches and processes;
* ``evaluate(model, batches)``: metrics of one evaluation set (``{"loss": ...}`` at least);
* ``score(metrics)``: how good a model is (higher is better), to keep the best one;
* ``save(folder, model)``: what a model folder holds for this task.

Pretraining's ``LMTask`` lives here; the fine-tuning tasks live next to their data
(``finetune/classify.py``, ``finetune/instruct.py``).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class Task:
    """The defaults every task shares; subclasses override what differs."""

    splits: tuple[str, ...] = ("train", "val")  # evaluation sets, by name
    best_at_root = False  # True: the run folder itself holds the best model (fine-tuning's result)
    evaluate_first = False  # evaluate once before the first step (a fine-tune's starting point)
    supports_fsdp = False  # FSDP gathers a plain GPTModel back on rank 0; other heads need more
    final_tokens = 0  # tokens the ``final`` hook will score (counted into a time budget)
    flops_per_token: float | None = None  # for the progress bar's MFU, when known
    eval_iters: int | None = None  # batches per evaluation set (None: all of it)
    files: tuple[str, ...] = ()  # what the task writes into the run folder, removed by --force

    def items(self, batch) -> int | torch.Tensor:
        raise NotImplementedError

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        raise NotImplementedError

    def evaluate(self, model: nn.Module, batches) -> dict[str, float]:
        raise NotImplementedError

    def eval_sets(self) -> dict[str, list]:
        return {split: self.batches.eval_batches(split, self.eval_iters) for split in self.splits}

    def score(self, metrics: dict[str, float]) -> float:
        """Lower validation loss is better (training loss when there is no validation set)."""
        loss = metrics.get("val_loss", math.nan)
        return -(loss if math.isfinite(loss) else metrics["train_loss"])

    def sample(self, model: nn.Module) -> str | None:
        """Text to show at each evaluation (language models), or None."""
        return None

    def final(self, model: nn.Module, device: torch.device) -> dict:
        """Figures computed once at the end, on every process (pretraining's whole-validation score)."""
        return {}

    def save(self, folder: Path, model: nn.Module) -> None:
        raise NotImplementedError


def mean_batch_loss(losses: list[float]) -> float:
    return sum(losses) / len(losses) if losses else math.nan


class LMTask(Task):
    """Pretraining: next-token prediction on every position of every window."""

    supports_fsdp = True

    def __init__(self, data, tokenizer, cfg, model: nn.Module):
        from buildllm.models.registry import describe

        self.batches, self.tokenizer, self.cfg = data, tokenizer, cfg
        self.eval_iters = cfg.eval_iters
        self.final_tokens = len(data.val_tokens) if cfg.final_eval else 0
        shape = dataclasses.replace(model.cfg, context_length=cfg.context_length)
        self.flops_per_token = describe(shape)["train_flops_per_token"]

    def items(self, batch) -> int:
        return batch[1].numel()

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        x, y = batch
        logits = model(x)  # the logits go to fp32 first, whatever autocast computed
        return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="sum")

    def evaluate(self, model: nn.Module, batches) -> dict[str, float]:
        """Mean loss over fixed batches (the book's calc_loss_loader)."""
        return {"loss": mean_batch_loss([(self.loss(model, b) / self.items(b)).item() for b in batches])}

    def sample(self, model: nn.Module) -> str | None:
        """The book's generate_and_print_sample: a short continuation of the start context."""
        from buildllm.generation.sampling import generate

        cfg, tok = self.cfg, self.tokenizer
        if cfg.sample_tokens <= 0:
            return None
        device = next(model.parameters()).device
        ids = tok.encode(cfg.sample_prompt or "\n")[-model.cfg.context_length + 1 :] or [tok.eot_id]
        out = generate(model, torch.tensor([ids], device=device), cfg.sample_tokens,
                       temperature=cfg.sample_temperature, top_k=cfg.sample_top_k,
                       generator=torch.Generator(device=device).manual_seed(cfg.seed))
        return tok.decode(out[0].tolist())

    def final(self, model: nn.Module, device: torch.device) -> dict:
        """Every held-out token scored once, with the tokens before it in its window as context."""
        from buildllm.evaluate import bits_per_character, perplexity

        if not self.cfg.final_eval:
            return {}
        data, T = self.batches, self.cfg.context_length
        result = perplexity(model, np.asarray(data.val_tokens, dtype=np.int64), context_length=T,
                            stride=max(1, T - 1), batch_size=self.cfg.batch_size)
        bpc = bits_per_character(result["loss"], result["tokens"], data.val_characters)
        return {"val_loss": result["loss"], "val_perplexity": result["perplexity"], "val_bits_per_char": bpc,
                "val_tokens": len(data.val_tokens), "val_characters": data.val_characters}

    def save(self, folder: Path, model: nn.Module) -> None:
        from buildllm.finetune.lora import lora_layers, merge_lora
        from buildllm.weights.checkpoint import save_model

        if lora_layers(model):
            model = merge_lora(copy.deepcopy(model))  # a plain GPTModel anyone can load
        save_model(folder, model, self.tokenizer)
