"""A/B tests of single performance levers, buildllm against itself (issue 8).

``run.py`` compares buildllm with Hugging Face; this file decides which levers buildllm should
use at all. Each lever builds a baseline and a variant that differ in that one thing, times them
interleaved (``run.race``) and prints the variant's speed over the baseline's. Levers that pay
were kept (in the package or as the harness's defaults), the rest were dropped: see README.md.

    .venv/bin/python benchmarks/levers.py --preset mini --levers fused-layernorm,fused-gelu
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
import run  # noqa: E402  (the harness next to this file)

from buildllm.generation.sampling import generate, sample_next_token  # noqa: E402
from buildllm.models.gpt2 import GELU, GPTModel, KVCache, LayerNorm  # noqa: E402


class FusedLayerNorm(LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.scale.shape, self.scale, self.shift, self.eps)


class ManualLayerNorm(LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=-1, keepdim=True)
        var = x.var(dim=-1, keepdim=True, unbiased=False)
        return self.scale * (x - mean) / torch.sqrt(var + self.eps) + self.shift


class FusedGELU(GELU):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate="tanh")


class FormulaGELU(GELU):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import math

        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def swap(model: nn.Module, base: type, new: type) -> nn.Module:
    """Make every ``base`` module of ``model`` a ``new`` one (same parameters, other forward)."""
    for m in model.modules():
        if isinstance(m, base):
            m.__class__ = new
    return model


class ConcatKVCache(KVCache):
    """A growing cache: torch.cat per step instead of writing into preallocated tensors."""

    def __init__(self, cfg, batch_size, max_length=None, device="cpu", dtype=torch.float32):
        super().__init__(cfg, batch_size, 1, device, dtype)  # only for valid/padded/length
        self.max_length = max_length or cfg.context_length
        self.valid = torch.ones(batch_size, self.max_length, device=device, dtype=torch.bool)
        self.k: list = [None] * cfg.n_layers
        self.v: list = [None] * cfg.n_layers

    def update(self, layer, keys, values):
        if self.k[layer] is None:
            self.k[layer], self.v[layer] = keys, values
        else:
            self.k[layer] = torch.cat([self.k[layer], keys], dim=2)
            self.v[layer] = torch.cat([self.v[layer], values], dim=2)
        return self.k[layer], self.v[layer]


def greedy(model: GPTModel, prompt: torch.Tensor, new_tokens: int, cache_cls=KVCache, grad_mode=torch.inference_mode):
    """The plainest greedy loop with a KV cache (to vary one thing of generate at a time)."""
    with grad_mode():
        cache = cache_cls(model.cfg, prompt.shape[0], prompt.shape[1] + new_tokens, dtype=model.wte.weight.dtype)
        logits = model(prompt, kv_cache=cache)[:, -1]
        for _ in range(new_tokens):
            nxt = logits.argmax(-1, keepdim=True)
            logits = model(nxt, kv_cache=cache)[:, -1]


# The levers ---------------------------------------------------------------------------------------


def sort_and_multinomial(logits, temperature, top_k=None, top_p=None, generator=None):
    """The sampler before sample_next_token's: top-k and top-p over the whole row (sorted for top-p),
    then torch.multinomial over every token."""
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    if top_k is not None:
        values, indices = torch.topk(logits, top_k, dim=-1)
        logits = torch.full_like(logits, -math.inf).scatter_(-1, indices, values)
    if top_p is not None:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        sorted_logits.masked_fill_(torch.cumsum(probs, dim=-1) - probs >= top_p, -math.inf)
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    return torch.multinomial(torch.softmax(logits, dim=-1), num_samples=1, generator=generator).squeeze(-1)


def sampling_pair(args, **settings):
    """128 draws per row from GPT-2-sized logits, old sampler against sample_next_token. The logits
    are peaked as a trained model's are (normal, standard deviation 4): a random model's flat ones
    make top-p's nucleus most of the vocabulary."""
    logits = 4 * torch.randn(args.decode_batch, 50257, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(0)

    def draws(sampler):
        return lambda: [sampler(logits, 1.0, generator=g, **settings) for _ in range(128)]
    return {"baseline": draws(sort_and_multinomial), "variant": draws(sample_next_token)}, args.decode_batch * 128


def ours(cfg, seed=0) -> GPTModel:
    torch.manual_seed(seed)
    return GPTModel(cfg)


def train_pair(args, make_a, make_b, dtype=torch.bfloat16, opt_a=None, opt_b=None):
    fns = {}
    for name, make, opt in (("baseline", make_a, opt_a), ("variant", make_b, opt_b)):
        model = make()
        fns[name] = run.train_step_fn(model, args.batch, args.seq, model.cfg.vocab_size, dtype,
                                      torch.device("cpu"), opt(model) if opt else None)
    return fns, args.batch * args.seq


def lever_fns(lever: str, args):
    cfg = run.model_config(args.preset, args.seq, False)
    dt = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    if lever == "fused-layernorm":
        return train_pair(args, lambda: swap(ours(cfg), LayerNorm, ManualLayerNorm),
                          lambda: swap(ours(cfg), LayerNorm, FusedLayerNorm), dt)
    if lever == "fused-gelu":
        return train_pair(args, lambda: swap(ours(cfg), GELU, FormulaGELU),
                          lambda: swap(ours(cfg), GELU, FusedGELU), dt)
    if lever == "bf16-autocast":
        return {"baseline": train_pair(args, lambda: ours(cfg), lambda: ours(cfg), torch.float32)[0]["baseline"],
                "variant": train_pair(args, lambda: ours(cfg), lambda: ours(cfg), torch.bfloat16)[0]["variant"]}, \
            args.batch * args.seq
    if lever == "pad-vocab":
        padded = replace(cfg, vocab_size=(cfg.vocab_size + 63) // 64 * 64)
        return train_pair(args, lambda: ours(cfg), lambda: ours(padded), dt)
    if lever in ("foreach-adamw", "fused-adamw"):
        def adamw(**kw):
            return lambda m: torch.optim.AdamW(m.parameters(), lr=1e-4, weight_decay=0.1, **kw)
        base = adamw(foreach=False, fused=False)
        return train_pair(args, lambda: ours(cfg), lambda: ours(cfg), dt, opt_a=base,
                          opt_b=adamw(fused=True) if lever == "fused-adamw" else adamw(foreach=True))
    if lever == "compile":
        return train_pair(args, lambda: ours(cfg), lambda: torch.compile(ours(cfg)), dt)
    prompt = torch.randint(cfg.vocab_size, (args.decode_batch, run.PROMPT_TOKENS),
                           generator=torch.Generator().manual_seed(2))
    tokens = args.decode_batch * args.new_tokens
    if lever == "bf16-weights":
        a, b = ours(cfg).eval(), ours(cfg).eval().to(torch.bfloat16)
        return {"baseline": lambda: generate(a, prompt, args.new_tokens),
                "variant": lambda: generate(b, prompt, args.new_tokens)}, tokens
    if lever == "compile-decode":  # bf16 weights both; inductor with frozen (prepacked) weights
        from torch._inductor import config as inductor_config

        inductor_config.freezing = True
        a, b = ours(cfg).eval().to(torch.bfloat16), ours(cfg).eval().to(torch.bfloat16)
        b = torch.compile(b)
        return {"baseline": lambda: generate(a, prompt, args.new_tokens),
                "variant": lambda: generate(b, prompt, args.new_tokens)}, tokens
    if lever == "two-threads":  # wall clock whatever --clock says: CPU time cannot show it
        m = ours(cfg).eval()

        def with_threads(n):
            def call():
                torch.set_num_threads(n)
                generate(m, prompt, args.new_tokens)
            return call
        return {"baseline": with_threads(1), "variant": with_threads(2)}, tokens
    if lever == "static-kv-cache":
        m = ours(cfg).eval()
        return {"baseline": lambda: greedy(m, prompt, args.new_tokens, cache_cls=ConcatKVCache),
                "variant": lambda: greedy(m, prompt, args.new_tokens)}, tokens
    if lever == "inference-mode":
        m = ours(cfg).eval()
        return {"baseline": lambda: greedy(m, prompt, args.new_tokens, grad_mode=torch.no_grad),
                "variant": lambda: greedy(m, prompt, args.new_tokens)}, tokens
    if lever == "hf-static-cache":
        _, hf = run.make_pair(cfg, torch.device("cpu"))
        return {"baseline": run.decode_fn(hf, "hf", args.decode_batch, args.new_tokens, torch.device("cpu")),
                "variant": run.decode_fn(hf, "hf", args.decode_batch, args.new_tokens, torch.device("cpu"),
                                         hf_cache="static")}, tokens
    if lever.startswith("sampler-"):  # sample_next_token against the sort-and-multinomial sampler
        return sampling_pair(args, **{"sampler-temperature": {}, "sampler-top-k": {"top_k": 50},
                                      "sampler-top-p": {"top_p": 0.9}}[lever])
    raise SystemExit(f"unknown lever {lever!r}; levers: {', '.join(LEVERS)}")


LEVERS = ("fused-layernorm", "fused-gelu", "bf16-autocast", "pad-vocab", "foreach-adamw", "fused-adamw",
          "compile", "bf16-weights", "compile-decode", "static-kv-cache", "inference-mode", "hf-static-cache",
          "two-threads", "sampler-temperature", "sampler-top-k", "sampler-top-p")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="A/B tests of single levers, buildllm against itself")
    p.add_argument("--levers", default=",".join(LEVERS))
    p.add_argument("--preset", default="gpt2")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="training levers' autocast")
    p.add_argument("--decode-batch", type=int, default=1)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int)
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="cpu: CPU seconds of this process, steadier on a shared machine (use with --threads 1)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# {args.preset}, batch {args.batch} seq {args.seq} {args.dtype}; decode batch {args.decode_batch}, "
          f"{args.new_tokens} tokens; {torch.get_num_threads()} threads")
    for lever in args.levers.split(","):
        t = time.perf_counter()
        fns, tokens = lever_fns(lever, args)
        clock = time.process_time if args.clock == "cpu" and lever != "two-threads" else time.perf_counter
        compiles = lever in ("compile", "compile-decode")
        r = run.race(fns, args.steps, max(args.warmup, 2 if compiles else 0), torch.device("cpu"), clock)
        if args.threads:
            torch.set_num_threads(args.threads)
        extra = ""
        if compiles:
            extra = f", compile {r.first_call['variant'] - r.median('variant'):.0f} s"
        print(f"{lever}: baseline {tokens / r.median('baseline'):,.1f} tok/s, variant "
              f"{tokens / r.median('variant'):,.1f} tok/s, variant/baseline {r.ratio('variant', 'baseline'):.2f}x "
              f"(pairs: {', '.join(f'{b / v:.2f}' for v, b in zip(r.seconds['variant'], r.seconds['baseline']))})"
              f"{extra} [{time.perf_counter() - t:.0f} s]", flush=True)
        del fns
    return 0


if __name__ == "__main__":
    sys.exit(main())
