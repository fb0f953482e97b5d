"""Classification (the book's chapter 6).

Rows of text and label from a CSV/TSV become token ids; the model's output head (emb_dim ->
vocabulary) is replaced by a small one (emb_dim -> classes); the output at the *last* token is the
text's representation, because under causal attention it is the only position that has seen every
token. AdamW trains the head, the last block(s) and the final norm; the checkpoint with the best
validation accuracy is kept.

Which token represents a text? The book pads every text to one length with ``<|endoftext|>`` and
reads the output at the last *position*, which for all but the longest texts is a pad token: the
model then has to learn to carry the message across a run of padding. We read the output at the
last *real* token instead (``representation="last_token"``, gathered by each text's length). Under
causal attention that output never sees the padding after it, so the padding length changes
nothing and each batch is padded only to its own longest text. ``representation="last_position"``
reproduces the book exactly (every text padded to the same ``max_length``).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from buildllm.data.sources import ExampleBatches
from buildllm.errors import UserError
from buildllm.files import write_json, write_safetensors
from buildllm.finetune.common import (
    METRICS,
    Log,
    finetune_config,
    log_trainable,
    pick_model,
    run_finetune,
    split_items,
    without_adapters,
)
from buildllm.finetune.labeled_data import (  # noqa: F401  (re-exported: the classification API)
    LabeledText,
    balance_classes,
    encode_labeled,
    open_text,
    read_labeled_texts,
)
from buildllm.finetune.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    apply_lora,
)
from buildllm.training.config import EngineConfig
from buildllm.training.loop import start_runtime
from buildllm.training.run_folder import check_run_folder
from buildllm.training.runtime import barrier
from buildllm.training.task import Task
from buildllm.weights.checkpoint import CONFIG, TOKENIZER, WEIGHTS
from buildllm.weights.loader import CLASSIFIER


def collate_classification(
    batch: Sequence[tuple[list[int], int]], pad_id: int, pad_to: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(input_ids, lengths, labels)``: right-padded with ``pad_id`` to ``pad_to`` or the longest."""
    width = pad_to or max(len(ids) for ids, _ in batch)
    inputs = torch.full((len(batch), width), pad_id, dtype=torch.long)
    for row, (ids, _) in enumerate(batch):
        inputs[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    lengths = torch.tensor([len(ids) for ids, _ in batch], dtype=torch.long)
    labels = torch.tensor([label for _, label in batch], dtype=torch.long)
    return inputs, lengths, labels


TRAINABLE = ("head", "last_blocks", "all")


REPRESENTATIONS = ("last_token", "last_position")


def make_classifier(
    model: nn.Module, num_classes: int, trainable: str = "last_blocks", last_blocks: int = 1
) -> nn.Module:
    """Replace the output head by ``Linear(emb_dim, num_classes)`` and choose what trains (in place).

    ``"head"``: the new head only. ``"last_blocks"``: the last ``last_blocks`` transformer blocks,
    the final LayerNorm and the head (the book's choice, with 1 block). ``"all"``: everything.
    """
    if trainable not in TRAINABLE:
        raise UserError(f"trainable must be one of {', '.join(TRAINABLE)}, not {trainable!r}")
    if trainable == "last_blocks" and not 1 <= last_blocks <= len(model.blocks):
        raise UserError(f"last_blocks must be between 1 and {len(model.blocks)}, got {last_blocks}")
    for p in model.parameters():
        p.requires_grad = trainable == "all"
    if trainable == "last_blocks":
        for module in [*model.blocks[-last_blocks:], model.final_norm]:
            for p in module.parameters():
                p.requires_grad = True
    device = model.out_head.weight.device
    # A new module, so a head tied to the token embedding is untied: the embedding stays as it was.
    model.out_head = nn.Linear(model.cfg.emb_dim, num_classes).to(device)
    return model


def classifier_logits(
    model: nn.Module, input_ids: torch.Tensor, lengths: torch.Tensor, representation: str = "last_token"
) -> torch.Tensor:
    """Class logits ``(batch, classes)`` read at the last real token (or the last position)."""
    logits = model(input_ids)  # (batch, tokens, classes)
    if representation == "last_position":
        return logits[:, -1, :]
    return logits[torch.arange(len(lengths), device=logits.device), lengths.to(logits.device) - 1]


def calc_loss_batch(model, batch, device, representation="last_token") -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of one batch, and how many of its predictions are right."""
    input_ids, lengths, labels = (t.to(device) for t in batch)
    logits = classifier_logits(model, input_ids, lengths, representation)
    loss = F.cross_entropy(logits, labels)
    return loss, (logits.argmax(dim=-1) == labels).sum()


@torch.no_grad()
def evaluate_classifier(model, loader, device, representation="last_token", num_batches=None) -> tuple[float, float]:
    """Mean loss and accuracy over ``loader`` (or its first ``num_batches``), dropout off."""
    was_training = model.training
    model.eval()
    total_loss, correct, seen = 0.0, 0, 0
    for i, batch in enumerate(loader):
        if num_batches is not None and i >= num_batches:
            break
        loss, right = calc_loss_batch(model, batch, device, representation)
        n = len(batch[2])
        total_loss += loss.item() * n
        correct += int(right)
        seen += n
    model.train(was_training)
    if not seen:
        return float("nan"), float("nan")
    return total_loss / seen, correct / seen


def save_classifier(directory: str | Path, model: nn.Module, tokenizer, meta: dict) -> Path:
    """A classifier folder: model.safetensors (head included), config.json, tokenizer.json, classifier.json.

    config.json is the base model's GPTConfig; classifier.json says the head has
    ``num_classes`` outputs (and a bias) instead of the vocabulary, so loaders build it accordingly.
    """
    from buildllm.files import atomic_write

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_safetensors(directory / WEIGHTS, model.state_dict())
    model.cfg.save(directory / CONFIG)  # atomic: GPTConfig.save writes through files.write_json
    atomic_write(directory / TOKENIZER, lambda tmp: tokenizer.save(tmp))
    write_json(directory / CLASSIFIER, meta)
    return directory


@dataclass
class Classifier:
    """A loaded classifier: ``predict(texts)`` gives ``(label, probability)`` per text."""

    model: nn.Module
    tokenizer: object
    labels: list[str]
    max_length: int
    representation: str = "last_token"

    @torch.no_grad()
    def predict_proba(self, texts: Sequence[str], batch_size: int = 32) -> torch.Tensor:
        """Class probabilities ``(len(texts), num_classes)``."""
        self.model.eval()
        pad_to = self.max_length if self.representation == "last_position" else None
        out = []
        for start in range(0, len(texts), batch_size):
            chunk = texts[start : start + batch_size]
            encoded = self.tokenizer.encode_batch(list(chunk))
            for text, ids in zip(chunk, encoded):
                if not ids:
                    raise UserError(f"cannot classify {text!r}: it encodes to no tokens")
            batch = collate_classification([(ids[: self.max_length], 0) for ids in encoded], self.tokenizer.eot_id, pad_to)
            logits = classifier_logits(self.model, batch[0].to(self.model.device), batch[1], self.representation)
            out.append(torch.softmax(logits.float(), dim=-1).cpu())
        return torch.cat(out) if out else torch.empty(0, len(self.labels))

    def predict(self, texts: Sequence[str]) -> list[tuple[str, float]]:
        probs = self.predict_proba(texts)
        best = probs.argmax(dim=-1)
        return [(self.labels[int(i)], float(p[i])) for i, p in zip(best, probs)]


def load_classifier(directory: str | Path, device: torch.device | str = "cpu") -> Classifier:
    """Load a folder written by ``save_classifier`` (the output of ``finetune_classifier``)."""
    from buildllm.weights.loader import load_model

    directory = Path(directory)
    if not (directory / CLASSIFIER).is_file():
        raise UserError(f"{directory} is not a classifier checkpoint ({CLASSIFIER} is missing); "
                        "make one with `buildllm finetune classify`")
    loaded = load_model(directory, device=device)  # checks the head against the labels
    meta = loaded.classifier
    try:
        labels, max_length = [str(x) for x in meta["labels"]], int(meta["max_length"])
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"cannot read {directory / CLASSIFIER}: {e!r}") from None
    model, tokenizer = loaded
    return Classifier(model, tokenizer, labels, max_length, meta.get("representation", "last_token"))


@dataclass
class ClassifierResult:
    checkpoint: Path
    labels: list[str]
    history: list[dict] = field(default_factory=list)  # per epoch: train/val loss and accuracy
    best_epoch: int = 0
    test_accuracy: float = float("nan")
    test_loss: float = float("nan")
    trainable_parameters: int = 0


@dataclass
class ClassifyConfig(EngineConfig):
    """Every knob of a classification fine-tune: the engine's (``EngineConfig``) and these."""

    base: str | None = None  # the model to start from: a checkpoint folder, a GPT-2 folder or model id
    data: str | None = None  # CSV/TSV file of texts and labels
    text_column: str | int = "text"  # column holding the text (a 0-based number without a header)
    label_column: str | int = "label"  # column holding the label
    labels: list[str] | None = None  # the label set, in output order (default: the sorted labels found)
    header: bool = True  # the file's first row names its columns
    delimiter: str | None = None  # field separator (default: from the extension, .csv or .tsv, else sniffed)
    balance: bool = False  # undersample every class to the smallest one
    split: tuple[float, ...] = (0.7, 0.1, 0.2)  # train, validation, test fractions
    max_length: int | None = None  # tokens per text (default: the longest training text)
    representation: Literal["last_token", "last_position"] = "last_token"  # read the class at the last real token, or last_position (the book)
    trainable: Literal["head", "last_blocks", "all"] = "last_blocks"  # what trains without LoRA: head, last_blocks (+ final norm + head), all
    last_blocks: int = 1  # how many blocks train with trainable=last_blocks
    lora_rank: int | None = None  # train LoRA adapters of this rank instead of the weights
    lora_alpha: float | None = None  # LoRA scale numerator (default: 2 x rank)
    lora_targets: tuple[str, ...] = ()  # Linear layers that get adapters (none: the architecture's)
    eval_batches: int | None = None  # evaluate on at most this many batches per split (default: all)
    epochs: int = 5  # passes over the training split

    what = "classification"


class ClassifyTask(Task):
    """Cross-entropy of the class read at each text's last token; the best accuracy is kept."""

    best_at_root = True  # the out folder is the classifier
    files = (CLASSIFIER, METRICS, ADAPTER_WEIGHTS, ADAPTER_CONFIG)

    def __init__(self, batches, tokenizer, meta: dict, eval_iters: int | None):
        self.batches, self.tokenizer, self.meta, self.eval_iters = batches, tokenizer, meta, eval_iters
        self.representation = meta["representation"]

    def items(self, batch) -> int:
        return len(batch[2])  # examples

    def loss(self, model, batch) -> torch.Tensor:
        input_ids, lengths, labels = batch
        logits = classifier_logits(model, input_ids, lengths, self.representation)
        return F.cross_entropy(logits.float(), labels, reduction="sum")

    def evaluate(self, model, batches) -> dict[str, float]:
        device = next(model.parameters()).device
        loss, accuracy = evaluate_classifier(model, batches, device, self.representation)
        return {"loss": loss, "accuracy": accuracy}

    def score(self, metrics: dict[str, float]) -> float:
        """Validation accuracy (training accuracy without a validation set)."""
        accuracy = metrics["val_accuracy"]
        return accuracy if math.isfinite(accuracy) else metrics["train_accuracy"]

    def save(self, folder: Path, model) -> None:
        """The classifier folder; with LoRA also the adapters plus the trained head (a small file)."""
        save_classifier(folder, without_adapters(folder, model), self.tokenizer, self.meta)


def finetune_classifier(
    base: str | Path | nn.Module | None = None,
    data: str | Path | None = None,
    out_dir: str | Path | None = None,
    *,
    config: ClassifyConfig | None = None,
    tokenizer=None,
    log: Log = print,
    **options,
) -> ClassifierResult:
    """Fine-tune ``base`` (a checkpoint folder, a GPT-2 folder or model id, or a model object with
    ``tokenizer``, which is then changed in place) as a text classifier on ``data`` and save the
    best epoch (by validation accuracy) to ``out_dir``.

    ``options`` are ``ClassifyConfig`` keys (``epochs``, ``lr``, ``max_length``, ``resume``, ...),
    applied over ``config``. With ``lora_rank``, the blocks train through LoRA adapters and the
    new head trains fully. Under torchrun the processes share each batch (DDP).
    """
    cfg = finetune_config(ClassifyConfig, base, data, out_dir, config, options)
    if cfg.representation not in REPRESENTATIONS:
        raise UserError(f"representation must be one of {', '.join(REPRESENTATIONS)}, not {cfg.representation!r}")
    rt = start_runtime(cfg)
    log = log if rt.dist.main else None
    resume_from = check_run_folder(cfg)
    model, tokenizer, label_set, (train_set, val_set, test_set), max_length = _prepare(
        cfg, base, tokenizer, rt.device, log)
    trainable_count, _ = log_trainable(model, log)

    pad_to = max_length if cfg.representation == "last_position" else None
    collate = partial(collate_classification, pad_id=tokenizer.eot_id, pad_to=pad_to)
    batches = ExampleBatches(train_set, collate, cfg.batch_size, cfg.seed, rt.dist,
                             {"train": train_set, "val": val_set})
    meta = {"task": "classification", "num_classes": len(label_set), "labels": label_set,
            "max_length": max_length, "representation": cfg.representation}
    task = ClassifyTask(batches, tokenizer, meta, cfg.eval_batches)
    done, history, steps_per_epoch = run_finetune(task, cfg, model, rt, resume_from, log)

    out_dir = Path(cfg.out)
    result = ClassifierResult(out_dir, label_set, history, best_epoch=math.ceil(done.best_step / steps_per_epoch),
                              trainable_parameters=trainable_count)
    if rt.dist.main:
        # Test with the checkpoint as saved: this also proves the folder loads.
        best_model = load_classifier(out_dir, rt.device).model
        test_eval = DataLoader(test_set, cfg.batch_size, collate_fn=collate)
        result.test_loss, result.test_accuracy = evaluate_classifier(best_model, test_eval, rt.device,
                                                                     cfg.representation)
        if log and test_set:
            log(f"test accuracy {100 * result.test_accuracy:.2f}% ({len(test_set)} examples, epoch "
                f"{result.best_epoch} checkpoint) -> {out_dir}")
        write_json(out_dir / METRICS, {"best_epoch": result.best_epoch, "test_loss": result.test_loss,
                                       "test_accuracy": result.test_accuracy, "history": result.history,
                                       "split_sizes": [len(train_set), len(val_set), len(test_set)]})
    barrier(rt.dist)
    return result


def _prepare(cfg: ClassifyConfig, base, tokenizer, device, log: Log):
    """The data read, split and encoded, and the model with its new head (seeded)."""
    rows, label_set = read_labeled_texts(cfg.data, cfg.text_column, cfg.label_column, cfg.labels,
                                         cfg.delimiter, cfg.header)
    if cfg.balance:
        rows = balance_classes(rows, cfg.seed)
    counts = Counter(r.label for r in rows)
    if log:
        log(f"{len(rows)} examples, {len(label_set)} classes: "
            + ", ".join(f"{label} {counts.get(label, 0)}" for label in label_set))
    parts = split_items(rows, cfg.split, cfg.seed)

    model, tokenizer = pick_model(base, cfg, tokenizer, device)
    context, max_length = model.cfg.context_length, cfg.max_length
    if max_length is None:
        # The book's rule: as long as the longest training text, capped by the context window.
        max_length = min(context, max(len(ids) for ids in tokenizer.encode_batch([r.text for r in parts[0]])))
    elif not 1 <= max_length <= context:
        raise UserError(f"max_length must be between 1 and the context length {context}, got {max_length}")
    sets = tuple(encode_labeled(part, tokenizer, label_set, max_length) for part in parts)

    torch.manual_seed(cfg.seed)  # the new head's initialisation and the LoRA matrices
    make_classifier(model, len(label_set), cfg.trainable, cfg.last_blocks)
    if cfg.lora_rank is not None:
        apply_lora(model, cfg.lora_rank, cfg.lora_alpha or 2 * cfg.lora_rank, cfg.lora_targets or None)  # freezes all ...
        for p in model.out_head.parameters():  # ... but the new head is random: it trains fully
            p.requires_grad = True
    return model, tokenizer, label_set, sets, max_length
