"""Command-line options generated from config dataclasses: each default is written once, in the class.

A field becomes a ``--field-name`` option::

    temperature: float = 0.0  # divide the logits by T before sampling; 0 = greedy

gives ``--temperature T`` (a float) whose help text is the trailing comment (or
``field(metadata={"help": ...})``) and whose default is shown as "(default: 0.0)". The type comes
from the annotation: ``int``/``float``/``str``, ``bool`` (``--x`` and ``--no-x``), ``Literal[...]``
(choices), ``tuple[X, ...]`` (one or more values) and any of them ``| None``.

The parser itself never holds a default (``argparse.SUPPRESS``): an option the user did not type
is simply absent from the parsed namespace. That is what lets a command layer the options over a
config file, and it means the dataclass is the only place a default lives. ``given(args, cls)``
returns the options typed; ``complete(args, cls)`` fills the rest from the dataclass.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import io
import sys
import textwrap
import tokenize
import types
import typing
from typing import Any, Literal

from buildllm.errors import UserError


def field_help(cls) -> dict[str, str]:
    """``{field name: help}`` from ``metadata["help"]`` or the field's trailing ``# comment``.

    Fields inherited from dataclass bases are read from the base's own source.
    """
    helps: dict[str, str] = {}
    for klass in reversed(cls.__mro__):  # a subclass's comment wins over its base's
        if dataclasses.is_dataclass(klass) and klass is not object:
            helps.update(_trailing_comments(klass))
    for f in dataclasses.fields(cls):
        if "help" in f.metadata:
            helps[f.name] = f.metadata["help"]
    return helps


def _trailing_comments(klass) -> dict[str, str]:
    try:
        source = textwrap.dedent(inspect.getsource(klass))
    except (OSError, TypeError):  # defined in a REPL or built by make_dataclass: no source to read
        return {}
    # ast knows which lines declare which field (a declaration may span lines: take its last);
    # tokenize knows where the comments are. Only a comment after code on the same line counts,
    # so section comments ("# Batches.") above a group of fields are not taken for help.
    tree = ast.parse(source).body[0]
    last_line = {node.end_lineno: node.target.id for node in tree.body
                 if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)}
    comments, code_lines = {}, set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT):
            code_lines.add(tok.start[0])
    return {name: comments[line] for line, name in last_line.items() if line in comments and line in code_lines}


@dataclasses.dataclass
class OptionType:
    """What argparse needs to know about one field's annotation."""

    kind: type | None  # converts the text typed (int, float, str); None for bool
    choices: tuple | None = None  # from a Literal
    many: bool = False  # a tuple: one or more values


