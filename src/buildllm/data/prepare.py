"""Streamed preparation for corpora bigger than memory (nanoGPT's way).

``prepare_corpus`` streams text files or JSON lines through the tokenizer into flat
``train.bin``/``val.bin`` token files plus a ``meta.json``; ``load_prepared`` memory-maps them.
Finding and reading the documents is ``corpus_reader.py``'s job; this file tokenizes and writes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from buildllm.data.corpus_reader import Corpus, Document, open_corpus, pieces, segments
from buildllm.errors import UserError
from buildllm.files import atomic_write_bytes, current_umask
from buildllm.tokenizer import (
    Tokenizer,
    check_bpe_vocab_size,
    get_tokenizer,
    train_bpe,
)

FORMAT = "buildllm-prepared-v1"
BATCH_CHARS = 8 << 20  # hand ~8 Mi characters at a time to tiktoken's threads
BPE_TRAIN_CHARS = 20_000_000  # "bpe:VOCAB" learns from the first 20 M characters of training text
MAX_LISTED_DOCUMENTS = 1000  # meta.json names the validation documents up to this many


@dataclass
class PreparedCorpus:
    """A prepared corpus: memory-mapped ``train``/``val`` token arrays, ``meta`` and ``tokenizer``."""

    path: Path
    meta: dict
    tokenizer: Tokenizer
    train: np.ndarray
    val: np.ndarray
    up_to_date: bool = False  # True when prepare_corpus found it already done

    def token_counts(self, split: str = "train", chunk: int = 1 << 22) -> np.ndarray:
        """How often each token id occurs (read in chunks, not mapped: memory stays small)."""
        counts = np.zeros(self.tokenizer.vocab_size, dtype=np.int64)
        with open(self.path / f"{split}.bin", "rb") as f:
            while len(tokens := np.fromfile(f, dtype=self.meta["dtype"], count=chunk)):
                counts += np.bincount(tokens, minlength=len(counts))
        return counts


def default_prepared_dir(input: str | os.PathLike | None, tokenizer: Any = "gpt2") -> Path:
    """``data/prepared/<input name>``, with the tokenizer's name appended unless it is gpt2."""
    name = "shakespeare" if input is None else Path(input).resolve().name.split(".")[0]
    if isinstance(tokenizer, Tokenizer):
        tok_name = tokenizer.name
    else:
        tok_name = str(tokenizer)
        tok_name = tok_name if tok_name.startswith("bpe:") else Path(tok_name).name.split(".")[0]
    tok_name = re.sub(r"[^\w-]", "", tok_name)
    return Path("data", "prepared", name if tok_name == "gpt2" else f"{name}-{tok_name}")


