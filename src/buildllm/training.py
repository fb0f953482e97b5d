"""Stage 5: pretraining. Teach a GPTModel to predict the next token, and keep what it learns.

The loop is the book's ``train_model_simple`` grown up: for every optimizer step

    batch ──► model ──► cross-entropy with the next tokens ──► backward   (x grad_accum micro-batches)
          ──► clip the gradient norm ──► AdamW step at the scheduled learning rate

and every ``eval_interval`` steps it measures training and validation loss on fixed batches,
prints a sample from a start context, and writes a checkpoint from which ``--resume`` continues
bit for bit.

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

import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import os
import random
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from buildllm.checkpoint import CONFIG, TOKENIZER, WEIGHTS, atomic_write, save_model
from buildllm.errors import UserError
from buildllm.model import GPTConfig, GPTModel, describe
from buildllm.evaluate import bits_per_character, perplexity
from buildllm.files import current_umask

# Configuration -----------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """Every knob of a training run. ``None`` means "the default of the data mode" (see DEFAULTS)."""

    # What to learn from, and where the run goes.
    data: str | None = None  # None: bundled Shakespeare; a .txt file; or a `buildllm prepare` folder
    out: str | None = None  # run folder (default: runs/<name>)
    name: str | None = None  # run name (default: the data's name)
    tokenizer: str | None = None  # gpt2, a tokenizer.json, or bpe:VOCAB (learned from the data)
    # The model.
    preset: str | None = None  # a GPTConfig preset
    model: dict = field(default_factory=dict)  # GPTConfig overrides, e.g. {"n_layers": 6}
    init_from: str | None = None  # start from these weights (a checkpoint folder or GPT-2) instead
    lora_rank: int | None = None  # train LoRA adapters of this rank (needs init_from)
    lora_alpha: float | None = None  # LoRA scale numerator (default: 2 x rank)
    # How long.
    max_steps: int | None = None  # optimizer steps; in book mode, None means `epochs` passes
    epochs: int | None = None  # book mode: passes over the training windows
    max_minutes: float | None = None  # wall-time budget of the whole run, final evaluation included
    # Batches.
    batch_size: int | None = None  # sequences per micro-batch, over all processes together
    grad_accum: int = 1  # micro-batches per optimizer step
    context_length: int | None = None  # tokens per sequence (default: the model's)
    stride: int | None = None  # book mode: sliding-window stride (default: context_length)
    val_fraction: float = 0.1  # book mode: the last share of the text that validates
    # Optimizer and schedule.
    lr: float | None = None  # peak learning rate
    lr_schedule: Literal["cosine", "constant"] | None = None  # after warmup
    warmup_steps: int | None = None
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.1  # on matrices only: never on biases or norms
    no_decay: tuple[str, ...] = ("wpe",)  # and never on these parameters (name or module prefix)
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global gradient norm; 0 turns clipping off
    # Evaluation, samples and checkpoints.
    eval_interval: int | None = None  # steps between evaluations (and checkpoints)
    eval_iters: int | None = None  # batches per split and evaluation
    save_interval: int | None = None  # steps between checkpoints (default: eval_interval)
    keep_last: int = 2  # checkpoints kept besides best/
    final_eval: bool = True  # loss and bits per character on the whole validation text at the end
    sample_prompt: str | None = None  # start context of the sample printed at each evaluation
    sample_tokens: int = 50
    sample_temperature: float = 0.8
    sample_top_k: int | None = 40
    progress: bool = True  # progress bar and printed evaluations
    # Hardware and reproducibility.
    device: str = "auto"  # auto, cpu, cuda, cuda:N, mps
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    compile: bool = False  # torch.compile the model
    parallel: Literal["ddp", "fsdp"] = "ddp"  # under torchrun
    seed: int = 123
    # What to do with an out folder that already holds a run.
    resume: bool | Literal["auto"] = False  # True: continue it; "auto": continue it if there is one
    force: bool = False  # start over, replacing it

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        unknown = sorted(set(d) - set(cls.keys()))
        if unknown:
            raise UserError(f"unknown training config key(s) {', '.join(unknown)}; valid keys: "
                            f"{', '.join(cls.keys())}")
        d = dict(d)
        if "no_decay" in d and d["no_decay"] is not None:
            d["no_decay"] = tuple([d["no_decay"]] if isinstance(d["no_decay"], str) else d["no_decay"])
        return cls(**d)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> TrainConfig:
        """Read a YAML (.yaml, .yml) or JSON file of config keys."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise UserError(f"cannot read config {path}: {e.strerror}") from None
        try:
            if path.suffix in (".yaml", ".yml"):
                import yaml

                d = yaml.safe_load(text) or {}
            else:
                d = json.loads(text)
        except Exception as e:  # yaml and json each have their own error types
            raise UserError(f"config {path} is not valid {path.suffix.lstrip('.') or 'JSON'}: "
                            f"{str(e).splitlines()[0]}") from None
        if not isinstance(d, dict):
            raise UserError(f"config {path} must be a mapping of keys to values")
        return cls.from_dict(d)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["no_decay"] = list(self.no_decay)
        return d

    def replace(self, **changes) -> TrainConfig:
        return TrainConfig.from_dict({**self.to_dict(), **changes})


# Defaults per data mode. The bundled run was tuned by measurement to finish in under 10 minutes
# on a 2-core CPU (see the README); the book's values are chapter 5's.
DEFAULT_PRESET = "shakespeare-cpu"
DEFAULTS: dict[str, dict[str, Any]] = {
    "bundled": dict(preset=DEFAULT_PRESET, tokenizer="bpe:4096", batch_size=8, lr=3e-3,
                    lr_schedule="cosine", warmup_steps=100, max_steps=3700, max_minutes=8.5,
                    eval_interval=300, eval_iters=10, sample_prompt="ROMEO:"),
    "prepared": dict(preset=DEFAULT_PRESET, batch_size=8, lr=3e-3, lr_schedule="cosine",
                     warmup_steps=100, max_steps=5000, eval_interval=250, eval_iters=20,
                     sample_prompt="\n"),
    # The book: GPT-2's 124M shape with a 256-token context, lr 4e-4, weight decay 0.1, batch 2,
    # 10 epochs, evaluation every 5 steps on 5 batches, "Every effort moves you".
    "book": dict(preset="gpt2", tokenizer="gpt2", batch_size=2, lr=4e-4, lr_schedule="constant",
                 warmup_steps=0, epochs=10, eval_interval=5, eval_iters=5,
                 sample_prompt="Every effort moves you"),
}
BOOK_MODEL = {"context_length": 256, "drop_rate": 0.1, "qkv_bias": False}  # the book's GPT_CONFIG_124M

