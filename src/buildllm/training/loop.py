"""The one training loop: pretraining, classification and instruction tuning all run ``fit``.

A ``Task`` (``training/task.py``) supplies the batches, the loss and the metrics; this module does
the rest. For every optimizer step

    grad_accum micro-batches ──► model ──► task loss ──► backward        (under autocast)
          ──► clip the gradient norm ──► AdamW step at the scheduled learning rate

With ``compile`` the model's forward and the task's loss are one ``torch.compile`` graph
(``TaskLoss``), so the logits never make a round trip through memory between the two.

and every ``eval_interval`` steps it evaluates the task's fixed batches, keeps the best model,
and writes a checkpoint (weights, optimizer, data position, every RNG) from which a resumed run
continues bit for bit, even after a SIGKILL. Under torchrun each process trains on its rows of
every global batch with DistributedDataParallel (or FSDP), so N processes follow one's trajectory.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from buildllm.errors import UserError
from buildllm.files import atomic_write
from buildllm.training.optim import learning_rate, make_optimizer
from buildllm.training.run_folder import (
    BEST,
    METRICS,
    PLOT,
    RUN_CONFIG,
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
    full_model,
    gather_objects,
    init_distributed,
    keep_freed_memory,
    load_optimizer_state,
    optimizer_state,
    peak_flops,
    pick_device,
    pick_dtype,
    sum_over_ranks,
)
from buildllm.training.task import Task
from buildllm.weights.checkpoint import WEIGHTS, read_weights, tied_parameters


@dataclass
class Runtime:
    """Where a run executes: this process's place among the torchrun processes, device, precision."""

    dist: Dist
    device: torch.device
    dtype: torch.dtype


def start_runtime(cfg) -> Runtime:
    """Join torchrun's process group (if launched by it) and pick the device and autocast dtype.

    Two process-wide settings stay: on CPU, glibc keeps freed memory for reuse; on CUDA, fp32
    matmuls may use TF32.
    """
    dist, device = init_distributed(pick_device(str(cfg.device)))
    dtype = pick_dtype(cfg.dtype, device)
    if device.type == "cpu":
        keep_freed_memory()
    if device.type == "cuda":
        # TF32 tensor cores for the fp32 matmuls that autocast leaves alone.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return Runtime(dist, device, dtype)


class Printer:
    """Messages from rank 0 only, written above the progress bar when there is one."""

    def __init__(self, enabled: bool, write=None):
        self.enabled, self.bar = enabled, None
        self.write = write or (lambda msg: print(msg, file=sys.stderr, flush=True))

    def __call__(self, msg: str) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            self.write(msg)
            return
        self.bar.clear()  # take the bar off its line, write, and draw it again below
        self.write(msg)
        self.bar.refresh()


@dataclass
class Run:
    """Everything a run in progress holds; the loop's functions read and advance it."""

    task: Task
    cfg: object  # a TrainConfig or a fine-tuning config (both have EngineConfig's fields)
    rt: Runtime
    folder: Path
    raw_model: nn.Module  # the model itself: what we save and sample from
    say: Printer
    max_steps: int
    loss_of: nn.Module | None = None  # TaskLoss, compiled and/or wrapped for many processes: what trains
    optimizer: torch.optim.Optimizer | None = None
    scaler: torch.amp.GradScaler | None = None
    fsdp: bool = False
    step: int = 0
    tokens_seen: int = 0
    best_score: float = -math.inf
    best_step: int = 0
    best_weights: dict | None = None  # with cfg.keep_best: a copy (in host memory) of the best model's
    spent_before: float = 0.0  # seconds spent by earlier processes of this run
    time_fraction: float = 0.0  # share of the time budget spent (0 without one)
    wall_start: float = field(default_factory=time.perf_counter)
    eval_sets: dict | None = None  # the task's fixed evaluation batches, made once
    last_eval: dict | None = None
    evaluated_at: int = -1  # the step of the last evaluation
    rate: float | None = None  # tokens per second, smoothed
    loop_seconds: float = 0.0  # in training steps after the first, for the average throughput
    first_step: int = 1  # this process's first step (a resumed run's is the one after its checkpoint)
    lr: float | None = None  # the last step's
    metrics_file: object = None
    bar: object = None
    peak: float | None = None  # the device's matmul FLOP/s, for the MFU shown by the progress bar

    def time_spent(self) -> float:
        return self.spent_before + time.perf_counter() - self.wall_start

    def log(self, record: dict) -> None:
        if self.metrics_file is not None:
            self.metrics_file.write(json.dumps(record) + "\n")
            self.metrics_file.flush()


