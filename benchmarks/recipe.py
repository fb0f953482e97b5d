"""The levers of the GPT-2 speedrun, each alone on the default run, at the same wall budget (issue 14).

Each variant is the default `buildllm train` (the bundled Shakespeare, the `shakespeare-cpu`
settings, the four held-out plays scored in full at the end) with one change: a `GPTConfig`
lever, `torch.compile`, or Muon. Every run trains through `buildllm.train` (the one training
loop), one after the other in this process, for `--minutes` of wall time each (compile time
included); the step cap of the default (3,700) is lifted so that every run stops on the clock and
its learning rate decays with the time spent (`--max-steps` puts a cap back). The table gives
bits per character on the held-out plays, the training throughput and the steps the budget held.

    .venv/bin/python benchmarks/recipe.py                          # every run, 8.5 minutes each
    .venv/bin/python benchmarks/recipe.py --only rope,relu2 --minutes 0.3   # a smoke run
    .venv/bin/python benchmarks/recipe.py --write-readme           # and into benchmarks/README.md

Run it on a quiet machine: the runs are timed by the wall clock, so anything else running costs
the later runs steps.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

from buildllm.files import atomic_write
from buildllm.training.config import DEFAULTS, TrainConfig
from buildllm.training.engine import TrainResult, train

# The default before the levers and Muon: GPT-2's blocks at the `shakespeare-cpu` shape, AdamW, eager,
# batch 8, cosine to a tenth of the peak learning rate.
OLD_DEFAULT = {"preset": "shakespeare-cpu", "optimizer": "adamw", "keep_best": False, "compile": False, "batch_size": 8,
               "min_lr_ratio": 0.1}
# name -> (what changes, TrainConfig changes). Each lever alone is the old default with that change.
RUNS: dict[str, tuple[str, dict]] = {
    "default": ("the old default: `shakespeare-cpu` (GPT-2's blocks), AdamW", OLD_DEFAULT),
    "new": ("the new default: `speedrun-cpu` (RoPE, RMSNorm, QK-norm, SwiGLU, zero-init), Muon, compiled, batch 16", {}),
    "rope": ("rotary positions, no learned position embedding", {"model": {"positions": "rope"}}),
    "rmsnorm": ("RMSNorm instead of LayerNorm", {"model": {"norm": "rmsnorm"}}),
    "qk_norm": ("RMSNorm of each head's queries and keys", {"model": {"qk_norm": True}}),
    "relu2": ("ReLU squared instead of GELU", {"model": {"activation": "relu2"}}),
    "swiglu": ("SwiGLU (hidden 352, about 8/3 emb_dim) instead of the GELU MLP", {"model": {"activation": "swiglu"}}),
    "untied": ("an output head of its own", {"model": {"tie_embeddings": False}}),
    "zero_init": ("output projections start at zero", {"model": {"zero_init": True}}),
    "softcap": ("logits soft-capped at 15 (nanochat, the speedrun)", {"model": {"logit_softcap": 15.0}}),
    "value_embeddings": ("value embeddings in layers 1 and 3 of 4", {"model": {"value_embeddings": True}}),
    "compile": ("`torch.compile` of the forward pass and the loss (its compile time in the budget)", {"compile": True}),
    "muon": ("Muon for the blocks' matrices (muon_lr 0.02)", {"optimizer": "muon"}),
    "rope_muon": ("the two that paid alone, together: rotary positions and Muon",
                  {"model": {"positions": "rope"}, "optimizer": "muon"}),
}
LEVERS = {"rope", "rmsnorm", "qk_norm", "relu2", "swiglu", "untied", "zero_init", "softcap", "value_embeddings",
          "compile", "muon", "rope_muon"}  # each on the old default

# A user's own text (--text FILE): the new default against the two recipes it must beat, scored on the
# file's last 10%. nanoGPT's CPU recipe (its README's `train_shakespeare_char` command, with as many
# iterations as the budget holds) in buildllm's terms: characters (a byte-level BPE of no merges: one
# token per byte, which is one per character in ASCII text), 4 layers x 4 heads x 128, block 64,
# batch 12, lr 1e-3 to 1e-4 after 100 warm-up steps, AdamW betas (0.9, 0.99), dropout 0, fp32 (what
# nanoGPT computes in on a CPU), its best-validation checkpoint kept.
TEXT_RUNS: dict[str, tuple[str, dict]] = {
    "new default": ("`buildllm train --data FILE`: BPE, model and steps sized to the text and the time", {}),
    "shakespeare-cpu": ("the old default's settings: `shakespeare-cpu`, BPE 4096, AdamW, 3,700 steps at most",
                        {**OLD_DEFAULT, "tokenizer": "bpe:4096", "max_steps": 3700, "eval_interval": 300}),
    "nanoGPT CPU": ("nanoGPT's CPU recipe: characters, 4 x 128, block 64, batch 12, lr 1e-3, fp32, best kept",
                    {"preset": "shakespeare-cpu", "tokenizer": "bpe:257", "optimizer": "adamw", "keep_best": True,
                     "model": {"qkv_bias": False, "context_length": 64}, "context_length": 64, "batch_size": 12, "lr": 1e-3,
                     "beta2": 0.99, "warmup_steps": 100, "min_lr_ratio": 0.1, "dtype": "fp32", "eval_interval": 250,
                     "eval_iters": 20, "max_steps": 1_000_000, "compile": False}),
}

README = Path(__file__).with_name("README.md")
BEGIN, END = "<!-- recipe.py: begin -->", "<!-- recipe.py: end -->"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=DEFAULTS["bundled"]["max_minutes"],
                   help="wall-time budget of each run (default: the default run's, 8.5)")
    p.add_argument("--text", metavar="FILE", help="a user's text: train the new default, the old default's "
                   "settings and nanoGPT's CPU recipe on it, scored on its last 10%% (default: the levers "
                   "on the bundled Shakespeare)")
    p.add_argument("--only", help="comma-separated runs (default: all): "
                   f"{', '.join(RUNS)}; with --text: {', '.join(TEXT_RUNS)}")
    p.add_argument("--max-steps", type=int, default=1_000_000,
                   help="step cap of every Shakespeare run (default: none that the budget could reach)")
    p.add_argument("--out", default="runs/recipe", help="folder for the runs (default runs/recipe; replaced)")
    p.add_argument("--write-readme", action="store_true", help=f"also write the table into {README}")
    args = p.parse_args(argv)
    args.catalog = TEXT_RUNS if args.text else RUNS
    args.runs = select(args.only, args.catalog)
    if not args.minutes > 0:
        p.error("--minutes must be positive")
    if args.text and not Path(args.text).is_file():
        p.error(f"--text {args.text} is not a file")
    return args


def select(only: str | None, catalog: dict = RUNS) -> list[str]:
    """The runs ``--only`` names, in the table's order; all of them without it."""
    if only is None:
        return list(catalog)
    names = [n.strip() for n in only.split(",") if n.strip()]
    unknown = [n for n in names if n not in catalog]
    if unknown or not names:
        raise SystemExit(f"unknown run(s) {', '.join(unknown) or '(none given)'}; runs: {', '.join(catalog)}")
    return [n for n in catalog if n in names]


