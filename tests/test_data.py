"""Stage 2: sliding windows, the bundled corpus, prepared (memory-mapped) corpora, batches."""

import json
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import buildllm.data.corpus_reader as reader
import buildllm.data.prepare as data
from buildllm.cli import main
from buildllm.data.prepare import load_prepared, prepare_corpus
from buildllm.data.shakespeare import (
    SHAKESPEARE_VAL_PLAYS,
    shakespeare_plays,
    shakespeare_train_val,
)
from buildllm.data.windows import SlidingWindowDataset, create_dataloader, get_batch
from buildllm.errors import UserError
from buildllm.tokenizer import EOT, WordTokenizer, get_tokenizer

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "shakespeare"
BOOK_IDS = [15496, 11, 995, 13, 1148, 428, 438, 257, 1332, 30]


@pytest.fixture(scope="module")
def gpt2():
    return get_tokenizer("gpt2")


def expected_tokens(tok, docs):
    """What a prepared split must hold: each document's tokens, then <|endoftext|>."""
    out = []
    for doc in docs:
        out += tok.encode(doc) + [tok.eot_id]
    return np.array(out, dtype=np.int64)


def snapshot(folder: Path) -> dict:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


# Sliding windows ---------------------------------------------------------------------------------


@pytest.mark.parametrize("n,max_length,stride,count", [
    (10, 4, 1, 6), (10, 4, 4, 2), (10, 4, 3, 2), (10, 9, 1, 1), (5, 4, 1, 1), (101, 10, 7, 13),
])
def test_window_count_is_the_books(n, max_length, stride, count):
    ds = SlidingWindowDataset(list(range(n)), max_length, stride)
    assert len(ds) == count == len(range(0, n - max_length, stride))


def test_windows_and_shifted_targets():
    ds = SlidingWindowDataset(np.arange(10, 20), max_length=4, stride=3)
    x, y = ds[0]
    assert x.tolist() == [10, 11, 12, 13] and y.tolist() == [11, 12, 13, 14]
    x, y = ds[-1]
    assert x.tolist() == [13, 14, 15, 16] and y.tolist() == [14, 15, 16, 17]
    assert x.dtype == y.dtype == torch.long
    assert SlidingWindowDataset(torch.arange(6), 5, 1)[0][1].tolist() == [1, 2, 3, 4, 5]
    with pytest.raises(IndexError):
        ds[2]


def test_window_bad_input():
    with pytest.raises(UserError, match="fewer than max_length \\+ 1 = 5"):
        SlidingWindowDataset(list(range(4)), max_length=4, stride=1)
    with pytest.raises(UserError, match="stride must be at least 1"):
        SlidingWindowDataset(list(range(10)), max_length=4, stride=0)
    with pytest.raises(UserError, match="max_length must be at least 1"):
        SlidingWindowDataset(list(range(10)), max_length=0, stride=1)


def test_dataloader_batches_the_books_example(gpt2):
    loader = create_dataloader("Hello, world. Is this-- a test?", "gpt2", batch_size=2,
                               max_length=4, stride=1, shuffle=False)
    assert len(loader) == 3
    x, y = next(iter(loader))
    assert x.tolist() == [BOOK_IDS[0:4], BOOK_IDS[1:5]]
    assert y.tolist() == [BOOK_IDS[1:5], BOOK_IDS[2:6]]
    # <|endoftext|> in the text is the special token, as in the book's loader
    loader = create_dataloader("a<|endoftext|>b c", gpt2, batch_size=1, max_length=2, stride=2,
                               shuffle=False)
    assert [x.tolist() for x, _ in loader] == [[[64, 50256]]]


def test_dataloader_shuffle_is_seeded():
    text = " ".join(str(i) for i in range(300))

    def order(seed):
        g = torch.Generator().manual_seed(seed)
        return [x[:, 0].tolist() for x, _ in create_dataloader(
            text, batch_size=4, max_length=8, stride=8, generator=g)]

    assert order(1) == order(1) != order(2)


def test_dataloader_too_little_text():
    with pytest.raises(UserError, match="fewer than max_length"):
        create_dataloader("too short", max_length=256)
    with pytest.raises(UserError, match="fewer than one batch of 4"):
        create_dataloader("one two three four five six", max_length=2, stride=2, batch_size=4)
    with pytest.raises(UserError, match="unknown tokenizer"):
        create_dataloader("text", tokenizer="gpt5")


# The bundled corpus ------------------------------------------------------------------------------


