"""The `buildllm` command line: a thin layer over the Python API, one subcommand per task.

Each subcommand has an ``add_<name>`` function that declares its arguments and a ``run_<name>``
function that calls the API. A ``UserError`` from anywhere below becomes one ``error:`` line on
stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys

from buildllm.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
    group = p.add_mutually_exclusive_group()
    group.add_argument("--preset", default="gpt2", help="a preset name (default: gpt2)")
    group.add_argument("--config", help="a config.json, or a checkpoint folder holding one")
    p.set_defaults(run=run_info)


def run_info(args) -> int:
    from pathlib import Path

    from buildllm.models.gpt2 import GPTConfig, describe

    if args.config:
        path = Path(args.config)
        cfg = GPTConfig.load(path / "config.json" if path.is_dir() else path)
        name = str(path)
    else:
        cfg, name = GPTConfig.from_preset(args.preset), args.preset
    info = describe(cfg)
    gib = 2**30
    print(f"{name}: {cfg.n_layers} layers, {cfg.n_heads} heads, emb_dim {cfg.emb_dim}, "
          f"context {cfg.context_length}, vocab {cfg.vocab_size}")
    print(f"  parameters             {info['params_total']:>15,}")
    print(f"    embeddings (wte+wpe) {info['params_embedding']:>15,}")
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
    p.add_argument("--tokenizer", default="gpt2",
                   help="gpt2, the path of a saved tokenizer, or bpe:VOCAB to train a byte-level "
                   "BPE of that size on the input (default: gpt2)")
    p.add_argument("--out", help="output folder (default: data/prepared/<input name>)")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="share of documents held out for validation (default: 0.1)")
    p.add_argument("--errors", choices=["strict", "replace"], default="strict",
                   help="non-UTF-8 bytes: stop with an error, or replace them with U+FFFD")
    p.add_argument("--force", action="store_true", help="replace a different corpus in --out")
    p.add_argument("--top", type=int, default=10, help="show the N most frequent tokens")
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
    p.add_argument("--tokenizer", default="gpt2",
                   help="gpt2 or the path of a saved tokenizer (default: gpt2)")
    p.add_argument("--allow-special", action="store_true",
                   help="encode <|endoftext|> as the special token, not as text")
    p.set_defaults(run=run_tokenize)


def run_tokenize(args) -> int:
    from buildllm.tokenizer import get_tokenizer

    tok = get_tokenizer(args.tokenizer)
    ids = tok.encode(args.text, allowed_special="all" if args.allow_special else frozenset())
    print(ids)
    print(" | ".join(repr(tok.decode([i])) for i in ids))
    print(f"{len(ids)} tokens, {len(args.text)} characters ({tok.name}, vocab {tok.vocab_size:,})")
    return 0


def _fractions(text: str, what: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise UserError(f"{what} must be comma-separated fractions like 0.7,0.1,0.2, got {text!r}") from None


def _add_finetune_common(p, epochs: int, split: str) -> None:
    p.add_argument("--model", "--checkpoint", dest="model", required=True,
                   help="the model to start from: a buildllm checkpoint folder or a Hugging Face GPT-2 folder")
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
        args.model, args.data, args.out,
        text_column=args.text_column, label_column=args.label_column, header=not args.no_header,
        delimiter=args.delimiter, labels=args.labels.split(",") if args.labels else None, balance=args.balance,
        split=_fractions(args.split, "--split"), max_length=args.max_length,
        representation=args.representation.replace("-", "_"), trainable=args.trainable.replace("-", "_"),
        last_blocks=args.last_blocks, **_finetune_common_kwargs(args),
    )
    print(f"saved {result.checkpoint} (epoch {result.best_epoch}); try: buildllm classify --checkpoint "
          f"{result.checkpoint} \"some text\"")
    return 0


def run_finetune_instruct(args) -> int:
    from buildllm.finetune.instruct import finetune_instruct

    result = finetune_instruct(
        args.model, args.data, args.out, template=args.template, split=_fractions(args.split, "--split"),
        mask_prompt=args.mask_prompt, allowed_max_length=args.max_length, log_every=args.log_every,
        max_new_tokens=args.max_new_tokens, test_responses=not args.no_test_responses,
        **_finetune_common_kwargs(args),
    )
    print(f"saved {result.checkpoint} (epoch {result.best_epoch})")
    return 0


def add_classify(sub) -> None:
    p = sub.add_parser("classify", help="label texts with a fine-tuned classifier",
                       description="Print the predicted label and its probability, one line per text.")
    p.add_argument("texts", nargs="+", metavar="TEXT", help="texts to classify; - reads one text per line from stdin")
    p.add_argument("--checkpoint", required=True, help="a folder written by `buildllm finetune classify`")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps or auto (default: cpu)")
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
    classifier = load_classifier(args.checkpoint, pick_device(args.device))
    for label, probability in classifier.predict(texts):
        print(f"{label}\t{probability:.4f}")
    return 0


def _add_sampling_args(p) -> None:
    p.add_argument("--checkpoint", metavar="DIR", help="a model folder written by buildllm (train, finetune)")
    p.add_argument("--pretrained", metavar="NAME_OR_PATH",
                   help="GPT-2 weights: gpt2, gpt2-medium, gpt2-large, gpt2-xl (downloaded), or a "
                   "Hugging Face / OpenAI GPT-2 folder")
    p.add_argument("--max-new-tokens", type=int, default=100, help="tokens to generate (default: 100)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="divide the logits by T before sampling; 0 = greedy, always the likeliest token "
                   "(default: 0)")
    p.add_argument("--top-k", type=int, help="sample only among the K likeliest tokens")
    p.add_argument("--top-p", type=float, help="sample only among the likeliest tokens that together hold "
                   "probability P (nucleus sampling)")
    p.add_argument("--seed", type=int, help="seed the sampler for reproducible output")
    p.add_argument("--no-cache", action="store_true",
                   help="recompute the whole context every step instead of using the KV cache (slower)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps (default: cpu)")
    _add_quantize_arg(p)


def _add_quantize_arg(p) -> None:
    p.add_argument("--quantize", choices=["int8", "int4"],
                   help="store the weights as 8- or 4-bit integers for faster generation on CPU: int8 is "
                   "nearly lossless, int4 faster still and coarser (see README)")


def _load_for_inference(args):
    """``(model, tokenizer)`` for generate and chat, in eval mode on ``args.device``."""
    from buildllm.training.runtime import pick_device
    from buildllm.weights.loader import load_model

    if bool(args.checkpoint) == bool(args.pretrained):
        raise UserError("give one model: --checkpoint DIR (a folder written by buildllm train or finetune) "
                        "or --pretrained NAME_OR_PATH (GPT-2 weights)")
    device = pick_device(args.device)
    if args.quantize and device.type != "cpu":
        print(f"note: PyTorch's {args.quantize} kernels are CPU-only; on {device.type} the weights are "
              "dequantized at every step, which is slower than bf16 weights", file=sys.stderr)
    source = args.checkpoint or args.pretrained
    # The one loader decides what the folder is and whether its vocabulary fits the tokenizer, the
    # same way for --checkpoint and --pretrained; weights come as fp32 (what the int8/int4 kernels take).
    model, tokenizer = load_model(source, device=device, quantize=args.quantize)
    if tokenizer is None:
        raise UserError(f"{source} has no tokenizer saved with it and its vocabulary ({model.cfg.vocab_size}) "
                        "is smaller than GPT-2's: save the tokenizer with the model")
    return model, tokenizer


def _sampler(args, model):
    """Keyword arguments for ``generate.stream_text`` from the command line's options."""
    import torch

    generator = None
    if args.seed is not None:
        generator = torch.Generator(device=model.device).manual_seed(args.seed)
    return {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_k": args.top_k,
            "top_p": args.top_p, "use_cache": not args.no_cache, "generator": generator}


