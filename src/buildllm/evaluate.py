"""Stage 7: how good is a language model? Perplexity, bits per character, multiple choice.

Perplexity over a long text (sliding window)
    A model sees at most ``context_length`` tokens. Cutting the text into disjoint chunks would
    score each chunk's first tokens with almost no context, which overstates the loss. The sliding
    window (the method the transformers documentation describes) moves a window of
    ``context_length`` tokens along the text by ``stride`` tokens and scores only the tokens not
    scored before, so every token is scored once, with up to ``context_length - stride`` tokens of
    extra left context::

        tokens:  0 1 2 3 4 5 6 7 8 9 ...            context_length 6, stride 3
        window:  [0 1 2 3 4 5]                      scores 1..5 (token 0 has nothing before it)
        window:        [3 4 5 6 7 8]                scores 6..8, with 3..5 as context only
        window:              [6 7 8 9 ...]          ...

    A smaller stride gives more context per token and a lower (more honest) perplexity, at the
    cost of ``context_length / stride`` times the compute. ``stride == context_length`` is the
    plain chunked loss. (The guide's code averages each window's mean loss weighted by its label
    count minus one, off by one token for the windows after the first; we sum the per-token
    losses and divide by the number scored, the exact mean; the difference is negligible.)

Bits per character
    Perplexity depends on the tokenizer (a token can be one letter or a whole word); bits per
    character does not: the total negative log-likelihood, in bits, divided by the number of
    characters. Models with different tokenizers can be compared with it.

Multiple choice (HellaSwag format)
    Each item is a context and several endings; the model "chooses" the ending it finds most
    likely after the context. ``acc`` compares the summed log-likelihoods of the endings' tokens,
    which favours short endings; ``acc_norm`` divides by the ending's length in characters (as the
    EleutherAI evaluation harness does); ``acc_norm_tokens`` divides by its number of tokens (the
    "completion style" of Karpathy's llm.c ``hellaswag.py``).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from buildllm.errors import UserError

# Perplexity --------------------------------------------------------------------------------------


def perplexity(
    model: torch.nn.Module,
    token_ids: Sequence[int] | torch.Tensor,
    context_length: int | None = None,
    stride: int = 512,
    batch_size: int = 1,
) -> dict[str, float]:
    """Sliding-window loss over ``token_ids``: ``{"loss", "perplexity", "tokens"}``.

    ``loss`` is the mean negative log-likelihood in nats of the scored tokens (every token but the
    first), ``tokens`` how many were scored. ``context_length`` defaults to the model's; a
    ``stride`` beyond it is capped to it (disjoint windows: a larger step would skip tokens).
    ``stride = context_length - 1`` scores every token once with the tokens before it in its window
    as context, as training sees them. ``batch_size`` windows go through the model at once.
    """
    ids = torch.as_tensor(token_ids, dtype=torch.long).flatten()
    window = context_length or model.cfg.context_length
    if not 1 <= window <= model.cfg.context_length:
        raise UserError(f"context_length must be in [1, {model.cfg.context_length}], got {window}")
    if stride < 1:
        raise UserError(f"stride must be at least 1 token, got {stride}")
    if batch_size < 1:
        raise UserError(f"batch_size must be at least 1, got {batch_size}")
    stride = min(stride, window)
    if len(ids) < 2:
        raise UserError("the text is too short to score: it needs at least two tokens")

    # (begin, end, new): the window's tokens and how many at its end it scores. The rest are
    # context only, scored by the window before (transformers sets their labels to -100).
    windows, previous_end = [], 0
    for begin in range(0, len(ids), stride):
        end = min(begin + window, len(ids))
        windows.append((begin, end, end - max(previous_end, begin + 1)))
        previous_end = end
        if end == len(ids):
            break

    device = next(model.parameters()).device
    total_nll = 0.0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in _same_length_batches(windows, batch_size):
                rows = torch.stack([ids[begin:end] for begin, end, _ in batch]).to(device)
                logits = model(rows)[:, :-1].float()  # predictions of each row's tokens 1..
                nll = F.cross_entropy(logits.transpose(1, 2), rows[:, 1:], reduction="none")  # (rows, L - 1)
                new = torch.tensor([n for _, _, n in batch], device=device)
                scored_here = torch.arange(nll.shape[1], device=device) >= nll.shape[1] - new[:, None]
                total_nll += nll[scored_here].sum().item()
    finally:
        model.train(was_training)
    scored = sum(new for _, _, new in windows)
    loss = total_nll / scored
    return {"loss": loss, "perplexity": math.exp(min(loss, 700)), "tokens": scored}


def _same_length_batches(windows: list, batch_size: int):
    """Consecutive windows in groups of ``batch_size`` (only the last window may be shorter)."""
    batch = []
    for w in windows:
        if batch and (len(batch) == batch_size or w[1] - w[0] != batch[0][1] - batch[0][0]):
            yield batch
            batch = []
        batch.append(w)
    if batch:
        yield batch


def bits_per_character(loss_nats: float, n_tokens: int, n_chars: int) -> float:
    """Total negative log-likelihood in bits (mean nats per token x tokens / ln 2) per character."""
    if n_chars <= 0:
        raise UserError("bits per character needs a text of at least one character")
    return loss_nats * n_tokens / (n_chars * math.log(2))


def evaluate_text(model: torch.nn.Module, tokenizer, text: str, stride: int = 512) -> dict[str, float]:
    """Loss, perplexity and bits per character of ``model`` on ``text``.

    Returns ``{"loss", "perplexity", "bits_per_char", "tokens", "chars"}``; ``tokens`` counts the
    text's tokens. The first token has no context and is not scored, so bits per character spread
    the scored tokens' bits over all characters (a negligible difference on any real text).
    """
    ids = tokenizer.encode(text)
    result = perplexity(model, ids, stride=stride)
    return {
        "loss": result["loss"],
        "perplexity": result["perplexity"],
        "bits_per_char": bits_per_character(result["loss"], result["tokens"], len(text)),
        "tokens": len(ids),
        "chars": len(text),
    }


# Multiple choice ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class MultipleChoiceItem:
    ctx: str
    endings: tuple[str, ...]
    label: int


def load_multiple_choice(path: str | os.PathLike, limit: int | None = None) -> list[MultipleChoiceItem]:
    """Read HellaSwag-style JSONL: one ``{"ctx": str, "endings": [str, ...], "label": int}`` per line.

    Other fields (HellaSwag's ``activity_label``, ``ctx_a``, ...) are ignored; blank lines skipped.
    """
    path = Path(path)
    items = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    for number, line in enumerate(lines, start=1):
        if limit is not None and len(items) >= limit:
            break
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{number}: not valid JSON ({e.msg})") from None
        if not isinstance(record, dict):
            raise UserError(f"{path}:{number}: expected an object with ctx, endings and label")
        ctx, endings, label = record.get("ctx"), record.get("endings"), record.get("label")
        if not isinstance(ctx, str):
            raise UserError(f"{path}:{number}: 'ctx' must be a string")
        if not (isinstance(endings, list) and len(endings) >= 2 and all(isinstance(e, str) and e for e in endings)):
            raise UserError(f"{path}:{number}: 'endings' must be a list of at least two non-empty strings")
        if isinstance(label, str) and label.strip().isdigit():
            label = int(label)  # some HellaSwag copies store the label as "3"
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(endings):
            raise UserError(f"{path}:{number}: 'label' must be an index into endings (0..{len(endings) - 1})")
        items.append(MultipleChoiceItem(ctx, tuple(endings), label))
    if not items:
        raise UserError(f"{path} holds no multiple-choice items")
    return items


def score_endings(model: torch.nn.Module, tokenizer, ctx: str, endings: Sequence[str]) -> list[tuple[float, int]]:
    """``(summed log-likelihood, number of tokens)`` of each ending after ``ctx``.

    Each ending is scored as `` " " + ending`` after the context (a space joins them, as in
    HellaSwag), context and ending encoded separately. All endings go through the model in one
    batch, right-padded: padding comes after the tokens scored, so a causal model never sees it.
    Contexts too long for the window lose their oldest tokens.
    """
    ctx_ids = tokenizer.encode(ctx)
    rows, spans = [], []
    for ending in endings:
        ending_ids = tokenizer.encode(" " + ending)
        if not ending_ids:
            raise UserError(f"ending {ending!r} encodes to no tokens")
        ids = (ctx_ids + ending_ids)[-model.cfg.context_length :]
        if len(ids) == len(ending_ids):
            raise UserError(f"ending {ending!r} leaves no room for the context in {model.cfg.context_length} tokens")
        rows.append(ids)
        spans.append(len(ending_ids))
    width = max(len(r) for r in rows)
    device = next(model.parameters()).device
    batch = torch.zeros(len(rows), width, dtype=torch.long, device=device)
    for i, ids in enumerate(rows):
        batch[i, : len(ids)] = torch.tensor(ids)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            logprobs = torch.log_softmax(model(batch).float(), dim=-1)
    finally:
        model.train(was_training)
    scores = []
    for i, (ids, n) in enumerate(zip(rows, spans)):
        # Token at position p is predicted at position p - 1.
        positions = torch.arange(len(ids) - n - 1, len(ids) - 1, device=device)
        targets = batch[i, positions + 1]
        scores.append((logprobs[i, positions, targets].sum().item(), n))
    return scores


def evaluate_multiple_choice(
    model: torch.nn.Module,
    tokenizer,
    items: str | os.PathLike | Sequence[MultipleChoiceItem],
    limit: int | None = None,
) -> dict[str, float]:
    """Accuracy on HellaSwag-style items (a JSONL path or loaded items).

    Returns ``{"acc", "acc_norm", "acc_norm_tokens", "items"}``: the share of items where the
    correct ending has the highest summed log-likelihood, the highest per character of the ending,
    and the highest per token. Ties go to the first ending.
    """
    if isinstance(items, (str, os.PathLike)):
        items = load_multiple_choice(items, limit)
    elif limit is not None:
        items = list(items)[:limit]
    if not items:
        raise UserError("no multiple-choice items to evaluate")
    correct = {"acc": 0, "acc_norm": 0, "acc_norm_tokens": 0}
    for item in items:
        scores = score_endings(model, tokenizer, item.ctx, item.endings)
        by = {
            "acc": [ll for ll, _ in scores],
            "acc_norm": [ll / len(ending) for (ll, _), ending in zip(scores, item.endings)],
            "acc_norm_tokens": [ll / n for ll, n in scores],
        }
        for metric, values in by.items():
            correct[metric] += max(range(len(values)), key=values.__getitem__) == item.label
    return {**{m: c / len(items) for m, c in correct.items()}, "items": len(items)}
