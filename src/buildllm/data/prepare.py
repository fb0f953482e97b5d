"""Streamed preparation for corpora bigger than memory (nanoGPT's way).

``prepare_corpus`` streams text files or JSON lines through the tokenizer into flat
``train.bin``/``val.bin`` token files plus a ``meta.json``; ``load_prepared`` memory-maps them.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from buildllm.data.shakespeare import (
    SHAKESPEARE_PATH,
    SHAKESPEARE_VAL_PLAYS,
    shakespeare_plays,
)
from buildllm.errors import UserError
from buildllm.files import atomic_write_bytes, current_umask
from buildllm.tokenizer import (
    Tokenizer,
    check_bpe_vocab_size,
    get_tokenizer,
    train_bpe,
)

FORMAT = "buildllm-prepared-v1"


READ_BYTES = 1 << 20  # read files 1 MiB at a time


PIECE_CHARS = 1 << 20  # encode at most ~1 Mi characters per call


MAX_PIECE_CHARS = 64 << 20  # a longer stretch with no safe cut (see below) is cut anyway


BATCH_CHARS = 8 << 20  # ... and hand ~8 Mi characters at a time to tiktoken's threads


BPE_TRAIN_CHARS = 20_000_000  # "bpe:VOCAB" learns from the first 20 M characters of training text


MAX_LISTED_DOCUMENTS = 1000  # meta.json names the validation documents up to this many


# A cut between two pieces of one text is safe where no tokenizer would join them: before a
# space, or after a newline, with a visible character on both sides. (GPT-2's pre-tokens never
# contain a visible character followed by whitespace, nor "\n" followed by a visible character.)
_VISIBLE = r"[\w!-/:-@\[-`{-~]"


_SAFE_CUT = re.compile(rf"(?<={_VISIBLE})(?= {_VISIBLE})|(?<={_VISIBLE}\n)(?={_VISIBLE})")


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
    source = _open_source(input, val_fraction, errors)
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


# A document's text arrives as chunks: (text, how many input bytes it consumed).
Chunks = Iterator[tuple[str, int]]


@dataclass
class _Document:
    name: str
    split: str  # "train", "val", or "tail": its last tail_fraction of bytes goes to val
    nbytes: int
    chunks: Callable[[], Chunks]
    tail_fraction: float = 0.0


@dataclass
class _Source:
    kind: str  # bundled | text | folder | jsonl
    input: str
    ident: str  # changes whenever the input files change
    files: int
    nbytes: int
    n_docs: int
    split: str  # how validation was chosen, in words
    documents: Callable[[], Iterator[_Document]]  # streamed: a .jsonl may hold millions


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


def _is_val(i: int, n: int, fraction: Fraction) -> bool:
    """Document i of n goes to validation: floor(n * fraction) evenly spaced ones, at least one."""
    if fraction == 0 or n < 2:
        return False
    if n * fraction < 1:
        return i == n - 1
    return math.floor((i + 1) * fraction) > math.floor(i * fraction)


def _open_source(input: Any, val_fraction: float, errors: str) -> _Source:
    """Find the input's documents (without reading them) and decide the split."""
    fraction = Fraction(val_fraction).limit_denominator(1_000_000)
    if input is None:
        plays = shakespeare_plays()
        archive = hashlib.sha256(SHAKESPEARE_PATH.read_bytes()).hexdigest()
        return _Source(
            "bundled", "bundled Shakespeare", f"bundled:{archive}", 1,
            sum(len(t) for t in plays.values()), len(plays),
            "held-out works: " + ", ".join(SHAKESPEARE_VAL_PLAYS),
            lambda: (_Document(name, "val" if name in SHAKESPEARE_VAL_PLAYS else "train",
                               len(text), _string_chunks(text))
                     for name, text in plays.items()),
        )

    path = Path(input)
    if not path.exists():
        raise UserError(f"input {path} does not exist")
    where = str(path.resolve())
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise UserError(f"folder {path} holds no .txt files")
        kind, n = "folder", len(files)
        listing = [(str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns) for p in files]

        def documents() -> Iterator[_Document]:
            for i, (p, (name, size, _)) in enumerate(zip(files, listing)):
                yield _Document(name, "val" if _is_val(i, n, fraction) else "train", size,
                                _file_chunks(p, errors))
    elif path.suffix == ".jsonl":
        kind = "jsonl"
        listing = [(path.name, path.stat().st_size, path.stat().st_mtime_ns)]
        n = _count_nonblank_lines(path)

        def documents() -> Iterator[_Document]:
            yield from _jsonl_documents(path, errors, lambda i: _is_val(i, n, fraction))
    else:
        kind, n = "text", 1
        listing = [(path.name, path.stat().st_size, path.stat().st_mtime_ns)]

        def documents() -> Iterator[_Document]:
            yield _Document(path.name, "tail" if val_fraction > 0 else "train", listing[0][1],
                            _file_chunks(path, errors), tail_fraction=val_fraction)
    nbytes = sum(size for _, size, _ in listing)
    if nbytes == 0 or n == 0:
        raise UserError(f"input {path} is empty: give a corpus with some text")
    if n == 1:
        split = f"the last {val_fraction:.0%} of the one document" if val_fraction else "none"
    else:
        split = f"{max(1, int(n * fraction)) if fraction else 0} of {n} documents, evenly spaced"
    ident = hashlib.sha256(json.dumps([where, listing]).encode()).hexdigest()
    return _Source(kind, where, ident, len(listing), nbytes, n, split, documents)