def _print_continuation(model, tokenizer, prompt: str, sampler: dict) -> None:
    """Print the model's continuation of ``prompt`` as it is produced, then a newline."""
    import warnings

    from buildllm.generation.sampling import stream_text

    def plain(message, category, *rest, **kw):  # like errors: one line, no source location
        print(f"warning: {message}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = plain
        for piece in stream_text(model, tokenizer, prompt, **sampler):
            print(piece, end="", flush=True)
    print(flush=True)


def add_generate(sub) -> None:
    p = sub.add_parser("generate", help="continue a prompt, printing the text as it is produced",
                       description="Continue --prompt with a trained model, streaming the new text to "
                       "stdout; stops at <|endoftext|>. An empty prompt starts a new document.")
    _add_sampling_args(p)
    p.add_argument("--prompt", default="", help="the text to continue (default: empty, a new document)")
    p.add_argument("--num-samples", type=int, default=1, help="how many continuations to print (default: 1)")
    p.set_defaults(run=run_generate)


def run_generate(args) -> int:
    from buildllm.generation.sampling import check_sampling

    check_sampling(args.temperature, args.top_k, args.top_p, args.max_new_tokens)
    if args.num_samples < 1:
        raise UserError(f"--num-samples must be at least 1, got {args.num_samples}")
    if args.num_samples > 1 and args.temperature == 0:
        print("note: --temperature 0 is greedy, so every sample is the same; try --temperature 0.8",
              file=sys.stderr)
    model, tokenizer = _load_for_inference(args)
    sampler = _sampler(args, model)  # one generator for all samples: different yet reproducible
    for i in range(args.num_samples):
        if args.num_samples > 1:
            print(f"--- sample {i + 1} ---")
        print(args.prompt, end="", flush=True)
        _print_continuation(model, tokenizer, args.prompt, sampler)
    return 0


def add_chat(sub) -> None:
    p = sub.add_parser("chat", help="an interactive prompt loop (type /quit or end input to leave)",
                       description="Read one prompt per line from stdin and print the model's answer. "
                       "Instruction-tuned models (buildllm finetune instruct) wrap each line in their prompt "
                       "template and print only the response; base models continue the line's text.")
    _add_sampling_args(p)
    p.set_defaults(run=run_chat)


def run_chat(args) -> int:
    from buildllm.finetune.instruct import load_prompt_template
    from buildllm.generation.sampling import check_sampling

    check_sampling(args.temperature, args.top_k, args.top_p, args.max_new_tokens)
    model, tokenizer = _load_for_inference(args)
    template = load_prompt_template(args.checkpoint) if args.checkpoint else None
    sampler = _sampler(args, model)
    interactive = sys.stdin.isatty()
    if interactive:
        kind = f"instruction model ({template.name} template)" if template else "base model: it continues your text"
        print(f"{kind}; /quit or Ctrl-D to leave", file=sys.stderr)
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() == "/quit":  # "" is end of input
            return 0
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        prompt = template.format(line) if template else line
        _print_continuation(model, tokenizer, prompt, sampler)


def add_convert(sub) -> None:
    p = sub.add_parser("convert", help="export a checkpoint as a Hugging Face GPT-2 folder",
                       description="Write a buildllm checkpoint as config.json + model.safetensors that "
                       "transformers.GPT2LMHeadModel.from_pretrained(OUT) loads with identical logits.")
    p.add_argument("--checkpoint", metavar="DIR", required=True, help="a model folder written by buildllm")
    p.add_argument("--to", choices=["hf"], required=True, help="the format to write: hf (Hugging Face GPT-2)")
    p.add_argument("out", metavar="OUT", help="the folder to write")
    p.add_argument("--force", action="store_true", help="write into OUT even if it is not empty")
    p.set_defaults(run=run_convert)


def run_convert(args) -> int:
    from buildllm.weights.huggingface import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.out, force=args.force)
    print(f"{out}: Hugging Face GPT-2 folder (load it with transformers.GPT2LMHeadModel.from_pretrained)")
    return 0


