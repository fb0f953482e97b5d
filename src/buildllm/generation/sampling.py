"""Stage 6: turning a trained model into text, one token at a time.

Each step the model gives logits for the next token; a *decoding strategy* picks one:

    logits ──► / temperature ──► keep the top-k ──► keep the top-p (nucleus) ──► softmax ──► sample
          └──────────────────────────── argmax (temperature 0, greedy) ─────────────────────────┘

``stream`` is the one decoding loop: it yields the new token of every row at each step, so a
command line can print text as it is produced. ``generate`` collects what ``stream`` yields,
and ``stream_text`` turns the tokens of one prompt into printable pieces of text.

The KV cache (``model.KVCache``) makes a step cost one position's compute: the prompt is run once
(the *prefill*), then only the newest token goes through the model, attending to the keys and
values kept from earlier steps. See ``_decode`` for what happens when the text outgrows the
context window.
"""

from __future__ import annotations

import math
import operator
import warnings
from collections.abc import Collection, Iterable, Iterator, Sequence
from itertools import takewhile

import torch
from torch import nn

from buildllm.errors import UserError
from buildllm.generation.fast_decode import fast_decoder
from buildllm.generation.quantization import QuantizedLinear

Prompt = torch.Tensor | Sequence[Sequence[int]]
StopIds = int | Collection[int]  # one token that ends a text, or several (Llama 3 Instruct has three)

# Tokens of already-printed text decoded again with the new ones (see ``detokenize``).
DETOKENIZE_CONTEXT = 4


# Picking the next token --------------------------------------------------------------------------


def check_sampling(
    temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None, max_new_tokens: int = 0
) -> None:
    """Raise ``UserError`` for settings that have no meaning."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise UserError(f"max_new_tokens must be a whole number >= 0, got {max_new_tokens!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise UserError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise UserError(f"top_k must be a whole number >= 1 (or None to keep every token), got {top_k!r}")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise UserError(f"top_p must be in (0, 1] (1 keeps every token), got {top_p!r}")


def sample_next_token(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token id per row of ``logits`` ``(batch, vocab)``; returns a ``(batch,)`` LongTensor.

    Temperature divides the *logits* (not the probabilities): below 1 it sharpens the
    distribution, above 1 it flattens it, and 0 means "always the most likely token". Top-k and
    top-p then cut the unlikely tail, row by row, before sampling from what is left.
    """
    if temperature == 0:
        # max's indices are argmax's (the first largest, a NaN first of all), from a vectorized
        # kernel where PyTorch's argmax compares one logit at a time (benchmarks/README.md).
        return logits.max(dim=-1).indices
    # Subtracting the row's maximum first changes no probability but keeps a tiny temperature from
    # overflowing to inf (and inf - inf to NaN). It also makes a new tensor: the caller's is untouched.
    logits = logits.float()
    logits = (logits - logits.amax(dim=-1, keepdim=True)).div_(temperature)
    vocab = logits.shape[-1]
    top_k = top_k if top_k is not None and top_k < vocab else None
    top_p = top_p if top_p is not None and top_p < 1 else None
    if top_k is None and top_p is None:
        return draw(torch.softmax(logits, dim=-1), generator)
    # The candidates, each row's most likely tokens best first, from torch.topk: it sorts only the
    # tokens it keeps, where sorting a whole 50,000-token row costs ~30x more (benchmarks/README.md).
    if top_k is not None:
        # Keep exactly the k largest logits of each row (ties broken by topk).
        logits, tokens = torch.topk(logits, top_k, dim=-1)
    if top_p is not None:
        # Nucleus sampling (Holtzman et al. 2019): the smallest set of most likely tokens whose
        # probabilities add up to at least p. A token stays if the tokens ranked above it hold
        # less than p; the most likely one always stays (nothing is ranked above it). The nucleus
        # is usually a few dozen tokens: look among the best 64, then 1024, and sort the whole row
        # only where some row's nucleus is wider still (a flat distribution: an untrained model's).
        log_total = torch.logsumexp(logits, dim=-1, keepdim=True)  # over the row (or its top k)
        width, everything = 64, logits.shape[-1]
        while True:
            if width < everything:
                values, order = torch.topk(logits, width, dim=-1)
            else:
                values, order = torch.sort(logits, dim=-1, descending=True)
            probs = torch.exp(values - log_total)
            keep = torch.cumsum(probs, dim=-1) - probs < top_p
            if width >= everything or not keep[:, -1].any():  # every row's nucleus ends among these
                break
            width = 1024 if width == 64 else everything
        tokens = tokens.gather(-1, order) if top_k is not None else order
        logits = values.masked_fill(~keep, -math.inf)
    return tokens.gather(-1, draw(torch.softmax(logits, dim=-1), generator)[:, None]).squeeze(-1)


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One index per row of ``probs`` (non-negative, summing to about 1), index i with probability
    ``probs[i]``: the first whose running total reaches a uniform draw (inverse transform sampling).

    ``torch.multinomial`` draws from the same distribution but spends ~1 ms on a 50,000-token row
    here, where this takes one cumulative sum (benchmarks/README.md).
    """
    totals = torch.cumsum(probs, dim=-1)  # summed in float64 by PyTorch, each total rounded once
    # 1 - rand lies in (0, 1]: the draw is never 0, so no index of probability 0 is the first to reach it.
    u = 1 - torch.rand(probs.shape[0], 1, generator=generator, device=probs.device)
    # Clamped: NaN probabilities (a broken model's logits) still give an index in range, as greedy's
    # max does, never one past the end for the embedding to read.
    return torch.searchsorted(totals, u * totals[:, -1:]).squeeze(-1).clamp_(max=probs.shape[-1] - 1)


# The decoding loop -------------------------------------------------------------------------------


def stream(
    model: nn.Module,
    idx: Prompt,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: StopIds | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    fast: bool = True,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, a ``(batch,)`` LongTensor per step.

    ``idx``: a ``(batch, tokens)`` LongTensor, or a list of token-id lists of any lengths (they
    are left-padded, and the padding is masked out, so each row gives what it would alone).
    Prompts longer than the context window are cropped from the left, with a warning.
    ``eos_id``: the token that ends a row, or several (any of them ends it). A row that has produced
    one keeps yielding that token, and the stream ends once every row has. Settings are checked
    here, before the first token is asked for. The model runs in eval mode under
    ``torch.inference_mode`` while the stream does; its training mode comes back when the stream
    ends or is closed. ``fast``: the one-token steps run in C++ (``generation/fast_decode.py``)
    where that applies to the model and machine; False runs every step through the model.
    """
    check_sampling(temperature, top_k, top_p, max_new_tokens)
    tokens, padding = left_pad(_rows(idx), model.cfg.context_length, device_of(model))
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= model.cfg.vocab_size):
        raise UserError(f"prompt token ids must be in [0, {model.cfg.vocab_size}) for this model's vocabulary")
    stops = _stop_set(eos_id)
    stops = torch.tensor(sorted(stops), device=tokens.device) if stops else None
    sampling = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "generator": generator}
    return _decode(model, tokens, padding, max_new_tokens, sampling, stops, use_cache, fast)


