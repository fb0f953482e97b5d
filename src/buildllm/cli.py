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


SUBCOMMANDS: list = []


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