def _string_chunks(text: str) -> Callable[[], Chunks]:
    def chunks() -> Chunks:
        for i in range(0, len(text), READ_BYTES):
            piece = text[i : i + READ_BYTES]
            yield piece, len(piece.encode("utf-8"))
    return chunks


def _decode_error(where: str, offset: int) -> UserError:
    return UserError(f"{where} is not UTF-8 at byte {offset}: convert it to UTF-8, or pass "
                     "--errors replace (errors='replace') to substitute U+FFFD")


def _file_chunks(path: Path, errors: str) -> Callable[[], Chunks]:
    """Decode a file READ_BYTES at a time; a character split across two reads is kept whole."""

    def chunks() -> Chunks:
        decoder = codecs.getincrementaldecoder("utf-8")(errors)
        offset = 0  # bytes read before this block
        with open(path, "rb") as f:
            while True:
                block = f.read(READ_BYTES)
                pending = len(decoder.getstate()[0])  # bytes of a character begun in the last block
                try:
                    text = decoder.decode(block, final=not block)
                except UnicodeDecodeError as e:
                    raise _decode_error(str(path), offset - pending + e.start) from None
                if offset == 0:
                    text = text.removeprefix("\ufeff")  # a byte-order mark is not text
                offset += len(block)
                if not block:
                    if text:
                        yield text, 0
                    return
                yield text, len(block)

    return chunks


def _count_nonblank_lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def _jsonl_documents(path: Path, errors: str, is_val: Callable[[int], bool]) -> Iterator[_Document]:
    """One document per non-blank line, read in order."""
    offset, i = 0, 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            start, offset = offset, offset + len(raw)
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8", errors)
            except UnicodeDecodeError as e:
                raise _decode_error(f"{path} (line {lineno})", start + e.start) from None
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path} line {lineno} is not valid JSON ({e.msg}): each line must "
                                'be an object like {"text": "..."}') from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise UserError(f'{path} line {lineno} has no string "text" field')
            text = record["text"]
            yield _Document(f"line {lineno}", "val" if is_val(i) else "train", len(raw),
                            _string_chunks_with_bytes(text, len(raw)))
            i += 1


def _string_chunks_with_bytes(text: str, nbytes: int) -> Callable[[], Chunks]:
    def chunks() -> Chunks:
        yield text, nbytes  # _pieces cuts it down to size
    return chunks


