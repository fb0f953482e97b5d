"""The bundled corpus: Shakespeare's 42 plays and poems, shipped inside the package.

Four whole works are held out for validation (``SHAKESPEARE_VAL_PLAYS``).
"""

from __future__ import annotations

import tarfile
from functools import lru_cache
from pathlib import Path

from buildllm.errors import UserError
from buildllm.tokenizer import (
    EOT,
)

SHAKESPEARE_PATH = Path(__file__).parent.parent / "assets" / "shakespeare.tar.xz"


# Held out for validation: one history, one tragedy, one comedy, one romance (482,299 characters,
# 9.5% of the corpus). Whole works, so validation text is never a neighbour of training text.
SHAKESPEARE_VAL_PLAYS = ("henry_v", "julius_caesar", "tempest", "twelfth_night")


@lru_cache(maxsize=1)
def _shakespeare() -> tuple[tuple[str, str], ...]:
    with tarfile.open(SHAKESPEARE_PATH, "r:xz") as archive:
        plays = []
        for member in sorted(archive.getmembers(), key=lambda m: m.name):
            name = member.name.removesuffix(".txt").removesuffix("_gut")
            plays.append((name, archive.extractfile(member).read().decode("utf-8")))
    return tuple(plays)


def shakespeare_plays(split: str = "all") -> dict[str, str]:
    """The bundled works as ``{name: text}`` sorted by name; ``split`` is "all", "train" or "val"."""
    if split not in ("all", "train", "val"):
        raise UserError(f"unknown split {split!r}: use all, train or val")
    return {
        name: text
        for name, text in _shakespeare()
        if split == "all" or (name in SHAKESPEARE_VAL_PLAYS) == (split == "val")
    }


def shakespeare_train_val() -> tuple[str, str]:
    """Training and validation text, each the works joined by ``<|endoftext|>``.

    Encode them with ``allowed_special={"<|endoftext|>"}`` (``create_dataloader`` does) so the
    separator becomes the end-of-text token.
    """
    return EOT.join(shakespeare_plays("train").values()), EOT.join(shakespeare_plays("val").values())
