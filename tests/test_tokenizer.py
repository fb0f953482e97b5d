"""Stage 1: tokenizers (word, GPT-2 through tiktoken, trained byte-level BPE)."""

import base64
import json
import shutil
from collections import Counter

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import buildllm
import buildllm.tokenizer as tokmod
from buildllm.cli import main
from buildllm.errors import UserError
from buildllm.tokenizer import (
    BPETokenizer,
    Tokenizer,
    WordTokenizer,
    count_pretokens,
    get_tokenizer,
    learn_merges,
    train_bpe,
)

BOOK_TEXT = "Hello, world. Is this-- a test?"
BOOK_IDS = [15496, 11, 995, 13, 1148, 428, 438, 257, 1332, 30]
TRICKY = [
    "",
    "\r",
    "a\r\nb\rc\n\n\n",
    "\x00\x01\x1b[0m\x7f\t\x0b\x0c",
    "你好，世界。日本語のテキスト",
    "👋🏽 family: 👨‍👩‍👧 🇫🇷",
    "\ufeffBOM and\u00a0nbsp\u2028line sep",
    "   leading and trailing   ",
    "'s 've I'M it's",
    "<|endoftext|> looks special",
]


@pytest.fixture(scope="module")
def gpt2():
    return get_tokenizer("gpt2")


@pytest.fixture(scope="module")
def small_bpe():
    text = buildllm.shakespeare_plays()["hamlet"][:60_000] + "".join(TRICKY) * 3
    return train_bpe(text, 512)


# GPT-2 -------------------------------------------------------------------------------------------


def test_gpt2_ids_match_the_book(gpt2):
    assert gpt2.encode(BOOK_TEXT) == BOOK_IDS
    assert gpt2.decode(BOOK_IDS) == BOOK_TEXT
    assert (gpt2.name, gpt2.vocab_size, gpt2.eot_id) == ("gpt2", 50257, 50256)
    assert gpt2.encode(" the") == [262] and gpt2.encode("Akwirw ier") == [33901, 86, 343, 86, 220, 959]


def test_gpt2_endoftext_only_when_allowed(gpt2):
    # not allowed: the marker is ordinary text (never a control token, never an exception)
    assert gpt2.encode("<|endoftext|>") == [27, 91, 437, 1659, 5239, 91, 29]
    assert gpt2.encode("a<|endoftext|>b", allowed_special={"<|endoftext|>"}) == [64, 50256, 65]
    assert gpt2.encode("a<|endoftext|>b", allowed_special="all") == [64, 50256, 65]
    assert gpt2.decode([64, 50256, 65]) == "a<|endoftext|>b"
    assert gpt2.special_tokens == {"<|endoftext|>": 50256}


def test_gpt2_batch_equals_one_by_one(gpt2):
    texts = [BOOK_TEXT, *TRICKY, "x<|endoftext|>y"]
    assert gpt2.encode_batch(texts) == [gpt2.encode(t) for t in texts]
    assert gpt2.encode_batch(texts, allowed_special="all") == [
        gpt2.encode(t, allowed_special="all") for t in texts
    ]


def test_gpt2_is_cached_and_saved_as_a_reference(gpt2, tmp_path):
    assert get_tokenizer("gpt2") is gpt2
    path = gpt2.save(tmp_path / "tokenizer.json")
    assert json.loads(path.read_text()) == {"type": "gpt2", "name": "gpt2"}
    assert get_tokenizer(path).encode(BOOK_TEXT) == BOOK_IDS
    assert get_tokenizer(tmp_path).encode(BOOK_TEXT) == BOOK_IDS  # a folder holding tokenizer.json


def test_gpt2_ranks_hash_is_checked(tmp_path, monkeypatch):
    tampered = tmp_path / "gpt2.tiktoken"
    shutil.copy(tokmod.GPT2_RANKS_PATH, tampered)
    blob = bytearray(tampered.read_bytes())
    blob[100] ^= 1
    tampered.write_bytes(bytes(blob))
    monkeypatch.setattr(tokmod, "GPT2_RANKS_PATH", tampered)
    with pytest.raises(UserError, match="sha256"):
        get_tokenizer("gpt2")
    assert main(["tokenize", "hello"]) == 2
    monkeypatch.setattr(tokmod, "GPT2_RANKS_PATH", tmp_path / "missing.tiktoken")
    with pytest.raises(UserError, match="cannot read GPT-2 ranks"):
        get_tokenizer("gpt2")


