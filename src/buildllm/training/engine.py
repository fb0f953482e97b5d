"""Stage 5: pretraining. Teach a GPTModel to predict the next token, and keep what it learns.

The loop is the book's ``train_model_simple`` grown up, and the same for every task: this module
sets pretraining up (the data, the model, the ``LMTask`` of next-token prediction) and hands it to
``training.loop.fit``. Every ``eval_interval`` steps that measures training and validation loss on
fixed batches, prints a sample from a start context, and writes a checkpoint from which
``--resume`` continues bit for bit.

Where the batches come from (``TrainConfig.data``):

* nothing: the bundled Shakespeare, tokenized once into ``data/prepared/`` with a BPE learned from
  the training plays; four whole plays are held out for validation. The default run.
* a ``.txt`` file: the book's mode. The first 90% of the text trains, the last 10% validates, a
  sliding window cuts it into examples, and training runs for ``epochs`` passes over them.
* a folder made by ``buildllm prepare``: the scale mode. Random windows of the memory-mapped
  ``train.bin`` for ``max_steps`` steps.

A run folder (``runs/<name>/``) holds everything a run keeps::

    train_config.json   the resolved configuration (a valid --config file)
    metrics.jsonl       one JSON object per step, per evaluation and at the end
    loss.png            training and validation loss against steps and tokens seen
    model.safetensors   the latest weights, with config.json and tokenizer.json: enough for
    config.json           `buildllm generate --checkpoint runs/<name>`
    tokenizer.json
    best/               the weights with the lowest validation loss so far
    checkpoints/step-N/ the latest ``keep_last`` checkpoints: weights plus state.pt (optimizer,
                        step, RNG states, data position) and manifest.json (sha256 of each file)

Many GPUs: launch the same command with ``torchrun --nproc_per_node N -m buildllm.cli train ...``.
Each process then trains on its slice of every batch under DistributedDataParallel (or FSDP with
``parallel: fsdp``); ``batch_size`` stays the global batch, so N processes follow the same
trajectory as one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from buildllm.data.sources import open_data
from buildllm.errors import UserError
from buildllm.training.config import (
    SIZED_MODES,
    TrainConfig,
    check_context,
    data_mode,
    resolve,
)
from buildllm.training.loop import Printer, fit, start_runtime
from buildllm.training.recipe import size_run
from buildllm.training.run_folder import check_run_folder
from buildllm.training.task import LMTask


def build_model(cfg: TrainConfig, vocab_size: int | None, device: torch.device):
    """A new model of the preset's architecture (seeded), or the weights of ``init_from`` (in fp32,
    whatever they are stored in); returns ``(model, tokenizer)``."""
    torch.manual_seed(cfg.seed)
    if cfg.init_from is not None:
        from buildllm.weights.loader import load_pretrained

        model, tokenizer = load_pretrained(cfg.init_from, device=device, dtype=torch.float32, **cfg.model)
        if tokenizer is None:
            raise UserError(f"{cfg.init_from} has no tokenizer saved with it: save its tokenizer.json")
    else:
        from buildllm.models import registry

        overrides = {"vocab_size": vocab_size, **cfg.model}  # a model key may pad the vocabulary
        # The preset's arch picks the model class: any registered architecture trains the same way.
        model, tokenizer = registry.build(registry.preset(cfg.preset, **overrides)).to(device), None
    if cfg.lora_rank is not None:
        from buildllm.finetune.lora import apply_lora

        apply_lora(model, cfg.lora_rank, cfg.lora_alpha)
    return model.train(), tokenizer


@dataclass
class TrainResult:
    out: Path
    steps: int
    tokens_seen: int
    train_loss: float | None  # the last evaluation's
    val_loss: float | None  # on the whole validation text (final_eval), else the last evaluation's
    val_bits_per_char: float | None
    best_val_loss: float | None
    seconds: float
    tokens_per_sec: float
    rank: int = 0  # this process's rank under torchrun


def train(config: TrainConfig | dict | None = None, **overrides) -> TrainResult:
    """Pretrain (or continue training) a GPT model; see ``TrainConfig`` for every knob.

    ``train()`` with nothing trains the default model on the bundled Shakespeare into
    ``runs/shakespeare``. Returns the final figures; everything is also in the run folder.
    Two process-wide settings stay after it returns: on CPU, glibc keeps freed memory for reuse
    (``keep_freed_memory``); on CUDA, fp32 matmuls may use TF32.
    """
    started = time.perf_counter()  # preparing the data counts against max_minutes
    if config is None:
        config = TrainConfig()
    elif isinstance(config, dict):
        config = TrainConfig.from_dict(config)
    cfg = resolve(config.replace(**overrides) if overrides else config)
    rt = start_runtime(cfg)
    say = Printer(cfg.progress and rt.dist.main)

    # A model that brings its own tokenizer (init_from) comes first, and fixes the context length.
    model = tokenizer = None
    if cfg.init_from is not None:
        model, tokenizer = build_model(cfg, None, rt.device)
        if cfg.context_length is None:
            cfg = cfg.replace(context_length=model.cfg.context_length)
        check_context(cfg.context_length, model.cfg.context_length)
    if data_mode(cfg.data, cfg.recipe) in SIZED_MODES:
        if not cfg.resume:
            check_run_folder(cfg)  # before any work: an out folder that holds a run stays as it is
        cfg = size_run(cfg, rt, started, tokenizer, model.cfg if model is not None else None, say)
    resume_from = check_run_folder(cfg)
    data = open_data(cfg, tokenizer, rt.dist)
    if model is None:
        tokenizer = data.tokenizer
        model, _ = build_model(cfg, tokenizer.vocab_size, rt.device)
    if model.cfg.vocab_size < tokenizer.vocab_size:
        raise UserError(f"the model's vocabulary ({model.cfg.vocab_size}) is smaller than the "
                        f"tokenizer's ({tokenizer.vocab_size})")

    done = fit(LMTask(data, tokenizer, cfg, model), cfg, model, rt, resume_from, say, started)
    last, final = done.last_eval or {}, done.final
    return TrainResult(Path(cfg.out), done.steps, done.tokens_seen, last.get("train_loss"),
                       final.get("val_loss", last.get("val_loss")), final.get("val_bits_per_char"),
                       -done.best_score if done.best_score is not None else None, done.seconds,
                       done.tokens_per_sec, rt.dist.rank)
