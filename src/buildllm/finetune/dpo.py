"""Preference tuning with Direct Preference Optimization (Rafailov et al. 2023), the step after
instruction tuning.

From pairs of answers to one prompt, a preferred one y_w (chosen) and a dispreferred one y_l
(rejected), DPO trains the policy pi directly, with no reward model and no reinforcement learning.
Its loss (the paper's equation 7) compares how much more likely the policy makes each answer than
the reference model pi_ref, the model training started from:

    L = -log sigmoid( beta * [ (log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x)) ] )

``log pi(y|x)`` is the sum of the log-probabilities of the answer's tokens given the prompt and
the answer's tokens before them (the prompt itself and the padding are not scored).
``beta * (log pi(y|x) - log pi_ref(y|x))`` is the answer's implicit reward; the bracket times beta is
the reward margin. beta sets how far the policy may move from the reference: small beta, far.

The reference model is the starting model, run once per batch without gradient and with dropout
off. With LoRA it is the same network with its adapters switched off (its base weights never
train), so no second copy of the weights is held; without LoRA it is a frozen copy of the whole
model, one more model's worth of memory.

Each evaluation logs, on the training and the held-out pairs, the loss, the reward margin, the
preference accuracy (the share of pairs whose chosen answer gets the higher implicit reward) and
the policy's mean log-probability of the chosen and of the rejected answers (DPO can raise the
margin while both fall; the chosen one should not collapse). The model with the best held-out
margin is kept.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from buildllm.data.sources import ExampleBatches
from buildllm.errors import UserError
from buildllm.files import write_json
from buildllm.finetune.common import (
    IGNORE_INDEX,
    METRICS,
    Log,
    finetune_config,
    initial_metrics,
    log_trainable,
    make_trainable,
    pick_model,
    run_finetune,
    save_lm,
    split_items,
)
from buildllm.finetune.instruct import (
    PromptTemplate,
    get_prompt_template,
    load_prompt_template,
)
from buildllm.finetune.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    adapters_disabled,
    lora_layers,
)
from buildllm.finetune.preference_data import (
    collate_preference,
    encode_preferences,
    read_preference_data,
)
from buildllm.training.config import EngineConfig
from buildllm.training.loop import start_runtime
from buildllm.training.run_folder import check_run_folder
from buildllm.training.runtime import barrier
from buildllm.training.task import Task
from buildllm.weights.loader import PROMPT_TEMPLATE

# The loss ----------------------------------------------------------------------------------------


def answer_logprobs(model, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``log pi(answer | prompt)`` of each sequence: the sum of its scored targets' log-probabilities.

    ``inputs`` and ``targets`` are ``(sequences, tokens)``; targets equal to ``IGNORE_INDEX`` (the
    prompt, the padding) add nothing. Computed in fp32 whatever autocast did.
    """
    logits = model(inputs).float()
    token_logprobs = -F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                                      reduction="none")  # log p(target), 0 where ignored
    return token_logprobs.view(targets.shape).sum(dim=-1)


