"""The training configuration: every knob of a run, its defaults per data mode, and the checks.

A config comes from a YAML/JSON file, ``--set KEY=VALUE`` and command-line options, in that order
(``cli_config``); ``resolve`` fills what is left from the data mode's defaults.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from buildllm.errors import UserError
from buildllm.models.gpt2 import GPTConfig


class ConfigFile:
    """What every config dataclass can do: list its keys, come from a dict or a YAML/JSON file, go back.

    A field's help text is the ``# comment`` after it: command-line options are made from these.
    """

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(cls, d: dict):
        unknown = sorted(set(d) - set(cls.keys()))
        if unknown:
            raise UserError(f"unknown {cls.what} config key(s) {', '.join(unknown)}; valid keys: "
                            f"{', '.join(cls.keys())}")
        d = dict(d)
        for f in fields(cls):  # JSON and YAML know lists only: a tuple field gets its tuple back
            value = d.get(f.name)
            if isinstance(f.default, tuple) and value is not None and not isinstance(value, tuple):
                d[f.name] = tuple([value] if isinstance(value, str) else value)
        return cls(**d)

    @classmethod
    def from_file(cls, path: str | os.PathLike):
        """Read a YAML (.yaml, .yml) or JSON file of config keys."""
        return cls.from_dict(read_config_file(path))

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def replace(self, **changes):
        return type(self).from_dict({**self.to_dict(), **changes})

    what = "training"  # for messages: "unknown training config key(s) ..."


@dataclass
class EngineConfig(ConfigFile):
    """The knobs of the training engine itself, shared by the fine-tuning tasks' configs.

    Every name here means the same in ``TrainConfig`` (pretraining), so the engine reads either.
    The defaults are the book's fine-tuning settings (chapters 6 and 7): constant learning rate,
    no warmup, no clipping, plain AdamW betas, fp32.
    """

    out: str | None = None  # folder for the run: checkpoints, metrics.jsonl, loss.png, the best model
    epochs: int = 1  # passes over the training examples
    max_steps: int | None = None  # optimizer steps (default: epochs x steps per epoch)
    max_minutes: float | None = None  # wall-time budget of the whole run
    batch_size: int = 8  # examples per micro-batch, over all processes together
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 5e-5  # peak learning rate (AdamW)
    lr_schedule: Literal["cosine", "constant"] = "constant"  # after warmup
    warmup_steps: int = 0  # steps of linear warmup from 0 to lr
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.1  # AdamW weight decay, on matrices only
    no_decay: tuple[str, ...] = ()  # and never on these parameters (name or module prefix)
    beta1: float = 0.9  # AdamW first-moment decay
    beta2: float = 0.999  # AdamW second-moment decay
    optimizer: Literal["adamw", "muon"] = "adamw"  # muon: Muon for the blocks' weight matrices, AdamW for the rest
    muon_lr: float = 0.02  # Muon's peak learning rate (the schedule scales it as it scales lr)
    muon_momentum: float = 0.95  # Muon's momentum (Nesterov)
    muon_weight_decay: float = 0.0  # Muon's decoupled weight decay
    grad_clip: float = 0.0  # max global gradient norm; 0 turns clipping off
    eval_interval: int | None = None  # steps between evaluations and checkpoints (default: one epoch)
    save_interval: int | None = None  # steps between checkpoints (default: eval_interval)
    keep_last: int = 2  # checkpoints kept
    progress: bool = True  # progress bar
    device: str = "auto"  # auto, cpu, cuda, cuda:N, mps
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "fp32"  # autocast precision (auto: bf16 where fast)
    compile: bool = False  # torch.compile the model's forward pass and the loss as one graph
    parallel: Literal["ddp", "fsdp"] = "ddp"  # under torchrun
    seed: int = 123  # seed for the split, the shuffling and new weights
    resume: bool | Literal["auto"] = False  # True: continue the run in out; "auto": if there is one
    force: bool = False  # start over, replacing the run in out


@dataclass
class TrainConfig(ConfigFile):
    """Every knob of a training run. ``None`` means "the default of the data mode" (see DEFAULTS)."""

    # What to learn from, and where the run goes.
    data: str | None = None  # None: bundled Shakespeare; a .txt file, a folder of them, or a `buildllm prepare` folder
    recipe: Literal["auto", "book"] = "auto"  # auto: tokenizer, model and steps sized to the data and time; book: chapter 5
    out: str | None = None  # run folder (default: runs/<name>)
    name: str | None = None  # run name (default: the data's name)
    tokenizer: str | None = None  # gpt2, a tokenizer.json, or bpe:VOCAB (learned from the data)
    # The model.
    arch: str | None = None  # architecture (gpt2, llama, qwen3): trains its small CPU preset unless preset names one
    preset: str | None = None  # a model preset (gpt2, llama-3.2-1b, qwen3-cpu, ...; `buildllm info` lists them)
    model: dict = field(default_factory=dict)  # model config overrides, e.g. {"n_layers": 6}
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
    val_fraction: float = 0.1  # a text (file or folder): the last share of it (or of its files) that validates
    # Optimizer and schedule.
    lr: float | None = None  # peak learning rate
    lr_schedule: Literal["cosine", "constant"] | None = None  # after warmup
    warmup_steps: int | None = None  # linear warmup steps
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio (0: to zero, as the speedrun's schedule ends)
    weight_decay: float = 0.1  # on matrices only: never on biases or norms
    no_decay: tuple[str, ...] = ("wpe",)  # and never on these parameters (name or module prefix)
    beta1: float = 0.9  # AdamW's first-moment decay
    beta2: float = 0.95  # AdamW's second-moment decay
    optimizer: Literal["adamw", "muon"] | None = None  # muon: Muon for the blocks' matrices, AdamW for the rest (default: muon; the book: adamw)
    muon_lr: float = 0.02  # Muon's peak learning rate (the schedule scales it as it scales lr)
    muon_momentum: float = 0.95  # Muon's momentum (Nesterov)
    muon_weight_decay: float = 0.0  # Muon's decoupled weight decay
    grad_clip: float = 1.0  # max global gradient norm; 0 turns clipping off
    # Evaluation, samples and checkpoints.
    eval_interval: int | None = None  # steps between evaluations (and checkpoints)
    eval_iters: int | None = None  # batches per split and evaluation
    save_interval: int | None = None  # steps between checkpoints (default: eval_interval)
    keep_last: int = 2  # checkpoints kept besides best/
    final_eval: bool = True  # loss and bits per character on the whole validation text at the end
    keep_best: bool | None = None  # the run's result (its weights, final score) is the best evaluated model (default; the book: the last)
    sample_prompt: str | None = None  # start context of the sample printed at each evaluation
    sample_tokens: int = 50  # length of the sample printed at each evaluation
    sample_temperature: float = 0.8  # temperature of that sample
    sample_top_k: int | None = 40  # top-k of that sample
    progress: bool = True  # progress bar and printed evaluations
    # Hardware and reproducibility.
    device: str = "auto"  # auto, cpu, cuda, cuda:N, mps
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # autocast precision
    compile: bool | None = None  # torch.compile the model's forward pass and the loss as one graph (default: on; the book: off)
    parallel: Literal["ddp", "fsdp"] = "ddp"  # under torchrun
    seed: int = 123  # seed of the weights, the batches and dropout
    # What to do with an out folder that already holds a run.
    resume: bool | Literal["auto"] = False  # True: continue it; "auto": continue it if there is one
    force: bool = False  # start over, replacing it


RUN_CONFIG = "train_config.json"  # the resolved config, saved in the run folder

# Defaults per data mode. The bundled run was tuned by measurement to finish in under 10 minutes
# on a 2-core CPU (see the README); a text or a prepared corpus gets the same recipe with its
# tokenizer, model and steps sized to it (training/recipe.py); the book's values are chapter 5's.
DEFAULT_PRESET = "speedrun-cpu"

_RECIPE = dict(batch_size=16, lr=3e-3, lr_schedule="cosine", warmup_steps=100, max_minutes=8.5, eval_iters=10,
               optimizer="muon", keep_best=True, compile=True)
DEFAULTS: dict[str, dict[str, Any]] = {
    "bundled": dict(_RECIPE, preset=DEFAULT_PRESET, tokenizer="bpe:4096", max_steps=4000, eval_interval=150,
                    sample_prompt="ROMEO:"),
    # tokenizer, preset (the model), max_steps and eval_interval: sized by training/recipe.py
    "text": dict(_RECIPE, sample_prompt="\n"),
    "prepared": dict(_RECIPE, sample_prompt="\n"),
    # The book: GPT-2's 124M shape with a 256-token context, lr 4e-4, weight decay 0.1, batch 2,
    # 10 epochs, evaluation every 5 steps on 5 batches, "Every effort moves you".
    "book": dict(preset="gpt2", tokenizer="gpt2", batch_size=2, lr=4e-4, lr_schedule="constant",
                 warmup_steps=0, epochs=10, eval_interval=5, eval_iters=5, optimizer="adamw",
                 sample_prompt="Every effort moves you", keep_best=False, compile=False),
}
SIZED_MODES = ("text", "prepared")  # where training/recipe.py fills in what the user left out


BOOK_MODEL = {"context_length": 256, "drop_rate": 0.1, "qkv_bias": False}  # the book's GPT_CONFIG_124M


# Keys that may differ when a run is resumed: they change how long it runs or what it reports,
# not what was computed so far.
RESUMABLE_KEYS = {"max_steps", "epochs", "max_minutes", "eval_interval", "eval_iters", "save_interval",
                  "keep_last", "final_eval", "sample_prompt", "sample_tokens", "sample_temperature",
                  "sample_top_k", "progress", "device", "compile", "out", "resume", "force",
                  # fine-tuning: what is evaluated and reported, not what trains
                  "eval_batches", "log_every", "max_new_tokens", "test_responses"}


def data_mode(data: str | None, recipe: str = "auto") -> str:
    """What ``data`` is: "bundled" (None), "text" (a text file, or a folder of them), "prepared" (a
    `buildllm prepare` folder), or "book" (a text file under the book's recipe)."""
    if recipe not in ("auto", "book"):
        raise UserError(f"recipe must be auto or book, got {recipe!r}")
    if recipe == "book" and (data is None or not Path(data).is_file()):
        raise UserError("the book's recipe trains on one .txt file: give --data FILE.txt, or drop --recipe book")
    if data is None:
        return "bundled"
    path = Path(data)
    if path.is_dir():
        return "prepared" if (path / "meta.json").is_file() else "text"
    if path.is_file():
        return "book" if recipe == "book" else "text"
    raise UserError(f"data {path} does not exist: give a .txt file, a folder of them, a folder made by "
                    "`buildllm prepare`, or nothing for the bundled Shakespeare")


def resolve(cfg: TrainConfig) -> TrainConfig:
    """Fill every ``None`` with its mode's default and check the values; the result is what runs."""
    mode = data_mode(cfg.data, cfg.recipe)
    cfg = _pick_arch(cfg)
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
    if filled.get("optimizer") == "muon" and (cfg.parallel == "fsdp" or cfg.dtype == "fp16"):
        filled["optimizer"] = "adamw"  # Muon wants whole matrices (FSDP shards them) and no loss scaling
    if cfg.name is None:
        stem = "shakespeare" if mode == "bundled" else Path(cfg.data).resolve().name.split(".")[0]
        filled["name"] = re.sub(r"[^\w.-]", "_", stem) or "run"
    if "warmup_steps" in filled and cfg.max_steps is not None and filled["warmup_steps"] >= cfg.max_steps:
        filled["warmup_steps"] = cfg.max_steps // 10  # a short run still gets to decay
    cfg = cfg.replace(**filled)
    if cfg.init_from is None and cfg.preset is not None:  # the model's shape is known now (its vocabulary comes with the data)
        try:
            model_cfg = GPTConfig.from_preset(cfg.preset, **cfg.model)
        except TypeError as e:
            known = ", ".join(f.name for f in fields(type(GPTConfig.from_preset(cfg.preset))))
            raise UserError(f"bad model override ({e}); valid keys: {known}") from None
        if cfg.context_length is None:
            cfg = cfg.replace(context_length=model_cfg.context_length)
        check_context(cfg.context_length, model_cfg.context_length)
    if cfg.out is None:
        cfg = cfg.replace(out=str(Path("runs") / cfg.name))
    if cfg.save_interval is None and cfg.eval_interval is not None:
        cfg = cfg.replace(save_interval=cfg.eval_interval)
    if cfg.lora_rank is not None and cfg.lora_alpha is None:
        cfg = cfg.replace(lora_alpha=2.0 * cfg.lora_rank)
    check(cfg)
    return cfg


def _pick_arch(cfg: TrainConfig) -> TrainConfig:
    """``arch`` without a preset means that architecture's small CPU preset; with one, they must agree."""
    if cfg.arch is None:
        return cfg
    from buildllm.models import registry

    if cfg.init_from is not None:
        raise UserError("init_from takes the architecture from its weights: drop arch")
    if cfg.preset is None:
        return cfg.replace(preset=registry.default_preset(cfg.arch))
    preset_arch = registry.preset(cfg.preset).arch
    if preset_arch != cfg.arch:
        raise UserError(f"preset {cfg.preset!r} is a {preset_arch} model, not {cfg.arch}: drop arch or the preset")
    return cfg


def check(cfg: TrainConfig) -> None:
    """A resolved pretraining config: the engine's knobs, then pretraining's own."""
    check_engine(cfg)
    _positive(cfg, ("context_length", "stride", "eval_iters", "lora_rank"))
    _positive(cfg, ("lora_alpha",), integer=False)
    _count(cfg, ("sample_tokens",))
    _between(cfg, ("val_fraction",), 0, 1)
    _non_negative(cfg, ("sample_temperature",))
    if not isinstance(cfg.model, dict):
        raise UserError(f"model must be a mapping of GPTConfig overrides, got {cfg.model!r}")
    if cfg.lora_rank is not None and cfg.init_from is None:
        raise UserError("LoRA adapts trained weights: give init_from (--init-from) with lora_rank")
    if cfg.init_from is not None and (cfg.preset is not None or set(cfg.model) - {"drop_rate", "attention"}):
        raise UserError("init_from takes the model's shape from its weights: drop preset and model "
                        "overrides other than drop_rate and attention")


def read_config_file(path: str | os.PathLike) -> dict:
    """The mapping in a YAML (.yaml, .yml) or JSON file; any config dataclass can be read from one."""
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
    return d


def check_engine(cfg: EngineConfig) -> None:
    """The engine's own knobs (``EngineConfig``'s fields, which ``TrainConfig`` shares)."""
    _positive(cfg, ("epochs", "max_steps", "batch_size", "grad_accum", "eval_interval", "save_interval", "keep_last"))
    _positive(cfg, ("lr", "max_minutes"), integer=False)
    _count(cfg, ("warmup_steps",), allow_none=False)  # resolve() has filled it in by now
    _positive(cfg, ("muon_lr",), integer=False)
    _between(cfg, ("min_lr_ratio", "beta1", "beta2", "muon_momentum"), 0, 1)
    _non_negative(cfg, ("weight_decay", "grad_clip", "muon_weight_decay"))
    choices = {"dtype": ("auto", "bf16", "fp16", "fp32"), "parallel": ("ddp", "fsdp"),
               "lr_schedule": ("cosine", "constant"), "resume": (True, False, "auto"), "optimizer": ("adamw", "muon")}
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            raise UserError(f"{name} must be one of {', '.join(map(str, allowed))}, got {getattr(cfg, name)!r}")
    if cfg.optimizer == "muon" and cfg.parallel == "fsdp":
        raise UserError("Muon orthogonalizes each weight matrix whole and FSDP shards them: use parallel=ddp "
                        "with optimizer=muon, or optimizer=adamw with FSDP")
    if cfg.optimizer == "muon" and cfg.dtype == "fp16":
        raise UserError("optimizer=muon is not combined with fp16 loss scaling: use dtype bf16 or fp32")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _positive(cfg, names: tuple[str, ...], integer: bool = True) -> None:
    """Each of ``names`` is None (its default) or a positive integer (or number)."""
    for name in names:
        v = getattr(cfg, name)
        if v is not None and (not (_is_int(v) if integer else isinstance(v, (int, float))) or v <= 0):
            raise UserError(f"{name} must be a positive {'integer' if integer else 'number'}, got {v!r}")


def _count(cfg, names: tuple[str, ...], allow_none: bool = True) -> None:
    for name in names:
        v = getattr(cfg, name)
        if (v is not None or not allow_none) and (not _is_int(v) or v < 0):
            raise UserError(f"{name} must be an integer >= 0, got {v!r}")


def _between(cfg, names: tuple[str, ...], lo: float, hi: float) -> None:
    for name in names:
        v = getattr(cfg, name)
        if not isinstance(v, (int, float)) or not lo <= v <= hi:
            raise UserError(f"{name} must be between {lo} and {hi}, got {v!r}")


def _non_negative(cfg, names: tuple[str, ...]) -> None:
    for name in names:
        v = getattr(cfg, name)
        if not isinstance(v, (int, float)) or v < 0:
            raise UserError(f"{name} must be a number >= 0, got {v!r}")


def parse_assignments(items: list[str]) -> dict:
    """``["lr=3e-4", "model.n_layers=6"]`` -> ``{"lr": 0.0003, "model": {"n_layers": 6}}`` (YAML values).

    A dotted key sets one entry of a mapping-valued key (TrainConfig's ``model``).
    """
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
        outer, dot, inner = key.partition(".")
        if dot:
            out.setdefault(outer, {})[inner] = value
        else:
            out[key] = value
    return out


def config_from_dict(cls, d: dict):
    """A ``cls`` from a mapping, naming unknown keys; lists become tuples where the field is one.

    Config classes with their own ``from_dict`` (TrainConfig) use it.
    """
    if hasattr(cls, "from_dict"):
        return cls.from_dict(d)
    keys = [f.name for f in fields(cls)]
    unknown = sorted(set(d) - set(keys))
    if unknown:
        raise UserError(f"unknown config key(s) {', '.join(unknown)}; valid keys: {', '.join(keys)}")
    tuples = {f.name for f in fields(cls) if isinstance(f.default, tuple)}
    return cls(**{k: tuple(v) if k in tuples and isinstance(v, list) else v for k, v in d.items()})


def cli_config(path: str | None, options: dict, assignments: list[str] = (), cls=TrainConfig):
    """The config the command line asks for: the file, then ``--set``, then the options given.

    Works for any config dataclass ``cls``; ``options`` holds only what was typed (None = not
    given). A mapping-valued key (TrainConfig's ``model``) is merged with the file's, not replaced.
    For TrainConfig, resuming without a file starts from the run's saved config, so
    ``--out DIR --resume`` is enough.
    """
    overrides = {**parse_assignments(list(assignments)), **{k: v for k, v in options.items() if v is not None}}
    base = config_from_dict(cls, read_config_file(path)) if path else cls()
    if cls is TrainConfig and overrides.get("resume") and not path:
        probe = base.replace(**{k: v for k, v in overrides.items() if k != "model"})
        out = probe.out or str(Path("runs") / (probe.name or resolve(probe).name))
        base = saved_config(out) or base
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(getattr(base, key, None), dict):
            overrides[key] = {**getattr(base, key), **value}
    return config_from_dict(cls, {**{f.name: getattr(base, f.name) for f in fields(cls)}, **overrides})


def saved_config(out: str | os.PathLike, cls: type = TrainConfig):
    """The resolved config (a ``cls``) of the run in ``out``, or None if there is none."""
    path = Path(out) / RUN_CONFIG
    return cls.from_file(path) if path.is_file() else None


def check_context(context_length: int, model_context: int) -> None:
    if context_length > model_context:
        raise UserError(f"context_length {context_length} exceeds the model's {model_context}: use "
                        f"--context-length {model_context} or less, or a model with a longer context "
                        "(the model key context_length)")
