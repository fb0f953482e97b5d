"""Instruction following (the book's chapter 7).

Alpaca-style records (instruction, optional input, output) are formatted with a prompt template and
trained as ordinary next-token prediction, with the padding (and optionally the prompt) left out of
the loss. After training, the model answers the held-out test instructions and the answers are
written next to the checkpoint.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from buildllm.data.sources import ExampleBatches
from buildllm.errors import UserError
from buildllm.files import read_json_object, write_json
from buildllm.finetune.common import (
    IGNORE_INDEX,
    METRICS,
    TEST_RESPONSES,
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
from buildllm.finetune.labeled_data import open_text
from buildllm.finetune.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
)
from buildllm.training.config import EngineConfig
from buildllm.training.loop import start_runtime
from buildllm.training.run_folder import check_run_folder
from buildllm.training.runtime import barrier
from buildllm.training.task import Task
from buildllm.weights.loader import PROMPT_TEMPLATE


@dataclass(frozen=True)
class PromptTemplate:
    """How an instruction (and optional input) becomes a prompt the model continues with its answer.

    ``instruction`` holds ``{instruction}``, ``input`` holds ``{input}`` (left out when the input is
    empty), ``response`` is the text after which the answer begins.
    """

    instruction: str
    input: str
    response: str
    name: str = "custom"

    def __post_init__(self) -> None:
        if "{instruction}" not in self.instruction:
            raise UserError("a prompt template's instruction part must contain {instruction}")
        if "{input}" not in self.input:
            raise UserError("a prompt template's input part must contain {input}")

    def format(self, instruction: str, input: str = "") -> str:
        """The prompt, ending exactly where the response begins."""
        # str.replace, not str.format: braces in a user's text or template stay literal.
        prompt = self.instruction.replace("{instruction}", instruction)
        if input:
            prompt += self.input.replace("{input}", input)
        return prompt + self.response

    def to_dict(self) -> dict:
        return {"name": self.name, "instruction": self.instruction, "input": self.input, "response": self.response}

    @classmethod
    def from_dict(cls, d: dict, source: str = "template") -> PromptTemplate:
        try:
            return cls(str(d["instruction"]), str(d.get("input", "\n{input}")), str(d["response"]),
                       str(d.get("name", "custom")))
        except (KeyError, TypeError, AttributeError) as e:
            raise UserError(f"{source}: a prompt template needs 'instruction' and 'response' strings ({e!r})") from None


TEMPLATES = {
    # The book's format_input (chapter 7), the Stanford Alpaca format.
    "alpaca": PromptTemplate(
        instruction=(
            "Below is an instruction that describes a task. "
            "Write an appropriate response to complete the request.\n\n### Instruction:\n{instruction}"
        ),
        input="\n\n### Input:\n{input}",
        response="\n\n### Response:\n",
        name="alpaca",
    ),
    # Microsoft's Phi-3 chat format (the book's exercise 7.1): shorter prompts, faster training.
    "phi3": PromptTemplate(instruction="<|user|>\n{instruction}", input="\n{input}", response="\n\n<|assistant|>:\n",
                           name="phi3"),
}


def get_prompt_template(spec: str | Path | PromptTemplate = "alpaca") -> PromptTemplate:
    """A built-in template by name (alpaca, phi3), or a JSON file with instruction/input/response."""
    if isinstance(spec, PromptTemplate):
        return spec
    if str(spec) in TEMPLATES:
        return TEMPLATES[str(spec)]
    path = Path(spec)
    if not path.is_file():
        raise UserError(f"unknown prompt template {str(spec)!r}: use {', '.join(TEMPLATES)} or a JSON file "
                        "with instruction, input and response strings")
    return PromptTemplate.from_dict(read_json_object(path, "prompt template"), str(path))


def load_prompt_template(checkpoint_dir: str | Path) -> PromptTemplate | None:
    """The template an instruction model was trained with, or None for a plain language model."""
    path = Path(checkpoint_dir) / PROMPT_TEMPLATE
    if not path.is_file():
        return None
    return get_prompt_template(path)


@dataclass(frozen=True)
class InstructionExample:
    instruction: str
    input: str
    output: str
    line: int = 0


def _json_array(path: Path, content: str):
    """Yield ``(line, value)`` for each element of a top-level JSON array, tracking line numbers."""
    decoder = json.JSONDecoder()

    def fail(pos: int, msg: str):
        raise UserError(f"{path}:{content.count(chr(10), 0, pos) + 1}: {msg}")

    def skip(pos: int) -> int:
        while pos < len(content) and content[pos] in " \t\r\n":
            pos += 1
        return pos

    pos = skip(0)
    if content[pos : pos + 1] != "[":
        fail(pos, "expected a JSON array of records")
    pos = skip(pos + 1)
    if content[pos : pos + 1] == "]":
        return
    while True:
        try:
            value, end = decoder.raw_decode(content, pos)
        except json.JSONDecodeError as e:
            fail(e.pos, f"invalid JSON: {e.msg}")
        yield content.count("\n", 0, pos) + 1, value
        pos = skip(end)
        if content[pos : pos + 1] == ",":
            pos = skip(pos + 1)
        elif content[pos : pos + 1] == "]":
            if skip(pos + 1) != len(content):
                fail(skip(pos + 1), "unexpected text after the array")
            return
        else:
            fail(pos, "expected ',' or ']' between records")


def read_json_records(path: str | Path):
    """Yield ``(line, record)`` for each record of a JSON array or of JSON lines (one per line)."""
    path = Path(path)
    content = open_text(path)
    if content.lstrip().startswith("["):
        yield from _json_array(path, content)
        return
    for number, text in enumerate(content.splitlines(), start=1):
        if text.strip():
            try:
                yield number, json.loads(text)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{number}: invalid JSON: {e.msg} (column {e.colno})") from None


def read_instruction_data(path: str | Path) -> list[InstructionExample]:
    """Alpaca-style records from a JSON array or JSON lines (``instruction``, ``input``?, ``output``)."""
    path = Path(path)
    examples = []
    for line, record in read_json_records(path):
        if not isinstance(record, dict):
            raise UserError(f"{path}:{line}: a record must be a JSON object with instruction and output")
        for key in ("instruction", "output"):
            if key not in record:
                raise UserError(f"{path}:{line}: the record has no {key!r}")
        for key in ("instruction", "input", "output"):
            if key in record and record[key] is not None and not isinstance(record[key], str):
                raise UserError(f"{path}:{line}: {key!r} must be a string, not {type(record[key]).__name__}")
        if not record["instruction"].strip():
            raise UserError(f"{path}:{line}: the instruction is empty")
        examples.append(InstructionExample(record["instruction"], record.get("input") or "", record["output"], line))
    if not examples:
        raise UserError(f"{path} has no records")
    return examples


def encode_instructions(
    examples: Sequence[InstructionExample], tokenizer, template: PromptTemplate
) -> list[tuple[list[int], int]]:
    """``(prompt + response token ids, prompt length)`` per example (the end-of-text token is added
    by the collate function). The prompt is encoded on its own, exactly as at inference time."""
    prompts = tokenizer.encode_batch([template.format(e.instruction, e.input) for e in examples])
    responses = tokenizer.encode_batch([e.output for e in examples])
    return [(p + r, len(p)) for p, r in zip(prompts, responses)]


def collate_instruction(
    batch: Sequence[tuple[list[int], int]],
    pad_id: int,
    ignore_index: int = IGNORE_INDEX,
    allowed_max_length: int | None = None,
    mask_prompt: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The book's ``custom_collate_fn``: ``(inputs, targets)`` for a batch of examples.

    Each example gets one end-of-text token (the model must learn to stop), then padding with the
    same token to the longest in the batch. Targets are the inputs shifted left by one; every
    padding target after that first end-of-text is ``ignore_index``, and with ``mask_prompt`` so
    are the targets inside the prompt (the model is not graded on repeating the instruction).
    Both are cut to ``allowed_max_length`` tokens.
    """
    width = max(len(ids) for ids, _ in batch) + 1  # + the end-of-text token
    inputs = torch.full((len(batch), width - 1), pad_id, dtype=torch.long)
    targets = torch.full((len(batch), width - 1), ignore_index, dtype=torch.long)
    for row, (ids, prompt_len) in enumerate(batch):
        seq = torch.tensor(ids + [pad_id], dtype=torch.long)  # the text and its end-of-text token
        n = len(ids)
        inputs[row, :n] = seq[:-1]
        targets[row, :n] = seq[1:]  # position n-1 predicts the end-of-text token: kept
        if mask_prompt:
            # Target i is token i+1: the prompt's tokens 1..p-1 are targets 0..p-2. Target p-1, the
            # first response token, is kept.
            targets[row, : max(prompt_len - 1, 0)] = ignore_index
    if allowed_max_length is not None:
        inputs, targets = inputs[:, :allowed_max_length], targets[:, :allowed_max_length]
    return inputs, targets


