"""`buildllm finetune classify|instruct`: fine-tune a model for a task.

Their options are still declared by hand (with their defaults here, a second time beside the
functions' keyword defaults). When the fine-tune functions take config dataclasses, each
``add_parser`` below becomes ``options(p, ClassifyConfig, aliases={"model": ["--checkpoint"]})``
(see ``cli.options``) and each ``run_*`` builds its config with
``cli_config(args.config, given(args, ClassifyConfig), args.set, cls=ClassifyConfig)``.
"""

from __future__ import annotations

import argparse

from buildllm.cli_options import need_model
from buildllm.errors import UserError


def _fractions(text: str, what: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise UserError(f"{what} must be comma-separated fractions like 0.7,0.1,0.2, got {text!r}") from None


def _add_finetune_common(p, epochs: int, split: str) -> None:
    p.add_argument("--model", metavar="PATH_OR_ID",
                   help="the model to start from: a buildllm checkpoint folder or a Hugging Face GPT-2 folder")
    p.add_argument("--checkpoint", dest="model", help=argparse.SUPPRESS)
    p.add_argument("--data", required=True, help="the training data file")
    p.add_argument("--out", required=True, help="folder for the fine-tuned checkpoint")
    p.add_argument("--split", default=split, help=f"train,val,test fractions (default: {split})")
    p.add_argument("--epochs", type=int, default=epochs, help=f"passes over the training split (default: {epochs})")
    p.add_argument("--batch-size", type=int, default=8, help="examples per step (default: 8)")
    p.add_argument("--lr", type=float, default=5e-5, help="AdamW learning rate (default: 5e-5)")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay (default: 0.1)")
    p.add_argument("--lora-rank", type=int, help="train LoRA adapters of this rank instead of the weights")
    p.add_argument("--lora-alpha", type=float, help="LoRA scale numerator: updates are scaled by alpha/rank "
                   "(default: 2 x rank; the book's rank 16 with its alpha 16 is --lora-alpha 256 here)")
    p.add_argument("--lora-targets", default="qkv,out_proj,fc,proj",
                   help="Linear layers that get adapters (default: qkv,out_proj,fc,proj)")
    p.add_argument("--eval-batches", type=int, help="evaluate on at most this many batches per split and epoch")
    p.add_argument("--seed", type=int, default=123, help="seed for the split, the shuffling and new weights")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")


def add_finetune(sub) -> None:
    p = sub.add_parser("finetune", help="fine-tune a model: text classification or instruction following")
    tasks = p.add_subparsers(dest="task", required=True, metavar="TASK")

    c = tasks.add_parser("classify", help="train a text classifier on a CSV/TSV of texts and labels",
                         description="Replace the output head by one output per class and fine-tune on a "
                         "CSV or TSV file; the epoch with the best validation accuracy is kept.")
    _add_finetune_common(c, epochs=5, split="0.7,0.1,0.2")
    c.add_argument("--text-column", default="text", help="column holding the text (default: text)")
    c.add_argument("--label-column", default="label", help="column holding the label (default: label)")
    c.add_argument("--no-header", action="store_true",
                   help="the file has no header row: columns are 0-based numbers (e.g. --label-column 0 --text-column 1)")
    c.add_argument("--delimiter", help="field separator (default: from the extension, .csv or .tsv, else sniffed)")
    c.add_argument("--labels", help="comma-separated label set, in output order (default: the sorted labels found)")
    c.add_argument("--balance", action="store_true", help="undersample every class to the smallest one")
    c.add_argument("--max-length", type=int, help="tokens per text (default: the longest training text)")
    c.add_argument("--trainable", choices=["head", "last-blocks", "all"], default="last-blocks",
                   help="what trains without LoRA: the head, the last blocks + final norm + head, or all "
                   "(default: last-blocks)")
    c.add_argument("--last-blocks", type=int, default=1, help="how many blocks train with --trainable last-blocks")
    c.add_argument("--representation", choices=["last-token", "last-position"], default="last-token",
                   help="read the class from the last real token (default) or the last padded position (the book)")
    c.set_defaults(run=run_finetune_classify)

    i = tasks.add_parser("instruct", help="instruction-tune on Alpaca-style JSON/JSONL records",
                         description="Fine-tune on instruction/input/output records formatted with a prompt "
                         "template; then answer the test split into test_responses.json.")
    _add_finetune_common(i, epochs=2, split="0.85,0.05,0.1")
    i.add_argument("--template", default="alpaca",
                   help="prompt format: alpaca, phi3, or a JSON file with instruction, input, response (default: alpaca)")
    i.add_argument("--mask-prompt", action="store_true", help="leave the prompt's tokens out of the loss")
    i.add_argument("--max-length", type=int, help="tokens per example (default: the context length)")
    i.add_argument("--log-every", type=int, default=0, help="print the training loss every N steps")
    i.add_argument("--max-new-tokens", type=int, default=256, help="longest answer for the test split (default: 256)")
    i.add_argument("--no-test-responses", action="store_true", help="skip answering the test split")
    i.set_defaults(run=run_finetune_instruct)


def _finetune_common_kwargs(args) -> dict:
    return {
        "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "weight_decay": args.weight_decay,
        "lora_rank": args.lora_rank, "lora_alpha": args.lora_alpha,
        "lora_targets": tuple(t.strip() for t in args.lora_targets.split(",") if t.strip()),
        "eval_batches": args.eval_batches, "seed": args.seed, "device": args.device,
    }


def run_finetune_classify(args) -> int:
    from buildllm.finetune.classify import finetune_classifier

    result = finetune_classifier(
        need_model(args), args.data, args.out,
        text_column=args.text_column, label_column=args.label_column, header=not args.no_header,
        delimiter=args.delimiter, labels=args.labels.split(",") if args.labels else None, balance=args.balance,
        split=_fractions(args.split, "--split"), max_length=args.max_length,
        representation=args.representation.replace("-", "_"), trainable=args.trainable.replace("-", "_"),
        last_blocks=args.last_blocks, **_finetune_common_kwargs(args),
    )
    print(f"saved {result.checkpoint} (epoch {result.best_epoch}); try: buildllm classify --model "
          f"{result.checkpoint} \"some text\"")
    return 0


def run_finetune_instruct(args) -> int:
    from buildllm.finetune.instruct import finetune_instruct

    result = finetune_instruct(
        need_model(args), args.data, args.out, template=args.template, split=_fractions(args.split, "--split"),
        mask_prompt=args.mask_prompt, allowed_max_length=args.max_length, log_every=args.log_every,
        max_new_tokens=args.max_new_tokens, test_responses=not args.no_test_responses,
        **_finetune_common_kwargs(args),
    )
    print(f"saved {result.checkpoint} (epoch {result.best_epoch})")
    return 0
