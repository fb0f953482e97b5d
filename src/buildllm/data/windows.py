"""Sliding windows: token ids to (input, target) pairs, the target being the input shifted by one.

In memory (the book's chapter 2): ``create_dataloader(text, tokenizer)`` tokenizes a string and
slides a window over it (``SlidingWindowDataset``); a PyTorch DataLoader batches and shuffles.
From a memory-mapped token file: ``get_batch`` samples random windows straight from the map.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from buildllm.errors import UserError
from buildllm.tokenizer import (
    EOT,
    Tokenizer,
    get_tokenizer,
)


class SlidingWindowDataset(Dataset):
    """Windows of ``max_length`` tokens every ``stride`` tokens, each with its next-token target.

    Window i starts at ``i * stride``; the starts are ``range(0, len(ids) - max_length, stride)``,
    exactly as the book's ``GPTDatasetV1``, so the last target token is always inside the text.
    A stride equal to max_length gives non-overlapping windows; a smaller one, overlapping windows.
    """

    def __init__(self, token_ids: Sequence[int] | np.ndarray | torch.Tensor, max_length: int,
                 stride: int):
        if isinstance(token_ids, torch.Tensor):
            ids = token_ids.detach().to("cpu", torch.long).reshape(-1)
        else:
            ids = torch.from_numpy(np.asarray(token_ids, dtype=np.int64).reshape(-1))
        if max_length < 1:
            raise UserError(f"max_length must be at least 1, got {max_length}")
        if stride < 1:
            raise UserError(f"stride must be at least 1, got {stride}")
        if len(ids) < max_length + 1:
            raise UserError(f"text has {len(ids)} tokens, fewer than max_length + 1 = "
                            f"{max_length + 1}: use more text or a smaller max_length")
        self.token_ids = ids
        self.max_length = max_length
        self.stride = stride
        self.starts = range(0, len(ids) - max_length, stride)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = self.starts[i]
        window = self.token_ids[start : start + self.max_length + 1]
        return window[:-1], window[1:]


def create_dataloader(
    text: str,
    tokenizer: str | os.PathLike | Tokenizer = "gpt2",
    batch_size: int = 4,
    max_length: int = 256,
    stride: int = 128,
    shuffle: bool = True,
    drop_last: bool = True,
    num_workers: int = 0,
    generator: torch.Generator | None = None,
) -> DataLoader:
    """Tokenize ``text`` (``<|endoftext|>`` allowed) and batch its sliding windows (the book's loader).

    Batches are ``(inputs, targets)``, two LongTensors of shape (batch_size, max_length). Pass a
    seeded ``generator`` for a reproducible shuffle.
    """
    if batch_size < 1:
        raise UserError(f"batch_size must be at least 1, got {batch_size}")
    tok = get_tokenizer(tokenizer)
    dataset = SlidingWindowDataset(tok.encode(text, allowed_special={EOT}), max_length, stride)
    if drop_last and len(dataset) < batch_size:
        raise UserError(f"text gives {len(dataset)} windows of {max_length} tokens, fewer than one "
                        f"batch of {batch_size}: use more text, a smaller batch or stride, or "
                        "drop_last=False")
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
                      num_workers=num_workers, generator=generator)


def get_batch(
    tokens: np.ndarray,
    batch_size: int,
    context_length: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch_size`` random windows of a token array: inputs and next-token targets, int64.

    Window starts are uniform over ``[0, len(tokens) - context_length)`` and drawn from
    ``generator`` (a CPU torch.Generator), so a seeded generator gives the same batches every run.
    Only the rows read are paged in from a memory-mapped array.
    """
    n = len(tokens)
    if n < context_length + 1:
        raise UserError(f"{n} tokens are fewer than context_length + 1 = {context_length + 1}: "
                        "use a bigger corpus or a smaller context length")
    starts = torch.randint(n - context_length, (batch_size,), generator=generator).numpy()
    rows = tokens[starts[:, None] + np.arange(context_length + 1)].astype(np.int64)
    x = torch.from_numpy(np.ascontiguousarray(rows[:, :-1]))
    y = torch.from_numpy(np.ascontiguousarray(rows[:, 1:]))
    return x, y