@dataclass
class FitResult:
    steps: int
    tokens_seen: int
    last_eval: dict | None  # the last evaluation's metrics (train_loss, val_loss, ...)
    best_score: float | None
    best_step: int
    final: dict  # what the task's final hook computed
    seconds: float
    tokens_per_sec: float


class TaskLoss(nn.Module):
    """The task's summed loss of a batch, as a module holding the model: what trains.

    With ``compiled``, ``torch.compile`` makes the model's forward pass and the loss one graph: for
    a small model the loss over the vocabulary is a large share of a step, and fused with the
    output head it needs no fp32 copy of the logits (benchmarks/README.md has the figures).
    DistributedDataParallel wraps this module like any model.
    """

    def __init__(self, task: Task, model: nn.Module, compiled: bool = False):
        super().__init__()
        self.task, self.model = task, model
        self.compiled = torch.compile(self.eager) if compiled else None

    def eager(self, batch) -> torch.Tensor:
        return self.task.loss(self.model, batch)

    def forward(self, batch) -> torch.Tensor:
        return (self.compiled or self.eager)(batch)


def fit(task: Task, cfg, model: nn.Module, rt: Runtime, resume_from: Path | None,
        say: Printer | None = None, started: float | None = None) -> FitResult:
    """Train ``model`` on ``task`` as ``cfg`` says, into the run folder ``cfg.out``; ``max_minutes``
    counts from ``started`` (``time.perf_counter()``; default: now)."""
    run = setup(task, cfg, model, rt, resume_from, say or Printer(cfg.progress and rt.dist.main))
    run.first_step = run.step + 1
    if started is not None:
        run.wall_start = started
    try:
        open_progress(run)
        if run.step == 0 and task.evaluate_first:
            evaluate(run, keep_best=False)
        while run.step < run.max_steps:
            step_once(run)
            if run.step % cfg.eval_interval == 0 or run.step == run.max_steps:
                evaluate(run)
            if run.step % cfg.save_interval == 0 or run.step == run.max_steps:
                save_checkpoint(run)
    finally:
        if run.bar is not None:
            run.bar.close()
        if run.metrics_file is not None:
            run.metrics_file.close()
    final = finish(run)
    best = run.best_score if math.isfinite(run.best_score) else None
    throughput = (run.step - run.first_step) * tokens_per_step(run) / run.loop_seconds if run.loop_seconds else 0.0
    return FitResult(run.step, run.tokens_seen, run.last_eval, best, run.best_step, final,
                     time.perf_counter() - run.wall_start, throughput)


def tokens_per_step(run: Run) -> int:
    return run.cfg.batch_size * getattr(run.cfg, "context_length", 0) * run.cfg.grad_accum


# Setup -------------------------------------------------------------------------------------------


