"""buildllm against Hugging Face transformers, side by side, in one process (issue 8).

Both contenders are built from the same GPTConfig and hold the same weights (ours are copied into
the transformers model of the same architecture, ``twins.py``: ``GPT2LMHeadModel`` for GPT-2's
blocks, GPT-NeoX or Qwen3 for the levers that make those, and the logits are checked to agree
before anything is timed). The ``train-default`` rows race the default ``buildllm train`` step
(its model, batch, optimizer and ``torch.compile`` of the forward pass with the loss) against the
same step of the transformers twin, eager as transformers runs by default, and compiled the same way. Every row runs the same batch, sequence length,
dtype and thread count for both, alternating the two contenders repeat by repeat (A B, B A, ...)
so that a noisy, shared machine slows both alike; the figures are medians over the timed repeats,
and the ratio buildllm/HF is the median of the per-repeat ratios.

MFU (model FLOPs utilisation) divides the model's FLOPs per second (``describe()``: 6N plus
attention for a training step, 2N plus attention for a forward pass) by the library's matmul peak
(``training.runtime.peak_flops``, the one the progress bar's MFU uses) measured at the start of the
run, in bf16 and in fp32, on this very machine. Training rows time the library's own step
(``training.loop.train_step`` with ``training.optim.make_optimizer``) for both contenders.

Peak memory comes from a fresh subprocess per contender and row (CPU: the growth of the peak
resident set, ``ru_maxrss``, over what the imports took; CUDA: ``torch.cuda.max_memory_allocated``).

    .venv/bin/python benchmarks/run.py                       # everything, the gpt2 preset
    .venv/bin/python benchmarks/run.py --rows decode --steps 5
    .venv/bin/python benchmarks/run.py --quick               # a tiny smoke run (seconds)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace

import torch
import twins
from torch import nn

from buildllm.errors import UserError
from buildllm.generation.quantization import quantize
from buildllm.models.gpt2 import GPTConfig, GPTModel, describe
from buildllm.training.config import TrainConfig
from buildllm.training.loop import Printer, Run, Runtime, TaskLoss, train_step
from buildllm.training.optim import make_optimizer
from buildllm.training.runtime import Dist, autocast, peak_flops, pick_device
from buildllm.training.task import LMTask

# Which rows exist. A row id is "<kind>-<variant>"; --rows takes ids or their prefixes.
ROWS = (
    "train-fp32", "train-bf16",  # the main preset
    "train-small-fp32", "train-small-bf16",  # the small preset
    "train-compile-bf16",  # torch.compile both (compile time reported apart)
    "train-default-bf16",  # the default `buildllm train` step (compiled) against the HF twin as it comes (eager)
    "train-default-compile-bf16",  # the same with both compiled
    "forward-fp32", "forward-bf16",
    "decode-b1", "decode-b8",  # fp32 weights
    "decode-b1-bf16w", "decode-b8-bf16w",  # bf16 weights
    "decode-b1-int8", "decode-b8-int8",  # buildllm with int8 weights (quantize), HF as it comes (fp32)
    "decode-b1-int4", "decode-b8-int4",  # buildllm with int4 weights (groups of 32), HF fp32
    "prepare",
)
DEFAULT_CPU_ROWS = ROWS
DEFAULT_CUDA_ROWS = ("train-bf16", "train-compile-bf16", "train-default-bf16", "forward-bf16", "decode-b1", "decode-b8",
                     "decode-b1-bf16w", "decode-b8-bf16w")
PROMPT_TOKENS = 32  # decoding starts from a prompt of this many (random) tokens


# Setup -------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="gpt2", help="main model shape (default gpt2)")
    p.add_argument("--small-preset", default="mini", help="the smaller training row's shape (default mini)")
    p.add_argument("--batch", type=int, help="training/forward batch (default 4 on CPU, 16 on CUDA)")
    p.add_argument("--seq", type=int, help="training/forward sequence length (default 256 on CPU, 1024 on CUDA)")
    p.add_argument("--steps", type=int, default=5, help="timed repeats per contender (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed repeats first (default 1)")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens to decode (default 128)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    p.add_argument("--rows", help=f"comma-separated row ids or prefixes, from: {', '.join(ROWS)}")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu or cuda")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall time (default), or CPU seconds of this process: steadier while other jobs share "
                        "the machine, and meaningful with --threads 1")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--hf-cache", choices=("dynamic", "static"), default="dynamic",
                   help="HF generate's cache_implementation (default dynamic, its default)")
    p.add_argument("--prepare-mb", type=float, default=64, help="corpus size for the prepare row (default 64)")
    p.add_argument("--quick", action="store_true", help="tiny shapes and few repeats: a smoke run")
    p.add_argument("--json", metavar="OUT", help="also write the results as JSON to OUT")
    p.add_argument("--child", help=argparse.SUPPRESS)  # internal: one memory measurement
    args = p.parse_args(argv)
    if args.quick:
        args.preset, args.small_preset = "nano", "nano"
        args.batch, args.seq = args.batch or 2, args.seq or 32
        args.steps, args.warmup = min(args.steps, 2), min(args.warmup, 1)
        args.new_tokens = min(args.new_tokens, 8)
        args.prepare_mb = min(args.prepare_mb, 1)
    return args


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def model_config(preset: str, seq: int, quick: bool) -> GPTConfig:
    """The preset with GPT-2's vocabulary, no dropout, and a window that holds ``seq`` tokens."""
    cfg = GPTConfig.from_preset(preset, vocab_size=50257, drop_rate=0.0)
    return replace(cfg, context_length=max(cfg.context_length, seq, PROMPT_TOKENS + 128 if not quick else 0))