def run_config(name: str, args: argparse.Namespace) -> TrainConfig:
    """This run's settings, its budget, and a folder of its own."""
    folder = str(Path(args.out) / name.replace(" ", "-"))
    common = dict(out=folder, force=True, progress=False, max_minutes=args.minutes)
    if args.text:
        return TrainConfig(data=args.text, **common, **TEXT_RUNS[name][1])
    changes = RUNS[name][1]
    if name in LEVERS:  # each lever alone, on the old default
        changes = {**OLD_DEFAULT, **changes}
    return TrainConfig(**common, max_steps=args.max_steps, **changes)


def table(results: dict[str, TrainResult], catalog: dict = RUNS) -> str:
    """The markdown table: bits per character (and the difference to the first run), tokens/s, steps."""
    first = next(iter(results.values()), None)
    lines = ["| run | what it is | held-out bits per character | vs the first row | tokens/s | steps |",
             "|---|---|---|---|---|---|"]
    for name, r in results.items():
        delta = "" if r is first else f"{r.val_bits_per_char - first.val_bits_per_char:+.3f}"
        lines.append(f"| {name} | {catalog[name][0]} | {r.val_bits_per_char:.3f} | {delta} | "
                     f"{r.tokens_per_sec:,.0f} | {r.steps:,} |")
    return "\n".join(lines)


def markers(args: argparse.Namespace) -> tuple[str, str]:
    """The README's markers of this table: one pair for the levers, one per text file."""
    if not args.text:
        return BEGIN, END
    name = Path(args.text).name
    return f"<!-- recipe.py --text {name}: begin -->", f"<!-- recipe.py --text {name}: end -->"


def readme_section(results: dict[str, TrainResult], args: argparse.Namespace) -> str:
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    begin, end = markers(args)
    command = f"--text {Path(args.text).name} " if args.text else ""
    return (f"{begin}\n`benchmarks/recipe.py {command}--minutes {args.minutes:g}`, {when}, {machine}; one run "
            f"each:\n\n{table(results, args.catalog)}\n{end}")


def write_readme(section: str, path: Path = README, begin: str = BEGIN, end: str = END) -> None:
    """Put ``section`` between the markers of ``path`` (replacing what was there), or at its end."""
    text = path.read_text(encoding="utf-8")
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results: dict[str, TrainResult] = {}
    for name in args.runs:
        start = time.perf_counter()
        results[name] = r = train(run_config(name, args))
        print(f"{name}: {r.val_bits_per_char:.3f} bits per character, {r.steps} steps, "
              f"{r.tokens_per_sec:,.0f} tokens/s [{time.perf_counter() - start:.0f} s]", file=sys.stderr, flush=True)
    print(table(results, args.catalog))
    if args.write_readme:
        write_readme(readme_section(results, args), README, *markers(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