def add_eval(sub) -> None:
    p = sub.add_parser("eval", help="perplexity and bits per character on a text; HellaSwag-style accuracy",
                       description="Score a model on a text file (sliding-window perplexity, bits per "
                       "character) and/or on multiple-choice items in HellaSwag's JSONL format.")
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--checkpoint", metavar="DIR", help="a model folder written by buildllm")
    model.add_argument("--pretrained", metavar="NAME_OR_PATH",
                       help="GPT-2 weights: gpt2 ... gpt2-xl, or a Hugging Face / OpenAI GPT-2 folder")
    p.add_argument("--data", metavar="FILE", help="a UTF-8 text file to compute perplexity on")
    p.add_argument("--stride", type=int, default=512,
                   help="slide the context window by N tokens; each token is scored once with up to "
                   "context - N tokens of extra context (default: 512, capped at the context length)")
    p.add_argument("--hellaswag", metavar="FILE", help="JSONL with ctx, endings and label per line")
    p.add_argument("--limit", type=int, help="score only the first N multiple-choice items")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps (default: cpu)")
    _add_quantize_arg(p)
    p.set_defaults(run=run_eval)


def run_eval(args) -> int:
    from buildllm.evaluate import evaluate_multiple_choice, evaluate_text

    if not args.data and not args.hellaswag:
        raise UserError("nothing to evaluate: add --data FILE (perplexity) and/or --hellaswag FILE")
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be at least 1, got {args.limit}")
    model, tokenizer = _load_for_inference(args)
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