def test_bundled_shakespeare():
    plays = shakespeare_plays()
    assert len(plays) == 42 and list(plays) == sorted(plays)
    assert sum(map(len, plays.values())) == 5_057_198
    assert set(SHAKESPEARE_VAL_PLAYS) <= set(plays)
    val = shakespeare_plays("val")
    assert list(val) == list(SHAKESPEARE_VAL_PLAYS) and sum(map(len, val.values())) == 482_299
    assert plays["hamlet"].startswith("HAMLET, PRINCE OF DENMARK")
    train_text, val_text = shakespeare_train_val()
    assert train_text.count(EOT) == 37 and val_text.count(EOT) == 3
    assert len(train_text) + len(val_text) == 5_057_198 + 40 * len(EOT)
    with pytest.raises(UserError, match="unknown split"):
        shakespeare_plays("test")


@pytest.mark.skipif(not SHARED.is_dir(), reason="shared data not present")
def test_bundled_shakespeare_is_the_shared_source_unchanged():
    plays = shakespeare_plays()
    for path in sorted(SHARED.glob("*_gut.txt")):
        assert plays[path.name.removesuffix("_gut.txt")] == path.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def bundled(tmp_path_factory):
    return prepare_corpus(out_dir=tmp_path_factory.mktemp("p") / "shakespeare", progress=False)


def test_prepare_bundled_memmap_holds_the_plays(bundled, gpt2):
    meta = bundled.meta
    assert isinstance(bundled.train, np.memmap) and bundled.train.dtype == np.uint16
    assert (meta["train"]["tokens"], meta["val"]["tokens"]) == (1_414_738, 151_263)
    assert (meta["train"]["documents"], meta["val"]["documents"]) == (38, 4)
    assert meta["val_documents"] == list(SHAKESPEARE_VAL_PLAYS)
    assert meta["tokenizer"]["name"] == "gpt2" and meta["tokenizer"]["vocab_size"] == 50257
    np.testing.assert_array_equal(bundled.val, expected_tokens(gpt2, shakespeare_plays("val").values()))
    np.testing.assert_array_equal(bundled.train,
                                  expected_tokens(gpt2, shakespeare_plays("train").values()))
    assert int((bundled.train == 50256).sum()) == 38
    assert bundled.token_counts("val").sum() == 151_263


def test_prepare_again_is_up_to_date(bundled):
    before = snapshot(bundled.path)
    again = prepare_corpus(out_dir=bundled.path, progress=False)
    assert again.up_to_date and snapshot(bundled.path) == before


# get_batch ---------------------------------------------------------------------------------------


def test_get_batch_reads_random_windows_deterministically(bundled):
    tokens = bundled.train
    x, y = get_batch(tokens, 3, 16, torch.Generator().manual_seed(0))
    x2, y2 = get_batch(tokens, 3, 16, torch.Generator().manual_seed(0))
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert x.shape == y.shape == (3, 16) and x.dtype == y.dtype == torch.int64
    starts = torch.randint(len(tokens) - 16, (3,), generator=torch.Generator().manual_seed(0))
    for row, s in enumerate(starts.tolist()):
        assert x[row].tolist() == tokens[s : s + 16].tolist()
        assert y[row].tolist() == tokens[s + 1 : s + 17].tolist()
    assert not torch.equal(get_batch(tokens, 3, 16, torch.Generator().manual_seed(1))[0], x)


def test_get_batch_covers_the_last_token():
    tokens = np.arange(5, dtype=np.uint16)
    g = torch.Generator().manual_seed(0)
    seen = {tuple(get_batch(tokens, 1, 4, g)[1][0].tolist()) for _ in range(5)}
    assert seen == {(1, 2, 3, 4)}  # the only window of 4 + 1 tokens
    with pytest.raises(UserError, match="fewer than context_length \\+ 1 = 6"):
        get_batch(tokens, 1, 5, g)


# prepare: inputs ---------------------------------------------------------------------------------

TEXT = shakespeare_plays()["sonnets"][:20_000] + "\n\n  \t 你好，世界\r\n👋🏽 done.\n   \n"


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab é'\n\t\r .,!9你👋")), max_size=300))
def test_pieces_tokenize_exactly_like_the_whole_text(text):
    tok = get_tokenizer("gpt2")
    with mock.patch.object(reader, "PIECE_CHARS", 7):
        pieces = [p for p, _ in reader.pieces(iter([(text[i : i + 5], 5) for i in range(0, len(text), 5)]))]
    assert "".join(pieces) == text
    assert sum((tok.encode(p) for p in pieces), []) == tok.encode(text)