@torch.inference_mode()  # wraps a generator: active only while the loop runs, not in the caller
def _decode(model, prompt, padding, max_new_tokens, sampling, stops, use_cache, use_fast) -> Iterator[torch.Tensor]:
    """The loop behind ``stream``: prefill, then sample, append and step one token at a time.

    Past the context window. GPT-2 learns an embedding per *absolute* position (wpe), and the
    reference behaviour, without a cache, feeds the last ``context_length`` tokens each step.
    Once the text is longer than the window, each step slides that window by one token, so every
    token moves to a new position, and every cached key and value (which depend on the position
    through all the layers) becomes stale. Keeping them (or sliding the cache) would be fast but
    would give different text. So we use the cache while the text fits, and from the first step
    that does not, we recompute the window: one forward pass over the last ``context_length``
    tokens per step, exactly what the reference computes. No exact scheme can do less with
    absolute positions; models with relative positions (RoPE, ALiBi) can slide a cache instead.
    """
    context_length = model.cfg.context_length
    batch, prompt_length = prompt.shape
    was_training = model.training
    model.eval()  # dropout off
    try:
        if max_new_tokens == 0:
            return
        # All tokens live in one buffer allocated up front: no concatenation per step.
        tokens = torch.empty(batch, prompt_length + max_new_tokens, dtype=torch.long, device=prompt.device)
        tokens[:, :prompt_length] = prompt
        if padding is not None:
            padding = torch.cat([padding, padding.new_zeros(batch, max_new_tokens)], dim=1)
        cache = fast = None
        if use_cache:
            # The last pass with the cache reads position prompt_length + max_new_tokens - 2.
            max_length = min(context_length, prompt_length + max_new_tokens - 1)
            cache = model.new_kv_cache(batch, max_length, device=prompt.device, dtype=cache_dtype(model))
            fast = fast_decoder(model) if use_fast else None  # the one-token steps in C++, where it applies

        def window_logits(n: int) -> torch.Tensor:
            """Logits after the last ``context_length`` of the first ``n`` tokens, from scratch."""
            start = max(0, n - context_length)
            mask = padding[:, start:n] if padding is not None else None
            if cache is not None:  # the prefill (n fits in the window): fill the cache
                return model(tokens[:, start:n], kv_cache=cache, padding=mask, last_only=True)[:, -1]
            return model(tokens[:, start:n], padding=mask, last_only=True)[:, -1]

        def cached_step(last: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
            """Logits after one new token per row through the cache, and the greedy picks where the
            C++ step makes them with the logits (None elsewhere: sample_next_token picks)."""
            if fast is None:
                return model(last[:, None], kv_cache=cache)[:, -1], None
            if sampling["temperature"] == 0:
                return fast.step_greedy(last, cache)
            return fast.step(last, cache), None

        finished = torch.zeros(batch, dtype=torch.bool, device=prompt.device) if stops is not None else None
        n = prompt_length
        if fast is not None and n == 1 and padding is None:
            logits, picks = cached_step(tokens[:, 0])  # a one-token prompt is one decoding step
        else:
            logits, picks = window_logits(n), None
        for step in range(max_new_tokens):
            next_token = picks if picks is not None else sample_next_token(logits, **sampling)
            if finished is not None:
                # a finished row repeats the stop token it ended with (its padding)
                next_token = torch.where(finished, tokens[:, n - 1], next_token)
                finished |= torch.isin(next_token, stops)
            tokens[:, n] = next_token
            n += 1
            yield next_token
            if step + 1 == max_new_tokens or (finished is not None and bool(finished.all())):
                return  # (the only host sync per step, and only with stop tokens)
            if cache is not None and n <= cache.max_length:  # one new position
                logits, picks = cached_step(tokens[:, n - 1])
            else:
                cache = None  # the window slides from now on (see above): recompute it
                logits, picks = window_logits(n), None
    finally:
        model.train(was_training)


def generate(
    model: nn.Module,
    idx: Prompt,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: StopIds | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    fast: bool = True,
) -> torch.Tensor | list[list[int]]:
    """The prompt followed by up to ``max_new_tokens`` generated tokens.

    For a ``(batch, tokens)`` tensor: a ``(batch, tokens + steps)`` LongTensor, where ``steps`` is
    ``max_new_tokens`` or fewer if every row produced a stop token (``eos_id``: one id or several)
    earlier; finished rows are padded with the stop token they produced. For a list of token-id
    lists: a list of lists, each its prompt plus its new tokens, ending at (and including) its first
    stop token, with no padding. The prompt comes back whole even when the model only saw its last
    ``context_length`` tokens.
    """
    steps = list(stream(model, idx, max_new_tokens, temperature, top_k, top_p, eos_id, use_cache, generator, fast))
    batch = len(idx)
    new = torch.stack(steps, dim=1) if steps else torch.empty(batch, 0, dtype=torch.long)
    if isinstance(idx, torch.Tensor):
        return torch.cat([idx, new.to(idx.device)], dim=1)
    stops, out = _stop_set(eos_id), []
    for prompt, row in zip(idx, new.tolist()):
        end = next((i for i, t in enumerate(row) if t in stops), None)
        if end is not None:
            row = row[: end + 1]
        out.append([int(t) for t in prompt] + row)
    return out


# Text in, text out -------------------------------------------------------------------------------


def detokenize(tokenizer, ids: Iterable[int], context: Sequence[int] = ()) -> Iterator[str]:
    """Turn a stream of token ids into a stream of printable text pieces.

    Byte-level BPE tokens can end halfway through a UTF-8 character (an emoji is often two or three
    tokens), and decoding such a token alone gives a replacement character. So the ids not yet
    printed are decoded together with a few tokens before them (``context`` at first: the prompt),
    and the new text is released only once it does not end in a half character (U+FFFD). The
    leading tokens also keep word-level tokenizers' spacing right at the seam.
    """
    tail, pending = list(context)[-DETOKENIZE_CONTEXT:], []
    shown = tokenizer.decode(tail)
    for token in ids:
        pending.append(int(token))
        text = tokenizer.decode(tail + pending)
        if text.endswith("\ufffd") or not text.startswith(shown):
            continue  # wait for the rest of the character
        if len(text) > len(shown):
            yield text[len(shown) :]
        tail, pending = (tail + pending)[-DETOKENIZE_CONTEXT:], []
        shown = tokenizer.decode(tail)
    if pending:  # the stream ended inside a character: show what there is
        text = tokenizer.decode(tail + pending)
        keep = len(shown) if text.startswith(shown) else len(common_prefix(text, shown))
        if len(text) > keep:
            yield text[keep:]


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """The token ids a text prompt starts the model from.

    The tokenizer's beginning-of-text token comes first when it has one (``bos_id``: Llama's
    ``<|begin_of_text|>``, as transformers' ``encode`` adds it), then the text. An empty prompt
    without one starts from ``<|endoftext|>``, GPT-2's "beginning of a document".
    """
    ids = tokenizer.encode(prompt)  # (special tokens spelled in the text stay text: never a second bos)
    bos = getattr(tokenizer, "bos_id", None)
    if bos is not None:
        ids = [bos, *ids]
    return ids or [tokenizer.eot_id]


def stop_ids(tokenizer) -> tuple[int, ...]:
    """The token ids that end an answer: the tokenizer's end-of-turn tokens (several for Llama 3)
    when it names them, else its end-of-text token."""
    ids = getattr(tokenizer, "stop_ids", None)
    return tuple(ids) if ids else (tokenizer.eot_id,)


def stream_text(
    model: nn.Module,
    tokenizer,
    prompt: str | Sequence[int],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_at_eot: bool = True,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    fast: bool = True,
) -> Iterator[str]:
    """Continue ``prompt``, yielding the new text piece by piece as the model produces it.

    ``prompt``: text (encoded by ``prompt_ids``), or token ids taken as they are (a chat prompt's,
    see ``generation.chat.chat_ids``). Stops at the tokenizer's stop tokens (which are not shown:
    ``<|endoftext|>``, or a chat model's end-of-turn tokens) unless ``stop_at_eot`` is False.
    """
    ids = prompt_ids(tokenizer, prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
    stops = stop_ids(tokenizer) if stop_at_eot else None
    steps = stream(model, [ids], max_new_tokens, temperature, top_k, top_p, stops, use_cache, generator, fast)
    new_ids = (int(step[0]) for step in steps)
    if stops is not None:
        new_ids = takewhile(lambda t: t not in stops, new_ids)
    return detokenize(tokenizer, new_ids, context=ids)


# Helpers -----------------------------------------------------------------------------------------


def _stop_set(eos_id: StopIds | None) -> frozenset[int]:
    """``eos_id`` (None, one id, or a collection of ids) as a set of ids."""
    if isinstance(eos_id, torch.Tensor):
        eos_id = eos_id.tolist()
    ids = () if eos_id is None else tuple(eos_id) if isinstance(eos_id, Collection) else (eos_id,)
    try:
        if any(isinstance(i, bool) for i in ids):
            raise TypeError
        return frozenset(operator.index(i) for i in ids)
    except TypeError:
        raise UserError(f"eos_id must be a token id or a collection of token ids, got {eos_id!r}") from None


def _rows(idx: Prompt) -> list[list[int]] | torch.Tensor:
    if isinstance(idx, torch.Tensor):
        if idx.dim() != 2 or idx.dtype not in (torch.long, torch.int32, torch.int16, torch.uint8):
            raise UserError(f"idx must be a (batch, tokens) tensor of token ids, got shape {tuple(idx.shape)} "
                            f"and dtype {idx.dtype}")
        if idx.shape[0] == 0 or idx.shape[1] == 0:
            raise UserError("the prompt is empty: give at least one token per row")
        return idx
    rows = [list(row) for row in idx]
    if not rows or any(len(row) == 0 for row in rows):
        raise UserError("the prompt is empty: give at least one token per row")
    return rows


def left_pad(
    rows: list[list[int]] | torch.Tensor, context_length: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Crop each prompt to the context window and left-pad them to one length.

    Returns ``(tokens, padding)``; ``padding`` is True at padding positions, None without any.
    """
    longest = rows.shape[1] if isinstance(rows, torch.Tensor) else max(len(r) for r in rows)
    if longest > context_length:
        warnings.warn(
            f"the prompt has {longest} tokens but the context window holds {context_length}: "
            f"the model sees only the last {context_length}",
            stacklevel=4,
        )
    if isinstance(rows, torch.Tensor):
        return rows[:, -context_length:].to(device=device, dtype=torch.long), None
    rows = [r[-context_length:] for r in rows]
    width = max(len(r) for r in rows)
    tokens = torch.zeros(len(rows), width, dtype=torch.long)  # id 0 under the padding: never seen
    padding = torch.ones(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        tokens[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        padding[i, width - len(r) :] = False
    if not padding.any():
        padding = None
    return tokens.to(device), (padding.to(device) if padding is not None else None)


def device_of(model: nn.Module) -> torch.device:
    """Where the model's weights live (the CPU for a model without parameters)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def cache_dtype(model: nn.Module) -> torch.dtype:
    """The KV cache's dtype: the model's own, but bf16 under int8 or int4 weights.

    Keys and values rounded to bf16 move the logits far less than the weights' own rounding does
    (benchmarks/README.md), and a batched step of a quantized model otherwise spends a quarter of
    its time reading an fp32 cache; llama.cpp keeps its cache in 16 bits too.
    """
    if any(isinstance(m, QuantizedLinear) for m in model.modules()):
        return torch.bfloat16
    p = next((p for p in model.parameters() if p.is_floating_point()), None)
    return p.dtype if p is not None else torch.float32


def common_prefix(a: str, b: str) -> str:
    i = 0
    while i < min(len(a), len(b)) and a[i] == b[i]:
        i += 1
    return a[:i]
