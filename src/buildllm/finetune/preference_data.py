"""Preference pairs for DPO: a prompt, the answer preferred (chosen) and the one not (rejected).

Records come from a JSON array or JSON lines, in either of two forms::

    {"prompt": "...", "chosen": "...", "rejected": "..."}
    {"instruction": "...", "input": "...", "chosen": "...", "rejected": "..."}

A ``prompt`` is used as it is. An ``instruction`` (with its optional ``input``) is laid out with a
prompt template, exactly as instruction tuning lays it out, so the book's preference data (records
with instruction, input, output, chosen and rejected; ``output`` is not used) works as it is.

Each pair becomes two token sequences that share the prompt: prompt + chosen + end-of-text and
prompt + rejected + end-of-text. Only the answers' tokens, end-of-text included, are scored: the
prompt and the padding are masked out of the targets (the collate function is instruction
tuning's, with the prompt masked).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from buildllm.errors import UserError
from buildllm.finetune.instruct import (
    PromptTemplate,
    collate_instruction,
    read_json_records,
)


@dataclass(frozen=True)
class PreferencePair:
    """One record: the prompt (or the instruction and input to make it from) and its two answers."""

    chosen: str
    rejected: str
    prompt: str | None = None  # used as it is; None: made from instruction and input
    instruction: str = ""
    input: str = ""
    where: str = ""  # "prefs.json:12: record 3", for messages

    def prompt_text(self, template: PromptTemplate) -> str:
        return self.prompt if self.prompt is not None else template.format(self.instruction, self.input)


def read_preference_data(path: str | Path) -> list[PreferencePair]:
    """The preference pairs in a JSON array or JSON lines file (see the module docstring).

    A bad record stops the reading with one line naming the file, the line and the record's
    index (counted from 0, as in ``data[3]``).
    """
    path = Path(path)
    pairs = []
    for index, (line, record) in enumerate(read_json_records(path)):
        where = f"{path}:{line}: record {index}"
        if not isinstance(record, dict):
            raise UserError(f"{where}: a record must be a JSON object with prompt (or instruction), chosen "
                            "and rejected")
        for key in ("prompt", "instruction", "input", "chosen", "rejected"):
            if record.get(key) is not None and not isinstance(record[key], str):
                raise UserError(f"{where}: {key!r} must be a string, not {type(record[key]).__name__}")
        for key in ("chosen", "rejected"):
            if record.get(key) is None:
                raise UserError(f"{where}: the record has no {key!r} answer: each record needs chosen and "
                                "rejected")
        if (record.get("prompt") is None) == (record.get("instruction") is None):
            raise UserError(f"{where}: give the record a 'prompt' or an 'instruction' (with an optional "
                            "'input'), one of the two")
        if record["chosen"] == record["rejected"]:
            raise UserError(f"{where}: chosen and rejected are the same answer: a pair must differ")
        pairs.append(PreferencePair(record["chosen"], record["rejected"], record.get("prompt"),
                                    record.get("instruction") or "", record.get("input") or "", where))
    if not pairs:
        raise UserError(f"{path} has no records")
    return pairs


EncodedPair = tuple[list[int], list[int], list[int]]  # prompt, chosen and rejected token ids


def encode_preferences(pairs: Sequence[PreferencePair], tokenizer, template: PromptTemplate,
                       max_length: int) -> list[EncodedPair]:
    """Token ids of each pair, checked against a window of ``max_length`` input tokens.

    The prompt is encoded on its own, exactly as at inference time. Targets are the inputs shifted
    by one, so a window scores the answer tokens that follow the prompt's last ``max_length``-th
    position; an answer running past it is cut (by the collate function). A pair is refused when
    an answer encodes to no tokens, when the prompt leaves no answer token inside the window, or
    when the two answers are the same inside it.
    """
    prompts = tokenizer.encode_batch([p.prompt_text(template) for p in pairs])
    chosen = tokenizer.encode_batch([p.chosen for p in pairs])
    rejected = tokenizer.encode_batch([p.rejected for p in pairs])
    eot = tokenizer.eot_id
    for pair, prompt, *answers in zip(pairs, prompts, chosen, rejected):
        for name, ids in zip(("chosen", "rejected"), answers):
            if not ids:
                raise UserError(f"{pair.where}: the {name} answer {getattr(pair, name)!r} encodes to no tokens")
        if not prompt:
            raise UserError(f"{pair.where}: the prompt encodes to no tokens: the answers need a prompt to follow")
        room = max_length + 1 - len(prompt)  # answer tokens (end-of-text included) the window scores
        if room < 1:
            raise UserError(f"{pair.where}: the prompt takes {len(prompt)} tokens and leaves no room for the "
                            f"answer in the {max_length}-token window (the context, or --max-length): shorten "
                            "the prompt")
        a, b = ((ids + [eot])[:room] for ids in answers)
        if a == b:
            raise UserError(f"{pair.where}: chosen and rejected are the same "
                            + ("tokens" if len(a) < room else f"in the {room} tokens the window leaves after "
                               "the prompt") + ": a pair must differ")
    return list(zip(prompts, chosen, rejected))


def collate_preference(batch: Sequence[EncodedPair], pad_id: int,
                       allowed_max_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, targets)``, each ``(pairs, 2, tokens)``: ``[:, 0]`` holds prompt + chosen answer,
    ``[:, 1]`` prompt + rejected answer, padded to one width so both go through the model at once.

    Instruction tuning's collate makes each sequence: the answer gets its end-of-text token,
    targets are the inputs shifted by one, and only the answer's targets are scored (the prompt's
    and the padding's are ``IGNORE_INDEX``).
    """
    sequences = [(prompt + answer, len(prompt)) for prompt, chosen, rejected in batch for answer in (chosen, rejected)]
    inputs, targets = collate_instruction(sequences, pad_id, allowed_max_length=allowed_max_length, mask_prompt=True)
    return inputs.view(len(batch), 2, -1), targets.view(len(batch), 2, -1)
