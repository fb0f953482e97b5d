"""Stage 1 of the pipeline: text to token ids, and back.

Four tokenizers share one small interface (``Tokenizer``, base.py): ``encode(text) -> list[int]``,
``decode(ids) -> str``, ``vocab_size``, ``eot_id``, ``save(path)`` and ``Tokenizer.load(path)``.

    word.py         ``WordTokenizer``: the book's first tokenizer (chapter 2), whole words and
                    punctuation from a corpus; it cannot represent words it has never seen
    bpe.py          ``get_tokenizer("gpt2")``: GPT-2's byte-level BPE run by tiktoken, built offline
                    from the ranks shipped in ``assets/``; ``train_bpe(text, vocab_size)``: a
                    byte-level BPE learned from your corpus. Every string round-trips exactly.
    huggingface.py  ``HFTokenizer``: a Hugging Face ``tokenizer.json`` (Llama 3, Qwen3, ...) run by
                    the tokenizers library, with its special tokens, stop tokens and chat template

``get_tokenizer`` takes a name, a saved tokenizer (any of the four) or a Hugging Face folder. Text
that merely *looks like* a special token (``<|endoftext|>``) is ordinary text unless the caller
allows it, so a document that quotes the marker can never inject a control token.
"""

from __future__ import annotations

import base64
import hashlib
import os
from functools import lru_cache
from pathlib import Path

from buildllm.errors import UserError
from buildllm.tokenizer.base import EOT, KINDS, UNK, AllowedSpecial, Tokenizer
from buildllm.tokenizer.bpe import (
    GPT2_PATTERN,
    BPETokenizer,
    byte_to_unicode,
    check_bpe_vocab_size,
    count_pretokens,
    learn_merges,
    train_bpe,
)
from buildllm.tokenizer.huggingface import HFTokenizer
from buildllm.tokenizer.word import WordTokenizer

__all__ = ["EOT", "GPT2_PATTERN", "GPT2_RANKS_PATH", "GPT2_RANKS_SHA256", "UNK", "AllowedSpecial", "BPETokenizer",
           "HFTokenizer", "Tokenizer", "WordTokenizer", "byte_to_unicode", "check_bpe_vocab_size",
           "count_pretokens", "get_tokenizer", "gpt2_tokenizer", "learn_merges", "load_gpt2_ranks", "train_bpe"]

GPT2_RANKS_PATH = Path(__file__).parent.parent / "assets" / "gpt2.tiktoken"
GPT2_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
BUILTIN_NAMES = ("gpt2",)


def load_gpt2_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    """Read a ``.tiktoken`` ranks file (``base64(token) rank`` per line) after checking its sha256."""
    path = Path(path)
    try:
        blob = path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read GPT-2 ranks {path}: {e.strerror}; reinstall buildllm") from None
    digest = hashlib.sha256(blob).hexdigest()
    if digest != GPT2_RANKS_SHA256:
        raise UserError(
            f"GPT-2 ranks {path} have sha256 {digest[:16]}..., expected {GPT2_RANKS_SHA256[:16]}...: "
            "the file is damaged or replaced; reinstall buildllm"
        )
    ranks = {}
    for line in blob.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


@lru_cache(maxsize=4)
def _gpt2_cached(path: str) -> BPETokenizer:
    return BPETokenizer(load_gpt2_ranks(path), {EOT: 50256}, name="gpt2", builtin="gpt2")


def gpt2_tokenizer() -> BPETokenizer:
    """GPT-2's tokenizer, built offline from the shipped ranks (cached per process)."""
    return _gpt2_cached(str(GPT2_RANKS_PATH))


KINDS["gpt2"] = lambda path, data: gpt2_tokenizer()  # saved by name: read back from the shipped ranks


def get_tokenizer(spec: str | os.PathLike | Tokenizer = "gpt2") -> Tokenizer:
    """A tokenizer by name (``"gpt2"``), by the path of a saved one, or passed through as is."""
    if isinstance(spec, Tokenizer):
        return spec
    if isinstance(spec, str) and spec in BUILTIN_NAMES:
        return gpt2_tokenizer()
    path = Path(spec)
    if path.is_file() or (path.is_dir() and (path / "tokenizer.json").is_file()):
        return Tokenizer.load(path)
    if isinstance(spec, str) and spec.startswith("bpe:"):
        raise UserError(f"{spec!r} is trained from a corpus: use `buildllm prepare INPUT "
                        f"--tokenizer {spec}` or buildllm.train_bpe(text, vocab_size)")
    raise UserError(f"unknown tokenizer {str(spec)!r}: use one of {', '.join(BUILTIN_NAMES)}, "
                    "or the path of a saved tokenizer.json (word, gpt2, bpe or Hugging Face's)")
