"""Hugging Face tokenizers (``tokenizer.json``) behind buildllm's one tokenizer interface.

Llama 3, Qwen3, SmolLM2 and most models on the Hub ship their tokenizer as a ``tokenizer.json``
(the ``tokenizers`` library's format: normalizer, pre-tokenizer, BPE vocabulary and merges, added
tokens), and say what its special tokens mean in two more files:

    tokenizer_config.json     bos_token, eos_token, pad_token, added_tokens_decoder, chat_template
    generation_config.json    eos_token_id: one id or several (Llama 3 Instruct stops on three)
    chat_template.jinja       the chat template, when it is not in tokenizer_config.json

``HFTokenizer.from_folder`` reads them all; the ``tokenizers`` library (Rust) does the encoding.
``encode`` gives the ids of the text alone, as transformers' ``encode(text, add_special_tokens=False)``
does: the beginning-of-text token a model expects in front (Llama's ``<|begin_of_text|>``) is
``bos_id``, added by whoever starts a document (``generation.sampling.prompt_ids``; a chat template
writes it itself). ``decode`` is exact (no clean-up of spaces), so ``decode(encode(text)) == text``.

Saved (``save``) as one buildllm JSON that embeds the ``tokenizer.json`` and the special tokens and
chat template that came with it; ``Tokenizer.load`` reads it back.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from functools import cached_property
from pathlib import Path

from buildllm.chat_template import CHAT_TEMPLATE_FILE, ChatTemplate, template_source
from buildllm.errors import UserError
from buildllm.files import atomic_write_bytes, read_json_object, write_json
from buildllm.tokenizer.base import HUGGING_FACE, AllowedSpecial, Tokenizer, _checked

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
GENERATION_CONFIG = "generation_config.json"
# The special tokens a chat template may name, as transformers passes them (``special_tokens_map``).
NAMED_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# Where no config names the end of text, these spellings do (GPT-2 and Qwen, Llama 3, Llama 2).
END_OF_TEXT_SPELLINGS = ("<|endoftext|>", "<|end_of_text|>", "</s>")


class HFTokenizer(Tokenizer):
    """A ``tokenizers.Tokenizer`` with the special tokens and chat template of its folder.

    ``eot_id``: the end-of-sequence token (``eos_token``). ``stop_ids``: every token that ends an
    answer (generation_config.json's ``eos_token_id``s and ``eos_token``). ``bos_id``: the token a
    document starts with when the tokenizer's own post-processor puts one there, else None.
    ``chat_template``: the template's Jinja2 text, or None.
    """

    kinds = (HUGGING_FACE,)

    def __init__(self, tokenizer_json: str | Mapping, config: Mapping | None = None,
                 generation_config: Mapping | None = None, chat_template: str | None = None,
                 name: str = "huggingface", origin: str | None = None):
        from tokenizers import Tokenizer as Backend

        origin = origin or name
        text = tokenizer_json if isinstance(tokenizer_json, str) else json.dumps(tokenizer_json, ensure_ascii=False)
        try:
            self.backend = Backend.from_str(text)
        except Exception as e:  # noqa: BLE001 (the Rust side raises a bare Exception for a malformed file)
            raise UserError(f"{origin} is not a tokenizers tokenizer.json: {e}") from None
        self.name, self.origin = name, origin
        self.config = dict(config or {})
        self.generation_config = dict(generation_config or {})
        _add_declared_tokens(self.backend, self.config, origin)

        added = self.backend.get_added_tokens_decoder()
        self.special_tokens = {t.content: i for i, t in sorted(added.items()) if t.special}
        self.vocab_size = max([self.backend.get_vocab_size(with_added_tokens=False), *(i + 1 for i in added)])
        self.named_tokens = {k: t for k in NAMED_TOKENS if (t := _token_text(self.config.get(k))) is not None}
        self.eot_id = self._end_of_text_id()
        self.stop_ids = self._stop_ids()
        self.bos_id = self._bos_id()
        self.chat_template = chat_template
        self._template = ChatTemplate(chat_template, f"{origin} chat template") if chat_template is not None else None
        self._special_pattern = (re.compile("|".join(map(re.escape, sorted(self.special_tokens, key=len, reverse=True))))
                                 if self.special_tokens else None)

    @cached_property
    def plain_backend(self):
        """The same tokenizer reading special tokens spelled in the text as plain text (made when
        first needed: a large vocabulary takes a moment to build)."""
        plain = type(self.backend).from_str(self.backend.to_str())
        plain.encode_special_tokens = True
        return plain

    @classmethod
    def from_folder(cls, path: str | os.PathLike) -> HFTokenizer:
        """The tokenizer of a Hugging Face folder (or the folder of the ``tokenizer.json`` given)."""
        path = Path(path)
        folder = path.parent if path.is_file() else path
        tokenizer_file = path if path.is_file() else folder / TOKENIZER_JSON
        try:
            text = tokenizer_file.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise UserError(f"no {TOKENIZER_JSON} in {folder}: give a Hugging Face tokenizer folder") from None
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read {tokenizer_file}: {e}") from None
        config_file, generation_file = folder / TOKENIZER_CONFIG, folder / GENERATION_CONFIG
        config = read_json_object(config_file, "tokenizer config") if config_file.is_file() else {}
        generation = read_json_object(generation_file, "generation config") if generation_file.is_file() else {}
        template = template_source(config, str(config_file), folder / CHAT_TEMPLATE_FILE)
        return cls(text, config, generation, template, name=folder.name or "huggingface", origin=str(tokenizer_file))

    # Encoding and decoding --------------------------------------------------------------------------

    def encode(self, text: str, allowed_special: AllowedSpecial = frozenset()) -> list[int]:
        """The ids of ``text``; special tokens spelled in it are tokens only when allowed (the names
        in ``allowed_special``, or "all"), plain text otherwise."""
        if allowed_special == "all" or not self._special_pattern:
            return self.backend.encode(text, add_special_tokens=False).ids
        if not allowed_special:
            return self.plain_backend.encode(text, add_special_tokens=False).ids
        ids, start = [], 0
        for match in self._special_pattern.finditer(text):
            if match.group() in allowed_special:
                ids += self.plain_backend.encode(text[start:match.start()], add_special_tokens=False).ids
                ids.append(self.special_tokens[match.group()])
                start = match.end()
        return ids + self.plain_backend.encode(text[start:], add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str], allowed_special: AllowedSpecial = frozenset()) -> list[list[int]]:
        """Many texts at once, on the tokenizers library's threads."""
        if allowed_special == "all" or not allowed_special or not self._special_pattern:
            backend = self.backend if allowed_special == "all" else self.plain_backend
            return [e.ids for e in backend.encode_batch(list(texts), add_special_tokens=False)]
        return super().encode_batch(texts, allowed_special)

    def decode(self, ids: Iterable[int]) -> str:
        return self.backend.decode(_checked(ids, self.vocab_size), skip_special_tokens=False)

    def apply_chat_template(self, messages: Sequence[Mapping], add_generation_prompt: bool = True,
                            **variables) -> str:
        """The conversation laid out by the model's chat template (the text, as transformers'
        ``apply_chat_template(messages, tokenize=False)`` gives it). ``variables``: what else the
        template reads, e.g. ``enable_thinking=False`` for Qwen3."""
        if self._template is None:
            raise UserError(f"{self.origin} has no chat template: add one to {TOKENIZER_CONFIG} or "
                            f"{CHAT_TEMPLATE_FILE}")
        return self._template.render(messages, add_generation_prompt, self.named_tokens, **variables)

    # Saving -----------------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return {"type": HUGGING_FACE, "name": self.name, "tokenizer": json.loads(self.backend.to_str()),
                "config": self.config, "generation_config": self.generation_config,
                "chat_template": self.chat_template}

    def save_hf_files(self, directory: str | os.PathLike) -> Path:
        """Write tokenizer.json and tokenizer_config.json (with the chat template), the files that
        ``transformers.AutoTokenizer.from_pretrained(directory)`` reads. The stop ids beyond
        ``eos_token`` belong in the model's generation_config.json."""
        directory = Path(directory)
        atomic_write_bytes(directory / TOKENIZER_JSON, self.backend.to_str().encode("utf-8"))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", **self.config}
        config.pop("chat_template", None)
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        write_json(directory / TOKENIZER_CONFIG, config)
        return directory

    @classmethod
    def _read(cls, path: Path, data: dict) -> HFTokenizer:
        """buildllm's saved form, or the tokenizers library's own tokenizer.json with its folder."""
        return cls._from_dict(data) if "type" in data else cls.from_folder(path)

    @classmethod
    def _from_dict(cls, data: dict) -> HFTokenizer:
        return cls(data["tokenizer"], data.get("config"), data.get("generation_config"), data.get("chat_template"),
                   name=data.get("name", "huggingface"))

    # What the configs say ---------------------------------------------------------------------------

    def _id_of(self, token: str, what: str) -> int:
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise UserError(f"{self.origin}: {what} {token!r} is not in the vocabulary")
        return token_id

    def _end_of_text_id(self) -> int:
        if "eos_token" in self.named_tokens:
            return self._id_of(self.named_tokens["eos_token"], "eos_token")
        ids = _id_list(self.generation_config.get("eos_token_id"), self.origin)
        if ids:
            return ids[0]
        for spelling in END_OF_TEXT_SPELLINGS:
            if (token_id := self.backend.token_to_id(spelling)) is not None:
                return token_id
        raise UserError(f"{self.origin}: no end-of-text token is named: set eos_token in {TOKENIZER_CONFIG}")

    def _stop_ids(self) -> tuple[int, ...]:
        ids = [self.eot_id, *_id_list(self.generation_config.get("eos_token_id"), self.origin)]
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise UserError(f"{self.origin}: eos_token_id {i} is outside the vocabulary (0..{self.vocab_size - 1})")
        return tuple(dict.fromkeys(ids))

    def _bos_id(self) -> int | None:
        """The token a document starts with: tokenizer_config.json's bos_token when its
        ``add_bos_token`` says so, else the one the post-processor puts before a text (what
        transformers' ``encode`` adds), if any."""
        add_bos = self.config.get("add_bos_token")
        if add_bos is False:
            return None
        if add_bos is True and "bos_token" in self.named_tokens:
            return self._id_of(self.named_tokens["bos_token"], "bos_token")
        bare = self.backend.encode("a", add_special_tokens=False).ids
        full = self.backend.encode("a", add_special_tokens=True).ids
        if len(full) > len(bare) and full[1 : 1 + len(bare)] == bare:
            return full[0]
        return None


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken's object."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _id_list(value, origin: str) -> list[int]:
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise UserError(f"{origin}: eos_token_id must be a token id or a list of them, got {value!r}")
    return list(values)