def prepare_corpus(
    input: str | os.PathLike | None = None,
    out_dir: str | os.PathLike | None = None,
    tokenizer: str | os.PathLike | Tokenizer = "gpt2",
    val_fraction: float = 0.1,
    errors: str = "strict",
    force: bool = False,
    progress: bool = True,
) -> PreparedCorpus:
    """Tokenize a corpus into ``out_dir``: ``train.bin``, ``val.bin``, ``meta.json``, ``tokenizer.json``.

    ``input``: None (the bundled Shakespeare, validated on SHAKESPEARE_VAL_PLAYS), a text file (one
    document: its last ``val_fraction`` of bytes is held out), a folder (each ``*.txt`` under it is
    a document) or a ``.jsonl`` file (each line's ``"text"`` is a document). With several
    documents the split is by document: ``floor(n * val_fraction)`` evenly spaced documents (at
    least one) go to validation. Every document ends with ``<|endoftext|>``; text inside documents
    that looks like a special token stays ordinary text.

    ``tokenizer``: "gpt2", the path of a saved tokenizer, a Tokenizer, or "bpe:VOCAB" to train a
    byte-level BPE of that size on the training documents. It is saved in ``out_dir`` either way.

    It streams: memory stays bounded whatever the input size. It writes into a temporary folder
    that replaces ``out_dir`` only once complete. An ``out_dir`` holding a different prepared
    corpus is replaced only with ``force=True``; the very same corpus again is left as it is
    (``.up_to_date`` is then True).
    """
    if errors not in ("strict", "replace"):
        raise UserError(f"errors must be strict or replace, not {errors!r}")
    if not 0 <= val_fraction < 1:
        raise UserError(f"val_fraction must be in [0, 1), got {val_fraction}")
    bpe_vocab = _parse_bpe_spec(tokenizer)
    tok = None if bpe_vocab else get_tokenizer(tokenizer)  # a bad name fails before any work
    source = open_corpus(input, val_fraction, errors)
    fingerprint = {
        "format": FORMAT,
        "source": source.ident,
        "tokenizer": f"bpe:{bpe_vocab}/{BPE_TRAIN_CHARS}" if bpe_vocab else tok.fingerprint(),
        "val_fraction": None if source.kind == "bundled" else val_fraction,
        "errors": errors,
    }
    out = Path(out_dir) if out_dir is not None else default_prepared_dir(input, tok or tokenizer)
    if _check_out_dir(out, fingerprint, force):
        corpus = load_prepared(out)
        corpus.up_to_date = True
        return corpus

    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(out)
    # The writer's process id in the name tells a later run whether the folder is abandoned.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=out.parent))
    os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it private; the corpus is not
    try:
        if bpe_vocab:
            tok = _train_bpe_on(source, bpe_vocab, progress)
        meta = _write_tokens(source, tok, tmp, progress)
        if meta["train"]["tokens"] + meta["val"]["tokens"] == 0:
            raise UserError(f"input {source.input} holds no text: give a non-empty corpus")
        meta = {
            "format": FORMAT,
            "source": {"kind": source.kind, "input": source.input, "files": source.files,
                       "bytes": source.nbytes, "documents": source.n_docs, "split": source.split},
            "tokenizer": {"spec": f"bpe:{bpe_vocab}" if bpe_vocab else _spec_str(tokenizer),
                          "name": tok.name, "vocab_size": tok.vocab_size, "eot_id": tok.eot_id,
                          "file": "tokenizer.json"},
            "val_fraction": val_fraction,
            "errors": errors,
            **meta,
            "fingerprint": fingerprint,
        }
        tok.save(tmp / "tokenizer.json")
        atomic_write_bytes(tmp / "meta.json", (json.dumps(meta, indent=2) + "\n").encode())
        _swap_in(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return load_prepared(out)


def _remove_abandoned(out: Path) -> None:
    """Delete the temporary folders of earlier runs into ``out`` that were killed mid-way."""
    for folder in out.parent.glob(f".{out.name}.partial-*"):
        pid = folder.name.removeprefix(f".{out.name}.partial-").split("-")[0]
        if pid.isdigit() and not _process_exists(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _process_exists(pid: int) -> bool:
    if os.name == "nt":  # os.kill would terminate it there: keep the folder
        return True
    try:
        os.kill(pid, 0)  # signal 0: checks only
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: it exists, owned by someone else
        return True
    return True


def load_prepared(path: str | os.PathLike) -> PreparedCorpus:
    """Open a prepared corpus: its token files are memory-mapped, not read into memory."""
    path = Path(path)
    try:
        meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path} is not a prepared corpus (no meta.json): run "
                        f"`buildllm prepare INPUT --out {path}` first") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path / 'meta.json'}: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(f"{path / 'meta.json'} is not a {FORMAT} corpus: prepare it again")
    tokenizer = Tokenizer.load(path / "tokenizer.json")
    dtype = np.dtype(meta["dtype"])
    arrays = {}
    for split in ("train", "val"):
        file = path / f"{split}.bin"
        expected = meta[split]["tokens"] * dtype.itemsize
        size = file.stat().st_size if file.is_file() else -1
        if size != expected:
            raise UserError(f"{file} has {size} bytes, meta.json says {expected}: the corpus is "
                            "damaged; prepare it again with --force")
        # np.memmap cannot map an empty file
        arrays[split] = np.memmap(file, dtype=dtype, mode="r") if size else np.zeros(0, dtype)
    return PreparedCorpus(path, meta, tokenizer, arrays["train"], arrays["val"])



def _parse_bpe_spec(tokenizer: Any) -> int | None:
    if not (isinstance(tokenizer, str) and tokenizer.startswith("bpe:")):
        return None
    try:
        vocab_size = int(tokenizer[4:])
    except ValueError:
        raise UserError(f"bad tokenizer {tokenizer!r}: write bpe:VOCAB, e.g. bpe:4096") from None
    check_bpe_vocab_size(vocab_size)
    return vocab_size


def _spec_str(tokenizer: Any) -> str:
    return tokenizer.name if isinstance(tokenizer, Tokenizer) else str(tokenizer)




