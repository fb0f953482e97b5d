"""Reading a corpus for tokenization: find its documents, split them into training and
validation, and stream each one's text in pieces that tokenize exactly as the whole text would.

The input is the bundled plays, a text file, a folder of .txt files, or a .jsonl of documents.
Nothing is read until asked for: a .jsonl may hold millions of documents and a text file may be
bigger than memory. ``prepare.py`` turns what this yields into token files.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

from buildllm.data.shakespeare import (
    SHAKESPEARE_PATH,
    SHAKESPEARE_VAL_PLAYS,
    shakespeare_plays,
)
from buildllm.errors import UserError

READ_BYTES = 1 << 20  # read files 1 MiB at a time
PIECE_CHARS = 1 << 20  # a tokenizer is handed at most ~1 Mi characters per call
MAX_PIECE_CHARS = 64 << 20  # a longer stretch with no safe cut (see below) is cut anyway


# A cut between two pieces of one text is safe where no tokenizer would join them: before a
# space, or after a newline, with a visible character on both sides. (GPT-2's pre-tokens never
# contain a visible character followed by whitespace, nor "\n" followed by a visible character.)
_VISIBLE = r"[\w!-/:-@\[-`{-~]"
_SAFE_CUT = re.compile(rf"(?<={_VISIBLE})(?= {_VISIBLE})|(?<={_VISIBLE}\n)(?={_VISIBLE})")


# A document's text arrives as chunks: (text, how many input bytes it consumed).
Chunks = Iterator[tuple[str, int]]


@dataclass
class Document:
    name: str
    split: str  # "train", "val", or "tail": its last tail_fraction of bytes goes to val
    nbytes: int
    chunks: Callable[[], Chunks]
    tail_fraction: float = 0.0


@dataclass
class Corpus:
    kind: str  # bundled | text | folder | jsonl
    input: str
    ident: str  # changes whenever the input files change
    files: int
    nbytes: int
    n_docs: int
    split: str  # how validation was chosen, in words
    documents: Callable[[], Iterator[Document]]  # streamed: a .jsonl may hold millions



def is_val(i: int, n: int, fraction: Fraction) -> bool:
    """Document i of n goes to validation: floor(n * fraction) evenly spaced ones, at least one."""
    if fraction == 0 or n < 2:
        return False
    if n * fraction < 1:
        return i == n - 1
    return math.floor((i + 1) * fraction) > math.floor(i * fraction)


def open_corpus(input: Any, val_fraction: float, errors: str) -> Corpus:
    """Find the input's documents (without reading them) and decide the split."""
    fraction = Fraction(val_fraction).limit_denominator(1_000_000)
    if input is None:
        plays = shakespeare_plays()
        archive = hashlib.sha256(SHAKESPEARE_PATH.read_bytes()).hexdigest()
        return Corpus(
            "bundled", "bundled Shakespeare", f"bundled:{archive}", 1,
            sum(len(t) for t in plays.values()), len(plays),
            "held-out works: " + ", ".join(SHAKESPEARE_VAL_PLAYS),
            lambda: (Document(name, "val" if name in SHAKESPEARE_VAL_PLAYS else "train",
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

        def documents() -> Iterator[Document]:
            for i, (p, (name, size, _)) in enumerate(zip(files, listing)):
                yield Document(name, "val" if is_val(i, n, fraction) else "train", size,
                                _file_chunks(p, errors))
    elif path.suffix == ".jsonl":
        kind = "jsonl"
        listing = [(path.name, path.stat().st_size, path.stat().st_mtime_ns)]
        n = _count_nonblank_lines(path)

        def documents() -> Iterator[Document]:
            yield from _jsonl_documents(path, errors, lambda i: is_val(i, n, fraction))
    else:
        kind, n = "text", 1
        listing = [(path.name, path.stat().st_size, path.stat().st_mtime_ns)]

        def documents() -> Iterator[Document]:
            yield Document(path.name, "tail" if val_fraction > 0 else "train", listing[0][1],
                            _file_chunks(path, errors), tail_fraction=val_fraction)
    nbytes = sum(size for _, size, _ in listing)
    if nbytes == 0 or n == 0:
        raise UserError(f"input {path} is empty: give a corpus with some text")
    if n == 1:
        split = f"the last {val_fraction:.0%} of the one document" if val_fraction else "none"
    else:
        split = f"{max(1, int(n * fraction)) if fraction else 0} of {n} documents, evenly spaced"
    ident = hashlib.sha256(json.dumps([where, listing]).encode()).hexdigest()
    return Corpus(kind, where, ident, len(listing), nbytes, n, split, documents)


def _string_chunks(text: str) -> Callable[[], Chunks]:
    def chunks() -> Chunks:
        for i in range(0, len(text), READ_BYTES):
            piece = text[i : i + READ_BYTES]
            yield piece, len(piece.encode("utf-8"))
    return chunks


def _decode_error(where: str, offset: int) -> UserError:
    return UserError(f"{where} is not UTF-8 at byte {offset}: convert it to UTF-8, or substitute U+FFFD for "
                     "the bad bytes with `buildllm prepare INPUT --errors replace` (errors='replace')")


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


def _jsonl_documents(path: Path, errors: str, is_val: Callable[[int], bool]) -> Iterator[Document]:
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
            yield Document(f"line {lineno}", "val" if is_val(i) else "train", len(raw),
                            _string_chunks_with_bytes(text, len(raw)))
            i += 1


def _string_chunks_with_bytes(text: str, nbytes: int) -> Callable[[], Chunks]:
    def chunks() -> Chunks:
        yield text, nbytes  # pieces cuts it down to size
    return chunks


def segments(documents: Iterator[Document]) -> Iterator[tuple[str, Chunks]]:
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


def pieces(chunks: Chunks) -> Chunks:
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