# Keys that may differ when a run is resumed: they change how long it runs or what it reports,
# not what was computed so far.
RESUMABLE_KEYS = {"max_steps", "epochs", "max_minutes", "eval_interval", "eval_iters", "save_interval",
                  "keep_last", "final_eval", "sample_prompt", "sample_tokens", "sample_temperature",
                  "sample_top_k", "progress", "device", "compile", "out", "resume", "force"}


def data_mode(data: str | None) -> str:
    if data is None:
        return "bundled"
    path = Path(data)
    if path.is_dir():
        if not (path / "meta.json").is_file():
            raise UserError(f"{path} is a folder but not a prepared corpus (no meta.json): run "
                            f"`buildllm prepare INPUT --out {path}`, or give a .txt file")
        return "prepared"
    if path.is_file():
        return "book"
    raise UserError(f"data {path} does not exist: give a .txt file, a folder made by `buildllm "
                    "prepare`, or nothing for the bundled Shakespeare")


def resolve(cfg: TrainConfig) -> TrainConfig:
    """Fill every ``None`` with its mode's default and check the values; the result is what runs."""
    mode = data_mode(cfg.data)
    filled = {k: v for k, v in DEFAULTS[mode].items() if getattr(cfg, k) is None}
    if cfg.max_steps is not None:  # a step count given is the budget: no default time limit
        filled.pop("max_minutes", None)
    if mode == "book" and cfg.preset is None and cfg.init_from is None:
        filled["model"] = {**BOOK_MODEL, **cfg.model}
    if cfg.init_from is not None:
        filled.pop("preset", None)  # the model comes from init_from
        if cfg.tokenizer is None:
            filled.pop("tokenizer", None)  # ... and so does its tokenizer
    if mode == "prepared":
        filled.pop("tokenizer", None)  # the prepared corpus has its own
    if cfg.name is None:
        stem = "shakespeare" if mode == "bundled" else Path(cfg.data).resolve().name.split(".")[0]
        filled["name"] = re.sub(r"[^\w.-]", "_", stem) or "run"
    if "warmup_steps" in filled and cfg.max_steps is not None and filled["warmup_steps"] >= cfg.max_steps:
        filled["warmup_steps"] = cfg.max_steps // 10  # a short run still gets to decay
    cfg = cfg.replace(**filled)
    if cfg.init_from is None:  # the model's shape is known now (its vocabulary comes with the data)
        try:
            model_cfg = GPTConfig.from_preset(cfg.preset, **cfg.model)
        except TypeError as e:
            known = ", ".join(f.name for f in fields(GPTConfig))
            raise UserError(f"bad model override ({e}); valid keys: {known}") from None
        if cfg.context_length is None:
            cfg = cfg.replace(context_length=model_cfg.context_length)
        check_context(cfg.context_length, model_cfg.context_length)
    if cfg.out is None:
        cfg = cfg.replace(out=str(Path("runs") / cfg.name))
    if cfg.save_interval is None:
        cfg = cfg.replace(save_interval=cfg.eval_interval)
    if cfg.lora_rank is not None and cfg.lora_alpha is None:
        cfg = cfg.replace(lora_alpha=2.0 * cfg.lora_rank)
    check(cfg)
    return cfg


def check(cfg: TrainConfig) -> None:
    def positive(name: str, integer: bool = True, allow_none: bool = True) -> None:
        v = getattr(cfg, name)
        if v is None and allow_none:
            return
        ok = isinstance(v, int) and not isinstance(v, bool) if integer else isinstance(v, (int, float))
        if not ok or v <= 0:
            raise UserError(f"{name} must be a positive {'integer' if integer else 'number'}, got {v!r}")

    for name in ("batch_size", "grad_accum", "context_length", "stride", "max_steps", "epochs",
                 "eval_interval", "eval_iters", "save_interval", "keep_last", "lora_rank"):
        positive(name)
    for name in ("lr", "max_minutes", "lora_alpha"):
        positive(name, integer=False)
    for name in ("warmup_steps", "sample_tokens"):
        v = getattr(cfg, name)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
            raise UserError(f"{name} must be an integer >= 0, got {v!r}")
    for name, lo, hi in (("min_lr_ratio", 0, 1), ("val_fraction", 0, 1), ("beta1", 0, 1), ("beta2", 0, 1)):
        v = getattr(cfg, name)
        if not isinstance(v, (int, float)) or not lo <= v <= hi:
            raise UserError(f"{name} must be between {lo} and {hi}, got {v!r}")
    for name in ("weight_decay", "grad_clip", "sample_temperature"):
        v = getattr(cfg, name)
        if not isinstance(v, (int, float)) or v < 0:
            raise UserError(f"{name} must be a number >= 0, got {v!r}")
    choices = {"dtype": ("auto", "bf16", "fp16", "fp32"), "parallel": ("ddp", "fsdp"),
               "lr_schedule": ("cosine", "constant"), "resume": (True, False, "auto")}
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            raise UserError(f"{name} must be one of {', '.join(map(str, allowed))}, got {getattr(cfg, name)!r}")
    if not isinstance(cfg.model, dict):
        raise UserError(f"model must be a mapping of GPTConfig overrides, got {cfg.model!r}")
    if cfg.lora_rank is not None and cfg.init_from is None:
        raise UserError("LoRA adapts trained weights: give init_from (--init-from) with lora_rank")
    if cfg.init_from is not None and (cfg.preset is not None or set(cfg.model) - {"drop_rate", "attention"}):
        raise UserError("init_from takes the model's shape from its weights: drop preset and model "
                        "overrides other than drop_rate and attention")


def load_config(path: str | os.PathLike | None = None, **overrides) -> TrainConfig:
    """A config file (YAML or JSON), if any, with ``overrides`` on top (None values are ignored)."""
    cfg = TrainConfig.from_file(path) if path else TrainConfig()
    return cfg.replace(**{k: v for k, v in overrides.items() if v is not None})


