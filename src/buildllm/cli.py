"""The `buildllm` command line: a thin layer over the Python API, one subcommand per task.

Each subcommand has an ``add_<name>`` function that declares its arguments and a ``run_<name>``
function that calls the API. Most options are generated from a dataclass (``cli_options``): the
field's type, default and trailing comment become the option's type, default and help, so each
default is written once. A ``UserError`` from anywhere below, and a bad option, become one
``error:`` line on stderr and exit status 2.

Every command that loads a model names it ``--model PATH_OR_ID``; the older ``--checkpoint``,
``--pretrained`` and ``--init-from`` still work and are hidden from ``--help``.
"""

from __future__ import annotations

import argparse
import sys

from buildllm.cli_finetune import add_finetune
from buildllm.cli_generate import add_chat, add_generate
from buildllm.cli_options import (
    AttentionOptions,
    ConvertOptions,
    EvalOptions,
    InfoOptions,
    ModelOptions,
    PrepareOptions,
    TokenizeOptions,
    add_options,
    complete,
    given,
    load_for_inference,
    model_options,
    need_model,
    options,
)
from buildllm.errors import UserError


class Parser(argparse.ArgumentParser):
    """argparse, with its errors in the same one-line form as every other error."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="buildllm",
        description="Build, pretrain, fine-tune and run a GPT-style language model from scratch.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(sub)
    return parser


# Subcommands -------------------------------------------------------------------------------------


def add_info(sub) -> None:
    p = sub.add_parser("info", help="parameters, memory and FLOPs of a model configuration")
    options(p, InfoOptions, aliases={"model": ["--config"]}, metavars={"model": "PATH"})
    p.set_defaults(run=run_info)


def run_info(args) -> int:
    from pathlib import Path

    from buildllm.files import read_json_object
    from buildllm.models import registry
    from buildllm.weights.huggingface import config_from_hf

    if args.model and args.preset:
        raise UserError("give --model or --preset, not both")
    if args.model:
        path = Path(args.model)
        file = path / "config.json" if path.is_dir() else path
        raw = read_json_object(file, "model config")
        # A Hugging Face config.json names its model_type; buildllm's own names its arch.
        cfg = config_from_hf(raw, str(file)) if "model_type" in raw else registry.config_from_dict(raw)
        name = str(path)
    else:
        name = args.preset or "gpt2"
        cfg = registry.preset(name)
    info = registry.describe(cfg)
    gib = 2**30
    kv_heads = getattr(cfg, "n_kv_heads", None) or cfg.n_heads
    heads = f"{cfg.n_heads} heads" + (f" ({kv_heads} key/value)" if kv_heads != cfg.n_heads else "")
    print(f"{name} ({cfg.arch}): {cfg.n_layers} layers, {heads}, emb_dim {cfg.emb_dim}, "
          f"context {cfg.context_length}, vocab {cfg.vocab_size}")
    print(f"  parameters             {info['params_total']:>15,}")
    print(f"    embeddings           {info['params_embedding']:>15,}")
    if info["params_head"]:
        print(f"    output head          {info['params_head']:>15,}")
    print(f"    without embeddings   {info['params_non_embedding']:>15,}")
    print(f"  memory                 {'fp32':>10} {'bf16':>10}")
    for part in ("weights", "grads", "adamw_state"):
        fp32, bf16 = info[f"{part}_fp32_bytes"] / gib, info[f"{part}_bf16_bytes"] / gib
        print(f"    {part.replace('_', ' '):<20} {fp32:>8.2f} GiB {bf16:>6.2f} GiB")
    print(f"  FLOPs per token        forward {info['forward_flops_per_token']:.3e}, "
          f"training {info['train_flops_per_token']:.3e} (6N + attention)")
    return 0


def add_prepare(sub) -> None:
    p = sub.add_parser("prepare", help="tokenize a corpus into memory-mapped train/val token files",
                       description="Tokenize a .txt file, a folder of .txt files or a .jsonl file "
                       '(a "text" field per line) into train.bin/val.bin + meta.json. With no '
                       "INPUT, prepare the bundled Shakespeare.")
    p.add_argument("input", nargs="?", help="corpus to prepare (default: the bundled Shakespeare)")
    options(p, PrepareOptions, metavars={"out": "DIR"})
    p.set_defaults(run=run_prepare)


def run_prepare(args) -> int:
    from buildllm.data.prepare import prepare_corpus

    corpus = prepare_corpus(args.input, args.out, tokenizer=args.tokenizer,
                            val_fraction=args.val_fraction, errors=args.errors, force=args.force,
                            progress=sys.stderr.isatty())
    meta, tok = corpus.meta, corpus.tokenizer
    state = ("up to date" if corpus.up_to_date else
             f"prepared in {meta['seconds']:.1f} s, {meta['mb_per_s']:.1f} MB/s")
    print(f"{corpus.path}: {state} ({meta['source']['input']}, "
          f"{meta['source']['bytes'] / 1e6:.1f} MB)")
    print(f"  tokenizer   {tok.name} (vocab {tok.vocab_size:,}, <|endoftext|> = {tok.eot_id}), "
          f"stored as {meta['dtype']}")
    print(f"  validation  {meta['source']['split']}")
    for split in ("train", "val"):
        s = meta[split]
        per_token = s["characters"] / s["tokens"] if s["tokens"] else 0
        print(f"  {split:<5} {s['documents']:>8,} documents {s['characters']:>14,} characters "
              f"{s['tokens']:>13,} tokens  {per_token:.2f} chars/token")
    if args.top > 0 and len(corpus.train):
        counts = corpus.token_counts("train")
        top = counts.argsort()[::-1][: args.top]
        shown = ", ".join(f"{tok.decode([int(i)])!r} {counts[i] / len(corpus.train):.1%}"
                          for i in top)
        print(f"  top tokens  {shown}")
    return 0


def add_tokenize(sub) -> None:
    p = sub.add_parser("tokenize", help="show the token ids (and pieces) of a text")
    p.add_argument("text", help="the text to encode")
    options(p, TokenizeOptions)
    p.set_defaults(run=run_tokenize)


def run_tokenize(args) -> int:
    from buildllm.tokenizer import get_tokenizer

    tok = get_tokenizer(args.tokenizer)
    ids = tok.encode(args.text, allowed_special="all" if args.allow_special else frozenset())
    print(ids)
    print(" | ".join(repr(tok.decode([i])) for i in ids))
    print(f"{len(ids)} tokens, {len(args.text)} characters ({tok.name}, vocab {tok.vocab_size:,})")
    return 0


def add_classify(sub) -> None:
    p = sub.add_parser("classify", help="label texts with a fine-tuned classifier",
                       description="Print the predicted label and its probability, one line per text.")
    p.add_argument("texts", nargs="+", metavar="TEXT", help="texts to classify; - reads one text per line from stdin")
    model_options(p, ModelOptions, model_help="a folder written by `buildllm finetune classify`")
    p.set_defaults(run=run_classify)


def run_classify(args) -> int:
    from buildllm.finetune.classify import load_classifier
    from buildllm.training.runtime import pick_device

    texts = []
    for text in args.texts:
        if text == "-":
            texts.extend(line for line in sys.stdin.read().splitlines() if line.strip())
        else:
            texts.append(text)
    if not texts:
        raise UserError("no text to classify")
    classifier = load_classifier(need_model(args), pick_device(args.device))
    for label, probability in classifier.predict(texts):
        print(f"{label}\t{probability:.4f}")
    return 0


def add_convert(sub) -> None:
    p = sub.add_parser("convert", help="export a model as a Hugging Face folder of its architecture",
                       description="Write any model buildllm loads as config.json + model.safetensors (and "
                       "its tokenizer's files) that transformers.AutoModelForCausalLM.from_pretrained(OUT) "
                       "loads with identical logits.")
    p.add_argument("out", metavar="OUT", help="the folder to write")
    model_options(p, ConvertOptions)
    p.set_defaults(run=run_convert)


def run_convert(args) -> int:
    from buildllm.weights.loader import export_checkpoint

    out = export_checkpoint(need_model(args), args.out, force=args.force)
    print(f"{out}: Hugging Face folder (load it with transformers.AutoModelForCausalLM.from_pretrained)")
    return 0


def add_eval(sub) -> None:
    p = sub.add_parser("eval", help="perplexity and bits per character on a text; HellaSwag-style accuracy",
                       description="Score a model on a text file (sliding-window perplexity, bits per "
                       "character) and/or on multiple-choice items in HellaSwag's JSONL format.")
    model_options(p, EvalOptions)
    p.set_defaults(run=run_eval)


def run_eval(args) -> int:
    from buildllm.evaluate import evaluate_multiple_choice, evaluate_text

    if not args.data and not args.hellaswag:
        raise UserError("nothing to evaluate: add --data FILE (perplexity) and/or --hellaswag FILE")
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be at least 1, got {args.limit}")
    model, tokenizer = load_for_inference(args)
    if args.data:
        try:
            with open(args.data, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read {args.data}: {e}") from None
        stride = min(args.stride, model.cfg.context_length)
        r = evaluate_text(model, tokenizer, text, stride=stride)
        print(f"{args.data}: {r['tokens']:,} tokens, {r['chars']:,} characters "
              f"(context {model.cfg.context_length}, stride {stride})")
        print(f"  loss            {r['loss']:.4f} nats per token")
        print(f"  perplexity      {r['perplexity']:.2f}")
        print(f"  bits per char   {r['bits_per_char']:.4f}")
    if args.hellaswag:
        r = evaluate_multiple_choice(model, tokenizer, args.hellaswag, limit=args.limit)
        print(f"{args.hellaswag}: {r['items']:,} items")
        print(f"  acc             {r['acc']:.4f}  (summed log-likelihood of the ending)")
        print(f"  acc_norm        {r['acc_norm']:.4f}  (per character, as the EleutherAI harness)")
        print(f"  acc_norm_tokens {r['acc_norm_tokens']:.4f}  (per token, llm.c's completion style)")
    return 0


def add_attention(sub) -> None:
    p = sub.add_parser("attention", help="draw what each attention head looks at, for a prompt",
                       description="Run the model once on --prompt and write one layer's attention weights "
                       "as one heatmap per head (queries down, keys across) to --out.")
    model_options(p, AttentionOptions)
    p.set_defaults(run=run_attention)


def run_attention(args) -> int:
    from buildllm.attention_maps import save_attention_map
    from buildllm.training.runtime import pick_device
    from buildllm.weights.loader import load_model

    if not args.prompt:
        raise UserError('give the text to look at: --prompt "..."')
    model, tokenizer = load_model(need_model(args), device=pick_device(args.device))
    if tokenizer is None:
        raise UserError(f"{args.model} has no tokenizer saved with it: save the tokenizer with the model")
    fig = save_attention_map(model, tokenizer, args.prompt, args.out, layer=args.layer)
    heads = sum(1 for ax in fig.axes if ax.images)
    print(f"{args.out}: layer {args.layer % model.cfg.n_layers}, {heads} heads, "
          f"{len(tokenizer.encode(args.prompt))} tokens")
    return 0


# TrainConfig fields that have no trailing comment yet. Their help belongs there, as a comment;
# once it is, delete the entry here (test_cli checks every field has help from one or the other).
def add_train(sub) -> None:
    from buildllm.training.config import TrainConfig

    p = sub.add_parser(
        "train", help="pretrain a model (with no options: the default model on the bundled Shakespeare)",
        description="Pretrain a GPT model and write runs/<name>/ (checkpoints, metrics.jsonl, loss.png). "
        "--data: nothing for the bundled Shakespeare, a .txt file or a folder of them, or a folder made by "
        "`buildllm prepare`; with no model named, the tokenizer, the model and the steps are sized to the data "
        "and --max-minutes (--recipe book: chapter 5's GPT-2 124M, sliding windows and epochs on a .txt file). "
        "Every option is a TrainConfig key; "
        "options override --set, which overrides --config; an option with no default shown takes the data "
        "mode's. Many GPUs: torchrun --nproc_per_node N -m buildllm.cli train ...")
    p.add_argument("--config", metavar="FILE", help="a YAML or JSON file of TrainConfig keys")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any config key, e.g. --set model.n_layers=6 --set min_lr_ratio=0.05")
    # The model (a dict of GPTConfig overrides) is set with --set model.KEY=VALUE. resume and force
    # exclude each other, so they are declared here, in a group; the rest is generated.
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_const", const=True, default=argparse.SUPPRESS,
                       help="continue the run in --out")
    again.add_argument("--resume-if-exists", dest="resume", action="store_const", const="auto",
                       default=argparse.SUPPRESS, help="continue the run in --out if there is one, else start it")
    again.add_argument("--force", action="store_const", const=True, default=argparse.SUPPRESS,
                       help="start over, replacing the run in --out")
    add_options(p, TrainConfig, skip={"resume", "force"},
                flags={"init_from": "--model"}, aliases={"init_from": ["--init-from"]}, once={"init_from"},
                metavars={"init_from": "PATH_OR_ID", "data": "PATH", "out": "DIR", "no_decay": "NAME"})
    p.set_defaults(run=run_train)


def run_train(args) -> int:
    from buildllm.training.config import TrainConfig, cli_config
    from buildllm.training.engine import train

    result = train(cli_config(args.config, given(args, TrainConfig), args.set))
    if result.rank != 0:  # under torchrun, one process reports
        return 0
    speed = f" ({result.tokens_per_sec:,.0f} tokens/s)" if result.tokens_per_sec else ""
    print(f"{result.out}: {result.steps:,} steps, {result.tokens_seen:,} tokens; this session took "
          f"{result.seconds / 60:.1f} minutes{speed}")
    if result.val_bits_per_char is not None:
        print(f"  validation loss {result.val_loss:.4f} nats per token, {result.val_bits_per_char:.3f} bits per character")
    print(f"  generate with: buildllm generate --model {result.out} --prompt \"ROMEO:\"")
    return 0


def add_serve(sub) -> None:
    from buildllm.serve.config import ServeOptions

    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server with batched decoding, and a chat page",
                       description="Load the model once and serve it until Ctrl-C: POST /v1/chat/completions "
                       "and /v1/completions in OpenAI's format (streaming too), GET /v1/models, GET /health, and "
                       "a chat page at /. Requests that arrive while others decode join the running batch.")
    model_options(p, ServeOptions)
    p.set_defaults(run=run_serve)


def run_serve(args) -> int:
    from buildllm.serve.config import ServeConfig
    from buildllm.serve.server import run_server, served_name

    config = ServeConfig(**given(args, ServeConfig))
    config.check()  # before the model loads: a bad option fails fast
    run_server(load_for_inference(args), config, model_name=config.model_name or served_name(args.model))
    return 0


SUBCOMMANDS: list = [add_info, add_prepare, add_train, add_tokenize, add_finetune, add_classify, add_generate, add_chat,
                     add_convert, add_eval, add_serve, add_attention]


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)  # inside the try: an option may raise UserError
        if hasattr(args, "options"):
            complete(args, args.options)
        return args.run(args) or 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
