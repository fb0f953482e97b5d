"""A model's chat template: the Jinja2 program that lays out a conversation in its own tokens.

Chat models learn one exact layout of turns, e.g. Llama 3's::

    <|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\\n\\n

and ship it as a Jinja2 template in ``tokenizer_config.json`` (``"chat_template"``) or in
``chat_template.jinja``. A template from a downloaded folder is untrusted code, so it runs in Jinja2's
``ImmutableSandboxedEnvironment``: no attribute that starts with an underscore, no method that
changes a list or a dict. Where the sandbox would quietly print nothing for ``''.__class__``, this
one refuses the whole template, so a template that reaches for Python internals never renders.

Otherwise the environment is transformers' (``utils/chat_template_utils.py``), so that a template
renders character for character as ``tokenizer.apply_chat_template(..., tokenize=False)`` does: the
same options (``trim_blocks``, ``lstrip_blocks``, loop controls), the same helpers
(``raise_exception``, ``strftime_now``, a ``tojson`` that does not escape HTML, ``dict``, a
``namespace`` without underscore names, the ``{% generation %}`` block) and the same variables
(``messages``, ``add_generation_prompt``, ``tools``, ``documents`` and the special tokens:
``bos_token``, ``eos_token``, ...).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import ClassVar

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.exceptions import SecurityError, TemplateError, TemplateSyntaxError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from buildllm.errors import UserError

CHAT_TEMPLATE_FILE = "chat_template.jinja"


class ChatTemplate:
    """A compiled chat template; ``render(messages, ...)`` gives the text the model reads."""

    def __init__(self, source: str, origin: str = "chat template"):
        if not isinstance(source, str) or not source.strip():
            raise UserError(f"{origin}: the chat template is empty; give the Jinja2 text of one")
        self.source, self.origin = source, origin
        try:
            self.template = _environment().from_string(source)
        except TemplateSyntaxError as e:
            raise UserError(f"{origin}: the chat template is not valid Jinja2 (line {e.lineno}: {e.message})") from None

    def render(self, messages: Sequence[Mapping], add_generation_prompt: bool = True,
               special_tokens: Mapping[str, str] | None = None, **variables) -> str:
        """The conversation laid out by the template.

        ``special_tokens``: ``{"bos_token": "<s>", "eos_token": "</s>", ...}``, as the template names
        them. ``variables``: whatever else the template reads (e.g. Qwen3's ``enable_thinking``);
        like transformers, they override the special tokens of the same name.
        """
        context = {"tools": None, "documents": None, **(special_tokens or {}), **variables}
        context = _plain(context)
        try:
            return self.template.render(messages=_plain(list(messages)),
                                        add_generation_prompt=bool(add_generation_prompt), **context)
        except SecurityError as e:
            raise UserError(f"{self.origin}: the chat template was refused: it tries to reach Python internals "
                            f"({e}); a template is untrusted code, use the model's published one") from None
        except TemplateError as e:  # raise_exception(...) in the template, or a template bug
            raise UserError(f"{self.origin}: the chat template stopped: {e}") from None

    def __repr__(self) -> str:
        return f"ChatTemplate({self.origin!r}, {len(self.source)} characters)"


def template_source(config: Mapping, origin: str, jinja_file: Path | None = None) -> str | None:
    """The chat template a tokenizer folder declares: ``chat_template.jinja`` if it exists (it wins,
    as in transformers), else ``tokenizer_config.json``'s ``chat_template``: a string, or a list of
    named templates of which "default" is the one for chat. None when there is none."""
    if jinja_file is not None and jinja_file.is_file():
        try:
            return jinja_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read the chat template {jinja_file}: {e}") from None
    template = config.get("chat_template")
    if template is None or isinstance(template, str):
        return template
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
        raise UserError(f"{origin}: chat_template lists templates named {sorted(map(str, named))} but none named "
                        "'default'; add one")
    raise UserError(f"{origin}: chat_template must be a string or a list of named templates, "
                    f"not {type(template).__name__}")


# The environment -----------------------------------------------------------------------------------


class StrictSandbox(ImmutableSandboxedEnvironment):
    """The sandbox, refusing outright: reading an unsafe attribute raises instead of giving an
    undefined value (which would print as nothing and let the template carry on)."""

    def unsafe_undefined(self, obj, attribute):
        raise SecurityError(f"access to attribute {attribute!r} of a {type(obj).__name__} is unsafe")


class GenerationBlock(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}``: transformers marks the assistant's tokens with it
    (for training masks); rendering text, the block is its body."""

    tags: ClassVar[set[str]] = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


class TemplateNamespace(jinja2.utils.Namespace):
    """Jinja2's ``namespace()``, refusing names with a leading underscore (a way into internals)."""

    def __init__(*args, **kwargs):  # Jinja's own signature trick, so that namespace(self=...) works
        self, attributes = args[0], dict(*args[1:], **kwargs)
        for name in attributes:
            TemplateNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, attributes)

    def __setitem__(self, name, value):
        TemplateNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise SecurityError(f"a namespace cannot hold {name!r} (names starting with '_' are refused)")


class TemplateDict:
    """``dict(...)`` for templates, without the class itself (its attributes lead out of the sandbox)."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


def raise_exception(message):
    raise TemplateError(message)


def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    """Jinja2's own ``tojson`` escapes <, > and & for HTML; chat templates want the JSON itself."""
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def strftime_now(format):
    return datetime.now().strftime(format)


@lru_cache(maxsize=1)
def _environment() -> StrictSandbox:
    env = StrictSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now, dict=TemplateDict(),
                       namespace=TemplateNamespace)
    return env


def _plain(value):
    """What a template may see: JSON's types only (str, numbers, lists, dicts, None), so that no
    object with methods of its own is handed to untrusted code."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):  # a subclass (an enum, say) may carry methods of its own: keep the value
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return f"<{type(value).__name__}>"