def parse_assignments(items: list[str]) -> dict:
    """``["lr=3e-4", "model.n_layers=6"]`` -> ``{"lr": 0.0003, "model": {"n_layers": 6}}`` (YAML values)."""
    import yaml

    out: dict = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set wants KEY=VALUE, got {item!r}")
        try:
            value = yaml.safe_load(text) if text else None
        except yaml.YAMLError:
            value = text
        if key.startswith("model."):
            out.setdefault("model", {})[key.removeprefix("model.")] = value
        else:
            out[key] = value
    return out


def cli_config(path: str | None, options: dict, assignments: list[str] = ()) -> TrainConfig:
    """The config the command line asks for: the file, then ``--set``, then the options given.

    Resuming without a file starts from the run's saved config, so ``--out DIR --resume`` is enough.
    """
    overrides = {**parse_assignments(list(assignments)), **{k: v for k, v in options.items() if v is not None}}
    base = TrainConfig.from_file(path) if path else TrainConfig()
    if overrides.get("resume") and not path:
        probe = base.replace(**{k: v for k, v in overrides.items() if k != "model"})
        out = probe.out or str(Path("runs") / (probe.name or resolve(probe).name))
        base = saved_config(out) or base
    if "model" in overrides:
        overrides["model"] = {**base.model, **overrides["model"]}
    return base.replace(**overrides)


def saved_config(out: str | os.PathLike) -> TrainConfig | None:
    """The resolved config of the run in ``out``, or None if there is none."""
    path = Path(out) / RUN_CONFIG
    return TrainConfig.from_file(path) if path.is_file() else None


# Devices, precision, processes -------------------------------------------------------------------


def pick_device(spec: str = "auto") -> torch.device:
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise UserError(f"unknown device {spec!r}: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {spec} asked for, but CUDA is not available: use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"device {spec} asked for, but there are {torch.cuda.device_count()} CUDA devices: "
                        f"use cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    if device.type == "mps" and not _mps_available():
        raise UserError(f"device {spec} asked for, but MPS (Apple GPU) is not available: use --device cpu")
    return device


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def pick_dtype(spec: str, device: torch.device) -> torch.dtype:
    """The autocast dtype: bf16 where the hardware has it, fp16 (with loss scaling) on older GPUs."""
    if spec == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return torch.bfloat16  # native bf16 matmuls (AVX512-BF16, AMX): several times fp32's speed
        return torch.float32
    if spec == "fp16" and device.type != "cuda":
        raise UserError("fp16 training needs a CUDA GPU (it relies on a GradScaler): use bf16 or fp32")
    if spec == "bf16" and device.type == "mps":
        raise UserError("bf16 autocast is not supported here on MPS: use fp32")
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[spec]


def autocast(device: torch.device, dtype: torch.dtype):
    """Matmuls in ``dtype``, everything precision-sensitive (softmax, norms, loss) in fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


@dataclass
class Dist:
    """This process's place among the ``torchrun`` processes (rank 0 of 1 when run alone)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: torch.device) -> tuple[Dist, torch.device]:
    """Join the process group when launched by torchrun (it sets RANK, WORLD_SIZE, LOCAL_RANK)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(), device
    import torch.distributed as td

    dist = Dist(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")), world)
    if device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    if not td.is_initialized():
        td.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return dist, device


def _broadcast_float(value: float, dist: Dist) -> float:
    """Rank 0's value on every rank (a clock reading must not differ between processes)."""
    if not dist.enabled:
        return value
    import torch.distributed as td

    t = torch.tensor([value], dtype=torch.float64)
    td.broadcast(t, src=0)
    return float(t.item())


def _mean_over_ranks(value: float, dist: Dist) -> float:
    if not dist.enabled:
        return value
    import torch.distributed as td

    t = torch.tensor([value], dtype=torch.float64)
    td.all_reduce(t)
    return float(t.item()) / dist.world_size


# Data --------------------------------------------------------------------------------------------


class RandomWindows:
    """Scale mode: every micro-batch is ``batch_size`` windows at random places of train.bin.

    The one generator is the whole data position: saving its state saves where we are. Under
    torchrun every process draws the same global batch and keeps its own rows, so N processes
    see exactly the batches one process would.
    """

    def __init__(self, corpus, batch_size: int, context_length: int, seed: int, dist: Dist):
        self.corpus, self.batch_size, self.context_length, self.dist = corpus, batch_size, context_length, dist
        self.generator = torch.Generator().manual_seed(seed)
        self.seed = seed
        self.tokenizer = corpus.tokenizer
        self.val_tokens = corpus.val
        self.val_characters = corpus.meta["val"]["characters"]
        for split in ("train", "val"):
            tokens = getattr(corpus, split)
            if len(tokens) < context_length + 1:
                raise UserError(f"the {split} split of {corpus.path} has {len(tokens)} tokens, fewer "
                                f"than one window of context_length + 1 = {context_length + 1}: use "
                                "more data or a smaller --context-length")

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        from buildllm.data import get_batch

        x, y = get_batch(self.corpus.train, self.batch_size, self.context_length, self.generator)
        return _my_rows(x, self.dist), _my_rows(y, self.dist)

    def eval_batches(self, split: str, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The same ``n`` batches at every evaluation: losses move only because the model does."""
        from buildllm.data import get_batch

        g = torch.Generator().manual_seed(self.seed)
        tokens = getattr(self.corpus, split)
        return [get_batch(tokens, self.batch_size, self.context_length, g) for _ in range(n)]

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


class SlidingWindows:
    """Book mode: the text's sliding windows, shuffled anew each epoch (the book's DataLoader).

    The position is (epoch, batch within it) plus the generator state the epoch's shuffle was
    drawn from, so a resumed run redraws the same order and carries on from the same batch.
    """

    def __init__(self, text: str, tokenizer, cfg: TrainConfig, dist: Dist):
        from buildllm.data import SlidingWindowDataset
        from buildllm.tokenizer import EOT

        split = int(len(text) * (1 - cfg.val_fraction))  # the book's 90/10 split, by characters
        train_text, val_text = text[:split], text[split:]
        self.tokenizer, self.dist, self.batch_size = tokenizer, dist, cfg.batch_size
        train_ids = tokenizer.encode(train_text, allowed_special={EOT})
        val_ids = tokenizer.encode(val_text, allowed_special={EOT})
        T, stride = cfg.context_length, cfg.stride or cfg.context_length
        for name, ids, share in (("training", train_ids, 1 - cfg.val_fraction), ("validation", val_ids, cfg.val_fraction)):
            if len(ids) < T + 1:
                raise UserError(f"the {name} text ({share:.0%} of {cfg.data}) has {len(ids)} tokens, "
                                f"fewer than one window of context_length + 1 = {T + 1}: use a longer "
                                "text or a smaller --context-length")
        self.train = SlidingWindowDataset(train_ids, T, stride)
        self.val = SlidingWindowDataset(val_ids, T, T)
        self.batches_per_epoch = len(self.train) // cfg.batch_size  # the book drops the last partial batch
        if self.batches_per_epoch == 0:
            raise UserError(f"the training text gives {len(self.train)} windows of {T} tokens, fewer "
                            f"than one batch of {cfg.batch_size}: use a longer text, a smaller "
                            "--batch-size or --context-length")
        self.val_tokens = np.asarray(val_ids, dtype=np.int64)
        self.val_characters = len(val_text)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.seed = cfg.seed
        self.epoch, self.index = 0, 0
        self._start_epoch()

    def _start_epoch(self) -> None:
        self.epoch_state = self.generator.get_state()
        self.order = torch.randperm(len(self.train), generator=self.generator)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.index == self.batches_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
            self._start_epoch()
        rows = self.order[self.index * self.batch_size : (self.index + 1) * self.batch_size]
        self.index += 1
        x, y = _stack([self.train[int(i)] for i in _my_rows(rows, self.dist)])
        return x, y

    def eval_batches(self, split: str, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The first ``n`` batches of validation (in order) or of training (in a fixed shuffle)."""
        dataset = self.val if split == "val" else self.train
        order = (torch.arange(len(dataset)) if split == "val"
                 else torch.randperm(len(dataset), generator=torch.Generator().manual_seed(self.seed)))
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)][:n]
        return [_stack([dataset[int(i)] for i in rows]) for rows in batches]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "epoch_generator": self.epoch_state}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["epoch_generator"])
        self._start_epoch()
        self.epoch, self.index = state["epoch"], state["index"]


