"""Byte-level BPE through tiktoken: GPT-2's own (offline), or one trained on your corpus.

* GPT-2's own (``get_tokenizer("gpt2")``): the ranks shipped in ``assets/`` (see ``__init__``).
* ``train_bpe(text, vocab_size)``: byte-level BPE learned from your own corpus with GPT-2's
  pre-tokenization, then handed to tiktoken for fast encoding. Byte-level means every string,
  emoji and control characters included, round-trips exactly.
"""

from __future__ import annotations

import base64
import heapq
import itertools
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from functools import lru_cache

import tiktoken

from buildllm.errors import UserError
from buildllm.tokenizer.base import EOT, AllowedSpecial, Tokenizer, _checked

# GPT-2's pre-tokenization: contractions, letters, digits, other symbols, whitespace. BPE merges never
# cross these pieces, so " the" and "the." stay apart.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


class BPETokenizer(Tokenizer):
    """Byte-level BPE: GPT-2's own ranks (``get_tokenizer("gpt2")``) or ones from ``train_bpe``.

    ``mergeable_ranks`` maps each token's bytes to its id; lower ids were merged earlier. tiktoken
    (Rust, multi-threaded for batches) does the actual encoding.
    """

    kinds = ("bpe",)

    def __init__(
        self,
        mergeable_ranks: dict[bytes, int],
        special_tokens: dict[str, int],
        name: str,
        pat_str: str = GPT2_PATTERN,
        builtin: str | None = None,
    ):
        if EOT not in special_tokens:
            raise ValueError(f"special_tokens must contain {EOT}")
        self.name = name
        self.pat_str = pat_str
        self.builtin = builtin  # saved as a reference to the shipped ranks instead of a copy
        self.mergeable_ranks = mergeable_ranks
        self.special_tokens = dict(special_tokens)
        self.vocab_size = len(mergeable_ranks) + len(special_tokens)
        self.eot_id = special_tokens[EOT]
        self.encoding = tiktoken.Encoding(
            name=name,
            pat_str=pat_str,
            mergeable_ranks=mergeable_ranks,
            special_tokens=self.special_tokens,
            explicit_n_vocab=self.vocab_size,
        )

    def encode(self, text: str, allowed_special: AllowedSpecial = frozenset()) -> list[int]:
        if not allowed_special:
            return self.encoding.encode_ordinary(text)
        # disallowed_special=() : any other special-looking text is encoded as plain text
        return self.encoding.encode(text, allowed_special=allowed_special, disallowed_special=())

    def encode_batch(
        self, texts: Sequence[str], allowed_special: AllowedSpecial = frozenset()
    ) -> list[list[int]]:
        """Encode many texts in parallel on tiktoken's thread pool."""
        if not allowed_special:
            return self.encoding.encode_ordinary_batch(list(texts))
        return self.encoding.encode_batch(
            list(texts), allowed_special=allowed_special, disallowed_special=()
        )

    def decode(self, ids: Iterable[int]) -> str:
        # errors="replace": a slice that cuts a multi-byte character in half still decodes
        return self.encoding.decode(_checked(ids, self.vocab_size))

    def to_dict(self) -> dict:
        if self.builtin:
            return {"type": self.builtin, "name": self.name}
        by_rank = sorted(self.mergeable_ranks.items(), key=lambda kv: kv[1])
        return {
            "type": "bpe",
            "name": self.name,
            "pat_str": self.pat_str,
            # tokens[i] is the base64 of the bytes of token i (tiktoken's format, one list)
            "tokens": [base64.b64encode(b).decode("ascii") for b, _ in by_rank],
            "special_tokens": self.special_tokens,
        }

    def to_vocab_and_merges(self) -> tuple[dict[str, int], list[tuple[str, str]]]:
        """The same tokenizer in GPT-2's original files: ``vocab.json`` and ``merges.txt``.

        tiktoken keeps only each token's rank; OpenAI's format lists the merges themselves, in
        order, and spells bytes as printable characters (``byte_to_unicode``). Each merge is
        recovered by running BPE on the token's bytes with only the merges ranked before it:
        what remains is the pair that the token was made from.
        """
        spell = byte_to_unicode()

        def text(token: bytes) -> str:
            return "".join(spell[b] for b in token)

        vocab = {text(token): rank for token, rank in self.mergeable_ranks.items()}
        vocab.update(self.special_tokens)
        merges = []
        for token, rank in sorted(self.mergeable_ranks.items(), key=lambda kv: kv[1]):
            if len(token) > 1:
                left, right = _last_merge(token, self.mergeable_ranks)
                merges.append((text(left), text(right)))
        return vocab, merges

    @classmethod
    def _from_dict(cls, data: dict) -> BPETokenizer:
        ranks = {base64.b64decode(t): i for i, t in enumerate(data["tokens"])}
        if len(ranks) != len(data["tokens"]):
            raise ValueError("duplicate tokens")
        specials = {str(k): int(v) for k, v in data["special_tokens"].items()}
        if sorted(specials.values()) != list(range(len(ranks), len(ranks) + len(specials))):
            raise ValueError("special token ids must follow the ordinary tokens")
        return cls(ranks, specials, name=data["name"], pat_str=data["pat_str"])


@lru_cache(maxsize=1)
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's printable spelling of the 256 byte values (OpenAI's ``bytes_to_unicode``).

    Printable Latin-1 bytes stand for themselves; the rest (controls, space) are mapped to the
    code points from 256 up, in order, so that vocab.json and merges.txt never hold whitespace.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    spelling, extra = {}, 0
    for b in range(256):
        if b in printable:
            spelling[b] = chr(b)
        else:
            spelling[b] = chr(256 + extra)
            extra += 1
    return spelling