def test_pieces_stay_bounded_without_safe_cuts(monkeypatch):
    monkeypatch.setattr(reader, "PIECE_CHARS", 10)
    monkeypatch.setattr(reader, "MAX_PIECE_CHARS", 40)
    text = "x" * 95 + " y z"
    pieces = [p for p, _ in reader.pieces(iter([(text[i : i + 5], 5) for i in range(0, 99, 5)]))]
    assert "".join(pieces) == text and max(map(len, pieces)) <= 40
    # hard cuts at 10 while nothing safe is in sight, then the last safe cut of the new text
    assert [len(p) for p in pieces] == [10, 10, 10, 10, 10, 10, 37, 2]


def test_prepare_text_file_in_small_chunks(tmp_path, monkeypatch, gpt2):
    monkeypatch.setattr(reader, "READ_BYTES", 64)  # multi-byte characters straddle reads
    monkeypatch.setattr(reader, "PIECE_CHARS", 100)
    monkeypatch.setattr(data, "BATCH_CHARS", 1000)
    src = tmp_path / "sonnets.txt"
    src.write_text(TEXT, encoding="utf-8", newline="")
    c = prepare_corpus(src, tmp_path / "whole", val_fraction=0, progress=False)
    np.testing.assert_array_equal(c.train, expected_tokens(gpt2, [TEXT]))
    assert len(c.val) == 0 and c.meta["source"]["split"] == "none"

    c = prepare_corpus(src, tmp_path / "split", val_fraction=0.1, progress=False)
    head, tail = gpt2.decode(c.train[:-1].tolist()), gpt2.decode(c.val[:-1].tolist())
    assert head + tail == TEXT and c.train[-1] == c.val[-1] == 50256
    assert 0.08 < len(tail.encode()) / len(TEXT.encode()) < 0.12
    assert c.meta["train"]["characters"] + c.meta["val"]["characters"] == len(TEXT)


def test_prepare_folder_splits_by_document(tmp_path, gpt2):
    root = tmp_path / "docs"
    (root / "sub").mkdir(parents=True)
    docs = {"a.txt": "First document.", "b.txt": "Second one\nwith lines.", "c.txt": "",
            "d.txt": "Fourth <|endoftext|> stays text", "sub/e.txt": "Fifth, in a subfolder.",
            "notes.md": "not a .txt: ignored"}
    for name, text in docs.items():
        (root / name).write_text(text)
    c = prepare_corpus(root, tmp_path / "out", val_fraction=0.2, progress=False)
    # 5 .txt documents, val_fraction 0.2: the 5th (sub/e.txt) is held out; c.txt is empty
    assert c.meta["val_documents"] == ["sub/e.txt"]
    np.testing.assert_array_equal(c.val, expected_tokens(gpt2, [docs["sub/e.txt"]]))
    np.testing.assert_array_equal(
        c.train, expected_tokens(gpt2, [docs["a.txt"], docs["b.txt"], docs["d.txt"]]))
    assert (c.meta["train"]["documents"], c.meta["val"]["documents"]) == (3, 1)
    assert int((c.train == 50256).sum()) == 3  # the quoted marker stayed ordinary text


def test_prepare_few_documents_still_validates_one(tmp_path, gpt2):
    root = tmp_path / "three"
    root.mkdir()
    for name in "xyz":
        (root / f"{name}.txt").write_text(f"document {name}")
    c = prepare_corpus(root, tmp_path / "out", val_fraction=0.1, progress=False)
    assert c.meta["val_documents"] == ["z.txt"]
    np.testing.assert_array_equal(c.val, expected_tokens(gpt2, ["document z"]))


def test_prepare_jsonl(tmp_path, gpt2):
    texts = [f"Document number {i}: café ☕ and more." for i in range(12)]
    lines = [json.dumps({"text": t, "id": i}) for i, t in enumerate(texts)]
    lines.insert(5, "   ")  # blank lines are skipped
    src = tmp_path / "corpus.jsonl"
    src.write_text("\n".join(lines) + "\n")
    c = prepare_corpus(src, tmp_path / "out", val_fraction=0.25, progress=False)
    # 12 documents, a quarter held out, evenly spaced: documents 3, 7 and 11
    assert c.meta["val_documents"] == ["line 4", "line 9", "line 13"]
    np.testing.assert_array_equal(c.val, expected_tokens(gpt2, [texts[3], texts[7], texts[11]]))
    np.testing.assert_array_equal(
        c.train, expected_tokens(gpt2, [t for i, t in enumerate(texts) if i not in (3, 7, 11)]))