def _stack(pairs) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.stack([x for x, _ in pairs]), torch.stack([y for _, y in pairs])


def _my_rows(batch: torch.Tensor, dist: Dist) -> torch.Tensor:
    """This process's contiguous share of a global batch."""
    if not dist.enabled:
        return batch
    if len(batch) % dist.world_size:
        raise UserError(f"batch_size {len(batch)} does not split evenly over {dist.world_size} "
                        "processes: make it a multiple of the process count")
    share = len(batch) // dist.world_size
    return batch[dist.rank * share : (dist.rank + 1) * share]


def open_data(cfg: TrainConfig, tokenizer, dist: Dist):
    """The batches of ``cfg.data``; ``tokenizer`` is None unless the model already has one."""
    from buildllm.data import default_prepared_dir, load_prepared, prepare_corpus

    mode = data_mode(cfg.data)
    if mode == "book":
        from buildllm.tokenizer import get_tokenizer

        tok = tokenizer or get_tokenizer(cfg.tokenizer)
        try:
            text = Path(cfg.data).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read {cfg.data} as UTF-8 text: {e}") from None
        return SlidingWindows(text, tok, cfg, dist)

    if mode == "bundled":
        spec = tokenizer or cfg.tokenizer
        path = default_prepared_dir(None, spec)
        if dist.main:  # tokenize once, then every process maps the same files
            corpus = prepare_corpus(None, path, tokenizer=spec, progress=cfg.progress)
        _barrier(dist)
        corpus = load_prepared(path)
    else:
        corpus = load_prepared(cfg.data)
        if cfg.tokenizer is not None and cfg.tokenizer != corpus.meta["tokenizer"]["spec"]:
            raise UserError(f"{cfg.data} was prepared with tokenizer {corpus.meta['tokenizer']['spec']}, "
                            f"not {cfg.tokenizer}: drop --tokenizer or prepare the data again")
    if tokenizer is not None and tokenizer.fingerprint() != corpus.tokenizer.fingerprint():
        raise UserError(f"{corpus.path} was tokenized with {corpus.tokenizer.name}, but the model "
                        f"uses {tokenizer.name}: prepare the data with the model's tokenizer.json")
    return RandomWindows(corpus, cfg.batch_size, cfg.context_length, cfg.seed, dist)


def _barrier(dist: Dist) -> None:
    if dist.enabled:
        import torch.distributed as td

        td.barrier()


# The model and its optimizer ---------------------------------------------------------------------


def build_model(cfg: TrainConfig, vocab_size: int | None, device: torch.device):
    """A new GPTModel (seeded), or the weights of ``init_from``; returns ``(model, tokenizer)``."""
    torch.manual_seed(cfg.seed)
    if cfg.init_from is not None:
        from buildllm.pretrained import load_pretrained

        model, tokenizer = load_pretrained(cfg.init_from, device=device, **cfg.model)
        if tokenizer is None:
            raise UserError(f"{cfg.init_from} has no tokenizer saved with it: save its tokenizer.json")
    else:
        overrides = {"vocab_size": vocab_size, **cfg.model}  # a model key may pad the vocabulary
        model, tokenizer = GPTModel(GPTConfig.from_preset(cfg.preset, **overrides)).to(device), None
    if cfg.lora_rank is not None:
        from buildllm.lora import apply_lora

        apply_lora(model, cfg.lora_rank, cfg.lora_alpha)
    return model.train(), tokenizer


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
    groups = param_groups(model, cfg.weight_decay, cfg.no_decay)
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