def calc_loss_lm_batch(model, inputs, targets, device) -> torch.Tensor:
    logits = model(inputs.to(device))
    return F.cross_entropy(logits.flatten(0, 1), targets.to(device).flatten(), ignore_index=IGNORE_INDEX)


@torch.no_grad()
def calc_loss_loader(model, loader, device, num_batches: int | None = None) -> float:
    """Mean next-token loss over ``loader`` (each batch's mean over its scored tokens), dropout off."""
    was_training = model.training
    model.eval()
    losses = []
    for i, (inputs, targets) in enumerate(loader):
        if num_batches is not None and i >= num_batches:
            break
        losses.append(calc_loss_lm_batch(model, inputs, targets, device).item())
    model.train(was_training)
    return sum(losses) / len(losses) if losses else float("nan")


@dataclass
class InstructResult:
    checkpoint: Path
    history: list[dict] = field(default_factory=list)  # per epoch: train and val loss
    initial_train_loss: float = float("nan")
    initial_val_loss: float = float("nan")
    best_epoch: int = 0
    responses_path: Path | None = None
    trainable_parameters: int = 0


@torch.no_grad()
def generate_responses(
    model: nn.Module,
    tokenizer,
    template: PromptTemplate,
    examples: Sequence[InstructionExample],
    max_new_tokens: int = 256,
    batch_size: int = 8,
) -> list[str]:
    """Greedy answers to ``examples`` (batched; generation stops at end-of-text)."""
    from buildllm.generation.sampling import generate

    answers = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        prompts = tokenizer.encode_batch([template.format(e.instruction, e.input) for e in chunk])
        # Leave room for the answer inside the context window: keep the prompt's last tokens.
        keep = max(1, model.cfg.context_length - max_new_tokens)
        prompts = [p[-keep:] for p in prompts]
        for prompt, out in zip(prompts, generate(model, prompts, max_new_tokens, eos_id=tokenizer.eot_id)):
            new = out[len(prompt) :]
            if new and new[-1] == tokenizer.eot_id:
                new = new[:-1]
            answers.append(tokenizer.decode(new).strip())
    return answers


