"""Continuous batching: requests join and leave a running batch between decoding steps.

One decoding step reads every weight of the model once, whatever the number of rows; for small
batches that read, not the arithmetic, sets the time, so rows decoded together cost little more
than one. *Continuous* (iteration-level) batching (Orca, Yu et al. 2022; vLLM) lets a request join
the running batch at the next step and leave it the step it finishes, rather than waiting for a
whole batch to drain.

The engine keeps one KV cache for ``max_batch`` rows (slots), shared by every request, and never
changes the model. A step feeds each busy row's newest token at the same cache position
``length``. The rows started at different times, so they hold different amounts of text; each
row's text is *right-aligned* at ``length`` with invalid positions before it::

    position     0  1  2  3  4  5  6  7 | length = 8: every row writes its next key here
    slot 0       a  a  a  a  a  a  a  a |  running since the start
    slot 1       .  .  .  .  .  b  b  b |  joined three steps ago
    slot 2       .  .  .  .  .  .  .  . |  free (its request finished)

The model counts a row's positions from its first valid position (a cumulative sum of
``cache.valid``) and never attends to an invalid one, so row b computes what it would alone: the
same positions, the same keys and values (only the matrix shapes of the batch differ, which
``tests/test_serve_batching.py`` shows changes no token). Joining: the prompts of the requests that
arrive together run through the model in a cache of their own (the *prefill*; left-padded, the
padding masked as in ``generate``), and each one's keys and values are copied into a free slot,
ending at ``length``. Leaving: the slot's positions are marked invalid and the slot is free for the
next request. When ``length`` reaches the cache's capacity (or half of it is unused), every row is
shifted left by the number of leading positions that no busy row uses (``_shift``); a request never
holds more than the capacity, so there is always room.

Sampling is per row, each request with its own ``torch.Generator``: a seeded request draws the
same random numbers whatever else shares its steps, so it gives the same text alone or batched.
"""

from __future__ import annotations

import collections
import copy
import logging
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from buildllm.errors import UserError
from buildllm.generation.fast_decode import fast_decoder
from buildllm.generation.sampling import cache_dtype, check_sampling, device_of, left_pad, sample_next_token

log = logging.getLogger(__name__)

# What a request hears from the engine: (token, None) for each token, (last token or None,
# finish reason) at the end. Reasons: "stop" (a stop id), "length" (max_tokens), "cancelled",
# "error". Called on the engine's thread: it must be quick and must not raise.
Listener = Callable[[int | None, str | None], None]


class QueueFull(Exception):
    """More requests wait than the engine accepts (the server answers 429)."""


class EngineClosed(Exception):
    """The engine is shutting down and takes no new request (the server answers 503)."""


@dataclass
class Sampling:
    """How one request picks its tokens and when it ends."""

    max_tokens: int
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None  # None: a fresh random seed
    stop_ids: tuple[int, ...] = ()

    def check(self) -> None:
        check_sampling(self.temperature, self.top_k, self.top_p, self.max_tokens)
        if self.max_tokens < 1:
            raise UserError(f"max_tokens must be at least 1, got {self.max_tokens}")


@dataclass(eq=False)
class Request:
    """One sequence being generated: its prompt, its settings, and where its tokens go."""

    prompt: list[int]
    sampling: Sampling
    listener: Listener
    tokens: list[int] = field(default_factory=list)  # generated so far
    slot: int | None = None  # its row of the shared cache while it decodes
    cached: int = 0  # positions it holds in the cache (prompt + fed tokens)
    finish_reason: str | None = None
    cancelled: bool = False  # set by any thread; the engine acts on it before its next step
    generator: torch.Generator | None = None