def setup(task: Task, cfg, model: nn.Module, rt: Runtime, resume_from: Path | None, say: Printer) -> Run:
    """Check, prepare the run folder, restore a checkpoint, wrap the model, make the optimizer."""
    dist = rt.dist
    if dist.enabled and cfg.batch_size % dist.world_size:
        raise UserError(f"batch_size {cfg.batch_size} does not split evenly over {dist.world_size} "
                        "processes: make it a multiple of the process count")
    fsdp = dist.enabled and cfg.parallel == "fsdp"
    if fsdp and not task.supports_fsdp:
        raise UserError("parallel: fsdp is for pretraining; fine-tune with parallel: ddp")
    if fsdp and getattr(cfg, "lora_rank", None) is not None:
        raise UserError("LoRA under FSDP is not supported: use parallel: ddp")
    max_steps = cfg.max_steps or math.ceil(cfg.epochs * task.batches.batches_per_epoch / cfg.grad_accum)
    if resume_from is None:  # everything checked: only now may an old run make way
        start_run_folder(Path(cfg.out), dist, task.files)
    run = Run(task, cfg, rt, Path(cfg.out), model, say, max_steps, fsdp=fsdp)
    state = restore_weights(run, resume_from) if resume_from is not None else None
    if dist.main:
        saved = {k: v for k, v in cfg.to_dict().items() if k not in ("resume", "force")}
        atomic_write(run.folder / RUN_CONFIG, lambda p: Path(p).write_text(json.dumps(saved, indent=2) + "\n"))

    # FSDP shards the weights themselves, so the optimizer comes after.
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
    run.optimizer = make_optimizer(model, cfg, rt.device)
    run.scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.dtype == torch.float16)
    if state is not None:
        restore_training_state(run, state)
        say(f"resuming {run.folder} from {resume_from.name}")
    else:
        torch.manual_seed(cfg.seed + dist.rank)  # dropout differs between processes
    run.loss_of = trainable_loss(run, compiled=bool(cfg.compile))
    if dist.main:
        run.metrics_file = open(run.folder / METRICS, "a")
    describe_run(run)
    return run


def trainable_loss(run: Run, compiled: bool) -> nn.Module:
    """``TaskLoss`` of the run's task and model, compiled if asked, under DDP when run by torchrun."""
    loss_of = TaskLoss(run.task, run.raw_model, compiled)
    if run.rt.dist.enabled and run.cfg.parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [run.rt.device.index] if run.rt.device.type == "cuda" else None
        loss_of = DistributedDataParallel(loss_of, device_ids=device_ids)
    return loss_of


def restore_weights(run: Run, checkpoint: Path) -> dict:
    """Load a checkpoint's weights into the model; returns its training state."""
    weights, state = read_checkpoint(checkpoint)
    if "model" in state:  # LoRA: the unmerged weights
        run.raw_model.load_state_dict(state["model"])
    else:
        if "out_head.weight" not in weights and "out_head.weight" in run.raw_model.state_dict():
            weights["out_head.weight"] = weights["wte.weight"]  # a tied head is saved once
        run.raw_model.load_state_dict(weights)
    run.step, run.tokens_seen = state["step"], state["tokens_seen"]
    run.best_score, run.best_step = state["best_score"], state["best_step"]
    run.spent_before, run.time_fraction = state["scheduler"]["spent"], state["scheduler"]["time_fraction"]
    best = run.folder / BEST
    if getattr(run.cfg, "keep_best", False) and run.best_step and (best / WEIGHTS).is_file() and "model" not in state:
        run.best_weights = read_weights(best / WEIGHTS)
    if run.cfg.max_minutes and run.time_fraction >= 1:
        run.max_steps = run.step  # it stopped on its time limit: nothing left to do
    return state


def restore_training_state(run: Run, state: dict) -> None:
    """Optimizer, loss scaler, data position and every RNG, as they were after the checkpoint's step."""
    dist = run.rt.dist
    load_optimizer_state(run.raw_model, run.optimizer, state["optimizer"], run.fsdp)
    run.scaler.load_state_dict(state["scaler"])
    run.task.batches.load_state_dict(state["data"])
    rngs = state["rng"]
    set_rng_state(rngs[dist.rank] if len(rngs) == dist.world_size else rngs[0])
    if dist.main:  # forget what was logged after the checkpoint: it will be logged again
        path = run.folder / METRICS
        kept = [r for r in read_metrics(path) if r.get("kind") != "final" and r["step"] <= run.step]
        atomic_write(path, lambda p: Path(p).write_text("".join(json.dumps(r) + "\n" for r in kept)))


