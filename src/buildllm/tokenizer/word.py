"""The book's first tokenizer (chapter 2): whole words and punctuation.

A regex splits text into words and punctuation; the vocabulary is every distinct piece of a corpus
plus ``<|endoftext|>`` and ``<|unk|>``. Easy to read, but it cannot represent words it has never seen.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from buildllm.tokenizer.base import (
    EOT,
    UNK,
    AllowedSpecial,
    Tokenizer,
    _allowed_set,
    _checked,
)

# Split on punctuation, "--" and whitespace, keeping the separators (the capture group) so that
# punctuation becomes tokens of its own.
WORD_SPLIT = re.compile(r'([,.:;?_!"()\']|--|\s)')
# Undo the spaces that " ".join puts before punctuation.
WORD_JOIN = re.compile(r'\s+([,.:;?!"()\'])')


class WordTokenizer(Tokenizer):
    """A vocabulary of whole words and punctuation; anything unseen becomes ``<|unk|>``."""

    kinds = ("word",)

    def __init__(self, vocab: Sequence[str], name: str = "word"):
        if len(set(vocab)) != len(vocab):
            raise ValueError("vocabulary has duplicate entries")
        if EOT not in vocab or UNK not in vocab:
            raise ValueError(f"vocabulary must contain {EOT} and {UNK}")
        self.name = name
        self.id_to_token = list(vocab)
        self.token_to_id = {t: i for i, t in enumerate(self.id_to_token)}
        self.vocab_size = len(self.id_to_token)
        self.eot_id = self.token_to_id[EOT]
        self.unk_id = self.token_to_id[UNK]
        self.special_tokens = {EOT: self.eot_id, UNK: self.unk_id}

    @staticmethod
    def split(text: str) -> list[str]:
        """The book's pre-processing: words and punctuation, whitespace dropped."""
        return [piece for piece in WORD_SPLIT.split(text) if piece.strip()]

    @classmethod
    def from_text(cls, text: str | Iterable[str], name: str = "word") -> WordTokenizer:
        """Vocabulary = the sorted distinct pieces of ``text`` (or of each text), then EOT and UNK."""
        texts = [text] if isinstance(text, str) else text
        words: set[str] = set()
        for t in texts:
            words.update(cls.split(t))
        words -= {EOT, UNK}
        return cls([*sorted(words), EOT, UNK], name=name)

    def encode(self, text: str, allowed_special: AllowedSpecial = frozenset()) -> list[int]:
        allowed = _allowed_set(allowed_special, self.special_tokens)
        ids = []
        for piece in self.split(text):
            if piece in self.special_tokens and piece not in allowed:
                # a disallowed special is not a word of the corpus either
                ids.append(self.unk_id)
            else:
                ids.append(self.token_to_id.get(piece, self.unk_id))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        text = " ".join(self.id_to_token[i] for i in _checked(ids, self.vocab_size))
        return WORD_JOIN.sub(r"\1", text)

    def to_dict(self) -> dict:
        return {"type": "word", "name": self.name, "vocab": self.id_to_token}

    @classmethod
    def _from_dict(cls, data: dict) -> WordTokenizer:
        return cls(data["vocab"], name=data.get("name", "word"))