def _segments(documents: Iterator[_Document]) -> Iterator[tuple[str, Chunks]]:
    """(split, text chunks) for each stretch of text that ends with <|endoftext|>."""
    for doc in documents:
        if doc.split != "tail":
            yield doc.split, doc.chunks()
            continue
        # A single document: its first bytes train, its last tail_fraction validation.
        threshold = int(doc.nbytes * (1 - doc.tail_fraction))
        stream = doc.chunks()
        rest: list[tuple[str, int]] = []

        def head(stream: Chunks = stream, rest: list = rest, threshold: int = threshold) -> Chunks:
            consumed = 0
            for text, nbytes in stream:
                if consumed + nbytes <= threshold:
                    consumed += nbytes
                    yield text, nbytes
                    continue
                # the cut falls in this chunk: put it at a line or word break near the right spot
                at = len(text) * (threshold - consumed) // max(nbytes, 1)
                cut = _safe_cut(text, at) or at
                head_bytes = nbytes * cut // max(len(text), 1)
                yield text[:cut], head_bytes
                rest.append((text[cut:], nbytes - head_bytes))
                return

        def tail(stream: Chunks = stream, rest: list = rest) -> Chunks:
            yield from rest
            yield from stream

        yield "train", head()
        yield "val", tail()


def _safe_cut(text: str, limit: int, lo: int = 0) -> int | None:
    """The last safe cut position p with lo < p <= limit (see _SAFE_CUT), or None."""
    if limit <= lo:
        return None
    for start in (max(lo, limit - 4096), lo):  # usually one lies within the last 4 KiB
        found = None
        for m in _SAFE_CUT.finditer(text, start, min(len(text), limit + 2)):
            if lo < m.start() <= limit:
                found = m.start()
        if found is not None:
            return found
    return None


def _pieces(chunks: Chunks) -> Chunks:
    """Regroup text chunks into pieces of at most ~PIECE_CHARS that end at safe cuts.

    Encoding the pieces one by one then gives exactly the tokens of encoding the whole text, with
    only a piece or two in memory.
    """
    buf, nbytes = "", 0
    for text, n in chunks:
        buf += text
        nbytes += n
        while len(buf) > PIECE_CHARS:
            # the last cut within PIECE_CHARS, else the first one in the text just read
            cut = _safe_cut(buf, PIECE_CHARS) or _safe_cut(
                buf, len(buf) - 2, lo=max(PIECE_CHARS, len(buf) - len(text) - 2))
            if cut is None:
                if len(buf) < MAX_PIECE_CHARS:
                    break  # a very long stretch with no cut: read on
                cut = PIECE_CHARS  # give up exactness at this one spot rather than bounded memory
            yield buf[:cut], nbytes
            buf, nbytes = buf[cut:], 0
            text = buf
    if buf or nbytes:
        yield buf, nbytes


def _train_bpe_on(source: _Source, vocab_size: int, progress: bool) -> Tokenizer:
    """Train on the first BPE_TRAIN_CHARS characters of the training documents."""

    def training_text() -> Iterator[str]:
        seen = 0
        for split, chunks in _segments(source.documents()):
            if split != "train":
                continue
            for piece, _ in _pieces(chunks):
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


def _write_tokens(source: _Source, tok: Tokenizer, out: Path, progress: bool) -> dict:
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

    def documents() -> Iterator[_Document]:
        for doc in source.documents():
            if doc.split == "val" and len(val_names) <= MAX_LISTED_DOCUMENTS:
                val_names.append(doc.name)
            yield doc

    bar = tqdm(total=source.nbytes, unit="B", unit_scale=True, unit_divisor=1024,
               desc="tokenizing", disable=not progress, mininterval=0.5, file=sys.stderr)
    start = time.perf_counter()
    try:
        for split, chunks in _segments(documents()):
            chars = 0
            for text, nbytes in _pieces(chunks):
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