# The two contenders, with the same weights --------------------------------------------------------


class HFLogits(nn.Module):
    """A transformers model called the way ours is: token ids in, logits out (no cache built)."""

    def __init__(self, hf: nn.Module):
        super().__init__()
        self.hf = hf

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.hf(input_ids=idx, use_cache=False).logits


def make_pair(cfg: GPTConfig, device: torch.device, seed: int = 0) -> tuple[GPTModel, nn.Module]:
    """Our model (seeded GPT-2 init) and its transformers twin holding a copy of its weights."""
    torch.manual_seed(seed)
    ours = GPTModel(cfg)
    hf = twins.twin(cfg)
    twins.copy_weights(ours, hf)
    ours, hf = ours.to(device), hf.to(device)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # compare in true fp32
    with torch.no_grad():
        x = torch.randint(cfg.vocab_size, (2, 16), device=device)
        diff = (ours.eval()(x) - HFLogits(hf.eval())(x)).abs().max().item()
    torch.backends.cuda.matmul.allow_tf32 = tf32
    if diff > 1e-3:
        raise RuntimeError(f"buildllm and HF disagree on the same weights: max |logit diff| {diff:.2e}")
    return ours, hf


# Timing ------------------------------------------------------------------------------------------


@dataclass
class Race:
    seconds: dict[str, list[float]]  # contender -> timed repeats
    first_call: dict[str, float]  # contender -> the first warmup call (includes any compilation)

    def median(self, name: str) -> float:
        return statistics.median(self.seconds[name])

    def ratio(self, a: str, b: str) -> float:
        """Speed of a over b: the median of the per-repeat ratios (noise shared by a pair cancels)."""
        return statistics.median(tb / ta for ta, tb in zip(self.seconds[a], self.seconds[b]))