def lm_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy; the logits go to fp32 first, whatever autocast computed."""
    logits = model(x)
    return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())


def train_step(model: nn.Module, optimizer, scaler, data, accum: int, grad_clip: float,
               device: torch.device, dtype: torch.dtype, ddp: bool = False) -> float:
    """One optimizer step on ``accum`` micro-batches; returns their mean loss on this process."""
    loss_sum = 0.0
    for micro in range(accum):
        x, y = data.next_batch()
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        # Under DDP, gradients are averaged across processes on the last micro-step only.
        skip_sync = ddp and micro < accum - 1
        with (model.no_sync() if skip_sync else contextlib.nullcontext()), autocast(device, dtype):
            loss = lm_loss(model, x, y) / accum  # so the accumulated gradient is the mean's
        scaler.scale(loss).backward()
        loss_sum += loss.item()
    if grad_clip > 0:
        scaler.unscale_(optimizer)  # clip the true gradients, not the fp16-scaled ones
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)  # (an fp16 step with inf/nan gradients is skipped)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum


@torch.no_grad()
def estimate_loss(model: nn.Module, batches, device: torch.device, dtype: torch.dtype) -> float:
    """Mean loss over fixed batches, dropout off (the book's calc_loss_loader)."""
    was_training = model.training
    model.eval()
    total = 0.0
    for x, y in batches:
        with autocast(device, dtype):
            total += lm_loss(model, x.to(device), y.to(device)).item()
    model.train(was_training)
    return total / len(batches)


def sample_text(model: GPTModel, tokenizer, cfg: TrainConfig, device: torch.device) -> str:
    """The book's generate_and_print_sample: a short continuation of the start context."""
    from buildllm.generation import generate

    ids = tokenizer.encode(cfg.sample_prompt or "\n")[-model.cfg.context_length + 1 :] or [tokenizer.eot_id]
    out = generate(model, torch.tensor([ids], device=device), cfg.sample_tokens,
                   temperature=cfg.sample_temperature, top_k=cfg.sample_top_k,
                   generator=torch.Generator(device=device).manual_seed(cfg.seed))
    model.train()
    return tokenizer.decode(out[0].tolist())


# Throughput --------------------------------------------------------------------------------------

# Dense bf16 tensor-core peaks (FLOP/s) by GPU name, for the MFU estimate.
GPU_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12,
                  "L4": 121e12, "4090": 165e12, "3090": 71e12, "V100": 125e12, "T4": 65e12}


def peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """The device's matmul peak: from the table for known GPUs, else measured on a big matmul."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in GPU_PEAK_FLOPS.items():
            if key in name:
                return value
    n = 1024
    g = torch.Generator(device=device).manual_seed(0)  # leave the global RNG (dropout's) untouched
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    a @ b  # warm up
    best = math.inf
    for _ in range(5):  # the fastest of several tries: other processes only ever slow it down
        _sync(device)
        t = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def keep_freed_memory() -> None:
    """Let glibc keep big freed blocks for reuse instead of handing them back to the kernel.

    By default glibc serves each allocation above 32 MiB with a fresh ``mmap`` and returns it with
    ``munmap`` when freed, so a tensor like the fp32 logits (batch x context x vocab) is
    page-faulted in anew at every step. On the 2-core CPU of the default run that cost a third of
    the step time. Raising both thresholds makes steady-state steps reuse the same memory.
    Linux with glibc only; elsewhere (or with another C library) this does nothing.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # from glibc's malloc.h
    mallopt(M_MMAP_THRESHOLD, 1 << 30)
    mallopt(M_TRIM_THRESHOLD, 1 << 30)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


# The run folder ----------------------------------------------------------------------------------

RUN_CONFIG, METRICS, PLOT, STATE, MANIFEST = "train_config.json", "metrics.jsonl", "loss.png", "state.pt", "manifest.json"
CHECKPOINTS, BEST = "checkpoints", "best"
STATE_KEYS = ("step", "tokens_seen", "best_val_loss", "scheduler", "optimizer", "scaler", "data", "rng")
RUN_FILES = (RUN_CONFIG, METRICS, PLOT, WEIGHTS, CONFIG, TOKENIZER, CHECKPOINTS, BEST)


def checkpoint_dirs(run: Path) -> list[tuple[int, Path]]:
    """Finished checkpoints of a run, oldest first (unfinished ones are hidden .tmp folders)."""
    found = []
    for p in (run / CHECKPOINTS).glob("step-*"):
        m = re.fullmatch(r"step-(\d+)", p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a folder be fsynced
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_checkpoint(run: Path, step: int, model: nn.Module, tokenizer, state: dict, keep_last: int) -> Path:
    """Write checkpoints/step-N atomically: into a temporary folder, every file fsynced, then renamed.

    A crash at any moment leaves either the complete new checkpoint or none, and the older ones
    are deleted only after the new one is in place.
    """
    root = run / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=root))
    os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it private; a checkpoint is not
    try:
        save_model(tmp, model, tokenizer)
        atomic_write(tmp / STATE, lambda p: torch.save(state, p))
        files = sorted(p.name for p in tmp.iterdir())
        manifest = {"step": step, "files": {name: _sha256(tmp / name) for name in files}}
        atomic_write(tmp / MANIFEST, lambda p: Path(p).write_text(json.dumps(manifest, indent=2) + "\n"))
        _fsync_dir(tmp)
        if final.exists():  # the same step written again (a resumed run's last step): swap it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for _, old in checkpoint_dirs(run)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".step-*.tmp"):  # left by a crash mid-write
        shutil.rmtree(stale, ignore_errors=True)
    return final


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Weights and training state of a checkpoint folder, every file checked against its sha256."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    what = f"checkpoint {path}"
    hint = ("move it aside to resume from the previous one, or start over with --force")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        listed = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{what} has no readable {MANIFEST} ({e}): it is damaged; {hint}") from None
    for name, digest in listed.items():
        file = path / name
        if not file.is_file():
            raise UserError(f"{what} is incomplete: {name} is missing; {hint}")
        if _sha256(file) != digest:
            raise UserError(f"{what} is corrupt or truncated: {name} does not match its sha256; {hint}")
    try:
        weights = load_file(path / WEIGHTS)
        state = torch.load(path / STATE, map_location="cpu", weights_only=True)
    except (SafetensorError, OSError, RuntimeError, EOFError, ValueError) as e:
        raise UserError(f"{what} cannot be read ({str(e).splitlines()[0]}); {hint}") from None
    missing = [k for k in STATE_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise UserError(f"{what} holds no {missing[0]!r} in {STATE}: another version of buildllm wrote "
                        "it; resume with that version, or start over with --force")
    return weights, state


def rng_state() -> dict:
    """Every random number generator that training draws from (dropout, and any user code)."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


def _gather_objects(obj, dist: Dist) -> list:
    if not dist.enabled:
        return [obj]
    import torch.distributed as td

    out = [None] * dist.world_size
    td.all_gather_object(out, obj)
    return out


def _read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):  # a line cut short by a crash
            records.append(json.loads(line))
    return records


def plot_losses(records: list[dict], path: Path) -> None:
    """Training and validation loss against steps, with tokens seen on a second axis (the book's plot)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r for r in records if r.get("kind") == "step"]
    evals = [r for r in records if r.get("kind") == "eval"]
    if not steps and not evals:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    if steps:
        ax.plot([r["step"] for r in steps], [r["train_loss"] for r in steps], color="tab:blue",
                alpha=0.3, linewidth=0.8, label="training loss (each step)")
    if evals:
        ax.plot([r["step"] for r in evals], [r["train_loss"] for r in evals], "o-", color="tab:blue",
                markersize=3, label="training loss")
        ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "s-", color="tab:orange",
                markersize=3, label="validation loss")
    ax.set_xlabel("steps")
    ax.set_ylabel("loss (nats per token)")
    ax.legend(loc="upper right")
    last = (steps or evals)[-1]
    if last["step"] > 0:
        tokens_per_step = last["tokens_seen"] / last["step"]
        top = ax.secondary_xaxis("top", functions=(lambda s: s * tokens_per_step, lambda t: t / tokens_per_step))
        top.set_xlabel("tokens seen")
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=100))
    plt.close(fig)


