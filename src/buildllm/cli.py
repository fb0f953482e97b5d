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

    from buildllm.model import GPTConfig, describe

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


SUBCOMMANDS: list = [add_info]


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