def pair_logprobs(model, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``(pairs, 2)``: the chosen (column 0) and rejected (column 1) answers' log-probabilities, both
    sequences of every pair in one forward pass."""
    return answer_logprobs(model, inputs.flatten(0, 1), targets.flatten(0, 1)).view(inputs.shape[:2])


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
             reference_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The DPO loss of each pair, and its reward margin (both ``(pairs,)``), from the four log-probabilities."""
    margin = beta * ((policy_chosen - reference_chosen) - (policy_rejected - reference_rejected))
    return -F.logsigmoid(margin), margin


class Reference:
    """The reference model pi_ref: the policy as it was at the start, run without gradient and
    with dropout off.

    With LoRA adapters the base weights are frozen, so the start is the policy's own network with
    its adapters switched off: ``network`` *is* the policy and no weight is copied. Without LoRA
    every weight trains, and ``network`` is a frozen copy of the whole model taken now.
    """

    def __init__(self, policy: nn.Module):
        self.shares_weights = bool(lora_layers(policy))
        self.network = policy if self.shares_weights else copy.deepcopy(policy).requires_grad_(False).eval()

    @torch.no_grad()
    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        if not self.shares_weights:
            return self.network(inputs)
        was_training = self.network.training
        self.network.eval()
        try:
            with adapters_disabled(self.network):
                return self.network(inputs)
        finally:
            self.network.train(was_training)


# The task ----------------------------------------------------------------------------------------


@dataclass
class DPOConfig(EngineConfig):
    """Every knob of a DPO fine-tune: the engine's (``EngineConfig``) and these.

    The defaults are the book's DPO chapter: one epoch, lr 5e-6, weight decay 0.01, beta 0.1, batch 8.
    """

    base: str | None = None  # the model to start from, and the reference: a checkpoint folder, GPT-2 folder or id
    data: str | None = None  # records of prompt (or instruction, input), chosen, rejected: JSON array or lines
    beta: float = 0.1  # DPO's beta: how far the model may move from the reference (smaller: further)
    template: str | None = None  # instruction records' prompt format: alpaca, phi3, a JSON file (default: the model's, else alpaca)
    val_fraction: float = 0.1  # share of the pairs held out to measure accuracy and keep the best model
    allowed_max_length: int | None = None  # tokens per prompt + answer (default: the context length); answers are cut to fit
    lora_rank: int | None = None  # train LoRA adapters of this rank instead of the weights (reference: adapters off)
    lora_alpha: float | None = None  # LoRA scale numerator (default: 2 x rank)
    lora_targets: tuple[str, ...] = ()  # Linear layers that get adapters (none: the architecture's)
    eval_batches: int | None = None  # evaluate on at most this many batches per split (default: all)
    log_every: int = 0  # print the training loss every N steps (0: never)
    epochs: int = 1  # passes over the training pairs
    lr: float = 5e-6  # peak learning rate (AdamW)
    weight_decay: float = 0.01  # AdamW weight decay, on matrices only

    what = "DPO"


class DPOTask(Task):
    """The DPO loss on preference pairs; the best held-out reward margin is kept."""

    best_at_root = True  # the out folder is the tuned model
    evaluate_first = True  # the starting point: margin 0, accuracy 0.5
    files = (PROMPT_TEMPLATE, METRICS, ADAPTER_WEIGHTS, ADAPTER_CONFIG)

    def __init__(self, batches, reference: Reference, beta: float, tokenizer,
                 template: PromptTemplate | None, eval_iters: int | None):
        self.batches, self.reference, self.beta = batches, reference, beta
        self.tokenizer, self.template, self.eval_iters = tokenizer, template, eval_iters

    def items(self, batch) -> int:
        return len(batch[0])  # pairs

    def pair_losses(self, model, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per pair: the loss, the reward margin, and the policy's ``(chosen, rejected)`` log-probabilities."""
        inputs, targets = batch
        policy = pair_logprobs(model, inputs, targets)
        reference = pair_logprobs(self.reference, inputs, targets)  # no gradient: the target to move from
        loss, margin = dpo_loss(policy[:, 0], policy[:, 1], reference[:, 0], reference[:, 1], self.beta)
        return loss, margin, policy

    def loss(self, model, batch) -> torch.Tensor:
        return self.pair_losses(model, batch)[0].sum()

    def evaluate(self, model, batches) -> dict[str, float]:
        """Means over the pairs of ``batches``: loss, margin, preference accuracy, answer log-probabilities.

        A tie in implicit reward (every pair at the start, where policy and reference are one
        model) counts as half right: a coin flip.
        """
        device = next(model.parameters()).device
        losses, margins, policies = [], [], []
        for batch in batches:
            loss, margin, policy = self.pair_losses(model, tuple(t.to(device) for t in batch))
            losses.append(loss)
            margins.append(margin)
            policies.append(policy)
        if not losses:
            return {k: math.nan for k in ("loss", "margin", "accuracy", "chosen_logp", "rejected_logp")}
        loss, margin, policy = torch.cat(losses), torch.cat(margins), torch.cat(policies)
        accuracy = (margin > 0).float().mean() + 0.5 * (margin == 0).float().mean()
        return {"loss": loss.mean().item(), "margin": margin.mean().item(), "accuracy": accuracy.item(),
                "chosen_logp": policy[:, 0].mean().item(), "rejected_logp": policy[:, 1].mean().item()}

    def score(self, metrics: dict[str, float]) -> float:
        """The held-out reward margin (the training pairs' when nothing is held out)."""
        margin = metrics["val_margin"]
        return margin if math.isfinite(margin) else metrics["train_margin"]

    def save(self, folder: Path, model) -> None:
        save_lm(folder, model, self.tokenizer)
        if self.template is not None:
            write_json(folder / PROMPT_TEMPLATE, self.template.to_dict())


# The run -----------------------------------------------------------------------------------------


@dataclass
class DPOResult:
    checkpoint: Path
    history: list[dict] = field(default_factory=list)  # per epoch: train and val loss, margin, accuracy, ...
    initial: dict = field(default_factory=dict)  # the same before the first step
    best_epoch: int = 0
    trainable_parameters: int = 0


def finetune_dpo(
    base: str | Path | nn.Module | None = None,
    data: str | Path | None = None,
    out_dir: str | Path | None = None,
    *,
    config: DPOConfig | None = None,
    tokenizer=None,
    log: Log = print,
    **options,
) -> DPOResult:
    """Preference-tune ``base`` with DPO on the pairs in ``data`` and save the model with the best
    held-out reward margin to ``out_dir`` (with the prompt template, when one was used).

    ``base`` is a checkpoint folder, a GPT-2 folder or model id, or a model object with ``tokenizer``
    (then trained in place). ``options`` are ``DPOConfig`` keys (``beta``, ``epochs``, ``lr``,
    ``lora_rank``, ``resume``, ...), applied over ``config``; ``template`` may also be a
    ``PromptTemplate``. Under torchrun the processes share each batch (DDP).
    """
    spec = options.pop("template", None)  # a name, a JSON file, or a PromptTemplate
    if spec is not None:
        options["template"] = spec.name if isinstance(spec, PromptTemplate) else str(spec)
    cfg = finetune_config(DPOConfig, base, data, out_dir, config, options)
    if not (isinstance(cfg.beta, (int, float)) and cfg.beta > 0):
        raise UserError(f"beta must be a positive number, got {cfg.beta!r}")
    if not (isinstance(cfg.val_fraction, (int, float)) and 0 <= cfg.val_fraction < 1):
        raise UserError(f"val_fraction must be at least 0 and below 1, got {cfg.val_fraction!r}")
    rt = start_runtime(cfg)
    log = log if rt.dist.main else None
    resume_from = check_run_folder(cfg)
    pairs = read_preference_data(cfg.data)
    model, tokenizer = pick_model(base, cfg, tokenizer, rt.device)
    own = load_prompt_template(cfg.base) if cfg.base and Path(cfg.base).is_dir() else None
    template = spec if isinstance(spec, PromptTemplate) else get_prompt_template(cfg.template or own or "alpaca")
    context = model.cfg.context_length
    max_length = cfg.allowed_max_length or context
    if not 2 <= max_length <= context:
        raise UserError(f"allowed_max_length must be between 2 and the context length {context}, got {max_length}")
    encoded = encode_preferences(pairs, tokenizer, template, max_length)
    train_set, val_set, rest = split_items(encoded, (1 - cfg.val_fraction, cfg.val_fraction, 0), cfg.seed)
    train_set += rest  # what rounding the two shares down leaves over trains too
    if log:
        log(f"{len(pairs)} preference pairs: {len(train_set)} train, {len(val_set)} held out")

    torch.manual_seed(cfg.seed)
    make_trainable(model, cfg)
    reference = Reference(model)  # the start: taken before any step (and before a resumed run's weights load)
    trainable_count, _ = log_trainable(model, log)
    collate = partial(collate_preference, pad_id=tokenizer.eot_id, allowed_max_length=max_length)
    batches = ExampleBatches(train_set, collate, cfg.batch_size, cfg.seed, rt.dist,
                             {"train": train_set, "val": val_set})
    # The tuned model keeps the template its prompts were laid out with, so chat lays them out alike.
    used = own is not None or cfg.template is not None or any(p.prompt is None for p in pairs)
    task = DPOTask(batches, reference, cfg.beta, tokenizer, template if used else None, cfg.eval_batches)
    done, history, steps_per_epoch = run_finetune(task, cfg, model, rt, resume_from, log)

    out_dir = Path(cfg.out)
    initial = {k: v for k, v in initial_metrics(out_dir).items()
               if k not in ("kind", "step", "tokens_seen", "lr", "tokens_per_sec", "elapsed")}
    result = DPOResult(out_dir, history, initial, math.ceil(done.best_step / steps_per_epoch), trainable_count)
    if rt.dist.main:
        write_json(out_dir / METRICS, {"best_epoch": result.best_epoch, "initial": initial, "history": history,
                                       "split_sizes": [len(train_set), len(val_set)]})
        if log and history:
            best = max(history, key=task.score)  # the evaluation whose model was kept
            log(f"held-out preference accuracy {best.get('val_accuracy', math.nan):.3f}, reward margin "
                f"{best.get('val_margin', math.nan):.3f} (epoch {result.best_epoch}) -> {out_dir}")
    barrier(rt.dist)
    return result