def _train_bpe_on(source: Corpus, vocab_size: int, progress: bool) -> Tokenizer:
    """Train on the first BPE_TRAIN_CHARS characters of the training documents."""

    def training_text() -> Iterator[str]:
        seen = 0
        for split, chunks in segments(source.documents()):
            if split != "train":
                continue
            for piece, _ in pieces(chunks):
                yield piece[: BPE_TRAIN_CHARS - seen]
                seen += len(piece)
                if seen >= BPE_TRAIN_CHARS:
                    return

    if progress:
        print(f"training a byte-level BPE of {vocab_size} tokens on up to {BPE_TRAIN_CHARS:,} "
              "characters of the training documents", file=sys.stderr)
    return train_bpe(training_text(), vocab_size)


class _TokenWriter:
    """Appends token ids to a flat binary file through a buffer."""

    def __init__(self, path: Path, dtype: np.dtype):
        self.file = open(path, "wb", buffering=4 << 20)
        self.dtype = dtype
        self.tokens = 0

    def write(self, ids: list[int]) -> None:
        np.asarray(ids, dtype=self.dtype).tofile(self.file)
        self.tokens += len(ids)

    def close(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()


def _write_tokens(source: Corpus, tok: Tokenizer, out: Path, progress: bool) -> dict:
    """Stream every document through the tokenizer into out/train.bin and out/val.bin."""
    from tqdm import tqdm

    dtype = np.dtype(np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32)
    stats = {s: {"documents": 0, "characters": 0} for s in ("train", "val")}
    val_names: list[str] = []
    batch: list[tuple[str, str, bool]] = []  # (split, text, ends a document)
    batch_chars = 0
    writers = {s: _TokenWriter(out / f"{s}.bin", dtype) for s in ("train", "val")}

    def flush() -> None:
        nonlocal batch, batch_chars
        encoded = tok.encode_batch([text for _, text, _ in batch])
        for (split, _, ends), ids in zip(batch, encoded):
            writers[split].write(ids + [tok.eot_id] if ends else ids)
        batch, batch_chars = [], 0

    def documents() -> Iterator[Document]:
        for doc in source.documents():
            if doc.split == "val" and len(val_names) <= MAX_LISTED_DOCUMENTS:
                val_names.append(doc.name)
            yield doc

    bar = tqdm(total=source.nbytes, unit="B", unit_scale=True, unit_divisor=1024,
               desc="tokenizing", disable=not progress, mininterval=0.5, file=sys.stderr)
    start = time.perf_counter()
    try:
        for split, chunks in segments(documents()):
            chars = 0
            for text, nbytes in pieces(chunks):
                bar.update(nbytes)
                if text:
                    chars += len(text)
                    batch.append((split, text, False))
                    batch_chars += len(text)
                    if batch_chars >= BATCH_CHARS:
                        flush()
            if chars:  # an empty document adds nothing, not even <|endoftext|>
                batch.append((split, "", True))
                stats[split]["documents"] += 1
                stats[split]["characters"] += chars
        flush()
    finally:
        bar.close()
        for w in writers.values():
            w.close()
    elapsed = time.perf_counter() - start
    return {
        "dtype": dtype.name,
        "train": {**stats["train"], "tokens": writers["train"].tokens},
        "val": {**stats["val"], "tokens": writers["val"].tokens},
        "val_documents": val_names if len(val_names) <= MAX_LISTED_DOCUMENTS else None,
        "seconds": round(elapsed, 3),
        "mb_per_s": round(source.nbytes / 1e6 / max(elapsed, 1e-9), 2),
    }


def _check_out_dir(out: Path, fingerprint: dict, force: bool) -> bool:
    """True if ``out`` already holds this very corpus; raises if it must not be replaced."""
    if out.exists() and not out.is_dir():
        raise UserError(f"output {out} exists and is not a folder: choose another --out")
    if not out.exists() or not any(out.iterdir()):
        return False
    try:
        meta = json.loads((out / "meta.json").read_text(encoding="utf-8"))
        if not (isinstance(meta, dict) and meta.get("format") == FORMAT):
            raise ValueError
    except (OSError, ValueError):
        raise UserError(f"output folder {out} is not empty and holds no prepared corpus: "
                        "refusing to touch it; choose another --out") from None
    if meta.get("fingerprint") == fingerprint and not force:
        try:
            load_prepared(out)
            return True
        except UserError:
            pass  # damaged: refuse unless forced, like a different corpus
    if not force:
        source = meta.get("source", {}).get("input")
        spec = meta.get("tokenizer", {}).get("spec")
        raise UserError(f"{out} already holds another prepared corpus ({source}, tokenizer "
                        f"{spec}): pass --force (force=True) to replace it, or choose another --out")
    return False


def _swap_in(tmp: Path, out: Path) -> None:
    """Replace ``out`` by the finished ``tmp`` folder; the old one is deleted only afterwards."""
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / out.name)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