def _add_declared_tokens(backend, config: Mapping, origin: str) -> None:
    """Add tokenizer_config.json's ``added_tokens_decoder`` entries that tokenizer.json lacks (as
    transformers does), each at the id the config gives it."""
    from tokenizers import AddedToken

    declared = config.get("added_tokens_decoder") or {}
    if not isinstance(declared, Mapping):
        raise UserError(f"{origin}: added_tokens_decoder must map ids to tokens")
    for key, entry in sorted(declared.items(), key=lambda kv: int(kv[0]) if str(kv[0]).isdigit() else -1):
        if not str(key).isdigit() or not isinstance(entry, Mapping) or _token_text(entry) is None:
            raise UserError(f"{origin}: added_tokens_decoder entry {key!r} is not an id and a token")
        content, token_id = _token_text(entry), int(key)
        existing, free = backend.token_to_id(content), backend.get_vocab_size(with_added_tokens=True)
        if existing == token_id:
            continue
        if existing is not None or token_id != free:
            where = f"has it at {existing}" if existing is not None else f"has its next free id at {free}"
            raise UserError(f"{origin}: added_tokens_decoder puts {content!r} at id {token_id}, but tokenizer.json "
                            f"{where}")
        options = {k: bool(entry.get(k, False)) for k in ("single_word", "lstrip", "rstrip", "normalized")}
        token = AddedToken(content, **options, special=bool(entry.get("special", False)))
        (backend.add_special_tokens if token.special else backend.add_tokens)([token])
