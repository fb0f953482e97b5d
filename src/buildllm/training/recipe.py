"""Stage 5: the default recipe sized to the user's text and time.

``buildllm train --data my.txt`` (a text file, a folder of them, or a prepared corpus) with no
model named trains the tuned small-model recipe of the bundled Shakespeare run, with three things
chosen for the data and the budget (``--max-minutes``) instead of fixed:

* the tokenizer: a byte-level BPE learned from the training text, about one vocabulary entry per
  ``CHARS_PER_VOCAB_ENTRY`` characters (``vocab_size_for``), so a small text is not cut into
  tokens it shows too rarely to learn;
* the model: the largest rung of ``LADDER`` that passes both rules of ``choose_shape``. The data
  rule: at most ``MAX_PARAMS_PER_TOKEN`` block parameters per training token, whatever the
  budget, so a small text never gets a model that only memorises it. The compute rule: the budget
  (measured throughput of that very shape on this machine x the seconds left) must show the model
  at least ``MIN_TOKENS_PER_PARAM`` tokens per block parameter, so a slow machine gets a model it
  can train in time;
* the length: as many steps as the measured throughput fits in the budget, evaluated
  ``EVALS_PER_RUN`` times; the weights with the best held-out loss are the run's result
  (``TrainConfig.keep_best``), which is what a small text needs once later steps overfit. A budget
  that reads the text more than ``MAX_PASSES_WITHOUT_DROPOUT`` times over also gets dropout.

Where the constants come from (benchmarks/README.md has the runs): the vocabulary and model rules
give the bundled Shakespeare (4.3 M training characters, 8.5 minutes on a 2-core CPU) what was
measured best for it, a 4,096-token BPE and 4 layers x 128; dropout 0.2 is what a single play
(*Hamlet*) needed once the budget read it ~190 times.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

# (n_layers, emb_dim), smallest first; heads are HEAD_DIM wide.
LADDER: tuple[tuple[int, int], ...] = ((2, 64), (3, 96), (4, 128), (4, 192), (6, 256), (6, 384), (8, 512),
                                       (12, 768))
HEAD_DIM = 32
MIN_TOKENS_PER_PARAM = 5.0  # compute rule: tokens the budget shows the model, per block parameter
MAX_PARAMS_PER_TOKEN = 10.0  # data rule: block parameters per token of training text
CHARS_PER_VOCAB_ENTRY = 1000  # the BPE gets a vocabulary entry per this many training characters ...
MIN_VOCAB, MAX_VOCAB = 512, 32768  # ... a power of two within these
EVALS_PER_RUN = 25  # evaluations (and chances to keep a better model) over the run
MAX_PASSES_WITHOUT_DROPOUT = 8  # a budget that reads the text more often than this trains with dropout ...
DROPOUT = 0.2  # ... at this rate
STEP_OVERHEAD = 1.15  # a real run's time per step (evaluations, samples, data, checkpoints) over the probe's
COMPILED_SPEEDUP = 1.2  # a compiled step's speed over the eager step the probe times (not compiled for every rung)


def vocab_size_for(train_chars: int) -> int:
    """The BPE vocabulary for a training text of ``train_chars`` characters."""
    entries = max(1, train_chars // CHARS_PER_VOCAB_ENTRY)
    return min(MAX_VOCAB, max(MIN_VOCAB, 1 << (entries.bit_length() - 1)))  # the power of two at or below


def shape_overrides(base, n_layers: int, emb_dim: int) -> dict:
    """The model-config overrides that make ``base`` (the default preset's GPTConfig) a rung of the ladder."""
    return {"n_layers": n_layers, "emb_dim": emb_dim, "n_heads": max(1, emb_dim // HEAD_DIM)}


def block_params(model_cfg) -> int:
    """Parameters outside the embeddings and the output head: what the rules count."""
    from buildllm.models import registry

    return registry.count_parameters(model_cfg)["non_embedding"]


def choose_shape(base, train_tokens: int, budget_tokens: Callable[[object], float]) -> tuple[int, int]:
    """The largest rung of ``LADDER`` that passes the data rule and the compute rule; the smallest
    rung if none does. ``budget_tokens(model_cfg)`` is how many tokens the budget trains that model on."""
    chosen = LADDER[0]
    for n_layers, emb_dim in LADDER[1:]:
        cfg = dataclasses.replace(base, **shape_overrides(base, n_layers, emb_dim))
        params = block_params(cfg)
        if params > MAX_PARAMS_PER_TOKEN * train_tokens:
            break
        if budget_tokens(cfg) < MIN_TOKENS_PER_PARAM * params:
            break
        chosen = (n_layers, emb_dim)
    return chosen


def measure_tokens_per_sec(model_cfg, cfg, device: torch.device, dtype: torch.dtype, batch_size: int,
                           steps: int = 2) -> float:
    """Training tokens per second of a new ``model_cfg`` model here: forward, backward and the step of
    ``cfg``'s optimizer on random tokens, after one step of warm-up."""
    from buildllm.models import registry
    from buildllm.training.optim import make_optimizer
    from buildllm.training.runtime import autocast, synchronize

    model = registry.build(model_cfg).to(device).train()
    optimizer = make_optimizer(model, cfg, device)
    x = torch.randint(model_cfg.vocab_size, (batch_size, model_cfg.context_length), device=device,
                      generator=torch.Generator(device=device).manual_seed(0))

    def step() -> None:
        with autocast(device, dtype):
            logits = model(x)
        F.cross_entropy(logits.flatten(0, 1).float(), x.flatten()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return steps * x.numel() / (time.perf_counter() - start)


def size_run(cfg, rt, started: float, tokenizer=None, model_cfg=None, say=print):
    """``cfg`` (resolved, of a text or a prepared corpus) with what the recipe chooses filled in: the
    tokenizer of a text, the model when no preset, arch or init_from names one, ``max_steps`` when
    not given, and ``eval_interval``. The text is prepared on the way (``data/prepared/``).

    ``started`` is when the run began (``time.perf_counter()``): preparing the text and measuring
    count against ``max_minutes``. ``tokenizer`` and ``model_cfg`` are the model's when
    ``init_from`` built it already. A run being resumed keeps the choices it started with,
    whatever this machine measures now.
    """
    from buildllm.data.corpus_reader import open_corpus
    from buildllm.data.sources import prepared_corpus
    from buildllm.models import registry
    from buildllm.training.config import (
        DEFAULT_PRESET,
        data_mode,
        resolve,
        saved_config,
    )
    from buildllm.training.runtime import broadcast_float

    saved = saved_config(cfg.out) if cfg.resume else None
    if saved is not None:  # what the user leaves to the recipe comes from the run's first start
        kept = {k: getattr(saved, k) for k in ("tokenizer", "preset", "max_steps", "eval_interval", "save_interval")
                if getattr(cfg, k) is None}
        if cfg.preset is None:
            kept["model"] = saved.model
        if cfg.max_steps is None:
            kept["warmup_steps"] = saved.warmup_steps
        return resolve(cfg.replace(**kept))
    if data_mode(cfg.data, cfg.recipe) == "text" and cfg.tokenizer is None and tokenizer is None:
        source = open_corpus(cfg.data, cfg.val_fraction, "strict")
        cfg = cfg.replace(tokenizer=f"bpe:{vocab_size_for(int(source.nbytes * (1 - cfg.val_fraction)))}")
    corpus = prepared_corpus(cfg, tokenizer, rt.dist)
    train_tokens, vocab_size = len(corpus.train), corpus.tokenizer.vocab_size
    measured: dict[str, float] = {}

    def tokens_per_sec(model_cfg) -> float:
        if repr(model_cfg) not in measured:
            world = rt.dist.world_size
            local = measure_tokens_per_sec(model_cfg, cfg, rt.device, rt.dtype, max(1, cfg.batch_size // world))
            local *= COMPILED_SPEEDUP if cfg.compile else 1.0
            # every process makes the same choice
            measured[repr(model_cfg)] = broadcast_float(local * world / STEP_OVERHEAD, rt.dist)
        return measured[repr(model_cfg)]

    def budget_tokens(model_cfg) -> float:
        """Training tokens the budget holds: the steps given, or the seconds left at this model's
        throughput, less the final scoring of the held-out text (a forward pass is about a third
        of a training step), which the loop counts too."""
        if cfg.max_steps is not None:
            return cfg.max_steps * cfg.batch_size * cfg.grad_accum * model_cfg.context_length
        seconds = cfg.max_minutes * 60 - (time.perf_counter() - started)
        rate = tokens_per_sec(model_cfg)
        return max(0.0, rate * seconds - len(corpus.val) / 3)

    changes: dict = {}
    sized = model_cfg is None and cfg.preset is None  # no preset, arch or init_from names the model
    if model_cfg is None:
        model_cfg = registry.preset(cfg.preset or DEFAULT_PRESET, **{"vocab_size": vocab_size, **cfg.model})
    if cfg.context_length is not None:
        model_cfg = dataclasses.replace(model_cfg, context_length=cfg.context_length)
    if sized:
        n_layers, emb_dim = choose_shape(model_cfg, train_tokens, budget_tokens)
        shape = shape_overrides(model_cfg, n_layers, emb_dim)
        model_cfg = dataclasses.replace(model_cfg, **shape)
        changes.update(preset=DEFAULT_PRESET, model={**shape, **cfg.model})
        say(f"sized to {train_tokens:,} training tokens and the time: {n_layers} layers x {emb_dim} "
            f"({block_params(model_cfg):,} parameters in the blocks)")
    budget = budget_tokens(model_cfg)
    passes = budget / max(1, train_tokens)
    if sized and "drop_rate" not in cfg.model and passes > MAX_PASSES_WITHOUT_DROPOUT:
        # A small text read many times over: regularise. The attention weights too: without their
        # dropout, attention stays one fused kernel at twice the speed, and overfits sooner.
        changes["model"]["drop_rate"] = DROPOUT
        say(f"the budget reads the text {passes:.0f} times: dropout {DROPOUT}")
        model_cfg = dataclasses.replace(model_cfg, drop_rate=DROPOUT)
        budget = budget_tokens(model_cfg)  # at the throughput with dropout, measured too
    if cfg.max_steps is None:
        tokens_per_step = cfg.batch_size * cfg.grad_accum * model_cfg.context_length
        steps = changes["max_steps"] = max(1, int(budget / tokens_per_step))
        if cfg.warmup_steps >= steps:
            changes["warmup_steps"] = steps // 10  # a short run still gets to decay
    if cfg.eval_interval is None:
        changes["eval_interval"] = max(1, changes.get("max_steps", cfg.max_steps) // EVALS_PER_RUN)
    return resolve(cfg.replace(**changes))