def race(contenders: dict[str, callable], repeats: int, warmup: int, device: torch.device,
         clock=time.perf_counter) -> Race:
    """Time each contender ``repeats`` times, interleaved, order flipped every repeat.

    ``clock``: wall time by default; ``time.process_time`` (CPU seconds of this process) is steadier
    on a machine shared with other jobs, and fair when run with one thread (``--clock cpu``).
    """
    names = list(contenders)
    first = {}
    for name in names:
        for i in range(warmup):
            sync(device)
            t = clock()
            contenders[name]()
            sync(device)
            if i == 0:
                first[name] = clock() - t
    seconds = {name: [] for name in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            sync(device)
            t = clock()
            contenders[name]()
            sync(device)
            seconds[name].append(clock() - t)
    return Race(seconds, first)


class FixedBatch(LMTask):
    """Pretraining's task on one fixed random batch: the library's loss, nothing else to load."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.batches = SimpleNamespace(next_batch=lambda: (x, y))


def train_step_fn(model: nn.Module, batch: int, seq: int, vocab: int, dtype: torch.dtype,
                  device: torch.device, opt: torch.optim.Optimizer | None = None, compiled: bool = False):
    """One training step of the library's engine (``training.loop.train_step``: forward, summed
    loss, backward, clipping, the optimizer step; AdamW from ``training.optim`` unless ``opt``) on a
    fixed random batch; ``compiled``: the forward pass and the loss as one ``torch.compile`` graph,
    as ``buildllm train`` runs them (``training.loop.TaskLoss``)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randint(vocab, (batch, seq), generator=g).to(device)
    y = torch.randint(vocab, (batch, seq), generator=g).to(device)
    cfg = TrainConfig(lr=1e-4, weight_decay=0.1, no_decay=())  # pretraining's clipping and betas
    model.train()
    task = FixedBatch(x, y)
    run = Run(task=task, cfg=cfg, rt=Runtime(Dist(), device, dtype), folder=Path("."),
              raw_model=model, say=Printer(False), max_steps=0, loss_of=TaskLoss(task, model, compiled),
              optimizer=opt or make_optimizer(model, cfg, device),
              scaler=torch.amp.GradScaler(device.type, enabled=False))
    return lambda: train_step(run)


def forward_fn(model: nn.Module, batch: int, seq: int, vocab: int, dtype: torch.dtype, device: torch.device):
    x = torch.randint(vocab, (batch, seq), generator=torch.Generator().manual_seed(1)).to(device)
    model.eval()

    def forward() -> None:
        with torch.inference_mode(), autocast(device, dtype):
            model(x)

    return forward


def decode_fn(model: nn.Module, who: str, batch: int, new_tokens: int, device: torch.device,
              hf_cache: str = "dynamic", out: dict | None = None):
    """Greedy decoding of ``new_tokens`` from a fixed random prompt; the result lands in ``out[who]``.

    ``who`` is "ours" (``buildllm.generate``) or "hf" (``GPT2LMHeadModel.generate``).
    """
    from buildllm.generation.sampling import generate

    vocab = model.config.vocab_size if who == "hf" else model.cfg.vocab_size
    prompt = torch.randint(vocab, (batch, PROMPT_TOKENS), generator=torch.Generator().manual_seed(2)).to(device)
    out = {} if out is None else out
    model.eval()
    if who == "ours":
        return lambda: out.__setitem__(who, generate(model, prompt, new_tokens, temperature=0.0, use_cache=True))
    extra = {"cache_implementation": "static"} if hf_cache == "static" else {}
    return lambda: out.__setitem__(who, model.generate(
        prompt, attention_mask=torch.ones_like(prompt), do_sample=False, use_cache=True,
        max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=vocab - 1, **extra))


# Rows --------------------------------------------------------------------------------------------


@dataclass
class Row:
    id: str
    what: str  # shape and settings, in words
    tokens: int  # tokens processed per call
    ours_tps: float
    hf_tps: float
    ratio: float  # buildllm / HF
    peak: str  # which matmul peak the MFU is against: "bf16" or "fp32"
    flops_per_token: float = 0.0
    ours_mfu: float | None = None
    hf_mfu: float | None = None
    ours_mem_mb: float | None = None
    hf_mem_mb: float | None = None
    notes: dict = field(default_factory=dict)


