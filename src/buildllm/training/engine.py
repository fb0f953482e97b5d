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
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from buildllm.data.sources import open_data
from buildllm.errors import UserError
from buildllm.evaluate import bits_per_character, perplexity
from buildllm.files import atomic_write
from buildllm.models.gpt2 import GPTModel, describe
from buildllm.training.config import TrainConfig, check_context, resolve
from buildllm.training.optim import learning_rate, make_optimizer
from buildllm.training.run_folder import (
    BEST,
    METRICS,
    PLOT,
    RUN_CONFIG,
    check_run_folder,
    last_checkpoint,
    plot_losses,
    read_checkpoint,
    read_metrics,
    rng_state,
    set_rng_state,
    start_run_folder,
    write_checkpoint,
)
from buildllm.training.runtime import (
    Dist,
    autocast,
    barrier,
    broadcast_float,
    gather_objects,
    init_distributed,
    keep_freed_memory,
    mean_over_ranks,
    peak_flops,
    pick_device,
    pick_dtype,
)
from buildllm.weights.checkpoint import save_model


def build_model(cfg: TrainConfig, vocab_size: int | None, device: torch.device):
    """A new GPTModel (seeded), or the weights of ``init_from``; returns ``(model, tokenizer)``."""
    torch.manual_seed(cfg.seed)
    if cfg.init_from is not None:
        from buildllm.weights.loader import load_pretrained

        model, tokenizer = load_pretrained(cfg.init_from, device=device, **cfg.model)
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
    from buildllm.generation.sampling import generate

    ids = tokenizer.encode(cfg.sample_prompt or "\n")[-model.cfg.context_length + 1 :] or [tokenizer.eot_id]
    out = generate(model, torch.tensor([ids], device=device), cfg.sample_tokens,
                   temperature=cfg.sample_temperature, top_k=cfg.sample_top_k,
                   generator=torch.Generator(device=device).manual_seed(cfg.seed))
    model.train()
    return tokenizer.decode(out[0].tolist())


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
            kept = [r for r in read_metrics(run / METRICS) if r.get("kind") != "final" and r["step"] <= step]
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
        rngs = gather_objects(rng_state(), dist)
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
            from buildllm.finetune.lora import merge_lora

            state["model"] = {k: v.detach().clone() for k, v in to_save.state_dict().items()}
            to_save = merge_lora(copy.deepcopy(to_save))  # a plain GPTModel anyone can load
        metrics_file.flush()
        os.fsync(metrics_file.fileno())  # what was logged up to this step survives with it
        write_checkpoint(run, step, to_save, tokenizer, state, cfg.keep_last)
        save_model(run, to_save, tokenizer)
        if is_best:
            save_model(run / BEST, to_save, tokenizer)
        if val_loss is not None:  # a new point on the validation curve
            plot_losses(read_metrics(run / METRICS), run / PLOT)

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
            train_loss = mean_over_ranks(loss, dist)
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
                time_fraction = broadcast_float(min(1.0, (time_spent() + final_cost) / budget), dist)
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
            plot_losses(read_metrics(run / METRICS), run / PLOT)
        say(f"validation text ({len(data.val_tokens):,} tokens, {data.val_characters:,} characters): "
            f"loss {val_loss:.4f}, perplexity {val_perplexity:.2f}, {bpc:.3f} bits per character")
    barrier(dist)
    return TrainResult(run, step, tokens_seen, last_eval[0] if last_eval else None, val_loss, bpc,
                       best_val if math.isfinite(best_val) else None, time.perf_counter() - wall_start,
                       (step - first_step) * tokens_per_step / loop_seconds if loop_seconds else 0.0, dist.rank)


def _full_model(raw_model: nn.Module, fsdp: bool, dist: Dist) -> nn.Module:
    """The model with all its weights on rank 0 (FSDP holds a shard on each process)."""
    if not fsdp:
        return raw_model
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
    )

    from buildllm.weights.checkpoint import model_from_state_dict

    state = get_model_state_dict(raw_model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not dist.main:
        return raw_model
    if raw_model.cfg.tie_embeddings:
        state.pop("out_head.weight", None)
    return model_from_state_dict(raw_model.cfg, state)


def _optimizer_state(raw_model: nn.Module, optimizer, fsdp: bool, dist: Dist) -> dict | None:
    if not fsdp:
        return optimizer.state_dict() if dist.main else None
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
    )

    return get_optimizer_state_dict(raw_model, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _load_optimizer_state(raw_model: nn.Module, optimizer, state: dict, fsdp: bool) -> None:
    if not fsdp:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_optimizer_state_dict,
    )

    set_optimizer_state_dict(raw_model, optimizer, state, options=StateDictOptions(full_state_dict=True))
