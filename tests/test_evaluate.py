"""Perplexity with a sliding window, bits per character, HellaSwag-style multiple choice."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from buildllm import cli
from buildllm.errors import UserError
from buildllm.evaluate import (
    MultipleChoiceItem,
    bits_per_character,
    evaluate_multiple_choice,
    evaluate_text,
    load_multiple_choice,
    perplexity,
    score_endings,
)
from buildllm.models.gpt2 import GPTConfig, GPTModel
from buildllm.tokenizer import WordTokenizer
from buildllm.weights.checkpoint import save_model

CONTEXT = 16


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=50, context_length=CONTEXT, emb_dim=32, n_heads=2, n_layers=2)
    return GPTModel(cfg).eval()


def random_ids(n, seed=1):
    return torch.randint(0, 50, (n,), generator=torch.Generator().manual_seed(seed))


def nll_sum(model, ids):
    """Summed next-token loss of one forward pass over ``ids`` (its first token is not scored)."""
    with torch.no_grad():
        return F.cross_entropy(model(ids[None])[0, :-1], ids[1:], reduction="sum").item()


# Perplexity --------------------------------------------------------------------------------------


def test_stride_equal_to_context_is_the_plain_chunked_loss(model):
    ids = random_ids(50)
    chunks = [ids[i : i + CONTEXT] for i in range(0, len(ids), CONTEXT)]  # 16, 16, 16, 2 tokens
    expected = sum(nll_sum(model, c) for c in chunks) / sum(len(c) - 1 for c in chunks)
    result = perplexity(model, ids, stride=CONTEXT)
    assert result["tokens"] == 50 - 4
    assert result["loss"] == pytest.approx(expected, rel=1e-6)
    assert result["perplexity"] == pytest.approx(math.exp(expected), rel=1e-6)


def test_text_shorter_than_the_window_is_one_forward_pass(model):
    ids = random_ids(10)
    result = perplexity(model, ids, stride=4)
    assert result["tokens"] == 9
    assert result["loss"] == pytest.approx(nll_sum(model, ids) / 9, rel=1e-6)


def test_stride_one_scores_each_token_with_the_longest_context(model):
    """With stride 1 every token after the first window sees exactly CONTEXT - 1 tokens before it."""
    ids = random_ids(40)
    expected = 0.0
    with torch.no_grad():
        for t in range(1, len(ids)):
            context = ids[max(0, t - (CONTEXT - 1)) : t + 1]
            expected += F.cross_entropy(model(context[None])[0, -2], ids[t]).item()
    result = perplexity(model, ids, stride=1)
    assert result["tokens"] == 39
    assert result["loss"] == pytest.approx(expected / 39, rel=1e-6)


@pytest.mark.parametrize("stride", [3, 5, 8, 13])
def test_matches_the_transformers_recipe_with_ignored_labels(model, stride):
    """The loop of the transformers perplexity guide, transcribed: labels of tokens scored by an
    earlier window are -100 (ignored); the loss is summed over the labels that count."""
    ids = random_ids(45, seed=stride)
    total, count, prev_end_loc = 0.0, 0, 0
    for begin_loc in range(0, len(ids), stride):
        end_loc = min(begin_loc + CONTEXT, len(ids))
        trg_len = end_loc - prev_end_loc
        input_ids = ids[begin_loc:end_loc]
        target_ids = input_ids.clone()
        target_ids[:-trg_len] = -100
        with torch.no_grad():
            logits = model(input_ids[None])[0]
        labels = target_ids[1:]  # the shift inside GPT2LMHeadModel
        total += F.cross_entropy(logits[:-1], labels, ignore_index=-100, reduction="sum").item()
        count += int((labels != -100).sum())
        prev_end_loc = end_loc
        if end_loc == len(ids):
            break
    result = perplexity(model, ids, stride=stride)
    assert result["tokens"] == count == 44
    assert result["loss"] == pytest.approx(total / count, rel=1e-6)


def test_smaller_context_and_bad_settings(model):
    ids = random_ids(30)
    small = perplexity(model, ids, context_length=8, stride=8)
    chunks = [ids[i : i + 8] for i in range(0, 30, 8)]
    assert small["loss"] == pytest.approx(sum(nll_sum(model, c) for c in chunks) / (30 - 4), rel=1e-6)
    with pytest.raises(UserError, match="stride"):
        perplexity(model, ids, stride=0)
    assert perplexity(model, ids, stride=1000) == perplexity(model, ids, stride=CONTEXT)  # capped
    with pytest.raises(UserError, match="context_length"):
        perplexity(model, ids, context_length=CONTEXT + 1)
    with pytest.raises(UserError, match="two tokens"):
        perplexity(model, ids[:1])
    assert model.training is False


def test_training_mode_is_restored(model):
    model.train()
    try:
        perplexity(model, random_ids(20), stride=8)
        assert model.training
    finally:
        model.eval()


def test_bits_per_character():
    assert bits_per_character(math.log(2), 10, 5) == pytest.approx(2.0)
    assert bits_per_character(math.log(4), 3, 6) == pytest.approx(1.0)
    with pytest.raises(UserError):
        bits_per_character(1.0, 1, 0)


def test_evaluate_text():
    text = "the cat sat on the mat . the dog sat on the log . " * 3
    tokenizer = WordTokenizer.from_text(text)
    torch.manual_seed(0)
    model = GPTModel(GPTConfig(vocab_size=tokenizer.vocab_size, context_length=CONTEXT, emb_dim=32,
                               n_heads=2, n_layers=1)).eval()
    result = evaluate_text(model, tokenizer, text, stride=4)
    ids = tokenizer.encode(text)
    assert result["tokens"] == len(ids) == 42 and result["chars"] == len(text)
    direct = perplexity(model, ids, stride=4)
    assert result["loss"] == direct["loss"] and result["perplexity"] == direct["perplexity"]
    assert result["bits_per_char"] == pytest.approx(direct["loss"] * 41 / (len(text) * math.log(2)))


# Multiple choice ---------------------------------------------------------------------------------

WORDS = ["the", "cat", "dog", "say", "ok", "wonderful", "see", "a", "elephant", "filler"]
# P(next | current): a bigram table the constructed model below computes exactly.
BIGRAMS = {
    "the": {"cat": 0.5, "dog": 0.1},
    "say": {"ok": 0.2, "wonderful": 0.1},
    "wonderful": {"wonderful": 0.5},
    "see": {"a": 0.3, "elephant": 0.05},
    "a": {"a": 0.3},
}


def bigram_model(tokenizer):
    """A GPT whose next-token distribution depends only on the current token, set by hand.

    Token embeddings are one-hot, positions and every block add nothing (zero output projections),
    the final LayerNorm is set to give the one-hot vector back, and the output head holds the
    log-probabilities: logits = log P(next | current).
    """
    v = tokenizer.vocab_size
    model = GPTModel(GPTConfig(vocab_size=v, context_length=CONTEXT, emb_dim=v, n_heads=1, n_layers=1,
                               tie_embeddings=False))
    table = torch.empty(v, v)
    for current in range(v):
        known = BIGRAMS.get(tokenizer.id_to_token[current], {})
        rest = (1 - sum(known.values())) / (v - len(known))
        table[:, current] = rest
        for word, p in known.items():
            table[tokenizer.token_to_id[word], current] = p
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.wte.weight.copy_(torch.eye(v))
        # LayerNorm of a one-hot vector: (e - 1/v) * a with a = 1 / sqrt(var + eps); undo it.
        a = 1 / math.sqrt((1 / v) * (1 - 1 / v) + model.final_norm.eps)
        model.final_norm.scale.fill_(1 / a)
        model.final_norm.shift.fill_(1 / v)
        model.out_head.weight.copy_(table.log())
    return model.eval()


@pytest.fixture(scope="module")
def bigram():
    tokenizer = WordTokenizer([*WORDS, "<|endoftext|>", "<|unk|>"])
    return bigram_model(tokenizer), tokenizer


ITEMS = [
    # Every rule picks "cat".
    MultipleChoiceItem("the", ("cat", "dog"), 0),
    # Summed log-likelihood prefers the short "ok" (ln .2 = -1.61 against ln .1 + ln .5 = -3.00);
    # per character (-0.80 against -0.16) and per token (-1.61 against -1.50) prefer the long one.
    MultipleChoiceItem("say", ("ok", "wonderful wonderful"), 1),
    # Per token "a a" wins (-1.20 against -3.00), per character the long "elephant" (-0.80 against -0.37).
    MultipleChoiceItem("see", ("a a", "elephant"), 1),
]


def test_bigram_model_scores_endings_exactly(bigram):
    model, tokenizer = bigram
    scores = score_endings(model, tokenizer, "say", ["ok", "wonderful wonderful"])
    assert scores[0][1] == 1 and scores[1][1] == 2
    assert scores[0][0] == pytest.approx(math.log(0.2), abs=1e-5)
    assert scores[1][0] == pytest.approx(math.log(0.1) + math.log(0.5), abs=1e-5)


def test_acc_acc_norm_and_per_token_norm(bigram):
    model, tokenizer = bigram
    result = evaluate_multiple_choice(model, tokenizer, ITEMS)
    assert result == {"acc": pytest.approx(1 / 3), "acc_norm": 1.0, "acc_norm_tokens": pytest.approx(2 / 3),
                      "items": 3}
    assert evaluate_multiple_choice(model, tokenizer, ITEMS, limit=1)["acc"] == 1.0


def write_jsonl(path, records):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return path


def test_jsonl_items_with_hellaswag_fields(bigram, tmp_path):
    model, tokenizer = bigram
    records = [{"ctx": i.ctx, "endings": list(i.endings), "label": i.label, "activity_label": "x"} for i in ITEMS]
    records[2]["label"] = "1"  # some copies store labels as strings
    path = write_jsonl(tmp_path / "items.jsonl", records[:2] + [""] + records[2:])
    assert load_multiple_choice(path) == ITEMS
    assert load_multiple_choice(path, limit=2) == ITEMS[:2]
    assert evaluate_multiple_choice(model, tokenizer, path)["acc_norm"] == 1.0


@pytest.mark.parametrize("bad, message", [
    ("{not json", "not valid JSON"),
    ('["ctx"]', "expected an object"),
    ({"ctx": 3, "endings": ["a", "b"], "label": 0}, "'ctx' must be a string"),
    ({"ctx": "c", "endings": "ab", "label": 0}, "'endings' must be a list"),
    ({"ctx": "c", "endings": ["a", ""], "label": 0}, "'endings' must be a list"),
    ({"ctx": "c", "endings": ["a", "b"], "label": 2}, "'label' must be an index"),
    ({"ctx": "c", "endings": ["a", "b"]}, "'label' must be an index"),
])
def test_bad_jsonl_line_names_file_and_line(tmp_path, bad, message):
    good = {"ctx": "the", "endings": ["cat", "dog"], "label": 0}
    path = write_jsonl(tmp_path / "items.jsonl", [good, bad])
    with pytest.raises(UserError, match=rf"items\.jsonl:2: {message}"):
        load_multiple_choice(path)


def test_empty_or_missing_jsonl(tmp_path):
    with pytest.raises(UserError, match="no multiple-choice items"):
        load_multiple_choice(write_jsonl(tmp_path / "empty.jsonl", [""]))
    with pytest.raises(UserError, match="cannot read"):
        load_multiple_choice(tmp_path / "missing.jsonl")


# Command line ------------------------------------------------------------------------------------


def test_eval_cli(bigram, tmp_path, capsys):
    model, tokenizer = bigram
    save_model(tmp_path / "ckpt", model, tokenizer)
    text = write_jsonl(tmp_path / "text.txt", ["the cat say ok see a a the dog"])
    items = write_jsonl(tmp_path / "items.jsonl", [{"ctx": i.ctx, "endings": list(i.endings), "label": i.label}
                                                   for i in ITEMS])
    argv = ["eval", "--checkpoint", str(tmp_path / "ckpt"), "--data", str(text), "--stride", "4",
            "--hellaswag", str(items)]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    expected = evaluate_text(model, tokenizer, text.read_text(), stride=4)
    assert f"perplexity      {expected['perplexity']:.2f}" in out
    assert f"bits per char   {expected['bits_per_char']:.4f}" in out
    assert "acc             0.3333" in out and "acc_norm        1.0000" in out
    assert cli.main(["eval", "--checkpoint", str(tmp_path / "ckpt")]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err
    bad = write_jsonl(tmp_path / "bad.jsonl", ["{"])
    assert cli.main(["eval", "--checkpoint", str(tmp_path / "ckpt"), "--hellaswag", str(bad)]) == 2
    assert "bad.jsonl:1" in capsys.readouterr().err


def test_stride_one_less_than_the_window_scores_every_token_once(model):
    ids = random_ids(75)
    # by hand: windows of 16 tokens starting every 15, each predicting its 15 successors
    windows = [ids[start : start + CONTEXT] for start in range(0, 74, CONTEXT - 1)]
    expected = sum(nll_sum(model, w) for w in windows) / 74
    result = perplexity(model, ids, stride=CONTEXT - 1)
    assert result["tokens"] == 74 and result["loss"] == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("stride", [CONTEXT, CONTEXT - 1, 5])
def test_batched_windows_give_the_same_loss(model, stride):
    ids = random_ids(101)
    one_by_one = perplexity(model, ids, stride=stride)
    for batch_size in (2, 3, 64):
        batched = perplexity(model, ids, stride=stride, batch_size=batch_size)
        assert batched["tokens"] == one_by_one["tokens"]
        assert batched["loss"] == pytest.approx(one_by_one["loss"], rel=1e-6)
    with pytest.raises(UserError, match="batch_size"):
        perplexity(model, ids, batch_size=0)
