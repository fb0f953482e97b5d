"""From a conversation to the text a model continues, and the tokens at which its answer ends.

A conversation is a list of messages, ``{"role": "system" | "user" | "assistant", "content": str}``,
as in OpenAI's API. Three kinds of model lay it out three ways:

    a tokenizer with a chat template    its own template (Llama 3, Qwen3, ...), rendered by the tokenizer
    an instruction model                its prompt template (Alpaca, Phi-3, ...), one turn after another
    a base model                        a plain transcript ("User: ...\\nAssistant:") that it continues

``chat_prompt`` lays it out, ``chat_ids`` turns that text into the model's token ids, and
``stop_ids`` (the decoding loop's own, from ``sampling``) and ``stop_strings`` say where the answer
ends: the one place that decides, for ``buildllm chat`` and ``buildllm serve`` both.
"""

from __future__ import annotations

from collections.abc import Sequence

from buildllm.errors import UserError
from buildllm.generation.sampling import prompt_ids, stop_ids

__all__ = ["chat_ids", "chat_prompt", "check_messages", "prompt_ids", "stop_ids", "stop_strings"]

ROLES = ("system", "user", "assistant")
# A base model has learned no turns; it continues a transcript, and this is where its turn ends.
TRANSCRIPT_NAMES = {"system": "System", "user": "User", "assistant": "Assistant"}
TRANSCRIPT_STOP = "\nUser:"


def check_messages(messages: Sequence[dict]) -> list[dict]:
    """The messages as plain dicts, or a UserError naming the first one that is not a message."""
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise UserError("messages must be a non-empty list of {'role': ..., 'content': ...}")
    checked = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise UserError(f"messages[{i}] must have a role ({', '.join(ROLES)}) and a string content")
        checked.append({"role": m["role"], "content": m["content"]})
    return checked


def chat_prompt(messages: Sequence[dict], tokenizer, prompt_template=None, add_generation_prompt: bool = True) -> str:
    """The text the model continues with the assistant's next message.

    ``tokenizer``: when it has a chat template (``tokenizer.chat_template`` is not None), that
    template lays out the conversation. ``prompt_template``: an instruction model's
    ``PromptTemplate`` (or its JSON object); otherwise the plain transcript of a base model.
    """
    messages = check_messages(messages)
    if getattr(tokenizer, "chat_template", None) is not None:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    if prompt_template is not None:
        return _instruction_prompt(messages, prompt_template, add_generation_prompt)
    return _transcript(messages, add_generation_prompt)


def chat_ids(prompt: str, tokenizer) -> list[int]:
    """The token ids of ``chat_prompt``'s text.

    A chat template writes its control tokens (``<|im_start|>``, ``<|eot_id|>``, the bos token) as
    text, so they are encoded as the tokens they name and nothing is added in front, as transformers'
    ``apply_chat_template(..., tokenize=True)`` does. The other layouts are plain text, started
    like any prompt (``prompt_ids``).
    """
    if getattr(tokenizer, "chat_template", None) is not None:
        return tokenizer.encode(prompt, allowed_special="all") or [tokenizer.eot_id]
    return prompt_ids(tokenizer, prompt)


def _instruction_prompt(messages: list[dict], template, add_generation_prompt: bool) -> str:
    """Each user turn in the template's instruction, each answer after its response marker; a
    system message is the input of the first instruction (the templates' "context" slot)."""
    from buildllm.finetune.instruct import PromptTemplate

    if isinstance(template, dict):
        template = PromptTemplate.from_dict(template)
    system = "\n".join(m["content"] for m in messages if m["role"] == "system")
    text, waiting = "", False
    for m in messages:
        if m["role"] == "user":
            text += ("\n\n" if text else "") + template.format(m["content"], system)
            system, waiting = "", True
        elif m["role"] == "assistant":
            text += m["content"]
            waiting = False
    if not waiting:
        raise UserError("an instruction model answers a user message: end the messages with one")
    return text


def _transcript(messages: list[dict], add_generation_prompt: bool) -> str:
    lines = [f"{TRANSCRIPT_NAMES[m['role']]}: {m['content']}" for m in messages]
    if add_generation_prompt:
        lines.append(f"{TRANSCRIPT_NAMES['assistant']}:")
    return "\n".join(lines)


def stop_strings(tokenizer, prompt_template=None) -> list[str]:
    """Text that ends an answer besides the stop tokens: a base model's next "User:" turn."""
    if getattr(tokenizer, "chat_template", None) is not None or prompt_template is not None:
        return []
    return [TRANSCRIPT_STOP]
