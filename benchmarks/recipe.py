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

# name -> (what changes, TrainConfig changes). "default" is the current `buildllm train`.
RUNS: dict[str, tuple[str, dict]] = {
    "default": ("the `shakespeare-cpu` default, AdamW", {}),
    "rope": ("rotary positions, no learned position embedding", {"model": {"positions": "rope"}}),
    "rmsnorm": ("RMSNorm instead of LayerNorm", {"model": {"norm": "rmsnorm"}}),
    "qk_norm": ("RMSNorm of each head's queries and keys", {"model": {"qk_norm": True}}),
    "relu2": ("ReLU squared instead of GELU", {"model": {"activation": "relu2"}}),
    "swiglu": ("SwiGLU (hidden 352, about 8/3 emb_dim) instead of the GELU MLP", {"model": {"activation": "swiglu"}}),
    "untied": ("an output head of its own", {"model": {"tie_embeddings": False}}),
    "zero_init": ("output projections start at zero", {"model": {"zero_init": True}}),
    "softcap": ("logits soft-capped at 15 (nanochat, the speedrun)", {"model": {"logit_softcap": 15.0}}),
    "value_embeddings": ("value embeddings in layers 1 and 3 of 4", {"model": {"value_embeddings": True}}),
    "compile": ("`torch.compile` (its compile time in the budget)", {"compile": True}),
    "muon": ("Muon for the blocks' matrices (muon_lr 0.02)", {"optimizer": "muon"}),
}

README = Path(__file__).with_name("README.md")
BEGIN, END = "<!-- recipe.py: begin -->", "<!-- recipe.py: end -->"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=DEFAULTS["bundled"]["max_minutes"],
                   help="wall-time budget of each run (default: the default run's, 8.5)")
    p.add_argument("--only", help=f"comma-separated runs (default: all): {', '.join(RUNS)}")
    p.add_argument("--max-steps", type=int, default=1_000_000,
                   help="step cap of every run (default: none that the budget could reach)")
    p.add_argument("--out", default="runs/recipe", help="folder for the runs (default runs/recipe; replaced)")
    p.add_argument("--write-readme", action="store_true", help=f"also write the table into {README}")
    args = p.parse_args(argv)
    args.runs = select(args.only)
    if not args.minutes > 0:
        p.error("--minutes must be positive")
    return args


def select(only: str | None) -> list[str]:
    """The runs ``--only`` names, in the table's order; all of them without it."""
    if only is None:
        return list(RUNS)
    names = [n.strip() for n in only.split(",") if n.strip()]
    unknown = [n for n in names if n not in RUNS]
    if unknown or not names:
        raise SystemExit(f"unknown run(s) {', '.join(unknown) or '(none given)'}; runs: {', '.join(RUNS)}")
    return [n for n in RUNS if n in names]


def run_config(name: str, args: argparse.Namespace) -> TrainConfig:
    """The default run with this run's change, its budget, and a folder of its own."""
    changes = RUNS[name][1]
    return TrainConfig(out=str(Path(args.out) / name), force=True, progress=False, max_minutes=args.minutes,
                       max_steps=args.max_steps, **changes)


def table(results: dict[str, TrainResult]) -> str:
    """The markdown table: bits per character (and the difference to the default), tokens/s, steps."""
    base = results.get("default")
    lines = ["| run | what changes | held-out bits per character | vs default | tokens/s | steps |",
             "|---|---|---|---|---|---|"]
    for name, r in results.items():
        delta = "" if base is None or name == "default" else f"{r.val_bits_per_char - base.val_bits_per_char:+.3f}"
        lines.append(f"| {name} | {RUNS[name][0]} | {r.val_bits_per_char:.3f} | {delta} | "
                     f"{r.tokens_per_sec:,.0f} | {r.steps:,} |")
    return "\n".join(lines)


def readme_section(results: dict[str, TrainResult], args: argparse.Namespace) -> str:
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return (f"{BEGIN}\n`benchmarks/recipe.py --minutes {args.minutes:g}`, {when}, {machine}; one run each:\n\n"
            f"{table(results)}\n{END}")


def write_readme(section: str, path: Path = README) -> None:
    """Put ``section`` between the markers of ``path`` (replacing what was there), or at its end."""
    text = path.read_text(encoding="utf-8")
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + section + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n## The levers of the speedrun, each alone on the default run (`recipe.py`)\n\n" \
            + section + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results: dict[str, TrainResult] = {}
    for name in args.runs:
        start = time.perf_counter()
        results[name] = r = train(run_config(name, args))
        print(f"{name}: {r.val_bits_per_char:.3f} bits per character, {r.steps} steps, "
              f"{r.tokens_per_sec:,.0f} tokens/s [{time.perf_counter() - start:.0f} s]", file=sys.stderr, flush=True)
    print(table(results))
    if args.write_readme:
        write_readme(readme_section(results, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