def describe_run(run: Run) -> None:
    cfg, rt = run.cfg, run.rt
    n_params = sum(p.numel() for p in run.raw_model.parameters())
    n_train = sum(p.numel() for p in run.raw_model.parameters() if p.requires_grad)
    where = f", {rt.dist.world_size} processes ({cfg.parallel})" if rt.dist.enabled else ""
    limit = f", at most {cfg.max_minutes:g} minutes" if cfg.max_minutes else ""
    size = f" of {tokens_per_step(run):,} tokens" if tokens_per_step(run) else f" of {cfg.batch_size * cfg.grad_accum} examples"
    run.say(f"training {n_params:,} parameters ({n_train:,} trainable) on {rt.device} in "
            f"{str(rt.dtype).removeprefix('torch.')}{where}: {run.max_steps:,} steps{size}{limit}")


def open_progress(run: Run) -> None:
    if run.cfg.progress and run.rt.dist.main:
        from tqdm import tqdm

        run.bar = tqdm(total=run.max_steps, initial=run.step, unit="step", dynamic_ncols=True, file=sys.stderr)
        run.say.bar = run.bar
        if run.task.flops_per_token:
            run.peak = peak_flops(run.rt.device, run.rt.dtype)


# The step ----------------------------------------------------------------------------------------


def train_step(run: Run) -> float:
    """One optimizer step on ``grad_accum`` micro-batches; returns the step's mean loss (all processes).

    The task's loss is a sum; dividing it by the items of the whole step (every micro-batch, every
    process) makes the accumulated gradient the mean over the step's items, exactly as one big
    batch on one process would give. DDP averages gradients over processes, hence the world size.
    """
    task, rt, accum = run.task, run.rt, run.cfg.grad_accum
    batches = [tuple(t.to(rt.device, non_blocking=True) for t in task.batches.next_batch()) for _ in range(accum)]
    total = max(1.0, sum_over_ranks(float(sum(task.items(b) for b in batches)), rt.dist))
    ddp = rt.dist.enabled and not run.fsdp
    loss_sum = 0.0
    for micro, batch in enumerate(batches):
        # Under DDP, gradients are averaged across processes on the last micro-step only.
        skip_sync = ddp and micro < accum - 1
        with (run.loss_of.no_sync() if skip_sync else contextlib.nullcontext()), autocast(rt.device, rt.dtype):
            share = run.loss_of(batch) / total
        run.scaler.scale(share * rt.dist.world_size).backward()
        loss_sum += share.item()
        run.tokens_seen += batch[0].numel() * rt.dist.world_size
    if run.cfg.grad_clip > 0:
        run.scaler.unscale_(run.optimizer)  # clip the true gradients, not the fp16-scaled ones
        nn.utils.clip_grad_norm_(run.raw_model.parameters(), run.cfg.grad_clip)
    run.scaler.step(run.optimizer)  # (an fp16 step with inf/nan gradients is skipped)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    return sum_over_ranks(loss_sum, rt.dist)


def first_compiled_step(run: Run) -> float:
    """A compiled run's first step, in which torch.compile compiles. Where that fails (a CPU with no
    C++ compiler, a device inductor does not support) the run says so and carries on without it,
    from the same batch and random state."""
    before = copy.deepcopy(run.task.batches.state_dict()), rng_state(), run.tokens_seen
    try:
        return train_step(run)
    except torch._dynamo.exc.TorchDynamoException as e:
        reason = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        warnings.warn(f"torch.compile failed ({reason}); training goes on without it (--no-compile skips the attempt)",
                      stacklevel=2)
        run.optimizer.zero_grad(set_to_none=True)
        run.task.batches.load_state_dict(before[0])
        set_rng_state(before[1])
        run.tokens_seen = before[2]
        getattr(run.loss_of, "module", run.loss_of).compiled = None  # (DDP wraps it as .module)
        return train_step(run)