def test_prepare_uses_uint32_when_the_vocabulary_needs_it(tmp_path):
    words = " ".join(f"w{i}" for i in range(70_000))
    tok = WordTokenizer.from_text(words)
    assert tok.vocab_size == 70_002
    path = tok.save(tmp_path / "words.json")
    src = tmp_path / "words.txt"
    src.write_text(words + " w69999 w3 unseen")
    c = prepare_corpus(src, tmp_path / "out", tokenizer=str(path), val_fraction=0, progress=False)
    assert c.meta["dtype"] == "uint32" and c.train.dtype == np.uint32
    np.testing.assert_array_equal(c.train, expected_tokens(tok, [src.read_text()]))
    assert c.train.max() == 70_001 and isinstance(c.tokenizer, WordTokenizer)  # <|unk|>


def test_prepare_trains_and_stores_a_bpe(tmp_path):
    src = tmp_path / "s.txt"
    src.write_text(TEXT)
    c = prepare_corpus(src, tmp_path / "out", tokenizer="bpe:300", progress=False)
    assert c.tokenizer.vocab_size == 300 and c.meta["tokenizer"]["spec"] == "bpe:300"
    assert c.meta["dtype"] == "uint16" and (tmp_path / "out" / "tokenizer.json").is_file()
    assert c.tokenizer.decode(c.train[:-1].tolist()) + c.tokenizer.decode(c.val[:-1].tolist()) == TEXT
    assert prepare_corpus(src, tmp_path / "out", tokenizer="bpe:300", progress=False).up_to_date


def test_prepare_replace_errors(tmp_path, gpt2):
    src = tmp_path / "latin1.txt"
    src.write_bytes("café au lait".encode("latin-1"))
    c = prepare_corpus(src, tmp_path / "out", val_fraction=0, errors="replace", progress=False)
    assert gpt2.decode(c.train[:-1].tolist()) == "caf\ufffd au lait"


# prepare: bad input, nothing half-written --------------------------------------------------------


def test_non_utf8_names_file_and_byte_offset(tmp_path, monkeypatch):
    monkeypatch.setattr(reader, "READ_BYTES", 4)  # the bad byte is in a later read
    src = tmp_path / "bad.txt"
    src.write_bytes("héllo, wo".encode() + b"\xff" + b"rld")
    with pytest.raises(UserError, match=r"bad\.txt is not UTF-8 at byte 10.*--errors replace"):
        prepare_corpus(src, tmp_path / "out", progress=False)
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_bytes(b'{"text": "ok"}\n{"text": "b\xe9d"}\n')
    with pytest.raises(UserError, match=r"bad\.jsonl \(line 2\) is not UTF-8 at byte 26"):
        prepare_corpus(jsonl, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "bad.txt"]


