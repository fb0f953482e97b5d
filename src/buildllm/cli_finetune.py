"""`buildllm finetune classify|instruct|dpo`: fine-tune a model for a task.

Like ``train``, every option is generated from the task's config dataclass (``ClassifyConfig``,
``InstructConfig``, ``DPOConfig``: ``EngineConfig`` plus the task's keys), so each default is written once, in
the class. ``--config FILE`` reads a YAML or JSON file of those keys, ``--set KEY=VALUE`` sets any
of them, and the options typed win over both. A few options are declared here by hand: lists that
also take commas (``--split 0.7,0.1,0.2``), names that take ``-`` or ``_`` (``last-blocks``),
columns that are names or numbers, and ``--resume``/``--force`` (which exclude each other).
"""

from __future__ import annotations

import argparse

from buildllm.cli_options import MODEL_HELP, add_options, given
from buildllm.errors import UserError


class Listed(argparse.Action):
    """One or more values, each of which may hold several separated by commas: ``0.7,0.1,0.2``."""

    def __init__(self, *args, kind=str, **kw):
        super().__init__(*args, nargs="+", **kw)
        self.kind = kind

    def __call__(self, parser, namespace, values, option_string=None):
        items = [x.strip() for value in values for x in value.split(",") if x.strip()]
        try:
            setattr(namespace, self.dest, tuple(self.kind(x) for x in items))
        except ValueError:
            raise UserError(f"{option_string} takes comma-separated {self.kind.__name__} values, "
                            f"got {' '.join(values)!r}") from None


def _underscored(text: str) -> str:
    return text.replace("-", "_")  # last-blocks and last_blocks both name "last_blocks"


def _column(text: str) -> str | int:
    return int(text) if text.isdigit() else text  # a number is a column index (files without a header)


def _add_common(p, cls, hand: dict) -> None:
    """``--config``, ``--set``, ``--resume``/``--force``, the list options, and the generated rest."""
    p.add_argument("--config", metavar="FILE", help=f"a YAML or JSON file of {cls.__name__} keys")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any config key, e.g. --set lr=1e-4 --set 'split=[0.8, 0.1, 0.1]'")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_const", const=True, default=argparse.SUPPRESS,
                       help="continue the fine-tune in --out (e.g. with more --epochs)")
    again.add_argument("--force", action="store_const", const=True, default=argparse.SUPPRESS,
                       help="start over, replacing what is in --out")
    listed = {"split": ("train,val,test fractions", float, "X"),
              "lora_targets": ("Linear layers that get adapters", str, "NAME"),
              "no_decay": ("no weight decay on these parameters (name or module prefix)", str, "NAME")}
    keys = set(cls.keys())
    listed = {name: spec for name, spec in listed.items() if name in keys}
    for name, (text, kind, metavar) in listed.items():
        default = getattr(cls(), name)
        shown = f" (default: {','.join(map(str, default))})" if default else ""
        p.add_argument("--" + name.replace("_", "-"), dest=name, action=Listed, kind=kind, metavar=metavar,
                       default=argparse.SUPPRESS, help=text + shown)
    for flag, spec in hand.items():
        p.add_argument(flag, default=argparse.SUPPRESS, **spec)
    skip = {"resume", "force", *listed, *(spec["dest"] for spec in hand.values())}
    add_options(p, cls, skip=skip, flags={"base": "--model", "allowed_max_length": "--max-length"},
                aliases={"base": ["--checkpoint"], "allowed_max_length": ["--allowed-max-length"]},
                once={"base"}, metavars={"base": "PATH_OR_ID", "data": "PATH", "out": "DIR"})


def add_finetune(sub) -> None:
    from buildllm.finetune.classify import REPRESENTATIONS, TRAINABLE, ClassifyConfig
    from buildllm.finetune.dpo import DPOConfig
    from buildllm.finetune.instruct import InstructConfig

    p = sub.add_parser("finetune", help="fine-tune a model: text classification, instruction following, "
                       "preference tuning (DPO)")
    tasks = p.add_subparsers(dest="task", required=True, metavar="TASK")

    c = tasks.add_parser("classify", help="train a text classifier on a CSV/TSV of texts and labels",
                         description="Replace the output head by one output per class and fine-tune on a "
                         "CSV or TSV file; the epoch with the best validation accuracy is kept. Every option is "
                         "a ClassifyConfig key; options override --set, which overrides --config.")
    _add_common(c, ClassifyConfig, {
        "--text-column": {"dest": "text_column", "type": _column, "metavar": "NAME",
                          "help": "column holding the text, a 0-based number with --no-header (default: text)"},
        "--label-column": {"dest": "label_column", "type": _column, "metavar": "NAME",
                           "help": "column holding the label (default: label)"},
        "--labels": {"dest": "labels", "action": Listed, "metavar": "LABEL",
                     "help": "the label set, in output order (default: the sorted labels found)"},
        "--representation": {"dest": "representation", "type": _underscored, "choices": REPRESENTATIONS,
                             "help": "read the class at the last real token, or last_position (the book) "
                             "(default: last_token)"},
        "--trainable": {"dest": "trainable", "type": _underscored, "choices": TRAINABLE,
                        "help": "what trains without LoRA: head, last_blocks (+ final norm + head), all "
                        "(default: last_blocks)"},
    })
    c.set_defaults(run=run_finetune_classify)

    i = tasks.add_parser("instruct", help="instruction-tune on Alpaca-style JSON/JSONL records",
                         description="Fine-tune on instruction/input/output records formatted with a prompt "
                         "template; then answer the test split into test_responses.json. Every option is an "
                         "InstructConfig key; options override --set, which overrides --config.")
    _add_common(i, InstructConfig, {})
    i.set_defaults(run=run_finetune_instruct)

    d = tasks.add_parser("dpo", help="preference-tune with DPO on prompt/chosen/rejected JSON/JSONL records",
                         description="Direct Preference Optimization: raise the likelihood of each chosen answer "
                         "over its rejected one, relative to the starting model (the reference); the model with "
                         "the best held-out reward margin is kept. Every option is a DPOConfig key; options "
                         "override --set, which overrides --config.")
    _add_common(d, DPOConfig, {})
    d.set_defaults(run=run_finetune_dpo)


def _config(args, cls):
    from buildllm.training.config import cli_config

    cfg = cli_config(args.config, given(args, cls), args.set, cls=cls)
    if not cfg.base:
        raise UserError(MODEL_HELP)
    return cfg


def run_finetune_classify(args) -> int:
    from buildllm.finetune.classify import ClassifyConfig, finetune_classifier

    result = finetune_classifier(config=_config(args, ClassifyConfig))
    print(f"saved {result.checkpoint} (epoch {result.best_epoch}); try: buildllm classify --model "
          f"{result.checkpoint} \"some text\"")
    return 0


def run_finetune_instruct(args) -> int:
    from buildllm.finetune.instruct import InstructConfig, finetune_instruct

    result = finetune_instruct(config=_config(args, InstructConfig))
    print(f"saved {result.checkpoint} (epoch {result.best_epoch})")
    return 0


def run_finetune_dpo(args) -> int:
    from buildllm.finetune.dpo import DPOConfig, finetune_dpo

    result = finetune_dpo(config=_config(args, DPOConfig))
    print(f"saved {result.checkpoint} (epoch {result.best_epoch})")
    return 0