def step_once(run: Run) -> None:
    """Set the learning rate, take a step, log it, and watch the loss and the time budget."""
    cfg, step_start = run.cfg, time.perf_counter()
    lr = learning_rate(run.step + 1, cfg, run.max_steps, run.time_fraction)
    for group in run.optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)  # Muon's group has its own peak
    tokens_before = run.tokens_seen
    train_loss = first_compiled_step(run) if run.step + 1 == run.first_step and cfg.compile else train_step(run)
    run.step += 1
    if not math.isfinite(train_loss):
        good = last_checkpoint(run.folder)
        kept = f"the last good checkpoint, {good}, is kept" if good else "no checkpoint was written yet"
        raise UserError(f"the loss became {train_loss} at step {run.step}: training diverged; {kept}. "
                        "Lower --lr, raise --warmup-steps, or train in bf16/fp32")
    seconds = time.perf_counter() - step_start
    step_rate = (run.tokens_seen - tokens_before) / max(seconds, 1e-9)
    if run.step > run.first_step:  # a process's first step warms up (torch.compile compiles in it): not a rate
        run.loop_seconds += seconds
        run.rate = step_rate if run.rate is None else 0.9 * run.rate + 0.1 * step_rate
    run.lr = lr
    run.log({"kind": "step", "step": run.step, "tokens_seen": run.tokens_seen, "train_loss": train_loss,
             "val_loss": None, "lr": lr, "tokens_per_sec": round(step_rate, 1),
             "elapsed": round(run.time_spent(), 3)})
    if getattr(cfg, "log_every", 0) and run.step % cfg.log_every == 0:  # (fine-tuning's option)
        run.say(f"  step {run.step}: train loss {train_loss:.3f}")
    budget = cfg.max_minutes * 60 if cfg.max_minutes else None  # seconds, for the whole run
    if budget is not None:
        # The budget covers the whole run: time spent so far, plus what the final evaluation will
        # take (a forward pass costs about a third of a training step).
        final_cost = run.task.final_tokens / (3 * run.rate) if run.rate else 0.0
        run.time_fraction = broadcast_float(min(1.0, (run.time_spent() + final_cost) / budget), run.rt.dist)
        if run.time_fraction >= 1 and run.step < run.max_steps:
            run.say(f"time limit of {cfg.max_minutes:g} minutes reached at step {run.step}")
            run.max_steps = run.step
    if run.bar is not None:
        post = {"loss": f"{train_loss:.3f}", "lr": f"{lr:.2e}", "tok/s": f"{run.rate or step_rate:,.0f}"}
        if run.peak and run.rate:
            post["mfu"] = f"{run.task.flops_per_token * run.rate / run.peak:.0%}"
        if budget is not None:
            post["budget left"] = f"{max(0.0, budget - run.time_spent()) / 60:.1f} min"
        run.bar.total = run.max_steps
        run.bar.set_postfix(post, refresh=False)
        run.bar.update(1)


# Evaluation, checkpoints and the end --------------------------------------------------------------


@torch.no_grad()
def evaluate(run: Run, keep_best: bool = True) -> dict:
    """The task's metrics on its fixed evaluation sets, dropout off; keeps the best model so far."""
    task, rt = run.task, run.rt
    if run.eval_sets is None:
        run.eval_sets = task.eval_sets()
    run.raw_model.eval()
    with autocast(rt.device, rt.dtype):
        metrics = {f"{split}_{k}": v for split, batches in run.eval_sets.items()
                   for k, v in task.evaluate(run.raw_model, batches).items()}
    run.raw_model.train()
    if run.fsdp:  # a forward pass without backward leaves the root's weights gathered
        run.raw_model.reshard()
    run.last_eval, run.evaluated_at = metrics, run.step
    run.log({"kind": "eval", "step": run.step, "tokens_seen": run.tokens_seen, **metrics, "lr": run.lr,
             "tokens_per_sec": round(run.rate, 1) if run.rate else None, "elapsed": round(run.time_spent(), 3)})
    shown = " | ".join(f"{k.replace('_', ' ')} {v:.3f}" for k, v in metrics.items())
    rate = f" | {run.rate:,.0f} tok/s" if run.rate and tokens_per_step(run) else ""
    run.say(f"step {run.step:>6} | tokens {run.tokens_seen:>12,} | {shown}{rate}")
    if rt.dist.main and not run.fsdp:
        with autocast(rt.device, rt.dtype):
            text = task.sample(run.raw_model)
        run.raw_model.train()
        if text is not None:
            run.say("  sample: " + text.replace("\n", " "))
    if keep_best and task.score(metrics) > run.best_score:
        run.best_score, run.best_step = task.score(metrics), run.step
        to_save = full_model(run.raw_model, run.fsdp, rt.dist)
        if rt.dist.main:
            task.save(run.folder if task.best_at_root else run.folder / BEST, to_save)
        if getattr(run.cfg, "keep_best", False) and not run.fsdp:
            run.best_weights = {k: v.detach().to("cpu", copy=True) for k, v in run.raw_model.state_dict().items()}
    return metrics