@pytest.mark.parametrize("make,message", [
    (lambda d: d / "missing.txt", "does not exist"),
    (lambda d: (d / "empty.txt").write_text("") and None or d / "empty.txt", "is empty"),
    (lambda d: (d / "folder").mkdir() or d / "folder", "holds no .txt files"),
    (lambda d: (d / "f").mkdir() or (d / "f" / "e.txt").write_text("") and None or d / "f",
     "is empty"),
    (lambda d: (d / "x.jsonl").write_text('{"text": 1}\n') and None or d / "x.jsonl",
     'line 1 has no string "text" field'),
    (lambda d: (d / "y.jsonl").write_text('{"text": "a"}\n{oops\n') and None or d / "y.jsonl",
     "line 2 is not valid JSON"),
    (lambda d: (d / "z.jsonl").write_text("\n\n") and None or d / "z.jsonl", "is empty"),
])
def test_bad_inputs(tmp_path, make, message):
    src = make(tmp_path)
    with pytest.raises(UserError, match=message):
        prepare_corpus(src, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_bad_options(tmp_path):
    src = tmp_path / "t.txt"
    src.write_text("some text")
    for kwargs, message in [
        ({"tokenizer": "gpt3"}, "unknown tokenizer 'gpt3'"),
        ({"tokenizer": "bpe:many"}, "write bpe:VOCAB"),
        ({"tokenizer": "bpe:100"}, "vocab_size 100 is too small"),
        ({"val_fraction": 1.0}, "val_fraction must be in"),
        ({"errors": "ignore"}, "errors must be strict or replace"),
    ]:
        with pytest.raises(UserError, match=message):
            prepare_corpus(src, tmp_path / "out", progress=False, **kwargs)
        assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.txt"]


def test_different_corpus_needs_force(tmp_path, gpt2):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("corpus A " * 10)
    b.write_text("corpus B " * 10)
    out = tmp_path / "out"
    prepare_corpus(a, out, progress=False)
    before = snapshot(out)
    with pytest.raises(UserError, match="already holds another prepared corpus.*--force"):
        prepare_corpus(b, out, progress=False)
    with pytest.raises(UserError, match="another prepared corpus"):
        prepare_corpus(a, out, tokenizer=WordTokenizer.from_text("corpus A"), progress=False)
    assert snapshot(out) == before
    c = prepare_corpus(b, out, force=True, progress=False)
    assert gpt2.decode(c.train.tolist()).startswith("corpus B")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt", "out"]


def test_foreign_folder_is_never_touched(tmp_path):
    src = tmp_path / "t.txt"
    src.write_text("some text")
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    for force in (False, True):
        with pytest.raises(UserError, match="holds no prepared corpus"):
            prepare_corpus(src, out, force=force, progress=False)
    assert [p.name for p in out.iterdir()] == ["thesis.tex"]


def test_interrupted_prepare_leaves_nothing(tmp_path, monkeypatch):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("first corpus " * 50)
    b.write_text("second corpus " * 50)
    out = tmp_path / "out"
    prepare_corpus(a, out, progress=False)
    before = snapshot(out)

    def interrupted(self, ids):
        raise KeyboardInterrupt

    monkeypatch.setattr(data._TokenWriter, "write", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare_corpus(b, out, force=True, progress=False)
    with pytest.raises(KeyboardInterrupt):
        prepare_corpus(b, tmp_path / "new", progress=False)
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt", "out"]


def test_load_prepared_errors(tmp_path, bundled):
    with pytest.raises(UserError, match="no meta.json.*buildllm prepare"):
        load_prepared(tmp_path)
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("meta.json", "tokenizer.json", "val.bin"):
        (broken / name).write_bytes((bundled.path / name).read_bytes())
    (broken / "train.bin").write_bytes(b"\0" * 10)
    with pytest.raises(UserError, match="damaged"):
        load_prepared(broken)


# prepare: the command line -----------------------------------------------------------------------


def test_cli_prepare_prints_statistics(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    Path("plays.txt").write_text(TEXT)
    assert main(["prepare", "plays.txt", "--val-fraction", "0.2"]) == 0
    out = capsys.readouterr().out
    corpus = load_prepared("data/prepared/plays")
    assert f"{corpus.meta['train']['tokens']:,} tokens" in out and "chars/token" in out
    assert "top tokens  '\\n'" in out and "uint16" in out
    assert main(["prepare", "plays.txt", "--val-fraction", "0.2"]) == 0
    assert "up to date" in capsys.readouterr().out


def test_cli_bad_input_exits_2_and_overwrites_nothing(tmp_path, capsys):
    good, other, bad = tmp_path / "good.txt", tmp_path / "other.txt", tmp_path / "bad.txt"
    good.write_text("good text " * 20)
    other.write_text("other text " * 20)
    bad.write_bytes(b"ok \xc3\x28 then")
    out = tmp_path / "out"
    assert main(["prepare", str(good), "--out", str(out)]) == 0
    capsys.readouterr()
    before = snapshot(out)
    for argv, message in [
        ([str(other)], "already holds another prepared corpus"),
        ([str(other), "--tokenizer", "nope"], "unknown tokenizer 'nope'"),
        ([str(other), "--tokenizer", "bpe:10", "--force"], "vocab_size 10 is too small"),
        ([str(bad), "--force"], "bad.txt is not UTF-8 at byte 3"),
        ([str(tmp_path / "missing.txt"), "--force"], "does not exist"),
    ]:
        assert main(["prepare", *argv, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1
        assert snapshot(out) == before
    assert main(["prepare", str(bad), "--errors", "replace", "--out", str(out), "--force"]) == 0
    assert snapshot(out) != before
    assert sorted(os.listdir(tmp_path)) == ["bad.txt", "good.txt", "other.txt", "out"]


def test_prepare_removes_what_a_killed_prepare_left(tmp_path):
    src = tmp_path / "s.txt"
    src.write_text(TEXT)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    abandoned = tmp_path / f".out.partial-{gone.stdout.strip()}-abc123"  # its process has exited
    running = tmp_path / f".out.partial-{os.getpid()}-def456"  # as if another prepare were writing it now
    for folder in (abandoned, running):
        folder.mkdir()
        (folder / "train.bin").write_bytes(b"\0" * 10)
    prepare_corpus(src, tmp_path / "out", tokenizer="gpt2", val_fraction=0, progress=False)
    assert not abandoned.exists() and running.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [running.name, "out", "s.txt"]