def option_type(annotation) -> OptionType | None:
    """The option type of an annotation, or None if it cannot be typed on a command line (a dict)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        rest = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(rest) != 1:
            return None  # e.g. bool | Literal["auto"]: the command declares it by hand
        annotation = rest[0]
    if annotation is bool:
        return OptionType(None)
    if annotation in (int, float, str):
        return OptionType(annotation)
    if typing.get_origin(annotation) is Literal:
        choices = typing.get_args(annotation)
        return OptionType(type(choices[0]), choices=choices)
    if typing.get_origin(annotation) is tuple:
        inner = option_type(typing.get_args(annotation)[0])
        return dataclasses.replace(inner, many=True) if inner and inner.kind else None
    return None


def _default_of(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


class Once(argparse.Action):
    """Store a value, refusing a second, different one (``--model A --checkpoint B``).

    A UserError, not a parser error: ``main`` parses inside its ``try``, so it is one line, exit 2.
    """

    def __init__(self, *args, name: str, **kw):
        super().__init__(*args, **kw)
        self.name = name  # the option's shown name, whichever alias was typed

    def __call__(self, parser, namespace, values, option_string=None):
        before = getattr(namespace, self.dest, None)
        if before is not None and before != values:
            raise UserError(f"give one {self.name.lstrip('-')}, not two: {before} and {values}")
        setattr(namespace, self.dest, values)


def add_options(parser, cls, *, skip=(), flags: dict | None = None, aliases: dict | None = None,
                metavars: dict | None = None, once=(), extra_help: dict | None = None) -> list[str]:
    """Add one option per field of the dataclass ``cls`` to ``parser``; return the fields left out.

    ``skip``: fields the command declares itself. ``flags``: field -> the option's name when it is
    not ``--field-name``. ``aliases``: field -> older names that still work but are not shown in
    ``--help``. ``once``: fields that may be given once only, under any of their names.
    ``extra_help``: field -> help, for fields that have no comment in the class yet.
    """
    flags, aliases, metavars = flags or {}, aliases or {}, metavars or {}
    helps = {**(extra_help or {}), **field_help(cls)}
    hints = typing.get_type_hints(cls)
    left_out = []
    for f in dataclasses.fields(cls):
        kind = option_type(hints[f.name])
        if f.name in skip or kind is None:
            left_out.append(f.name)
            continue
        flag = flags.get(f.name, "--" + f.name.replace("_", "-"))
        default = _default_of(f)
        text = helps.get(f.name, "")
        if "(default" in text or default in (None, "", ()):
            pass  # the comment says it already, or there is nothing to show
        elif kind.kind is not None:
            shown = ",".join(map(str, default)) if kind.many else default
            text += f" (default: {shown})"
        elif default:  # a bool that is on unless --no-x
            text += " (default: on)"
        common = dict(dest=f.name, default=argparse.SUPPRESS)
        if kind.kind is None:  # bool: --x turns it on, --no-x off, whatever the config file says
            spec = dict(action=argparse.BooleanOptionalAction, help=text.strip())
        else:
            spec = dict(type=kind.kind, choices=kind.choices, nargs="+" if kind.many else None,
                        metavar=metavars.get(f.name, _metavar(f.name, kind)), help=text.strip())
            if f.name in once:
                spec["action"] = functools.partial(Once, name=flag)
        parser.add_argument(flag, **common, **spec)
        for alias in aliases.get(f.name, ()):
            parser.add_argument(alias, **common, **{**spec, "help": argparse.SUPPRESS})
    return left_out


def _metavar(name: str, kind: OptionType) -> str | None:
    if kind.choices:
        return "{" + ",".join(map(str, kind.choices)) + "}"
    return {int: "N", float: "X"}.get(kind.kind, name.split("_")[-1].upper())


def given(args: argparse.Namespace, cls) -> dict[str, Any]:
    """The fields of ``cls`` that were typed on the command line, tuples as tuples."""
    out = {}
    for f in dataclasses.fields(cls):
        if hasattr(args, f.name):
            value = getattr(args, f.name)
            out[f.name] = tuple(value) if isinstance(value, list) else value
    return out


def complete(args: argparse.Namespace, cls) -> Any:
    """The options as a ``cls`` instance: what was typed, the dataclass's defaults for the rest.

    The namespace gets the same values, so code that reads ``args.x`` sees the defaults too.
    """
    options = cls(**given(args, cls))
    for f in dataclasses.fields(cls):
        setattr(args, f.name, getattr(options, f.name))
    return options


MODEL_HELP = ("give a model: --model PATH_OR_ID, a folder written by buildllm train or finetune, GPT-2 "
              "weights (gpt2 ... gpt2-xl, a Hugging Face or OpenAI folder) or a Hugging Face id "
              "(--checkpoint and --pretrained are older names of --model)")


def need_model(args: argparse.Namespace) -> str:
    """``args.model``, or the error that says how to name one."""
    if not args.model:
        raise UserError(MODEL_HELP)
    return args.model


OLD_MODEL_FLAGS = ["--checkpoint", "--pretrained"]  # what the inference commands called --model before


def options(parser, cls, **kw) -> None:
    """Add ``cls``'s fields as options; the parsed namespace is completed from ``cls`` in ``main``."""
    add_options(parser, cls, **kw)
    parser.set_defaults(options=cls)


def model_options(p, cls, model_help: str | None = None) -> None:
    """``cls``'s options, with ``--model`` also answering to its old names and given at most once."""
    options(p, cls, aliases={"model": OLD_MODEL_FLAGS}, once={"model"}, metavars={"model": "PATH_OR_ID"},
            extra_help={"model": model_help} if model_help else None)


