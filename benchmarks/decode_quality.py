"""What the C++ step's int8 inputs cost: a trained model's held-out text, scored both ways.

    .venv/bin/python benchmarks/decode_quality.py --model runs/shakespeare \
        --text ../shared/data/shakespeare/tempest_gut.txt

The C++ decoding step multiplies int8 and int4 codes by its inputs rounded to int8 numbers per
block of 32 (as llama.cpp does), where the readable model's PyTorch kernels take them in bf16. For
fp32, int8 and int4 weights this prints the bits per character of ``--windows`` windows of the
text (the model's context length each), scored by the readable model's forward and, token by
token, by the C++ step over the KV cache generation keeps (bf16 under int8 and int4 weights:
``sampling.cache_dtype``); and how many greedy tokens after an 8-token prompt from each window are
the same from the C++ step and from the readable steps, and from the readable fp32 model.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from buildllm import generate, load_model  # noqa: E402
from buildllm.errors import UserError  # noqa: E402
from buildllm.generation.fast_decode import fast_decoder  # noqa: E402
from buildllm.generation.quantization import quantize  # noqa: E402
from buildllm.generation.sampling import cache_dtype  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a trained run folder (buildllm train --out)")
    p.add_argument("--text", required=True, help="held-out text to score")
    p.add_argument("--windows", type=int, default=8, help="windows of the context length (default 8)")
    p.add_argument("--new-tokens", type=int, default=200, help="greedy tokens compared per window (default 200)")
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args(argv)


def bits_per_char(model, windows, chars: int, fast: bool) -> float:
    """Cross-entropy of every window's tokens after its first, in bits, per character."""
    bits = 0.0
    decoder = fast_decoder(model) if fast else None
    with torch.inference_mode():
        for window in windows:
            ids = torch.tensor([window])
            if fast:  # the first token through the model, then one C++ step per token
                cache = model.new_kv_cache(1, len(window), dtype=cache_dtype(model))
                logits = [model(ids[:, :1], kv_cache=cache)[:, -1].float()]
                logits += [decoder.step(ids[:, i], cache) for i in range(1, len(window) - 1)]
                logits = torch.cat(logits)
            else:
                logits = model(ids)[0, :-1].float()
            bits += F.cross_entropy(logits, ids[0, 1:], reduction="sum").item() / math.log(2)
    return bits / chars


def same_tokens(a: list[list[int]], b: list[list[int]], start: int) -> float:
    pairs = [(x, y) for row_a, row_b in zip(a, b) for x, y in zip(row_a[start:], row_b[start:])]
    return sum(x == y for x, y in pairs) / len(pairs)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        base, tokenizer = load_model(args.model, dtype=torch.float32)
        text = Path(args.text).read_text(encoding="utf-8")
    except (UserError, OSError) as e:
        sys.exit(f"error: {e}")
    if fast_decoder(base) is None:
        sys.exit("error: the C++ decoding step is not available here (it needs x86-64 with AVX-512 BF16 and a "
                 "C++ compiler, and BUILDLLM_FAST_DECODE not 0): nothing to compare")
    length = base.cfg.context_length
    ids = tokenizer.encode(text[len(text) // 4 :])[: args.windows * length]  # past the front matter
    windows = [ids[i * length : (i + 1) * length] for i in range(len(ids) // length)]
    if not windows:
        sys.exit(f"error: the last three quarters of {args.text} are fewer than {length} tokens (the model's "
                 "context length): give a longer text")
    chars = sum(len(tokenizer.decode(w[1:])) for w in windows)
    prompts = [w[:8] for w in windows]
    reference = generate(base, prompts, args.new_tokens, fast=False)
    print(f"{args.model}: {len(windows)} windows of {length} tokens ({chars} characters) of {args.text}")
    print("| weights | readable forward, bits/char | C++ step, bits/char | greedy tokens equal: C++ step vs readable steps "
          "| C++ step vs readable fp32 | readable steps vs readable fp32 |")
    print("|---|---|---|---|---|---|")
    for scheme in ("fp32", "int8", "int4"):
        model = copy.deepcopy(base) if scheme == "fp32" else quantize(copy.deepcopy(base), scheme)
        fast = generate(model, prompts, args.new_tokens)
        readable = generate(model, prompts, args.new_tokens, fast=False)
        print(f"| {scheme} | {bits_per_char(model, windows, chars, fast=False):.4f} | "
              f"{bits_per_char(model, windows, chars, fast=True):.4f} | {same_tokens(fast, readable, 8):.3f} | "
              f"{same_tokens(fast, reference, 8):.3f} | {same_tokens(readable, reference, 8):.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