def _row(row_id, what, tokens, r: Race, peak_key, flops, peaks, **notes) -> Row:
    ours_tps, hf_tps = tokens / r.median("ours"), tokens / r.median("hf")
    mfu = (lambda tps: flops * tps / peaks[peak_key]) if flops else (lambda tps: None)
    return Row(row_id, what, tokens, ours_tps, hf_tps, r.ratio("ours", "hf"), peak_key, flops,
               mfu(ours_tps), mfu(hf_tps), notes=notes)


def bench_train(row_id: str, cfg: GPTConfig, args, device, peaks, dtype: torch.dtype,
                compile_: bool = False) -> Row:
    ours, hf = make_pair(cfg, device)
    models = {"ours": ours, "hf": HFLogits(hf)}
    fns = {k: train_step_fn(m, args.batch, args.seq, cfg.vocab_size, dtype, device, compiled=compile_)
           for k, m in models.items()}
    r = race(fns, args.steps, max(args.warmup, 2 if compile_ else 0), device, _clock(args))
    flops = describe(replace(cfg, context_length=args.seq))["train_flops_per_token"]
    notes = {}
    if compile_:  # the first call compiles: what it took beyond an ordinary step
        notes = {f"{k}_compile_s": round(r.first_call[k] - r.median(k), 1) for k in fns}
    name = "bf16 autocast" if dtype == torch.bfloat16 else "fp32"
    what = f"{_preset_of(cfg, args)} b{args.batch} s{args.seq} {name}{' compiled' if compile_ else ''}"
    return _row(row_id, what, args.batch * args.seq, r, _peak_key(dtype), flops, peaks, **notes)


def default_training(quick: bool) -> tuple[GPTConfig, TrainConfig]:
    """The model and the resolved training config of a plain ``buildllm train`` (``--quick``: the
    nano shape with the same levers)."""
    from buildllm.training.config import resolve

    cfg = resolve(TrainConfig())
    model = GPTConfig.from_preset(cfg.preset, drop_rate=0.0, **cfg.model)
    if quick:
        model = replace(model, **{k: getattr(GPTConfig.from_preset("nano"), k)
                                  for k in ("context_length", "emb_dim", "n_heads", "n_layers")})
        cfg = cfg.replace(batch_size=2, context_length=32)
    return model, cfg


def default_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device, ours: bool):
    """The default run's optimizer for ours (``training.optim``) and the same for the twin: Muon for
    the blocks' matrices, AdamW for the rest, at the default learning rates."""
    if ours or cfg.optimizer != "muon":
        return make_optimizer(model, cfg, device)
    from buildllm.training.optim import Optimizers

    matrices = twins.muon_matrices(model)
    rest = [p for p in model.parameters() if all(p is not m for m in matrices)]
    decay = [p for p in rest if p.dim() >= 2]
    keep = [p for p in rest if p.dim() < 2]
    muon = torch.optim.Muon(matrices, lr=cfg.muon_lr, weight_decay=cfg.muon_weight_decay, momentum=cfg.muon_momentum)
    adamw = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": keep, "weight_decay": 0.0}],
                              lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=True)
    return Optimizers(muon=muon, adamw=adamw)


def bench_default_training(row_id: str, args, device, peaks) -> Row:
    """The default ``buildllm train`` step, compiled as it runs (the default ``compile``), against
    the transformers twin's (eager, or with ``-compile-`` compiled the same way)."""
    model_cfg, cfg = default_training(args.quick)
    ours, hf = make_pair(model_cfg, device)
    both_compiled = "compile" in row_id
    batch, seq = cfg.batch_size, cfg.context_length
    dtype = torch.bfloat16
    compiled = {"ours": bool(cfg.compile), "hf": both_compiled}
    fns = {who: train_step_fn(m, batch, seq, model_cfg.vocab_size, dtype, device,
                              default_optimizer(m, cfg, device, who == "ours"), compiled=compiled[who])
           for who, m in (("ours", ours), ("hf", HFLogits(hf)))}
    r = race(fns, args.steps, max(args.warmup, 2), device, _clock(args))
    flops = describe(replace(model_cfg, context_length=seq))["train_flops_per_token"]
    notes = {f"{k}_compile_s": round(r.first_call[k] - r.median(k), 1) for k in fns if compiled[k]}
    notes["hf_model"] = type(hf).__name__
    state = lambda on: "compiled" if on else "eager"  # noqa: E731
    what = (f"{cfg.preset} (vocab {model_cfg.vocab_size}) b{batch} s{seq} bf16, {cfg.optimizer}, "
            f"buildllm {state(compiled['ours'])}, HF {state(compiled['hf'])}")
    return _row(row_id, what, batch * seq, r, "bf16", flops, peaks, **notes)


