"""Batch sources for the training engine (pretraining windows, fine-tuning examples): where each step's (input, target) batch comes from.

A source yields micro-batches (``next_batch``), fixed evaluation batches (``eval_batches``) and
its position (``state_dict``), so a resumed run continues with exactly the batch it would have
seen next.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from buildllm.errors import UserError
from buildllm.training.config import TrainConfig, data_mode
from buildllm.training.runtime import Dist, barrier


class RandomWindows:
    """Scale mode: every micro-batch is ``batch_size`` windows at random places of train.bin.

    The one generator is the whole data position: saving its state saves where we are. Under
    torchrun every process draws the same global batch and keeps its own rows, so N processes
    see exactly the batches one process would.
    """

    def __init__(self, corpus, batch_size: int, context_length: int, seed: int, dist: Dist):
        self.corpus, self.batch_size, self.context_length, self.dist = corpus, batch_size, context_length, dist
        self.generator = torch.Generator().manual_seed(seed)
        self.seed = seed
        self.tokenizer = corpus.tokenizer
        self.val_tokens = corpus.val
        self.val_characters = corpus.meta["val"]["characters"]
        for split in ("train", "val"):
            tokens = getattr(corpus, split)
            if len(tokens) < context_length + 1:
                raise UserError(f"the {split} split of {corpus.path} has {len(tokens)} tokens, fewer "
                                f"than one window of context_length + 1 = {context_length + 1}: use "
                                "more data or a smaller --context-length")

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        from buildllm.data.windows import get_batch

        x, y = get_batch(self.corpus.train, self.batch_size, self.context_length, self.generator)
        return my_rows(x, self.dist), my_rows(y, self.dist)

    def eval_batches(self, split: str, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The same ``n`` batches at every evaluation: losses move only because the model does."""
        from buildllm.data.windows import get_batch

        g = torch.Generator().manual_seed(self.seed)
        tokens = getattr(self.corpus, split)
        return [get_batch(tokens, self.batch_size, self.context_length, g) for _ in range(n)]

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


class EpochOrder:
    """The order of ``n`` items, shuffled anew each epoch, and which batch of it comes next.

    The position is (epoch, batch within it) plus the generator state the epoch's shuffle was
    drawn from, so a resumed run redraws the same order and carries on from the same batch.
    """

    def __init__(self, n: int, batch_size: int, batches_per_epoch: int, seed: int):
        self.n, self.batch_size, self.batches_per_epoch = n, batch_size, batches_per_epoch
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch, self.index = 0, 0
        self._start_epoch()

    def _start_epoch(self) -> None:
        self.epoch_state = self.generator.get_state()
        self.order = torch.randperm(self.n, generator=self.generator)

    def next_rows(self) -> torch.Tensor:
        """The item indices of the next batch (a new epoch starts when this one is used up)."""
        if self.index == self.batches_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
            self._start_epoch()
        rows = self.order[self.index * self.batch_size : (self.index + 1) * self.batch_size]
        self.index += 1
        return rows

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "epoch_generator": self.epoch_state}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["epoch_generator"])
        self._start_epoch()
        self.epoch, self.index = state["epoch"], state["index"]