@settings(max_examples=150, deadline=None)
@given(st.text())
@example("".join(TRICKY))
def test_gpt2_round_trips_any_text(s):
    tok = get_tokenizer("gpt2")
    assert tok.decode(tok.encode(s)) == s


# Names and files ---------------------------------------------------------------------------------


def test_unknown_tokenizer_names_the_valid_ones(tmp_path, capsys):
    with pytest.raises(UserError, match="unknown tokenizer 'gpt3'.*gpt2"):
        get_tokenizer("gpt3")
    with pytest.raises(UserError, match="trained from a corpus"):
        get_tokenizer("bpe:4096")
    assert main(["tokenize", "hi", "--tokenizer", "nope"]) == 2
    assert "error: unknown tokenizer 'nope'" in capsys.readouterr().err


def test_damaged_or_foreign_tokenizer_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="cannot read tokenizer"):
        Tokenizer.load(bad)
    bad.write_text(json.dumps({"type": "sentencepiece"}))
    with pytest.raises(UserError, match="not a buildllm tokenizer"):
        get_tokenizer(bad)
    bad.write_text(json.dumps({"type": "bpe", "name": "x"}))
    with pytest.raises(UserError, match="damaged"):
        get_tokenizer(bad)
    with pytest.raises(UserError, match="no tokenizer"):
        Tokenizer.load(tmp_path / "absent.json")


def test_cli_tokenize_prints_ids(capsys):
    assert main(["tokenize", BOOK_TEXT]) == 0
    assert str(BOOK_IDS) in capsys.readouterr().out
    assert main(["tokenize", "x<|endoftext|>", "--allow-special"]) == 0
    assert "[87, 50256]" in capsys.readouterr().out


# Word tokenizer ----------------------------------------------------------------------------------


def test_word_tokenizer_as_in_the_book():
    assert WordTokenizer.split(BOOK_TEXT) == [
        "Hello", ",", "world", ".", "Is", "this", "--", "a", "test", "?"]
    tok = WordTokenizer.from_text(BOOK_TEXT)
    assert tok.id_to_token == [",", "--", ".", "?", "Hello", "Is", "a", "test", "this", "world",
                               "<|endoftext|>", "<|unk|>"]
    assert (tok.vocab_size, tok.eot_id, tok.unk_id) == (12, 10, 11)
    assert tok.encode(BOOK_TEXT) == [4, 0, 9, 2, 5, 8, 1, 6, 7, 3]
    # the book's join: no space before , . ? but "--" keeps its spaces
    assert tok.decode(tok.encode(BOOK_TEXT)) == "Hello, world. Is this -- a test?"


def test_word_tokenizer_unknown_words_and_specials():
    tok = WordTokenizer.from_text(BOOK_TEXT)
    assert tok.encode("Hello, Bob.") == [4, 0, 11, 2]
    assert tok.decode([4, 0, 11, 2]) == "Hello, <|unk|>."
    assert tok.encode("a <|endoftext|> test", allowed_special={"<|endoftext|>"}) == [6, 10, 7]
    assert tok.encode("a <|endoftext|> test", allowed_special="all") == [6, 10, 7]
    assert tok.encode("a <|endoftext|> test") == [6, 11, 7]  # not allowed: not a word either
    assert tok.encode_batch(["Hello", "Bob"]) == [[4], [11]]


def test_word_tokenizer_decode_joins_punctuation():
    tok = WordTokenizer.from_text('He said: "Yes (really); no!" It\'s')
    assert tok.decode(tok.encode('He said: "Yes (really); no!"')) == 'He said:" Yes( really); no!"'


def test_word_tokenizer_save_load(tmp_path):
    tok = WordTokenizer.from_text(["one two, three.", "four"])
    path = tok.save(tmp_path / "word.json")
    loaded = WordTokenizer.load(path)
    assert loaded.id_to_token == tok.id_to_token and loaded.name == "word"
    assert get_tokenizer(path).encode("two, four five") == tok.encode("two, four five") == [5, 0, 2, 7]
    with pytest.raises(UserError, match="not a BPETokenizer"):
        BPETokenizer.load(path)


# Trained BPE -------------------------------------------------------------------------------------


def naive_bpe(word_counts: dict[bytes, int], n_tokens: int) -> list[bytes]:
    """Textbook BPE: recount every pair after every merge (slow, obviously right)."""
    vocab = [bytes([b]) for b in range(256)]
    words = {tuple(w): c for w, c in word_counts.items()}
    while len(vocab) < n_tokens:
        pairs = Counter()
        for w, c in words.items():
            for p in zip(w, w[1:]):
                pairs[p] += c
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))  # most frequent, ties to the smaller ids
        new = len(vocab)
        vocab.append(vocab[best[0]] + vocab[best[1]])
        merged = {}
        for w, c in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(new)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + c
        words = merged
    return vocab