def load_for_inference(args):
    """The one loader's ``(model, tokenizer)`` (with what else the folder held, e.g. its prompt
    template) for the inference commands, in eval mode on ``args.device``."""
    import torch

    from buildllm.training.runtime import pick_device
    from buildllm.weights.loader import load_model

    need_model(args)
    if args.dtype != "auto" and args.quantize:
        raise UserError(f"--quantize {args.quantize} chooses how the weights are stored: drop --dtype {args.dtype}")
    device = pick_device(args.device)
    if args.quantize and device.type != "cpu":
        print(f"note: PyTorch's {args.quantize} kernels are CPU-only; on {device.type} the weights are "
              "dequantized at every step, which is slower than bf16 weights", file=sys.stderr)
    # The one loader decides what the folder is and whether its vocabulary fits the tokenizer;
    # --dtype auto keeps the dtype the weights are stored in (a bf16 Llama stays bf16).
    dtype = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    loaded = load_model(args.model, device=device, dtype=dtype, quantize=args.quantize)
    model, tokenizer = loaded
    if tokenizer is None:
        raise UserError(f"{args.model} has no tokenizer saved with it: save the tokenizer with the model "
                        "(a GPT-2 with GPT-2's vocabulary needs none)")
    model.eval()
    return loaded


# The options of the commands that run a model ---------------------------------------------------
# Shared pieces are base classes: every command that loads a model names it the same way.


@dataclasses.dataclass
class ModelOptions:
    model: str | None = None  # a buildllm run or checkpoint folder, a Hugging Face GPT-2 folder or id (gpt2 ... gpt2-xl), or an OpenAI TensorFlow folder
    device: str = "auto"  # auto (cuda, else mps, else cpu), cpu, cuda, cuda:N or mps


@dataclasses.dataclass
class InferenceOptions(ModelOptions):
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # the weights' precision; auto keeps the stored one
    quantize: Literal["int8", "int4"] | None = None  # store the weights as 8- or 4-bit integers for faster generation on CPU: int8 is nearly lossless, int4 faster still and coarser (see README)


@dataclasses.dataclass
class SamplingOptions(InferenceOptions):
    max_new_tokens: int = 100  # tokens to generate
    temperature: float = 0.0  # divide the logits by T before sampling; 0 = greedy, always the likeliest token
    top_k: int | None = None  # sample only among the K likeliest tokens
    top_p: float | None = None  # sample only among the likeliest tokens that together hold probability P (nucleus sampling)
    seed: int | None = None  # seed the sampler for reproducible output
    stop: str | None = None  # end the answer where the text produced contains this string (it is not printed)
    cache: bool = True  # reuse the context's keys and values (KV cache); --no-cache recomputes the whole context every step (slower)


@dataclasses.dataclass
class GenerateOptions(SamplingOptions):
    prompt: str = ""  # the text to continue (default: empty, a new document)
    num_samples: int = 1  # how many continuations to print


@dataclasses.dataclass
class EvalOptions(InferenceOptions):
    data: str | None = None  # a UTF-8 text file to compute perplexity on
    stride: int = 512  # slide the context window by N tokens; each token is scored once with up to context - N tokens of extra context (capped at the context length)
    hellaswag: str | None = None  # JSONL with ctx, endings and label per line
    limit: int | None = None  # score only the first N multiple-choice items


@dataclasses.dataclass
class ConvertOptions:
    model: str | None = None  # a model folder written by buildllm
    to: Literal["hf"] = "hf"  # the format to write: hf (Hugging Face GPT-2)
    force: bool = False  # write into OUT even if it is not empty


@dataclasses.dataclass
class InfoOptions:
    model: str | None = None  # a config.json, or a model folder holding one
    preset: str | None = None  # a preset name, e.g. gpt2 (the default when no --model is given)


@dataclasses.dataclass
class PrepareOptions:
    tokenizer: str = "gpt2"  # gpt2, the path of a saved tokenizer, or bpe:VOCAB to train a byte-level BPE of that size on the input
    out: str | None = None  # output folder (default: data/prepared/<input name>)
    val_fraction: float = 0.1  # share of documents held out for validation
    errors: Literal["strict", "replace"] = "strict"  # non-UTF-8 bytes: stop with an error, or replace them with U+FFFD
    force: bool = False  # replace a different corpus in --out
    top: int = 10  # show the N most frequent tokens


@dataclasses.dataclass
class TokenizeOptions:
    tokenizer: str = "gpt2"  # gpt2 or the path of a saved tokenizer
    allow_special: bool = False  # encode <|endoftext|> as the special token, not as text


@dataclasses.dataclass
class AttentionOptions(ModelOptions):
    prompt: str = ""  # the text whose attention weights to draw
    layer: int = -1  # the layer to draw, counted from 0; negative counts back from the last (default: the last)
    out: str = "attention.png"  # the picture to write: .png, .svg or .pdf, one heatmap per head