@dataclass
class InstructConfig(EngineConfig):
    """Every knob of an instruction fine-tune: the engine's (``EngineConfig``) and these."""

    base: str | None = None  # the model to start from: a checkpoint folder, a GPT-2 folder or model id
    data: str | None = None  # Alpaca-style records: a JSON array or JSON lines
    template: str = "alpaca"  # prompt format: alpaca, phi3, or a JSON file with instruction, input, response
    split: tuple[float, ...] = (0.85, 0.05, 0.10)  # train, validation, test fractions (the book's)
    mask_prompt: bool = False  # leave the prompt's tokens out of the loss
    allowed_max_length: int | None = None  # tokens per training example (default: the context length)
    lora_rank: int | None = None  # train LoRA adapters of this rank instead of the weights
    lora_alpha: float | None = None  # LoRA scale numerator (default: 2 x rank)
    lora_targets: tuple[str, ...] = ()  # Linear layers that get adapters (none: the architecture's)
    eval_batches: int | None = None  # evaluate on at most this many batches per split (default: all)
    log_every: int = 0  # print the training loss every N steps (0: never)
    max_new_tokens: int = 256  # longest answer to a test instruction
    test_responses: bool = True  # answer the test split into test_responses.json
    epochs: int = 2  # passes over the training split

    what = "instruction"


class InstructTask(Task):
    """Next-token prediction on formatted instructions; padding (and the prompt, if masked) unscored."""

    best_at_root = True  # the out folder is the instruction model
    evaluate_first = True  # the losses before training, to compare with
    files = (PROMPT_TEMPLATE, METRICS, TEST_RESPONSES, ADAPTER_WEIGHTS, ADAPTER_CONFIG)

    def __init__(self, batches, tokenizer, template: PromptTemplate, eval_iters: int | None):
        self.batches, self.tokenizer, self.template, self.eval_iters = batches, tokenizer, template, eval_iters

    def items(self, batch) -> torch.Tensor:
        return (batch[1] != IGNORE_INDEX).sum()  # the scored tokens

    def loss(self, model, batch) -> torch.Tensor:
        inputs, targets = batch
        logits = model(inputs)
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                               reduction="sum")

    def evaluate(self, model, batches) -> dict[str, float]:
        return {"loss": calc_loss_loader(model, batches, next(model.parameters()).device)}

    def save(self, folder: Path, model) -> None:
        save_lm(folder, model, self.tokenizer)
        write_json(folder / PROMPT_TEMPLATE, self.template.to_dict())


