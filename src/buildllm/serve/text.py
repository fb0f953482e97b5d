"""A request's tokens, as they arrive one by one, turned into text pieces safe to send.

Two things hold text back. A byte-level BPE token can end halfway through a UTF-8 character, so
the newest tokens are decoded together with a few before them and released only once they do
not end in half a character (the rule of ``generation.sampling.detokenize``, which pulls from an
iterator; a server is handed tokens instead, so this is its push form). And a stop string can
arrive split over several pieces, so the last ``len(stop) - 1`` characters wait until it is
clear they do not begin one. The text ends before the first stop string, which is not sent.
"""

from __future__ import annotations

from collections.abc import Sequence

from buildllm.generation.sampling import DETOKENIZE_CONTEXT, common_prefix


class TextOutput:
    """Feed tokens with ``add``; each call returns the text that may be sent now.

    ``tokens`` counts the tokens taken (the usage), up to and including the one that completed a
    stop string or was a stop id; ``stopped`` is True once either happened.
    """

    def __init__(self, tokenizer, prompt: Sequence[int], stop: Sequence[str] = (), stop_ids: Sequence[int] = ()):
        self.tokenizer, self.stop, self.stop_ids = tokenizer, [s for s in stop if s], set(stop_ids)
        self.tail, self.pending = list(prompt)[-DETOKENIZE_CONTEXT:], []
        self.shown = tokenizer.decode(self.tail)
        self.held = ""  # decoded, but maybe the start of a stop string
        self.tokens = 0
        self.stopped = False

    def add(self, token: int) -> str:
        if self.stopped:
            return ""
        self.tokens += 1
        if token in self.stop_ids:
            return self.finish(stopped=True)
        self.pending.append(token)
        text = self.tokenizer.decode(self.tail + self.pending)
        if text.endswith("\ufffd") or not text.startswith(self.shown):
            return ""  # wait for the rest of the character
        self.held += text[len(self.shown) :]
        self.tail, self.pending = (self.tail + self.pending)[-DETOKENIZE_CONTEXT:], []
        self.shown = self.tokenizer.decode(self.tail)
        return self._release()

    def finish(self, stopped: bool = False) -> str:
        """The rest of the text once no token follows (a half character is shown as it is)."""
        if self.pending:
            text = self.tokenizer.decode(self.tail + self.pending)
            self.held += text[len(self.shown) :] if text.startswith(self.shown) else text[len(common_prefix(text, self.shown)) :]
            self.pending = []
        out = self._release(final=True)
        self.stopped = self.stopped or stopped
        return out

    def _release(self, final: bool = False) -> str:
        cut = min((i for i in (self.held.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:  # a stop string: send what precedes it, nothing after
            out, self.held, self.stopped = self.held[:cut], "", True
            return out
        keep = 0 if final else max((len(s) - 1 for s in self.stop), default=0)
        out = self.held[: len(self.held) - keep] if keep else self.held
        self.held = self.held[len(out) :]
        return out