def bench_forward(row_id: str, cfg: GPTConfig, args, device, peaks, dtype: torch.dtype) -> Row:
    ours, hf = make_pair(cfg, device)
    fns = {"ours": forward_fn(ours, args.batch, args.seq, cfg.vocab_size, dtype, device),
           "hf": forward_fn(HFLogits(hf), args.batch, args.seq, cfg.vocab_size, dtype, device)}
    r = race(fns, args.steps, args.warmup, device, _clock(args))
    flops = describe(replace(cfg, context_length=args.seq))["forward_flops_per_token"]
    name = "bf16 autocast" if dtype == torch.bfloat16 else "fp32"
    return _row(row_id, f"{_preset_of(cfg, args)} b{args.batch} s{args.seq} {name}",
                args.batch * args.seq, r, _peak_key(dtype), flops, peaks)


def bench_decode(row_id: str, cfg: GPTConfig, args, device, peaks, batch: int, weights: torch.dtype,
                 scheme: str | None = None) -> Row:
    ours, hf = make_pair(cfg, device)
    ours, hf = ours.to(weights), hf.to(weights)
    if scheme:
        quantize(ours, scheme)
    out = {}
    fns = {"ours": decode_fn(ours, "ours", batch, args.new_tokens, device, out=out),
           "hf": decode_fn(hf, "hf", batch, args.new_tokens, device, args.hf_cache, out)}
    r = race(fns, args.steps, args.warmup, device, _clock(args))
    # Fraction of generated tokens the two agree on: 1.0 expected with fp32 weights.
    same = (out["ours"][:, PROMPT_TOKENS:] == out["hf"][:, PROMPT_TOKENS:]).float().mean().item()
    # A decoding step attends to PROMPT_TOKENS + new_tokens / 2 positions on average.
    flops = describe(replace(cfg, context_length=PROMPT_TOKENS + args.new_tokens // 2))["forward_flops_per_token"]
    precision = f"buildllm {scheme} weights, HF fp32" if scheme else ("bf16" if weights == torch.bfloat16 else "fp32")
    what = f"{_preset_of(cfg, args)} batch {batch}, {args.new_tokens} new tokens, {precision} weights"
    # Quantized weights are multiplied in bf16: that peak is the one to compare with.
    peak_key = "bf16" if scheme else _peak_key(weights)
    return _row(row_id, what, batch * args.new_tokens, r, peak_key, flops, peaks,
                same_tokens=round(same, 3), hf_cache=args.hf_cache)


def _scheme_of(row_id: str) -> str | None:
    """"int8" for decode-b1-int8 and so on; None for rows at full precision."""
    return next((s for s in ("int8", "int4") if row_id.endswith(s)), None)


def _clock(args):
    return time.process_time if args.clock == "cpu" else time.perf_counter


def _peak_key(dtype: torch.dtype) -> str:
    return "bf16" if dtype == torch.bfloat16 else "fp32"


def _preset_of(cfg: GPTConfig, args) -> str:
    return args.preset if cfg.emb_dim == GPTConfig.from_preset(args.preset).emb_dim else args.small_preset


# Prepare: buildllm's streaming prepare_corpus against raw tiktoken ---------------------------------


def make_corpus(directory: Path, megabytes: float) -> Path:
    """The bundled Shakespeare, repeated to about ``megabytes`` MB, as one text file."""
    from buildllm.data.shakespeare import shakespeare_plays

    text = "\n\n".join(shakespeare_plays().values())
    path = directory / "corpus.txt"
    target = int(megabytes * 1e6)
    with open(path, "w", encoding="utf-8") as f:
        written = 0
        while written < target:
            piece = text[: target - written] if target - written < len(text) else text
            f.write(piece + "\n\n")
            written += len(piece.encode("utf-8")) + 2
    return path


def raw_tiktoken(path: Path) -> int:
    """Read the file, encode ~1 MB pieces with one ``encode_ordinary_batch``; the token count.

    Pieces end at a newline with visible characters on both sides, where GPT-2's pre-tokenizer
    splits anyway, so the count equals that of encoding the whole text at once.
    """
    from buildllm.tokenizer import get_tokenizer

    text = path.read_text(encoding="utf-8")
    pieces, i = [], 0
    while i < len(text):
        j = text.find("\n", i + (1 << 20))
        while 0 < j < len(text) - 1 and (text[j - 1].isspace() or text[j + 1].isspace()):
            j = text.find("\n", j + 1)
        j = len(text) if j < 0 or j == len(text) - 1 else j + 1
        pieces.append(text[i:j])
        i = j
    return sum(len(ids) for ids in get_tokenizer("gpt2").encoding.encode_ordinary_batch(pieces))


def run_prepare(path: Path, out: Path) -> int:
    from buildllm.data.prepare import prepare_corpus

    corpus = prepare_corpus(path, out, tokenizer="gpt2", progress=False, force=True)
    return len(corpus.train) + len(corpus.val)


def bench_prepare(args, device, peaks) -> Row:
    with tempfile.TemporaryDirectory(prefix="buildllm-bench-") as tmp:
        path = make_corpus(Path(tmp), args.prepare_mb)
        nbytes = path.stat().st_size
        counts = {}
        fns = {"ours": lambda: counts.__setitem__("ours", run_prepare(path, Path(tmp) / "out")),
               "hf": lambda: counts.__setitem__("hf", raw_tiktoken(path))}
        r = race(fns, max(3, args.steps // 2) if not args.quick else 1, args.warmup, torch.device("cpu"))
    row = _row("prepare", f"{nbytes / 1e6:.0f} MB of text, gpt2 BPE (vs raw tiktoken)", nbytes, r, "fp32", 0, peaks,
               ours_tokens=counts["ours"], tiktoken_tokens=counts["hf"])
    row.ours_tps, row.hf_tps = row.ours_tps / 1e6, row.hf_tps / 1e6  # MB/s, not tokens/s
    return row


# Peak memory, each in a fresh process -----------------------------------------------------------


def child(spec: dict) -> dict:
    """Run one row's workload for one contender; return the peak memory it added (MB)."""
    device = torch.device(spec["device"])
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    kind, who = spec["kind"], spec["who"]
    cfg = GPTConfig.from_dict(spec["cfg"]) if "cfg" in spec else None
    dtype = getattr(torch, spec.get("dtype", "float32"))
    tmp = tempfile.TemporaryDirectory(prefix="buildllm-bench-")
    if kind == "prepare":
        path = make_corpus(Path(tmp.name), spec["prepare_mb"])
    # What both contenders need anyway is loaded before the baseline: the libraries, the tokenizer.
    import transformers.models.gpt2.modeling_gpt2  # noqa: F401

    import buildllm.generation.sampling  # noqa: F401
    from buildllm.tokenizer import get_tokenizer

    get_tokenizer("gpt2")
    base = _reset_peak_rss()

    if kind == "prepare":
        fn = (lambda: run_prepare(path, Path(tmp.name) / "out")) if who == "ours" else (lambda: raw_tiktoken(path))
    else:
        torch.manual_seed(0)
        model = GPTModel(cfg) if who == "ours" else twins.twin(cfg)
        model = model.to(device)
        if kind == "decode":
            model = model.to(dtype)
            if who == "ours" and spec.get("scheme"):
                quantize(model, spec["scheme"])
            fn = decode_fn(model, who, spec["batch"], spec["new_tokens"], device, spec["hf_cache"])
        else:
            m = model if who == "ours" else HFLogits(model)
            make = train_step_fn if kind == "train" else forward_fn
            fn = make(m, spec["batch"], spec["seq"], cfg.vocab_size, dtype, device)
        del model
    # Count the weights but not the transient of building them (in fp32, before any bf16 cast).
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _reset_peak_rss()
    for _ in range(2):  # the second call sees the optimizer state and warm caches
        fn()
    sync(device)
    if device.type == "cuda":
        return {"peak_mb": torch.cuda.max_memory_allocated(device) / 2**20}
    tmp.cleanup()
    return {"peak_mb": _peak_rss_mb() - base}


def _reset_peak_rss() -> float:
    """Reset the peak resident set to the current one where Linux allows it; return it in MB."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")  # "5": reset VmHWM (Linux 4.0+)
    return _peak_rss_mb()


def _peak_rss_mb() -> float:
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**10  # kB
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # never reset: includes the imports
    return kb / 2**20 if sys.platform == "darwin" else kb / 2**10  # bytes on macOS, KiB on Linux


def measure_memory(row_id: str, cfg: GPTConfig | None, args, device) -> tuple[float | None, float | None]:
    if row_id.startswith(("train-compile", "train-default")):
        return None, None  # compilation's own memory would dominate; the eager rows show the model's
    kind = row_id.split("-")[0]
    spec = {"kind": kind, "device": str(device), "threads": args.threads, "batch": args.batch, "seq": args.seq,
            "new_tokens": args.new_tokens, "hf_cache": args.hf_cache, "prepare_mb": args.prepare_mb}
    if cfg is not None:
        spec["cfg"] = cfg.to_dict()
    if kind in ("train", "forward"):
        spec["dtype"] = "bfloat16" if row_id.endswith("bf16") else "float32"
    if kind == "decode":
        spec["batch"] = int(row_id.split("-")[1][1:])
        spec["dtype"] = "bfloat16" if row_id.endswith("bf16w") else "float32"
        spec["scheme"] = _scheme_of(row_id)
    peaks = []
    for who in ("ours", "hf"):
        spec["who"] = who
        proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)],
                              capture_output=True, text=True)
        if proc.returncode:
            print(f"warning: memory child for {row_id}/{who} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
            peaks.append(None)
            continue
        peaks.append(json.loads(proc.stdout.strip().splitlines()[-1])["peak_mb"])
    return peaks[0], peaks[1]


# Output ------------------------------------------------------------------------------------------


def cpu_name() -> str:
    """The processor's name as Linux's cpuinfo gives it (the machine's architecture elsewhere)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict:
    import transformers

    info = {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(), "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def format_table(rows: list[Row], peaks: dict) -> str:
    head = ("row", "what", "buildllm", "HF", "ratio", "MFU ours", "MFU HF", "mem ours", "mem HF")
    lines = [head]
    for r in rows:
        unit = "MB/s" if r.id == "prepare" else "tok/s"
        mfu = lambda v: f"{100 * v:.0f}% {r.peak}" if v is not None else "-"  # noqa: E731
        mem = lambda v: f"{v:,.0f} MB" if v is not None else "-"  # noqa: E731
        lines.append((r.id, r.what, f"{r.ours_tps:,.1f} {unit}", f"{r.hf_tps:,.1f} {unit}", f"{r.ratio:.2f}x",
                      mfu(r.ours_mfu), mfu(r.hf_mfu), mem(r.ours_mem_mb), mem(r.hf_mem_mb)))
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
    out = ["  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    out.append(f"matmul peak measured at the start: bf16 {peaks['bf16'] / 1e9:,.0f} GFLOP/s, "
               f"fp32 {peaks['fp32'] / 1e9:,.0f} GFLOP/s; ratio = buildllm / HF (prepare: / raw tiktoken)")
    for r in rows:
        if r.notes:
            out.append(f"{r.id}: " + ", ".join(f"{k} {v}" for k, v in r.notes.items()))
    return "\n".join(out)


# Main --------------------------------------------------------------------------------------------


def select_rows(spec: str | None, device: torch.device) -> list[str]:
    if spec is None:
        return list(DEFAULT_CUDA_ROWS if device.type == "cuda" else DEFAULT_CPU_ROWS)
    chosen = []
    for want in (s.strip() for s in spec.split(",") if s.strip()):
        matches = [want] if want in ROWS else [r for r in ROWS if r.startswith(want + "-")]
        if not matches:
            sys.exit(f"error: unknown row {want!r}; rows are: {', '.join(ROWS)}")
        chosen += [m for m in matches if m not in chosen]
    return [r for r in ROWS if r in chosen]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    try:
        device = pick_device(args.device)
    except UserError as e:
        sys.exit(f"error: {e}")
    if device.type == "cuda":
        # The GPU setting of the issue: a bigger batch, the full GPT-2 window, TF32 for fp32 matmuls.
        args.batch, args.seq = args.batch or 16, args.seq or 1024
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    args.batch, args.seq = args.batch or 4, args.seq or 256
    rows_wanted = select_rows(args.rows, device)
    info = machine_info(device)
    print(f"# {info['cpu']}, {info['cores']} cores, {info['threads']} torch threads, torch {info['torch']}, "
          f"transformers {info['transformers']}" + (f", {info['gpu']}" if "gpu" in info else ""), flush=True)

    peaks = {dt: peak_flops(device, getattr(torch, name)) for dt, name in (("bf16", "bfloat16"), ("fp32", "float32"))}
    print(f"# matmul peak (training.runtime.peak_flops): bf16 {peaks['bf16'] / 1e9:,.0f} GFLOP/s, fp32 {peaks['fp32'] / 1e9:,.0f} GFLOP/s",
          flush=True)

    main_cfg = model_config(args.preset, args.seq, args.quick)
    small_cfg = model_config(args.small_preset, args.seq, args.quick)
    rows = []
    for row_id in rows_wanted:
        t = time.perf_counter()
        cfg = small_cfg if row_id.startswith("train-small") else main_cfg
        dtype = torch.bfloat16 if "bf16" in row_id else torch.float32
        if row_id.startswith("train-default"):
            row, cfg = bench_default_training(row_id, args, device, peaks), None
        elif row_id.startswith("train"):
            row = bench_train(row_id, cfg, args, device, peaks, dtype, compile_="compile" in row_id)
        elif row_id.startswith("forward"):
            row = bench_forward(row_id, cfg, args, device, peaks, dtype)
        elif row_id.startswith("decode"):
            row = bench_decode(row_id, cfg, args, device, peaks, int(row_id.split("-")[1][1:]), dtype,
                               scheme=_scheme_of(row_id))
        else:
            row = bench_prepare(args, device, peaks)
            cfg = None
        if not args.no_memory:
            row.ours_mem_mb, row.hf_mem_mb = measure_memory(row_id, cfg, args, device)
        rows.append(row)
        print(f"{row.id}: buildllm {row.ours_tps:,.1f}, HF {row.hf_tps:,.1f}, ratio {row.ratio:.2f}x "
              f"({time.perf_counter() - t:.0f} s)", flush=True)

    print()
    print(format_table(rows, peaks))
    if args.json:
        result = {"date": time.strftime("%Y-%m-%d"), "machine": info, "peaks": peaks,
                  "settings": {k: v for k, v in vars(args).items() if k != "child"},
                  "rows": [asdict(r) for r in rows]}
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
