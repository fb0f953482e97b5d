"""``buildllm generate`` and ``buildllm chat``: a model's text streamed to the terminal."""

from __future__ import annotations

import sys

from buildllm.cli_options import (
    GenerateOptions,
    SamplingOptions,
    load_for_inference,
    model_options,
)
from buildllm.errors import UserError


def _sampler(args, model):
    """Keyword arguments for ``generate.stream_text`` from the command line's options."""
    import torch

    generator = None
    if args.seed is not None:
        generator = torch.Generator(device=model.device).manual_seed(args.seed)
    return {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_k": args.top_k,
            "top_p": args.top_p, "use_cache": args.cache, "generator": generator}


def _print_continuation(model, tokenizer, prompt, sampler: dict, stop=None) -> str:
    """Print the model's continuation of ``prompt`` (text or token ids) as it is produced, then a
    newline; return the text printed.

    With ``stop`` (a string or several), the text is cut where a stop string first appears. A stop
    string can arrive split over several pieces, so the last characters (one fewer than the longest
    stop string has) are held back until it is clear they do not begin one.
    """
    import warnings

    from buildllm.generation.sampling import stream_text

    def plain(message, category, *rest, **kw):  # like errors: one line, no source location
        print(f"warning: {message}", file=sys.stderr)

    stops = [s for s in ([stop] if isinstance(stop, str) else stop or []) if s]
    hold = max((len(s) for s in stops), default=1) - 1
    pending, printed = "", []
    with warnings.catch_warnings():
        warnings.showwarning = plain
        for piece in stream_text(model, tokenizer, prompt, **sampler):
            pending += piece
            found = [pending.index(s) for s in stops if s in pending]
            if found:
                pending = pending[: min(found)]
                break
            cut = max(0, len(pending) - hold)
            printed.append(pending[:cut])
            print(pending[:cut], end="", flush=True)
            pending = pending[cut:]
    print(pending, flush=True)
    return "".join(printed) + pending


def add_generate(sub) -> None:
    p = sub.add_parser("generate", help="continue a prompt, printing the text as it is produced",
                       description="Continue --prompt with a trained model, streaming the new text to "
                       "stdout; stops at <|endoftext|>. An empty prompt starts a new document.")
    model_options(p, GenerateOptions)
    p.set_defaults(run=run_generate)


def run_generate(args) -> int:
    from buildllm.generation.sampling import check_sampling

    check_sampling(args.temperature, args.top_k, args.top_p, args.max_new_tokens)
    if args.num_samples < 1:
        raise UserError(f"--num-samples must be at least 1, got {args.num_samples}")
    if args.num_samples > 1 and args.temperature == 0:
        print("note: --temperature 0 is greedy, so every sample is the same; try --temperature 0.8",
              file=sys.stderr)
    model, tokenizer = load_for_inference(args)
    sampler = _sampler(args, model)  # one generator for all samples: different yet reproducible
    for i in range(args.num_samples):
        if args.num_samples > 1:
            print(f"--- sample {i + 1} ---")
        print(args.prompt, end="", flush=True)
        _print_continuation(model, tokenizer, args.prompt, sampler, args.stop)
    return 0


def add_chat(sub) -> None:
    p = sub.add_parser("chat", help="an interactive conversation (type /reset to start over, /quit or end "
                       "input to leave)",
                       description="Read one message per line from stdin and print the model's answer. A chat "
                       "model (a tokenizer with a chat template, e.g. Llama 3 or Qwen3 Instruct) and an "
                       "instruction-tuned model (buildllm finetune instruct) keep the conversation, lay it out "
                       "in their template and print only the answer, which ends at the model's end-of-turn "
                       "token; base models continue each line's text.")
    model_options(p, SamplingOptions)
    p.set_defaults(run=run_chat)


def run_chat(args) -> int:
    from buildllm.finetune.instruct import PromptTemplate
    from buildllm.generation.chat import chat_ids, chat_prompt, stop_strings
    from buildllm.generation.sampling import check_sampling

    check_sampling(args.temperature, args.top_k, args.top_p, args.max_new_tokens)
    loaded = load_for_inference(args)
    model, tokenizer = loaded
    template = None
    if loaded.prompt_template is not None:  # an instruction model: its template wraps each turn
        template = PromptTemplate.from_dict(loaded.prompt_template, f"{args.model}/prompt_template.json")
    # A base model has learned no turns: chat continues the text as it is typed, one line at a time.
    conversational = tokenizer.chat_template is not None or template is not None
    stops = [*stop_strings(tokenizer, template), args.stop] if conversational else [args.stop]
    sampler = _sampler(args, model)
    interactive = sys.stdin.isatty()
    if interactive:
        kind = ("chat model (its chat template)" if tokenizer.chat_template is not None
                else f"instruction model ({template.name} template)" if template
                else "base model: it continues your text")
        print(f"{kind}; /reset starts over, /quit or Ctrl-D leaves", file=sys.stderr)
    messages: list[dict] = []
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() == "/quit":  # "" is end of input
            return 0
        line = line.rstrip("\r\n")
        if line.strip() == "/reset":
            messages = []
            continue
        if not line.strip():
            continue
        if not conversational:
            _print_continuation(model, tokenizer, line, sampler, stops)
            continue
        messages.append({"role": "user", "content": line})
        prompt = chat_ids(chat_prompt(messages, tokenizer, template), tokenizer)
        answer = _print_continuation(model, tokenizer, prompt, sampler, stops)
        messages.append({"role": "assistant", "content": answer})