def test_bpe_learns_the_textbook_merges():
    tok = train_bpe("aaabdaaabac", 256 + 4 + 1)
    merged = sorted(tok.mergeable_ranks.items(), key=lambda kv: kv[1])[256:]
    assert merged == [(b"aa", 256), (b"ab", 257), (b"aaab", 258), (b"ac", 259)]
    assert (tok.vocab_size, tok.eot_id, tok.name) == (261, 260, "bpe261")
    assert tok.encode("aaabdaaabac") == [258, 100, 258, 259]
    assert tok.encode("ab<|endoftext|>", allowed_special="all") == [257, 260]


def test_bpe_incremental_counts_equal_the_naive_algorithm():
    text = buildllm.shakespeare_plays()["sonnets"][:15_000] + " ééé 你好你好 👋👋"
    counts = count_pretokens(text)
    assert learn_merges(counts, 256 + 120) == naive_bpe(counts, 256 + 120)


def test_bpe_pretokens_follow_gpt2_and_skip_specials():
    assert count_pretokens("Hi there<|endoftext|>there's 42") == Counter(
        {b"Hi": 1, b" there": 1, b"there": 1, b"'s": 1, b" 42": 1})
    tok = train_bpe(["hello<|endoftext|>world "] * 50, 300)
    assert not any(b"|" in t and len(t) > 1 for t in tok.mergeable_ranks)


def test_bpe_vocab_size_limits():
    with pytest.raises(UserError, match="at least 256 byte tokens \\+ 1 special token"):
        train_bpe("some text", 256)
    with pytest.raises(UserError, match="258"):
        train_bpe("some text", 257, special_tokens=("<|endoftext|>", "<|pad|>"))
    with pytest.raises(UserError, match="must include <\\|endoftext\\|>"):
        train_bpe("some text", 300, special_tokens=("<|pad|>",))
    assert train_bpe("ab", 257).encode("ab") == [97, 98]  # bytes only
    assert train_bpe("ab", 1000).vocab_size == 256 + 1 + 1  # nothing left to merge: stops early
    two = train_bpe("ab ab", 300, special_tokens=("<|endoftext|>", "<|pad|>"))
    # merges "ab" (256) and " ab" (257), then specials follow the ordinary tokens
    assert two.special_tokens == {"<|endoftext|>": 258, "<|pad|>": 259} and two.vocab_size == 260


def test_bpe_save_load_round_trip(small_bpe, tmp_path):
    path = small_bpe.save(tmp_path / "bpe.json")
    data = json.loads(path.read_text())
    assert data["type"] == "bpe" and len(data["tokens"]) == 511
    assert base64.b64decode(data["tokens"][65]) == b"A"
    loaded = get_tokenizer(path)
    assert isinstance(loaded, BPETokenizer) and loaded.fingerprint() == small_bpe.fingerprint()
    text = "".join(TRICKY) + "To be, or not to be"
    assert loaded.encode(text) == small_bpe.encode(text)
    assert small_bpe.encode_batch(TRICKY) == [small_bpe.encode(t) for t in TRICKY]
    assert (loaded.vocab_size, loaded.eot_id) == (512, 511)


def test_bpe_compresses_what_it_learned(small_bpe):
    line = "To be, or not to be, that is the question"
    assert len(small_bpe.encode(line)) < len(line.encode()) * 0.6


@settings(max_examples=200, deadline=None)
@given(st.text())
@example("".join(TRICKY))
def test_bpe_round_trips_any_text(small_bpe, s):
    assert small_bpe.decode(small_bpe.encode(s)) == s


def test_decode_rejects_ids_outside_the_vocabulary(gpt2):
    with pytest.raises(ValueError, match="token id 50257 is outside the vocabulary \\(0..50256\\)"):
        gpt2.decode([1, 50257])
    with pytest.raises(ValueError, match="token id -1"):
        WordTokenizer.from_text("a b").decode([0, -1])
    assert gpt2.decode(torch.tensor([15496, 11])) == "Hello,"  # tensors and numpy ints are fine


@pytest.mark.parametrize("s", TRICKY)
def test_every_tokenizer_round_trips_tricky_text(small_bpe, gpt2, s):
    for tok in (small_bpe, gpt2):
        assert tok.decode(tok.encode(s)) == s