def check_run_folder(cfg: TrainConfig) -> Path | None:
    """Check the out folder against resume/force (touching nothing); the checkpoint to resume, if any."""
    run = Path(cfg.out)
    if run.exists() and not run.is_dir():
        raise UserError(f"out {run} exists and is not a folder: choose another --out")
    has_run = (run / RUN_CONFIG).is_file()
    if has_run and cfg.resume:
        found = checkpoint_dirs(run)
        if found:
            saved = saved_config(run)
            diff = [k for k in TrainConfig.keys()
                    if k not in RESUMABLE_KEYS and getattr(saved, k) != getattr(cfg, k)]
            if diff:
                shown = ", ".join(f"{k}: {getattr(saved, k)!r} -> {getattr(cfg, k)!r}" for k in diff)
                raise UserError(f"cannot resume {run} with a different configuration ({shown}): "
                                "resume with the same settings, or start over with --force")
            return found[-1][1]
        if cfg.resume is True:
            raise UserError(f"{run} holds no checkpoint yet: nothing to resume; start over with --force")
    elif has_run and not cfg.force and not cfg.resume:
        raise UserError(f"{run} already holds a training run: pass --resume to continue it, --force "
                        "to start over, or choose another --out")
    elif cfg.resume is True:
        raise UserError(f"{run} holds no training run to resume: drop --resume, or check --out")
    elif run.exists() and any(run.iterdir()) and not has_run and not cfg.force:
        raise UserError(f"out folder {run} is not empty and holds no training run: choose another "
                        "--out (or --force to write into it)")
    return None


def start_run_folder(run: Path, dist: Dist) -> None:
    """A new run: remove what an earlier run wrote there (with --force), nothing else."""
    if dist.main:
        for name in RUN_FILES:
            p = run / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
        run.mkdir(parents=True, exist_ok=True)
    _barrier(dist)


# The loop ----------------------------------------------------------------------------------------


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


class _Printer:
    """Messages from rank 0 only, written above the progress bar when there is one."""

    def __init__(self, enabled: bool):
        self.enabled, self.bar = enabled, None

    def __call__(self, msg: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr, flush=True)