def finetune_instruct(
    base: str | Path | nn.Module | None = None,
    data: str | Path | None = None,
    out_dir: str | Path | None = None,
    *,
    config: InstructConfig | None = None,
    tokenizer=None,
    log: Log = print,
    **options,
) -> InstructResult:
    """Instruction-tune ``base`` on Alpaca-style ``data`` and save the best epoch (by validation loss)
    to ``out_dir`` with its prompt template; then answer the test split into test_responses.json.

    ``options`` are ``InstructConfig`` keys (``epochs``, ``lr``, ``mask_prompt``, ``resume``, ...),
    applied over ``config``; ``template`` may also be a ``PromptTemplate``.
    Under torchrun the processes share each batch (DDP).
    """
    spec = options.pop("template", None)  # a name, a JSON file, or a PromptTemplate
    if spec is not None:
        options["template"] = spec.name if isinstance(spec, PromptTemplate) else str(spec)
    cfg = finetune_config(InstructConfig, base, data, out_dir, config, options)
    template = spec if isinstance(spec, PromptTemplate) else get_prompt_template(cfg.template)
    rt = start_runtime(cfg)
    log = log if rt.dist.main else None
    resume_from = check_run_folder(cfg)
    examples = read_instruction_data(cfg.data)
    train_ex, val_ex, test_ex = split_items(examples, cfg.split, cfg.seed)
    if log:
        log(f"{len(examples)} examples: {len(train_ex)} train, {len(val_ex)} validation, {len(test_ex)} test")
    model, tokenizer = pick_model(base, cfg, tokenizer, rt.device)
    context = model.cfg.context_length
    allowed_max_length = cfg.allowed_max_length or context
    if not 2 <= allowed_max_length <= context:
        raise UserError(f"allowed_max_length must be between 2 and the context length {context}, got {allowed_max_length}")
    train_set, val_set = _encode(cfg, tokenizer, template, train_ex, val_ex, allowed_max_length, log)

    torch.manual_seed(cfg.seed)
    make_trainable(model, cfg)
    trainable_count, _ = log_trainable(model, log)
    collate = partial(collate_instruction, pad_id=tokenizer.eot_id, allowed_max_length=allowed_max_length,
                      mask_prompt=cfg.mask_prompt)
    batches = ExampleBatches(train_set, collate, cfg.batch_size, cfg.seed, rt.dist,
                             {"train": train_set, "val": val_set})
    task = InstructTask(batches, tokenizer, template, cfg.eval_batches)
    done, history, steps_per_epoch = run_finetune(task, cfg, model, rt, resume_from, log)

    out_dir = Path(cfg.out)
    first = initial_metrics(out_dir)
    result = InstructResult(out_dir, history, first.get("train_loss", math.nan), first.get("val_loss", math.nan),
                            math.ceil(done.best_step / steps_per_epoch), trainable_parameters=trainable_count)
    if rt.dist.main:
        write_json(out_dir / METRICS, {"best_epoch": result.best_epoch, "initial_train_loss": result.initial_train_loss,
                                       "initial_val_loss": result.initial_val_loss, "history": result.history,
                                       "split_sizes": [len(train_ex), len(val_ex), len(test_ex)]})
        if cfg.test_responses and test_ex:
            result.responses_path = _answer_test_split(out_dir, rt.device, tokenizer, template, test_ex,
                                                       cfg.max_new_tokens, log)
    barrier(rt.dist)
    return result


def _encode(cfg: InstructConfig, tokenizer, template, train_ex, val_ex, allowed_max_length: int, log: Log):
    """Token ids of the training and validation examples, less those that leave nothing to learn."""
    train_set, val_set = (encode_instructions(part, tokenizer, template) for part in (train_ex, val_ex))
    if cfg.mask_prompt:
        # An example whose prompt fills the whole window has no target left to learn from.
        dropped = sum(p - 1 >= allowed_max_length for _, p in train_set)
        train_set = [(ids, p) for ids, p in train_set if p - 1 < allowed_max_length]
        val_set = [(ids, p) for ids, p in val_set if p - 1 < allowed_max_length]
        if dropped and log:
            log(f"dropped {dropped} training example(s) whose prompt is longer than {allowed_max_length} tokens")
        if not train_set:
            raise UserError(f"every prompt is longer than allowed_max_length {allowed_max_length}")
    return train_set, val_set


def _answer_test_split(out_dir: Path, device, tokenizer, template, test_ex, max_new_tokens: int, log: Log) -> Path:
    """The saved (best) model's greedy answers to the test instructions, next to it."""
    from buildllm.weights.loader import load_model

    best_model = load_model(out_dir, device=device).model
    answers = generate_responses(best_model, tokenizer, template, test_ex, max_new_tokens)
    records = [{"instruction": e.instruction, "input": e.input, "output": e.output, "model_response": a}
               for e, a in zip(test_ex, answers)]
    write_json(out_dir / TEST_RESPONSES, records)
    if log:
        log(f"answers to {len(records)} test instructions -> {out_dir / TEST_RESPONSES}")
    return out_dir / TEST_RESPONSES