def _last_merge(token: bytes, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The two tokens that BPE merged last to make ``token``."""
    parts = [bytes([b]) for b in token]
    limit = ranks[token]
    while len(parts) > 2:
        # Apply the best-ranked merge that existed before this token did.
        rank, i = min((ranks.get(a + b, limit), i) for i, (a, b) in enumerate(itertools.pairwise(parts)))
        if rank >= limit:
            break
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    if len(parts) != 2:
        raise ValueError(f"token {token!r} is not the merge of two earlier tokens")
    return parts[0], parts[1]



# Training a byte-level BPE -----------------------------------------------------------------------


def train_bpe(
    text: str | Iterable[str],
    vocab_size: int,
    special_tokens: Sequence[str] = (EOT,),
    name: str | None = None,
) -> BPETokenizer:
    """Learn a byte-level BPE of (at most) ``vocab_size`` tokens from ``text`` (or an iterable of texts).

    The vocabulary starts as the 256 byte values; each step merges the most frequent adjacent pair
    into a new token, until ``vocab_size - len(special_tokens)`` ordinary tokens exist (or no pair is
    left to merge, for a text too small to fill the vocabulary). Pairs never cross GPT-2's
    pre-tokens, and any special tokens found in the text are cut out before counting.

    Efficient in pure Python because it counts each distinct pre-token once (with its frequency)
    and, after a merge, updates pair counts only in the words that contained the merged pair.
    """
    special_tokens = list(dict.fromkeys(special_tokens))
    if EOT not in special_tokens:
        raise UserError(f"special_tokens must include {EOT} (documents are separated by it)")
    check_bpe_vocab_size(vocab_size, len(special_tokens))
    word_counts = count_pretokens(text, special_tokens)
    vocab = learn_merges(word_counts, vocab_size - len(special_tokens))
    ranks = {token: i for i, token in enumerate(vocab)}
    specials = {s: len(vocab) + k for k, s in enumerate(special_tokens)}
    return BPETokenizer(ranks, specials, name=name or f"bpe{vocab_size}")


def check_bpe_vocab_size(vocab_size: int, n_special: int = 1) -> None:
    if vocab_size < 256 + n_special:
        raise UserError(f"vocab_size {vocab_size} is too small: byte-level BPE needs at least 256 "
                        f"byte tokens + {n_special} special token(s) = {256 + n_special}")


def count_pretokens(text: str | Iterable[str], special_tokens: Sequence[str] = (EOT,)) -> Counter:
    """How often each distinct GPT-2 pre-token (as UTF-8 bytes) occurs in the text(s)."""
    import regex  # tiktoken's own dependency; the stdlib ``re`` has no \p{L}

    pattern = regex.compile(GPT2_PATTERN)
    cut = regex.compile("|".join(regex.escape(s) for s in special_tokens)) if special_tokens else None
    counts: Counter = Counter()
    for t in [text] if isinstance(text, str) else text:
        for part in cut.split(t) if cut else [t]:
            counts.update(pattern.findall(part))
    return Counter({w.encode("utf-8"): c for w, c in counts.items()})


def learn_merges(word_counts: dict[bytes, int], n_tokens: int) -> list[bytes]:
    """The BPE vocabulary (token bytes in rank order): 256 bytes, then merges until ``n_tokens``."""
    vocab = [bytes([b]) for b in range(256)]
    id_of = {token: i for i, token in enumerate(vocab)}
    words = [list(w) for w in word_counts]  # each word as a list of token ids
    counts = list(word_counts.values())

    pair_counts: dict[tuple[int, int], int] = defaultdict(int)
    where: dict[tuple[int, int], set[int]] = defaultdict(set)  # pair -> words that (may) hold it
    for i, w in enumerate(words):
        for pair in itertools.pairwise(w):
            pair_counts[pair] += counts[i]
            where[pair].add(i)
    # Max-heap of (-count, pair) with lazy deletion: an entry is stale when its count no longer
    # matches pair_counts. Ties go to the smaller pair of ids, so training is deterministic.
    heap = [(-c, pair) for pair, c in pair_counts.items()]
    heapq.heapify(heap)

    while len(vocab) < n_tokens and heap:
        neg, pair = heapq.heappop(heap)
        if pair_counts.get(pair) != -neg:
            continue
        a, b = pair
        merged = vocab[a] + vocab[b]
        new = id_of.get(merged)
        if new is None:  # (rarely, two different merges spell the same bytes: keep one id)
            new = id_of[merged] = len(vocab)
            vocab.append(merged)
        before: dict[tuple[int, int], int] = {}
        for i in where.pop(pair):
            w, c = words[i], counts[i]
            merged_word, j = [], 0
            while j < len(w):
                if j + 1 < len(w) and w[j] == a and w[j + 1] == b:
                    merged_word.append(new)
                    j += 2
                else:
                    merged_word.append(w[j])
                    j += 1
            if len(merged_word) == len(w):
                continue  # the pair left this word in an earlier merge
            words[i] = merged_word
            for p in itertools.pairwise(w):
                before.setdefault(p, pair_counts[p])
                pair_counts[p] -= c
            for p in itertools.pairwise(merged_word):
                before.setdefault(p, pair_counts[p])
                pair_counts[p] += c
                where[p].add(i)
        for p, old in before.items():
            now = pair_counts[p]
            if now <= 0:
                del pair_counts[p]
            elif now != old:
                heapq.heappush(heap, (-now, p))
    return vocab