def train(config: TrainConfig | dict | None = None, **overrides) -> TrainResult:
    """Pretrain (or continue training) a GPT model; see ``TrainConfig`` for every knob.

    ``train()`` with nothing trains the default model on the bundled Shakespeare into
    ``runs/shakespeare``. Returns the final figures; everything is also in the run folder.
    Two process-wide settings stay after it returns: on CPU, glibc keeps freed memory for reuse
    (``keep_freed_memory``); on CUDA, fp32 matmuls may use TF32.
    """
    if config is None:
        config = TrainConfig()
    elif isinstance(config, dict):
        config = TrainConfig.from_dict(config)
    cfg = resolve(config.replace(**overrides) if overrides else config)
    wall_start = time.perf_counter()

    device = pick_device(cfg.device)
    dist, device = init_distributed(device)
    dtype = pick_dtype(cfg.dtype, device)
    if device.type == "cpu":
        keep_freed_memory()
    if device.type == "cuda":
        # TF32 tensor cores for the fp32 matmuls that autocast leaves alone.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    say = _Printer(cfg.progress and dist.main)

    # A model that brings its own tokenizer (init_from) comes first, and fixes the context length.
    model = tokenizer = None
    if cfg.init_from is not None:
        model, tokenizer = build_model(cfg, None, device)
        if cfg.context_length is None:
            cfg = cfg.replace(context_length=model.cfg.context_length)
        check_context(cfg.context_length, model.cfg.context_length)
    run, resume_from = Path(cfg.out), check_run_folder(cfg)
    data = open_data(cfg, tokenizer, dist)
    if model is None:
        tokenizer = data.tokenizer
        model, _ = build_model(cfg, tokenizer.vocab_size, device)
    if model.cfg.vocab_size < tokenizer.vocab_size:
        raise UserError(f"the model's vocabulary ({model.cfg.vocab_size}) is smaller than the "
                        f"tokenizer's ({tokenizer.vocab_size})")
    if dist.enabled and cfg.batch_size % dist.world_size:
        raise UserError(f"batch_size {cfg.batch_size} does not split evenly over {dist.world_size} "
                        "processes: make it a multiple of the process count")
    fsdp = dist.enabled and cfg.parallel == "fsdp"
    if fsdp and cfg.lora_rank is not None:
        raise UserError("LoRA under FSDP is not supported: use parallel: ddp")
    max_steps = cfg.max_steps or math.ceil(cfg.epochs * data.batches_per_epoch / cfg.grad_accum)
    if resume_from is None:  # everything checked: only now may an old run make way
        start_run_folder(run, dist)

    # Continue where the checkpoint left off: weights, optimizer, data position, every RNG.
    step, tokens_seen, best_val, state = 0, 0, math.inf, None
    spent_before, time_fraction = 0.0, 0.0  # seconds spent by earlier processes of this run
    raw_model = model  # the GPTModel itself: what we save and sample from
    if resume_from is not None:
        weights, state = read_checkpoint(resume_from)
        if "model" in state:  # LoRA: the unmerged weights
            raw_model.load_state_dict(state["model"])
        else:
            if raw_model.cfg.tie_embeddings:
                weights["out_head.weight"] = weights["wte.weight"]
            raw_model.load_state_dict(weights)
        step, tokens_seen, best_val = state["step"], state["tokens_seen"], state["best_val_loss"]
        spent_before, time_fraction = state["scheduler"]["spent"], state["scheduler"]["time_fraction"]
        if cfg.max_minutes and time_fraction >= 1:
            max_steps = step  # it stopped on its time limit: nothing left to do
    if dist.main:
        atomic_write(run / RUN_CONFIG, lambda p: Path(p).write_text(json.dumps(
            {k: v for k, v in cfg.to_dict().items() if k not in ("resume", "force")}, indent=2) + "\n"))

    # Wrap for many processes: FSDP shards the weights themselves, so the optimizer comes after.
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for block in raw_model.blocks:
            fully_shard(block)
        fully_shard(raw_model)
    optimizer = make_optimizer(raw_model, cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    if state is not None:
        _load_optimizer_state(raw_model, optimizer, state["optimizer"], fsdp)
        scaler.load_state_dict(state["scaler"])
        data.load_state_dict(state["data"])
        rngs = state["rng"]
        set_rng_state(rngs[dist.rank] if len(rngs) == dist.world_size else rngs[0])
        if dist.main:  # forget what was logged after the checkpoint: it will be logged again
            kept = [r for r in _read_metrics(run / METRICS) if r.get("kind") != "final" and r["step"] <= step]
            atomic_write(run / METRICS, lambda p: Path(p).write_text("".join(json.dumps(r) + "\n" for r in kept)))
        say(f"resuming {run} from {resume_from.name}")
    else:
        torch.manual_seed(cfg.seed + dist.rank)  # dropout differs between processes
    model = raw_model
    if cfg.compile:
        model = torch.compile(model)
    if dist.enabled and cfg.parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    eval_model = model if fsdp else raw_model  # evaluation needs no gradient sync

    T, B, accum = cfg.context_length, cfg.batch_size, cfg.grad_accum
    tokens_per_step = B * T * accum
    flops_per_token = describe(dataclasses.replace(raw_model.cfg, context_length=T))["train_flops_per_token"]
    eval_sets = {split: data.eval_batches(split, cfg.eval_iters) for split in ("train", "val")}
    budget = cfg.max_minutes * 60 if cfg.max_minutes else None  # seconds, for the whole run

    def time_spent() -> float:
        return spent_before + time.perf_counter() - wall_start

    n_params = sum(p.numel() for p in raw_model.parameters())
    n_train = sum(p.numel() for p in raw_model.parameters() if p.requires_grad)
    where = f", {dist.world_size} processes ({cfg.parallel})" if dist.enabled else ""
    limit = f", at most {cfg.max_minutes:g} minutes" if budget else ""
    say(f"training {n_params:,} parameters ({n_train:,} trainable) on {device} in "
        f"{str(dtype).removeprefix('torch.')}{where}: {max_steps:,} steps of {tokens_per_step:,} tokens{limit}")

    metrics_file = open(run / METRICS, "a") if dist.main else None

    def log(record: dict) -> None:
        if metrics_file is not None:
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()

    def save(val_loss: float | None) -> None:
        """Checkpoint this step (rank 0 writes; under FSDP every rank helps gather the weights)."""
        nonlocal best_val
        is_best = val_loss is not None and val_loss <= best_val
        if is_best:
            best_val = val_loss
        rngs = _gather_objects(rng_state(), dist)
        optim_state = _optimizer_state(raw_model, optimizer, fsdp, dist)
        to_save = _full_model(raw_model, fsdp, dist)
        if not dist.main:
            return
        # The learning rate is a function of the step, max_steps and (with a time limit) the
        # time spent: those are the scheduler's whole state.
        state = {"step": step, "tokens_seen": tokens_seen, "best_val_loss": best_val,
                 "scheduler": {"step": step, "max_steps": max_steps, "spent": time_spent(),
                               "time_fraction": time_fraction},
                 "optimizer": optim_state, "scaler": scaler.state_dict(), "data": data.state_dict(),
                 "rng": rngs, "world_size": dist.world_size}
        if cfg.lora_rank is not None:
            from buildllm.lora import merge_lora

            state["model"] = {k: v.detach().clone() for k, v in to_save.state_dict().items()}
            to_save = merge_lora(copy.deepcopy(to_save))  # a plain GPTModel anyone can load
        metrics_file.flush()
        os.fsync(metrics_file.fileno())  # what was logged up to this step survives with it
        write_checkpoint(run, step, to_save, tokenizer, state, cfg.keep_last)
        save_model(run, to_save, tokenizer)
        if is_best:
            save_model(run / BEST, to_save, tokenizer)
        if val_loss is not None:  # a new point on the validation curve
            plot_losses(_read_metrics(run / METRICS), run / PLOT)

    bar = None
    if cfg.progress and dist.main:
        from tqdm import tqdm

        bar = tqdm(total=max_steps, initial=step, unit="step", dynamic_ncols=True, file=sys.stderr)
        say.bar = bar
    peak = peak_flops(device, dtype) if bar is not None else None
    last_eval, rate, first_step = None, None, step
    loop_seconds = 0.0  # in training steps, for the average throughput
    try:
        while step < max_steps:
            step_start = time.perf_counter()
            lr = learning_rate(step + 1, cfg, max_steps, time_fraction)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss = train_step(model, optimizer, scaler, data, accum, cfg.grad_clip, device, dtype,
                              ddp=dist.enabled and cfg.parallel == "ddp")
            step += 1
            tokens_seen += tokens_per_step
            train_loss = _mean_over_ranks(loss, dist)
            if not math.isfinite(train_loss):
                good = last_checkpoint(run)
                kept = f"the last good checkpoint, {good}, is kept" if good else "no checkpoint was written yet"
                raise UserError(f"the loss became {train_loss} at step {step}: training diverged; {kept}. "
                                "Lower --lr, raise --warmup-steps, or train in bf16/fp32")
            step_seconds = time.perf_counter() - step_start
            loop_seconds += step_seconds
            step_rate = tokens_per_step / max(step_seconds, 1e-9)
            rate = step_rate if rate is None else 0.9 * rate + 0.1 * step_rate
            log({"kind": "step", "step": step, "tokens_seen": tokens_seen, "train_loss": train_loss,
                 "val_loss": None, "lr": lr, "tokens_per_sec": round(step_rate, 1),
                 "elapsed": round(time_spent(), 3)})
            if budget is not None:
                # The budget covers the whole run: time spent so far, plus what scoring the
                # validation text will take at the end (a forward pass costs ~1/3 of a step).
                final_cost = len(data.val_tokens) / (3 * rate) if cfg.final_eval else 0.0
                time_fraction = _broadcast_float(min(1.0, (time_spent() + final_cost) / budget), dist)
                if time_fraction >= 1 and step < max_steps:
                    say(f"time limit of {cfg.max_minutes:g} minutes reached at step {step}")
                    max_steps = step
            if bar is not None:
                post = {"loss": f"{train_loss:.3f}", "lr": f"{lr:.2e}", "tok/s": f"{rate:,.0f}"}
                if peak:
                    post["mfu"] = f"{flops_per_token * rate / peak:.0%}"
                if budget is not None:
                    post["budget left"] = f"{max(0.0, budget - time_spent()) / 60:.1f} min"
                bar.total = max_steps
                bar.set_postfix(post, refresh=False)
                bar.update(1)

            val_loss = None
            if step % cfg.eval_interval == 0 or step == max_steps:
                last_eval = (estimate_loss(eval_model, eval_sets["train"], device, dtype),
                             estimate_loss(eval_model, eval_sets["val"], device, dtype))
                val_loss = last_eval[1]
                if fsdp:  # a forward pass without backward leaves the root's weights gathered
                    raw_model.reshard()
                log({"kind": "eval", "step": step, "tokens_seen": tokens_seen, "train_loss": last_eval[0],
                     "val_loss": val_loss, "lr": lr, "tokens_per_sec": round(rate, 1),
                     "elapsed": round(time_spent(), 3)})
                say(f"step {step:>6} | tokens {tokens_seen:>12,} | train loss {last_eval[0]:.3f} | "
                    f"val loss {val_loss:.3f} | {rate:,.0f} tok/s")
                if cfg.sample_tokens > 0 and dist.main and not fsdp:
                    with autocast(device, dtype):
                        text = sample_text(raw_model, tokenizer, cfg, device)
                    say("  sample: " + text.replace("\n", " "))
            if step % cfg.save_interval == 0 or step == max_steps:
                save(val_loss)
    finally:
        if bar is not None:
            bar.close()
        if metrics_file is not None:
            metrics_file.close()

    val_loss, bpc = (last_eval[1] if last_eval else None), None
    if cfg.final_eval:
        # Every held-out token scored once, with the tokens before it in its window as context.
        with autocast(device, dtype):
            final = perplexity(eval_model, np.asarray(data.val_tokens, dtype=np.int64), context_length=T,
                               stride=max(1, T - 1), batch_size=B)
        val_loss, val_perplexity = final["loss"], final["perplexity"]
        bpc = bits_per_character(val_loss, final["tokens"], data.val_characters)
        if dist.main:
            with open(run / METRICS, "a") as f:
                f.write(json.dumps({
                    "kind": "final", "step": step, "tokens_seen": tokens_seen,
                    "train_loss": last_eval[0] if last_eval else None, "val_loss": val_loss, "lr": None,
                    "tokens_per_sec": round(rate, 1) if rate else None, "elapsed": round(time_spent(), 3),
                    "val_perplexity": val_perplexity, "val_bits_per_char": bpc,
                    "val_tokens": len(data.val_tokens), "val_characters": data.val_characters}) + "\n")
            plot_losses(_read_metrics(run / METRICS), run / PLOT)
        say(f"validation text ({len(data.val_tokens):,} tokens, {data.val_characters:,} characters): "
            f"loss {val_loss:.4f}, perplexity {val_perplexity:.2f}, {bpc:.3f} bits per character")
    _barrier(dist)
    return TrainResult(run, step, tokens_seen, last_eval[0] if last_eval else None, val_loss, bpc,
                       best_val if math.isfinite(best_val) else None, time.perf_counter() - wall_start,
                       (step - first_step) * tokens_per_step / loop_seconds if loop_seconds else 0.0, dist.rank)


def check_context(context_length: int, model_context: int) -> None:
    if context_length > model_context:
        raise UserError(f"context_length {context_length} exceeds the model's {model_context}: use "
                        f"--context-length {model_context} or less, or a model with a longer context "
                        "(the model key context_length)")


def last_checkpoint(run: Path) -> Path | None:
    found = checkpoint_dirs(run)
    return found[-1][1] if found else None


def _full_model(raw_model: nn.Module, fsdp: bool, dist: Dist) -> nn.Module:
    """The model with all its weights on rank 0 (FSDP holds a shard on each process)."""
    if not fsdp:
        return raw_model
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from buildllm.checkpoint import model_from_state_dict

    state = get_model_state_dict(raw_model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not dist.main:
        return raw_model
    if raw_model.cfg.tie_embeddings:
        state.pop("out_head.weight", None)
    return model_from_state_dict(raw_model.cfg, state)


def _optimizer_state(raw_model: nn.Module, optimizer, fsdp: bool, dist: Dist) -> dict | None:
    if not fsdp:
        return optimizer.state_dict() if dist.main else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(raw_model, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _load_optimizer_state(raw_model: nn.Module, optimizer, state: dict, fsdp: bool) -> None:
    if not fsdp:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(raw_model, optimizer, state, options=StateDictOptions(full_state_dict=True))