class BatchEngine:
    """Decodes many requests at once on one model; ``submit`` from any thread.

    ``run_forever`` (on a thread of its own, see ``start``) admits waiting requests and steps
    the batch until ``close``. Tests call ``step`` directly to decide who joins when.
    """

    def __init__(self, model: nn.Module, max_batch: int = 8, max_waiting: int = 64, capacity: int | None = None):
        if max_batch < 1 or max_waiting < 0:
            raise UserError(f"max_batch must be >= 1 and max_waiting >= 0, got {max_batch} and {max_waiting}")
        self.model = model.eval()
        self.capacity = min(capacity or model.cfg.context_length, model.cfg.context_length)
        self.max_waiting = max_waiting
        self.device = device_of(model)
        self.cache = model.new_kv_cache(max_batch, self.capacity, device=self.device, dtype=cache_dtype(model))
        self.cache.padded = True  # rows start at different positions from the first step on
        self.fast = fast_decoder(self.model)  # the decoding steps in C++ where that applies (generation/fast_decode.py)
        self.slots: list[Request | None] = [None] * max_batch
        self.waiting: collections.deque[Request] = collections.deque()
        self.counts = collections.Counter()  # finished requests by reason, for /health
        self._wake = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None

    # From any thread ------------------------------------------------------------------------------

    def submit(self, requests: list[Request]) -> None:
        """Queue requests (all or none); they join the batch at the next step with a free slot."""
        for r in requests:
            r.sampling.check()
            if not r.prompt or len(r.prompt) + r.sampling.max_tokens > self.capacity:
                raise UserError(f"prompt ({len(r.prompt)} tokens) plus max_tokens ({r.sampling.max_tokens}) must "
                                f"fit the context of {self.capacity} tokens")
        with self._wake:
            if self._closed:
                raise EngineClosed("the server is shutting down")
            if len(self.waiting) + len(requests) > self.max_waiting + self.free_slots():
                raise QueueFull(f"{len(self.waiting)} requests are waiting already; try again later")
            self.waiting.extend(requests)
            self._wake.notify()

    def cancel(self, request: Request) -> None:
        """Stop a request (its client went away); its slot is freed before the next step."""
        with self._wake:
            request.cancelled = True
            self._wake.notify()

    def free_slots(self) -> int:
        return sum(r is None for r in self.slots)

    def stats(self) -> dict:
        return {"running": len(self.slots) - self.free_slots(), "waiting": len(self.waiting),
                "max_batch": len(self.slots), "finished": dict(self.counts)}

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run_forever, name="buildllm-batching", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Cancel what is left and stop the loop (the server finished what it waited for first)."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()

    # The loop -------------------------------------------------------------------------------------

    def run_forever(self) -> None:
        while True:
            with self._wake:
                while not self._closed and not self.waiting and self.free_slots() == len(self.slots):
                    self._wake.wait()
                if self._closed:
                    break
            try:
                self.step()
            except Exception:  # a bug or out of memory: fail what runs, keep serving the next ones
                log.exception("decoding step failed")
                with self._wake:
                    failed, self.waiting = [*self.waiting, *self.slots], collections.deque()
                for r in failed:
                    if r is not None:
                        self._finish(r, None, "error")
                self.cache.length = 0  # every slot is free again: start the cache over
                self.cache.valid.fill_(True)
        for r in [*self.waiting, *(r for r in self.slots if r is not None)]:
            self._finish(r, None, "cancelled")

    @torch.inference_mode()
    def step(self) -> None:
        """Free the slots of cancelled requests, admit waiting ones, then decode one token for each row."""
        for r in self.slots:
            if r is not None and r.cancelled:
                self._finish(r, None, "cancelled")
        newcomers = []
        with self._wake:
            while self.waiting and len(newcomers) < self.free_slots():
                newcomers.append(self.waiting.popleft())
        for r in [r for r in newcomers if r.cancelled]:
            self._finish(r, None, "cancelled")
        newcomers = [r for r in newcomers if not r.cancelled]
        if newcomers:
            try:
                self._admit(newcomers)
            except Exception:
                for r in newcomers:
                    if r.finish_reason is None:
                        self._finish(r, None, "error")
                raise
        busy = [r for r in self.slots if r is not None]
        if busy:
            self._decode(busy)
        elif self.cache.length:  # nobody left: the next batch starts from an empty cache
            self._shift(-self.cache.length)

    def _admit(self, newcomers: list[Request]) -> None:
        """Prefill the newcomers' prompts (together, left-padded, in a cache of their own), sample
        their first tokens, and move their keys and values into free slots, ending at ``length``."""
        for r in newcomers:
            seed = r.sampling.seed if r.sampling.seed is not None else secrets.randbits(63)
            r.generator = torch.Generator(device=self.device).manual_seed(seed)
        prompts, padding = left_pad([r.prompt for r in newcomers], self.capacity, self.device)
        n = prompts.shape[1]
        fresh = self.model.new_kv_cache(len(newcomers), n, device=self.device, dtype=self.cache.keys.dtype)
        logits = self.model(prompts, kv_cache=fresh, padding=padding, last_only=True)[:, -1]
        joining = [i for i, r in enumerate(newcomers) if not self._take(r, logits[i : i + 1])]
        length = self.cache.length
        if joining and n > length:  # the prompts are longer than what the batch holds: make room on the left
            self._shift(n - length)
            length = n
        for i in joining:  # (a request done at its first token never needs a slot)
            slot = self.slots.index(None)
            self.cache.keys[:, slot, :, length - n : length] = fresh.keys[:, i]
            self.cache.values[:, slot, :, length - n : length] = fresh.values[:, i]
            self.cache.valid[slot, : length - n] = False
            self.cache.valid[slot, length - n : length] = fresh.valid[i]  # False on the left padding
            r = newcomers[i]
            r.slot, r.cached, self.slots[slot] = slot, len(r.prompt), r

    def _decode(self, busy: list[Request]) -> None:
        """One step: each busy row's newest token goes in at position ``length``, one token comes out."""
        # Every step attends over all `length` positions, used or not. Drop the leading ones that no
        # busy row uses when the cache is full (there is at least one: see the limit in submit), or
        # once they are half of it: each copy then saves at least as much attention as it costs.
        unused = self.cache.length - max(r.cached for r in busy)
        if unused and (self.cache.length == self.capacity or 2 * unused >= self.cache.length):
            self._shift(-unused)
        # Only the rows up to the last busy slot run (free slots below it run too, and are ignored).
        rows = max(r.slot for r in busy) + 1
        last = [0] * rows
        for r in busy:
            last[r.slot] = r.tokens[-1]
        view = copy.copy(self.cache)  # the same storage, the first `rows` rows
        view.keys, view.values, view.valid = self.cache.keys[:, :rows], self.cache.values[:, :rows], self.cache.valid[:rows]
        last = torch.tensor(last, device=self.device)
        logits = self.fast.step(last, view) if self.fast else self.model(last[:, None], kv_cache=view)[:, -1]
        self.cache.length = view.length
        for r in busy:
            r.cached += 1
            self._take(r, logits[r.slot : r.slot + 1])  # frees the slot when r is done

    def _take(self, r: Request, logits: torch.Tensor) -> bool:
        """Sample the request's next token from its own logits row and generator; True when it is done."""
        s = r.sampling
        token = int(sample_next_token(logits, s.temperature, s.top_k, s.top_p, r.generator)[0])
        r.tokens.append(token)
        reason = "stop" if token in s.stop_ids else "length" if len(r.tokens) >= s.max_tokens else None
        if reason:
            self._finish(r, token, reason)
        else:
            self._tell(r, token, None)
        return reason is not None

    def _finish(self, r: Request, token: int | None, reason: str) -> None:
        if r.slot is not None:
            self._free(r)
        r.finish_reason = reason
        self.counts[reason] += 1
        self._tell(r, token, reason)

    def _free(self, r: Request) -> None:
        self.cache.valid[r.slot, : self.cache.length] = False
        self.slots[r.slot], r.slot = None, None

    @staticmethod
    def _tell(r: Request, token: int | None, reason: str | None) -> None:
        try:
            r.listener(token, reason)
        except Exception:  # a listener's failure (its client is gone) must not stop the batch
            log.exception("request listener failed")
            r.cancelled = True

    def _shift(self, by: int) -> None:
        """Move every row's cached positions ``by`` to the right (``by`` < 0: to the left).

        Only leading invalid positions are dropped or added, so no row's position count changes.
        """
        c, length = self.cache, self.cache.length
        rows = 1 + max((r.slot for r in self.slots if r is not None), default=-1)  # free rows above: as they are
        src, dst = (slice(0, length), slice(by, length + by)) if by > 0 else (slice(-by, length), slice(0, length + by))
        for t in (c.keys, c.values):
            t[:, :rows, :, dst] = t[:, :rows, :, src].clone()
        c.valid[:rows, dst] = c.valid[:rows, src].clone()
        if by > 0:
            c.valid[:rows, :by] = False
        c.length = length + by
        c.valid[:, c.length :] = True  # where the next steps write: valid for the row writing it
