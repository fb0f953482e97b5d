"""Labeled texts for classification: rows of text and label read from a CSV/TSV file.

Every malformed row is a ``UserError`` that names the file and line; ``balance_classes``
undersamples to the smallest class (the book's ``create_balanced_dataset``); ``encode_labeled``
turns rows into ``(token ids, class index)`` pairs.
"""

from __future__ import annotations

import csv
import io
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from buildllm.errors import UserError


@dataclass(frozen=True)
class LabeledText:
    text: str
    label: str
    line: int  # where it came from, for error messages


def open_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")  # -sig: drop a BOM that spreadsheets add
    except FileNotFoundError:
        raise UserError(f"data file {path} does not exist") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None


def _delimiter(path: Path, text: str) -> str:
    """Tab for .tsv, comma for .csv, otherwise sniffed from the first lines."""
    suffix = path.suffix.lower()
    if suffix in (".tsv", ".tab"):
        return "\t"
    if suffix == ".csv":
        return ","
    try:
        return csv.Sniffer().sniff(text[:8192], delimiters=",\t;|").delimiter
    except csv.Error:
        raise UserError(f"cannot tell the delimiter of {path}: name it .csv or .tsv, or pass a delimiter") from None


def read_labeled_texts(
    path: str | Path,
    text_column: str | int = "text",
    label_column: str | int = "label",
    labels: Sequence[str] | None = None,
    delimiter: str | None = None,
    header: bool = True,
) -> tuple[list[LabeledText], list[str]]:
    """Rows of a CSV/TSV file and the label set (``labels`` if given, else the sorted labels found).

    Without a header row, columns are 0-based indices (the SMS spam file is ``label<TAB>text``).
    Every malformed row is a ``UserError`` naming the file and line.
    """
    path = Path(path)
    content = open_text(path)
    delimiter = delimiter or _delimiter(path, content)
    reader = csv.reader(io.StringIO(content, newline=""), delimiter=delimiter)
    text_col, label_col = text_column, label_column
    n_fields = None
    if header:
        try:
            names = next(reader)
        except StopIteration:
            raise UserError(f"{path} is empty") from None
        except csv.Error as e:
            raise UserError(f"{path}:1: {e}") from None
        names = [n.strip() for n in names]
        for what, col in (("text", text_column), ("label", label_column)):
            if str(col) not in names:
                raise UserError(
                    f"{path}:1: no {what} column {str(col)!r} (columns: {', '.join(names)}); choose it with --{what}-column"
                )
        text_col, label_col = names.index(str(text_column)), names.index(str(label_column))
        n_fields = len(names)
    else:
        try:
            text_col, label_col = int(text_column), int(label_column)
        except ValueError:
            raise UserError("without a header row, --text-column and --label-column are 0-based column numbers") from None
    label_set = list(labels) if labels is not None else None
    if label_set is not None and len(set(label_set)) != len(label_set):
        raise UserError(f"the label list {label_set} has duplicates")

    rows: list[LabeledText] = []
    line = 1
    try:
        for fields in reader:
            line = reader.line_num
            if not fields or all(not f.strip() for f in fields):
                continue  # blank line
            if n_fields is not None and len(fields) != n_fields:
                raise UserError(
                    f"{path}:{line}: {len(fields)} fields, the header has {n_fields} "
                    "(quote text that contains the delimiter)"
                )
            if max(text_col, label_col) >= len(fields):
                raise UserError(f"{path}:{line}: missing column {max(text_col, label_col)} (the row has {len(fields)})")
            text, label = fields[text_col], fields[label_col].strip()
            if not text.strip():
                raise UserError(f"{path}:{line}: the text is empty")
            if not label:
                raise UserError(f"{path}:{line}: the label is empty")
            if label_set is not None and label not in label_set:
                raise UserError(f"{path}:{line}: label {label!r} is not one of {', '.join(label_set)}")
            rows.append(LabeledText(text, label, line))
    except csv.Error as e:
        raise UserError(f"{path}:{reader.line_num}: {e}") from None
    if not rows:
        raise UserError(f"{path} has no data rows")
    found = sorted({r.label for r in rows})
    label_set = label_set if label_set is not None else found
    if len(label_set) < 2:
        raise UserError(f"{path}: a classifier needs at least 2 classes, found only {found}")
    return rows, label_set


def balance_classes(rows: Sequence[LabeledText], seed: int = 123) -> list[LabeledText]:
    """Undersample every class to the size of the smallest one (the book's ``create_balanced_dataset``)."""
    by_label: dict[str, list[LabeledText]] = {}
    for r in rows:
        by_label.setdefault(r.label, []).append(r)
    smallest = min(len(v) for v in by_label.values())
    rng = random.Random(seed)
    keep = {id(r) for group in by_label.values() for r in rng.sample(group, smallest)}
    return [r for r in rows if id(r) in keep]  # original order; the split shuffles later


def encode_labeled(
    rows: Sequence[LabeledText], tokenizer, labels: Sequence[str], max_length: int
) -> list[tuple[list[int], int]]:
    """``(token ids, class index)`` per row, truncated to the first ``max_length`` tokens."""
    index = {label: i for i, label in enumerate(labels)}
    items = []
    for r, ids in zip(rows, tokenizer.encode_batch([r.text for r in rows])):
        if not ids:
            raise UserError(f"line {r.line}: the text encodes to no tokens")
        items.append((ids[:max_length], index[r.label]))
    return items
