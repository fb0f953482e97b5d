"""The one tokenizer interface, and reading any saved tokenizer back (``Tokenizer.load``).

Special tokens: text that merely *looks like* ``<|endoftext|>`` is encoded as ordinary text unless the
caller allows it (``allowed_special={"<|endoftext|>"}`` or ``"all"``). That way a document that
quotes the marker can never inject a control token, and encoding user text never raises.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Sequence
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import ClassVar, Literal

from buildllm.errors import UserError
from buildllm.files import atomic_write_bytes

EOT = "<|endoftext|>"
UNK = "<|unk|>"
HUGGING_FACE = "huggingface"

AllowedSpecial = AbstractSet[str] | Literal["all"]

# "type" of a saved tokenizer -> what reads it back, ``read(path, data)`` (each subclass adds its ``kinds``)
KINDS: dict[str, Callable[[Path, dict], Tokenizer]] = {}


class Tokenizer:
    """What every tokenizer offers. Subclasses implement encode, decode, ``to_dict`` and
    ``_from_dict``, and name in ``kinds`` the "type"s of the saved forms they read back.

    ``eot_id`` ends a text (and separates documents). Chat models' tokenizers (``HFTokenizer``)
    also name ``stop_ids``, the tokens that end an answer, ``bos_id``, the token a document starts
    with, and a ``chat_template``; the tokenizers here have none of those.
    """

    name: str
    vocab_size: int
    eot_id: int
    special_tokens: dict[str, int]
    stop_ids: tuple[int, ...] = ()
    bos_id: int | None = None
    chat_template: str | None = None
    kinds: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for kind in cls.__dict__.get("kinds", ()):
            KINDS[kind] = cls._read

    def encode(self, text: str, allowed_special: AllowedSpecial = frozenset()) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def encode_batch(
        self, texts: Sequence[str], allowed_special: AllowedSpecial = frozenset()
    ) -> list[list[int]]:
        return [self.encode(t, allowed_special) for t in texts]

    def to_dict(self) -> dict:
        raise NotImplementedError

    def fingerprint(self) -> str:
        """sha256 of the saved form: two tokenizers with the same fingerprint encode identically."""
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()

    def save(self, path: str | os.PathLike) -> Path:
        """Write the tokenizer as one JSON file (atomically); ``Tokenizer.load`` reads it back."""
        path = Path(path)
        atomic_write_bytes(path, json.dumps(self.to_dict(), ensure_ascii=False).encode("utf-8"))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """Load any saved tokenizer (a tokenizer.json, or a folder holding one): buildllm's own, or
        a Hugging Face ``tokenizer.json`` (read with the configs of its folder)."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UserError(f"no tokenizer at {path}: give a saved tokenizer.json") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"cannot read tokenizer {path}: {e}") from None
        kind = data.get("type") if isinstance(data, dict) else None
        if kind is None and isinstance(data, dict) and "model" in data:
            kind = HUGGING_FACE  # the tokenizers library's own file: a model, and no "type" of ours
        if kind not in KINDS:
            raise UserError(f"{path} is not a buildllm tokenizer (type {kind!r}); expected one of "
                            f"{', '.join(KINDS)}")
        try:
            tok = KINDS[kind](path, data)
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"tokenizer file {path} is damaged: {e!r}") from None
        if not isinstance(tok, cls):
            raise UserError(f"{path} holds a {type(tok).__name__}, not a {cls.__name__}")
        return tok

    @classmethod
    def _read(cls, path: Path, data: dict) -> Tokenizer:
        """The tokenizer a file of one of ``kinds`` holds (``data``: its JSON)."""
        return cls._from_dict(data)

    @classmethod
    def _from_dict(cls, data: dict) -> Tokenizer:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size})"


def _checked(ids: Iterable[int], vocab_size: int) -> list[int]:
    ids = [int(i) for i in ids]
    if ids and not 0 <= min(ids) <= max(ids) < vocab_size:
        bad = next(i for i in ids if not 0 <= i < vocab_size)
        raise ValueError(f"token id {bad} is outside the vocabulary (0..{vocab_size - 1})")
    return ids


def _allowed_set(allowed_special: AllowedSpecial, specials: dict[str, int]) -> AbstractSet[str]:
    if allowed_special == "all":
        return specials.keys()
    return allowed_special