def save_checkpoint(run: Run) -> None:
    """Checkpoint this step (rank 0 writes; under FSDP every rank helps gather the weights)."""
    dist = run.rt.dist
    rngs = gather_objects(rng_state(), dist)
    optim_state = optimizer_state(run.raw_model, run.optimizer, run.fsdp, dist)
    to_save = full_model(run.raw_model, run.fsdp, dist)
    if not dist.main:
        return
    # The learning rate is a function of the step, max_steps and (with a time limit) the time
    # spent: those are the scheduler's whole state.
    state = {"step": run.step, "tokens_seen": run.tokens_seen, "best_score": run.best_score,
             "best_step": run.best_step,
             "scheduler": {"step": run.step, "max_steps": run.max_steps, "spent": run.time_spent(),
                           "time_fraction": run.time_fraction},
             "optimizer": optim_state, "scaler": run.scaler.state_dict(),
             "data": run.task.batches.state_dict(), "rng": rngs, "world_size": dist.world_size}
    from buildllm.finetune.lora import lora_layers

    if lora_layers(to_save):  # the saved model is merged: keep the adapters apart to resume
        state["model"] = {k: v.detach().clone() for k, v in to_save.state_dict().items()}
    run.metrics_file.flush()
    os.fsync(run.metrics_file.fileno())  # what was logged up to this step survives with it
    write_checkpoint(run.folder, run.step, lambda folder: run.task.save(folder, to_save), state,
                     run.cfg.keep_last)
    if not run.task.best_at_root:
        run.task.save(run.folder, to_save)  # the latest weights, ready to generate from
    if run.evaluated_at == run.step:  # a new point on the validation curve
        plot_losses(read_metrics(run.folder / METRICS), run.folder / PLOT)


def finish(run: Run) -> dict:
    """The task's final figures (on every process), logged with the last evaluation's."""
    rt = run.rt
    if run.best_weights is not None and run.best_step != run.step:
        # keep_best: the best evaluated model is the run's result, scored and saved as such; the last
        # checkpoint keeps the last weights to resume from.
        missing = run.raw_model.load_state_dict(run.best_weights, strict=False).missing_keys
        if set(missing) - set(tied_parameters(run.raw_model)):  # only a tied head may be saved once
            raise RuntimeError(f"the best weights lack {missing}")
        run.say(f"keeping the weights of step {run.best_step} (the best validation loss, "
                f"{-run.best_score:.3f}) as the result, not those of step {run.step}")
        if rt.dist.main:
            run.task.save(run.folder, run.raw_model)
    run.raw_model.eval()
    with torch.no_grad(), autocast(rt.device, rt.dtype):
        final = run.task.final(run.raw_model, rt.device)
    run.raw_model.train()
    if final and rt.dist.main:
        last = run.last_eval or {}
        with open(run.folder / METRICS, "a") as f:
            f.write(json.dumps({
                "kind": "final", "step": run.step, "tokens_seen": run.tokens_seen,
                "train_loss": last.get("train_loss"), "lr": None,
                "tokens_per_sec": round(run.rate, 1) if run.rate else None,
                "elapsed": round(run.time_spent(), 3), **final}) + "\n")
        plot_losses(read_metrics(run.folder / METRICS), run.folder / PLOT)
    if final:
        run.say("final: " + ", ".join(f"{k.replace('_', ' ')} {v:,.4g}" for k, v in final.items()))
    barrier(rt.dist)
    return final