class SlidingWindows:
    """Book mode: the text's sliding windows, shuffled anew each epoch (the book's DataLoader)."""

    def __init__(self, text: str, tokenizer, cfg: TrainConfig, dist: Dist):
        from buildllm.data.windows import SlidingWindowDataset
        from buildllm.tokenizer import EOT

        split = int(len(text) * (1 - cfg.val_fraction))  # the book's 90/10 split, by characters
        train_text, val_text = text[:split], text[split:]
        self.tokenizer, self.dist, self.batch_size = tokenizer, dist, cfg.batch_size
        train_ids = tokenizer.encode(train_text, allowed_special={EOT})
        val_ids = tokenizer.encode(val_text, allowed_special={EOT})
        T, stride = cfg.context_length, cfg.stride or cfg.context_length
        for name, ids, share in (("training", train_ids, 1 - cfg.val_fraction), ("validation", val_ids, cfg.val_fraction)):
            if len(ids) < T + 1:
                raise UserError(f"the {name} text ({share:.0%} of {cfg.data}) has {len(ids)} tokens, "
                                f"fewer than one window of context_length + 1 = {T + 1}: use a longer "
                                "text or a smaller --context-length")
        self.train = SlidingWindowDataset(train_ids, T, stride)
        self.val = SlidingWindowDataset(val_ids, T, T)
        self.batches_per_epoch = len(self.train) // cfg.batch_size  # the book drops the last partial batch
        if self.batches_per_epoch == 0:
            raise UserError(f"the training text gives {len(self.train)} windows of {T} tokens, fewer "
                            f"than one batch of {cfg.batch_size}: use a longer text, a smaller "
                            "--batch-size or --context-length")
        self.val_tokens = np.asarray(val_ids, dtype=np.int64)
        self.val_characters = len(val_text)
        self.seed = cfg.seed
        self.position = EpochOrder(len(self.train), cfg.batch_size, self.batches_per_epoch, cfg.seed)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        return _stack([self.train[int(i)] for i in my_rows(self.position.next_rows(), self.dist)])

    def eval_batches(self, split: str, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The first ``n`` batches of validation (in order) or of training (in a fixed shuffle)."""
        dataset = self.val if split == "val" else self.train
        order = (torch.arange(len(dataset)) if split == "val"
                 else torch.randperm(len(dataset), generator=torch.Generator().manual_seed(self.seed)))
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)][:n]
        return [_stack([dataset[int(i)] for i in rows]) for rows in batches]

    def state_dict(self) -> dict:
        return self.position.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.position.load_state_dict(state)


class ExampleBatches:
    """Fine-tuning: a list of examples, shuffled anew each epoch and batched by ``collate``.

    Like ``SlidingWindows`` (an ``EpochOrder`` is the position), but over whole examples of
    different lengths. Under
    torchrun the *global* batch is collated first and each process keeps its rows: every process
    pads to the same width, so N processes compute exactly what one would.
    ``eval_sets`` names the fixed evaluation sets (e.g. train and val), batched in order.
    """

    def __init__(self, train: list, collate, batch_size: int, seed: int, dist: Dist,
                 eval_sets: dict[str, list] | None = None):
        self.examples, self.collate, self.batch_size, self.dist = train, collate, batch_size, dist
        self.eval_sets = eval_sets or {}
        # The book's DataLoader(drop_last=True): no noisy small last batch, unless that is all there is.
        self.batches_per_epoch = max(1, len(train) // batch_size)
        self.position = EpochOrder(len(train), batch_size, self.batches_per_epoch, seed)

    def next_batch(self) -> tuple[torch.Tensor, ...]:
        batch = self.collate([self.examples[int(i)] for i in self.position.next_rows()])
        return tuple(my_rows(t, self.dist) for t in batch)

    def eval_batches(self, split: str, n: int | None = None) -> list[tuple[torch.Tensor, ...]]:
        """The first ``n`` batches (all when None) of an evaluation set, in order."""
        examples = self.eval_sets.get(split, [])
        batches = [examples[i : i + self.batch_size] for i in range(0, len(examples), self.batch_size)]
        return [self.collate(b) for b in batches[:n]]

    def state_dict(self) -> dict:
        return self.position.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.position.load_state_dict(state)


def _stack(pairs) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.stack([x for x, _ in pairs]), torch.stack([y for _, y in pairs])


def my_rows(batch: torch.Tensor, dist: Dist) -> torch.Tensor:
    """This process's contiguous share of a global batch."""
    if not dist.enabled:
        return batch
    if len(batch) % dist.world_size:
        raise UserError(f"batch_size {len(batch)} does not split evenly over {dist.world_size} "
                        "processes: make it a multiple of the process count")
    share = len(batch) // dist.world_size
    return batch[dist.rank * share : (dist.rank + 1) * share]


def open_data(cfg: TrainConfig, tokenizer, dist: Dist):
    """The batches of ``cfg.data``; ``tokenizer`` is None unless the model already has one."""
    if data_mode(cfg.data, cfg.recipe) == "book":
        from buildllm.tokenizer import get_tokenizer

        tok = tokenizer or get_tokenizer(cfg.tokenizer)
        try:
            text = Path(cfg.data).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read {cfg.data} as UTF-8 text: {e}") from None
        return SlidingWindows(text, tok, cfg, dist)
    corpus = prepared_corpus(cfg, tokenizer, dist)
    return RandomWindows(corpus, cfg.batch_size, cfg.context_length, cfg.seed, dist)


def prepared_corpus(cfg: TrainConfig, tokenizer, dist: Dist):
    """The memory-mapped corpus of a run that is not the book's: a prepared folder as it is, the
    bundled Shakespeare or a text (a file or a folder of them) tokenized once into ``data/prepared/``.

    A text's folder is named after the text, the tokenizer and a hash of the files and the split,
    so an edited text is prepared anew and never mixed up with an older preparation.
    """
    from buildllm.data.prepare import (
        default_prepared_dir,
        load_prepared,
        prepare_corpus,
    )

    mode = data_mode(cfg.data, cfg.recipe)
    if mode in ("bundled", "text"):
        spec = tokenizer or cfg.tokenizer
        path = default_prepared_dir(cfg.data, spec)
        if mode == "text":
            from buildllm.data.corpus_reader import open_corpus

            ident = open_corpus(cfg.data, cfg.val_fraction, "strict").ident
            digest = hashlib.sha256(f"{ident}/{cfg.val_fraction}".encode()).hexdigest()[:10]
            path = path.with_name(f"{path.name}-{digest}")
        if dist.main:  # tokenize once, then every process maps the same files
            prepare_corpus(cfg.data, path, tokenizer=spec, val_fraction=cfg.val_fraction, progress=cfg.progress)
        barrier(dist)
        corpus = load_prepared(path)
    else:
        corpus = load_prepared(cfg.data)
        if cfg.tokenizer is not None and cfg.tokenizer != corpus.meta["tokenizer"]["spec"]:
            raise UserError(f"{cfg.data} was prepared with tokenizer {corpus.meta['tokenizer']['spec']}, "
                            f"not {cfg.tokenizer}: drop --tokenizer or prepare the data again")
    if tokenizer is not None and tokenizer.fingerprint() != corpus.tokenizer.fingerprint():
        raise UserError(f"{corpus.path} was tokenized with {corpus.tokenizer.name}, but the model "
                        f"uses {tokenizer.name}: prepare the data with the model's tokenizer.json")
    return corpus