def add_train(sub) -> None:
    p = sub.add_parser(
        "train", help="pretrain a model (with no options: the default model on the bundled Shakespeare)",
        description="Pretrain a GPT model and write runs/<name>/ (checkpoints, metrics.jsonl, loss.png). "
        "--data: nothing for the bundled Shakespeare, a .txt file (the book's sliding windows and epochs), "
        "or a folder made by `buildllm prepare` (random windows, steps). Options override --config. "
        "Many GPUs: torchrun --nproc_per_node N -m buildllm.cli train ...")
    p.add_argument("--config", metavar="FILE", help="a YAML or JSON file of TrainConfig keys")
    p.add_argument("--data", help="a .txt file or a prepared folder (default: the bundled Shakespeare)")
    p.add_argument("--out", metavar="DIR", help="the run folder (default: runs/<name>)")
    p.add_argument("--name", help="the run name (default: the data's name)")
    p.add_argument("--tokenizer", help="gpt2, a tokenizer.json, or bpe:VOCAB learned from the data")
    p.add_argument("--preset", help="the model shape: a GPTConfig preset (see `buildllm info`)")
    p.add_argument("--init-from", metavar="DIR", help="start from these weights: a checkpoint folder or GPT-2")
    for flag, kind, what in (
        ("--max-steps", int, "optimizer steps"), ("--epochs", int, "book mode: passes over the text"),
        ("--max-minutes", float, "also stop after this many minutes (the schedule adapts)"),
        ("--seed", int, "seed of the weights, the batches and dropout"), ("--lr", float, "peak learning rate"),
        ("--warmup-steps", int, "linear warmup steps"), ("--weight-decay", float, "AdamW weight decay"),
        ("--batch-size", int, "sequences per micro-batch, all processes together"),
        ("--context-length", int, "tokens per sequence"), ("--grad-accum", int, "micro-batches per step"),
        ("--eval-interval", int, "steps between evaluations"), ("--eval-iters", int, "batches per evaluation"),
        ("--save-interval", int, "steps between checkpoints"), ("--keep-last", int, "checkpoints kept"),
        ("--lora-rank", int, "train LoRA adapters of this rank (with --init-from)"),
        ("--lora-alpha", float, "LoRA scale numerator (default: 2 x rank)"),
    ):
        p.add_argument(flag, type=kind, help=what)
    p.add_argument("--dtype", choices=["auto", "bf16", "fp16", "fp32"], help="autocast precision (default: auto)")
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    p.add_argument("--parallel", choices=["ddp", "fsdp"], help="under torchrun: DDP (default) or FSDP")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any config key, e.g. --set model.n_layers=6 --set min_lr_ratio=0.05")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                   help="no progress bar or printed evaluations")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", default=None, help="continue the run in --out")
    again.add_argument("--resume-if-exists", dest="resume", action="store_const", const="auto",
                       help="continue the run in --out if there is one, else start it")
    again.add_argument("--force", action="store_true", default=None, help="start over, replacing the run in --out")
    p.set_defaults(run=run_train)


def run_train(args) -> int:
    from buildllm.training.config import cli_config
    from buildllm.training.engine import train

    keys = ("data", "out", "name", "tokenizer", "preset", "init_from", "max_steps", "epochs", "max_minutes",
            "seed", "lr", "warmup_steps", "weight_decay", "batch_size", "context_length", "grad_accum",
            "eval_interval", "eval_iters", "save_interval", "keep_last", "lora_rank", "lora_alpha", "dtype",
            "compile", "device", "parallel", "progress", "resume", "force")
    result = train(cli_config(args.config, {k: getattr(args, k) for k in keys}, args.set))
    if result.rank != 0:  # under torchrun, one process reports
        return 0
    speed = f" ({result.tokens_per_sec:,.0f} tokens/s)" if result.tokens_per_sec else ""
    print(f"{result.out}: {result.steps:,} steps, {result.tokens_seen:,} tokens; this session took "
          f"{result.seconds / 60:.1f} minutes{speed}")
    if result.val_bits_per_char is not None:
        print(f"  validation loss {result.val_loss:.4f} nats per token, {result.val_bits_per_char:.3f} bits per character")
    print(f"  generate with: buildllm generate --checkpoint {result.out} --prompt \"ROMEO:\"")
    return 0


SUBCOMMANDS: list = [add_info, add_prepare, add_train, add_tokenize, add_finetune, add_classify, add_generate, add_chat,
                     add_convert, add_eval]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
