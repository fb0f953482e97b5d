import io
import json
import math
import sys
from functools import partial

import pytest
import torch
from torch import nn

from buildllm import cli
from buildllm.errors import UserError
from buildllm.generation.sampling import (
    detokenize,
    generate,
    sample_next_token,
    stream,
    stream_text,
)
from buildllm.models.gpt2 import GPTConfig
from buildllm.models.layers import KVCache
from buildllm.tokenizer import WordTokenizer, get_tokenizer
from buildllm.weights.checkpoint import save_model

CFG = GPTConfig(vocab_size=61, context_length=16, emb_dim=32, n_heads=4, n_layers=2)


@pytest.fixture
def tiny_model(tiny_gpt):
    return partial(tiny_gpt, **{**CFG.to_dict(), "seed": 0})


def reference_greedy(model, idx: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """The book's generate_text_simple: no cache, the last context_length tokens every step."""
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(idx[:, -model.cfg.context_length :])[:, -1]
            idx = torch.cat([idx, logits.argmax(dim=-1, keepdim=True)], dim=1)
    return idx


class Recorder(nn.Module):
    """Wraps a model and keeps the last-position logits of every forward pass."""

    def __init__(self, model):
        super().__init__()
        self.model, self.cfg, self.logits = model, model.cfg, []

    def forward(self, idx, kv_cache=None, padding=None, last_only=False):
        out = self.model(idx, kv_cache=kv_cache, padding=padding, last_only=last_only)
        self.logits.append(out[:, -1].clone())
        return out

    def new_kv_cache(self, *args, **kwargs):  # generation asks the model for its cache
        return self.model.new_kv_cache(*args, **kwargs)


class FixedLogits(nn.Module):
    """A fake model whose next-token logits are always the same vector (for sampling statistics)."""

    def __init__(self, logits):
        super().__init__()
        self.register_buffer("fixed", torch.as_tensor(logits, dtype=torch.float32))
        self.cfg = GPTConfig(vocab_size=len(self.fixed), context_length=8, emb_dim=4, n_heads=1, n_layers=1)

    def forward(self, idx, kv_cache=None, padding=None, last_only=False):
        return self.fixed.expand(idx.shape[0], 1 if last_only else idx.shape[1], -1)


class Counting(nn.Module):
    """A fake model that always predicts (last token + 1) mod vocab: exact, known outputs."""

    def __init__(self, vocab_size=20):
        super().__init__()
        self.cfg = GPTConfig(vocab_size=vocab_size, context_length=8, emb_dim=4, n_heads=1, n_layers=1)

    def forward(self, idx, kv_cache=None, padding=None, last_only=False):
        idx = idx[:, -1:] if last_only else idx
        return torch.nn.functional.one_hot((idx + 1) % self.cfg.vocab_size, self.cfg.vocab_size).float() * 10

    def new_kv_cache(self, batch_size, max_length=None, device=None, dtype=torch.float32):
        return KVCache(self.cfg, batch_size, max_length, device=device or "cpu", dtype=dtype)


@pytest.mark.parametrize("preset", ["nano", "llama-nano", "qwen3-nano"])
def test_last_only_gives_the_last_positions_logits_and_the_same_cache(preset):
    """A prompt's pass asks for the last position's logits alone (the output head runs for one
    position); everything else, the cache included, is the full pass's."""
    from buildllm.models import registry

    torch.manual_seed(0)
    model = registry.build_model(registry.preset(preset, vocab_size=61, context_length=16)).eval()
    idx = torch.randint(0, 61, (2, 7), generator=torch.Generator().manual_seed(3))
    padding = torch.zeros(2, 7, dtype=torch.bool)
    padding[0, :2] = True
    caches = [model.new_kv_cache(2, 12) for _ in range(2)]
    with torch.no_grad():
        full = model(idx, kv_cache=caches[0], padding=padding)
        last = model(idx, kv_cache=caches[1], padding=padding, last_only=True)
    assert last.shape == (2, 1, 61)
    torch.testing.assert_close(last, full[:, -1:], rtol=0, atol=1e-6)
    assert caches[0].length == caches[1].length == 7
    assert torch.equal(caches[0].keys, caches[1].keys) and torch.equal(caches[0].values, caches[1].values)


# KV cache: identical to recomputing everything ----------------------------------------------------


@pytest.mark.parametrize("attention", ["fast", "readable"])
def test_cache_matches_reference_far_past_the_context_window(tiny_model, attention):
    model = tiny_model(attention=attention)
    idx = torch.randint(0, CFG.vocab_size, (1, 5), generator=torch.Generator().manual_seed(1))
    expected = reference_greedy(model, idx, 40)  # 45 tokens through a 16-token window
    assert torch.equal(generate(model, idx, 40, use_cache=False), expected)
    assert torch.equal(generate(model, idx, 40), expected)

    with_cache, without = Recorder(model), Recorder(model)
    generate(with_cache, idx, 40)
    generate(without, idx, 40, use_cache=False)
    assert len(with_cache.logits) == len(without.logits) == 40
    torch.testing.assert_close(torch.stack(with_cache.logits), torch.stack(without.logits), atol=1e-5, rtol=0)


def test_batch_of_different_lengths_equals_each_prompt_alone(tiny_model):
    model = tiny_model(seed=3)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, CFG.vocab_size, (n,), generator=g).tolist() for n in (3, 11, 7, 1)]
    cached = generate(model, prompts, 30)
    assert generate(model, prompts, 30, use_cache=False) == cached
    for prompt, row in zip(prompts, cached):
        alone = reference_greedy(model, torch.tensor([prompt]), 30)[0].tolist()
        assert row == alone
        assert generate(model, [prompt], 30) == [alone]

    with_cache, without = Recorder(model), Recorder(model)
    generate(with_cache, prompts, 30)
    generate(without, prompts, 30, use_cache=False)
    torch.testing.assert_close(torch.stack(with_cache.logits), torch.stack(without.logits), atol=1e-5, rtol=0)


def test_prompt_longer_than_the_window_is_cropped_with_a_warning(tiny_model):
    model = tiny_model()
    idx = torch.randint(0, CFG.vocab_size, (2, 25))
    with pytest.warns(UserWarning, match="only the last 16"):
        out = generate(model, idx, 6)
    assert torch.equal(out, reference_greedy(model, idx, 6))  # the whole prompt comes back
    with pytest.warns(UserWarning, match="context window"):
        rows = generate(model, [idx[0].tolist(), idx[1, :4].tolist()], 6)
    assert rows[0] == out[0].tolist() and len(rows[1]) == 10


def test_zero_new_tokens_returns_the_prompt(tiny_model):
    idx = torch.tensor([[1, 2, 3]])
    assert torch.equal(generate(tiny_model(), idx, 0), idx)
    assert list(stream(tiny_model(), idx, 0)) == []


# Stop tokens --------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_cache", [True, False])
def test_eos_stops_each_row_and_pads_finished_rows(use_cache):
    model = Counting()
    out = generate(model, torch.tensor([[3], [7]]), 10, eos_id=9, use_cache=use_cache)
    # Row 0 needs six tokens to reach 9; row 1 finished after two and is padded with eos.
    assert out.tolist() == [[3, 4, 5, 6, 7, 8, 9], [7, 8, 9, 9, 9, 9, 9]]
    rows = generate(model, [[3], [6, 7]], 10, eos_id=9, use_cache=use_cache)
    assert rows == [[3, 4, 5, 6, 7, 8, 9], [6, 7, 8, 9]]
    assert generate(model, [[3]], 4, eos_id=9) == [[3, 4, 5, 6, 7]]  # max_new_tokens comes first
    assert len(list(stream(model, torch.tensor([[3], [7]]), 10, eos_id=9))) == 6


# Sampling ----------------------------------------------------------------------------------------


def test_top_k_1_equals_greedy(tiny_model):
    model = tiny_model()
    idx = torch.randint(0, CFG.vocab_size, (3, 4))
    g = torch.Generator().manual_seed(0)
    assert torch.equal(generate(model, idx, 20, temperature=1.5, top_k=1, generator=g), generate(model, idx, 20))


def test_a_fixed_generator_makes_sampling_reproducible(tiny_model):
    model = tiny_model()
    idx = torch.randint(0, CFG.vocab_size, (2, 4))

    def run(seed):
        return generate(model, idx, 30, temperature=1.0, top_p=0.95, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(7), run(7))
    assert not torch.equal(run(7), run(8))


def test_temperature_towards_zero_converges_to_greedy(tiny_model):
    model = tiny_model()
    idx = torch.randint(0, CFG.vocab_size, (3, 4))
    g = torch.Generator().manual_seed(0)
    assert torch.equal(generate(model, idx, 20, temperature=1e-4, generator=g), generate(model, idx, 20))
    logits = torch.tensor([[1.0, 1.5, 0.5, -1.0]]).expand(2000, -1)
    assert sample_next_token(logits, 1e-30).tolist() == [1] * 2000  # no overflow to NaN
    for temperature, share in [(1.0, 0.4), (0.2, 0.9), (0.05, 0.999)]:
        picks = sample_next_token(logits, temperature, generator=torch.Generator().manual_seed(1))
        assert (picks == 1).float().mean() >= share


def test_greedy_picks_argmax_first_largest_and_nan_included():
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        logits = torch.randn(8, 50_257).to(dtype)
        logits[:, [100, 5000]] = 10.0  # tied: the first one wins, as argmax has it
        logits[1, 7] = 10.0
        logits[2, 300] = float("nan")  # argmax takes a NaN as the largest
        picks = sample_next_token(logits, 0.0)
        assert picks.tolist() == [100, 7, 300, 100, 100, 100, 100, 100]
        assert torch.equal(picks, logits.argmax(dim=-1))


def expected_distribution(logits, temperature, top_k=None, top_p=None):
    """softmax(logits / T) restricted to the top-k, then to the top-p set, written out plainly."""
    probs = torch.softmax(torch.tensor(logits, dtype=torch.float64) / temperature, dim=0).tolist()
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    keep = order[:top_k] if top_k else order
    total = sum(probs[i] for i in keep)
    if top_p is not None:
        nucleus, mass = [], 0.0
        for i in keep:
            nucleus.append(i)
            mass += probs[i] / total
            if mass >= top_p:
                break
        keep = nucleus
    total = sum(probs[i] for i in keep)
    return [probs[i] / total if i in keep else 0.0 for i in range(len(probs))]


LOGITS = [2.0, 1.5, 1.0, 0.6, 0.0, -0.5, -1.0, -3.0]


@pytest.mark.parametrize(
    "temperature, top_k, top_p",
    [(1.0, None, None), (0.7, 3, None), (1.6, None, None), (1.3, None, 0.8), (1.0, 5, 0.9), (0.5, None, 0.5)],
)
def test_sampled_frequencies_match_the_restricted_softmax(temperature, top_k, top_p):
    draws = 20_000
    model = FixedLogits(LOGITS)
    out = generate(model, torch.zeros(draws, 1, dtype=torch.long), 1, temperature=temperature, top_k=top_k,
                   top_p=top_p, use_cache=False, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(out[:, -1], minlength=len(LOGITS)).tolist()
    expected = expected_distribution(LOGITS, temperature, top_k, top_p)
    assert all(c == 0 for c, p in zip(counts, expected) if p == 0)  # nothing outside the set, ever
    kept = [(c, p * draws) for c, p in zip(counts, expected) if p > 0]
    chi2 = sum((c - e) ** 2 / e for c, e in kept)
    assert chi2 < 25, (counts, [round(e) for _, e in kept])  # df <= 7: p-value below 1e-3


def test_top_p_keeps_the_smallest_set_that_reaches_p():
    logits = torch.tensor([[0.5, 0.3, 0.2]]).log().expand(3000, -1)
    for top_p, support in [(1e-9, {0}), (0.45, {0}), (0.55, {0, 1}), (0.85, {0, 1, 2}), (1.0, {0, 1, 2})]:
        picks = sample_next_token(logits, 1.0, top_p=top_p, generator=torch.Generator().manual_seed(0))
        assert set(picks.tolist()) == support


def test_a_nucleus_wider_than_the_first_candidates_is_found_row_by_row():
    # Strictly falling probabilities over 5000 tokens: the 0.9 nucleus is ~3000 tokens, past the
    # best 64 and 1024 the sampler looks among first; the other row's nucleus is one token.
    wide = -torch.arange(5000, dtype=torch.float64) / 1500
    probs = torch.softmax(wide, dim=0)
    nucleus = int((probs.cumsum(0) - probs < 0.9).sum())
    assert 1024 < nucleus < 5000
    peaked = torch.full((5000,), -30.0)
    peaked[7] = 0.0
    logits = torch.stack([wide.float(), peaked]).repeat(5000, 1)
    picks = sample_next_token(logits, 1.0, top_p=0.9, generator=torch.Generator().manual_seed(0)).view(5000, 2)
    assert nucleus - 200 <= picks[:, 0].max() < nucleus  # its tail is drawn, nothing past it
    assert set(picks[:, 1].tolist()) == {7}


def test_a_token_of_probability_zero_is_never_drawn():
    logits = torch.linspace(1.0, -1.0, 100)
    logits[[0, 50, 99]] = -math.inf  # the first, one inside, the last
    picks = sample_next_token(logits.expand(20_000, -1), 1.0, generator=torch.Generator().manual_seed(0))
    assert set(picks.tolist()) == set(range(100)) - {0, 50, 99}


def test_nan_logits_still_give_token_ids_in_range():
    logits = torch.full((4, 100), math.nan)
    for settings in ({}, {"top_k": 5}, {"top_p": 0.9}, {"top_k": 5, "top_p": 0.9}):
        picks = sample_next_token(logits, 1.0, generator=torch.Generator().manual_seed(0), **settings)
        assert picks.shape == (4,) and ((0 <= picks) & (picks < 100)).all(), settings


def test_top_k_and_top_p_work_row_by_row_in_a_batch():
    # Each row has its own ranking: a filter that used row 0's threshold for all would fail.
    logits = torch.tensor([[3.0, 2.9, 0.0, -1.0], [-1.0, 0.0, 2.9, 3.0]]).repeat(1000, 1)
    g = torch.Generator().manual_seed(0)
    for kwargs in ({"top_k": 2}, {"top_p": 0.8}):
        picks = sample_next_token(logits, 1.0, generator=g, **kwargs).view(1000, 2)
        assert set(picks[:, 0].tolist()) == {0, 1} and set(picks[:, 1].tolist()) == {2, 3}
    assert sample_next_token(logits[:2], 0.0).tolist() == [0, 3]


@pytest.mark.parametrize(
    "kwargs, message",
    [({"temperature": -0.1}, "temperature"), ({"temperature": math.nan}, "temperature"), ({"top_k": 0}, "top_k"),
     ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"max_new_tokens": -1}, "max_new_tokens")],
)
def test_invalid_settings_are_clear_errors(tiny_model, kwargs, message):
    args = {"max_new_tokens": 5, **kwargs}
    with pytest.raises(UserError, match=message):
        generate(tiny_model(), torch.tensor([[1, 2]]), **args)
    with pytest.raises(UserError, match=message):
        stream(tiny_model(), torch.tensor([[1, 2]]), **args)  # at the call, not at the first token


def test_bad_prompts_are_clear_errors(tiny_model):
    model = tiny_model()
    with pytest.raises(UserError, match="empty"):
        generate(model, [[1, 2], []], 3)
    with pytest.raises(UserError, match="vocabulary"):
        generate(model, torch.tensor([[1, CFG.vocab_size]]), 3)


def test_training_mode_is_restored_and_inference_mode_does_not_leak(tiny_model):
    model = tiny_model(drop_rate=0.5).train()
    steps = stream(model, torch.tensor([[1, 2]]), 5)
    next(steps)
    assert not torch.is_inference_mode_enabled() and not model.training
    steps.close()  # a stream given up halfway restores the mode too
    assert model.training
    out = generate(model, torch.tensor([[1, 2]]), 5)
    assert model.training
    assert torch.equal(out, generate(model.eval(), torch.tensor([[1, 2]]), 5))  # dropout was off


# Text ----------------------------------------------------------------------------------------


def test_detokenize_never_prints_half_a_character():
    tok = get_tokenizer("gpt2")
    text = "Grüße 🙂🦙 世界 naïve"
    ids = tok.encode(text)
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # some tokens hold part of a character
    pieces = list(detokenize(tok, ids))
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)
    prompt = tok.encode("Hi ")
    assert "".join(detokenize(tok, ids, context=prompt)) == text


def test_detokenize_keeps_word_tokenizer_spacing_at_the_seam():
    tok = WordTokenizer.from_text("the cat sat on the mat, then it slept.")
    ids = tok.encode("the cat sat on the mat, then it slept.")
    for cut in (1, 5, 6):
        joined = "".join(detokenize(tok, ids[cut:], context=ids[:cut]))
        assert tok.decode(ids[:cut]) + joined == tok.decode(ids)


def test_stream_text_continues_the_prompt_and_stops_at_eot(tiny_model):
    tok = WordTokenizer.from_text("the cat sat on the mat, then it slept.")
    model = tiny_model(vocab_size=tok.vocab_size)
    prompt = "the cat sat"
    ids = tok.encode(prompt)
    out = generate(model, [ids], 12, eos_id=tok.eot_id)[0]
    new = out[len(ids) :]
    if new and new[-1] == tok.eot_id:
        new = new[:-1]
    assert prompt + "".join(stream_text(model, tok, prompt, 12)) == tok.decode(ids + new)

    # A model that always says <|endoftext|> prints nothing.
    with torch.no_grad():
        model.out_head.weight.zero_()
        model.out_head.weight[tok.eot_id] = 1.0
        model.final_norm.scale.zero_()
        model.final_norm.shift.fill_(1.0)
    assert list(stream_text(model, tok, prompt, 12)) == []
    assert "".join(stream_text(model, tok, prompt, 3, stop_at_eot=False)).count("<|endoftext|>") == 3


# Command line --------------------------------------------------------------------------------


@pytest.fixture
def word_checkpoint(tiny_model, tmp_path):
    tok = WordTokenizer.from_text("the cat sat on the mat, then it slept. a dog ran!")
    model = tiny_model(vocab_size=tok.vocab_size)
    save_model(tmp_path / "run", model, tok)
    return tmp_path / "run", model, tok


def test_cli_generate_streams_the_continuation(word_checkpoint, capsys):
    path, model, tok = word_checkpoint
    expected = "the cat" + "".join(stream_text(model, tok, "the cat", 10)) + "\n"
    assert cli.main(["generate", "--checkpoint", str(path), "--prompt", "the cat", "--max-new-tokens", "10"]) == 0
    assert capsys.readouterr().out == expected
    assert cli.main(["generate", "--checkpoint", str(path), "--prompt", "the cat", "--max-new-tokens", "10",
                     "--no-cache"]) == 0
    assert capsys.readouterr().out == expected


def test_cli_loads_a_padded_vocabulary_and_refuses_a_smaller_one(tiny_model, tmp_path, capsys):
    """--checkpoint and --pretrained share the one loader and its one vocabulary rule."""
    tok = WordTokenizer.from_text("the cat sat on the mat, then it slept. a dog ran!")
    save_model(tmp_path / "padded", tiny_model(vocab_size=tok.vocab_size + 5), tok)
    for flag in ("--checkpoint", "--pretrained"):
        assert cli.main(["generate", flag, str(tmp_path / "padded"), "--prompt", "the cat",
                         "--max-new-tokens", "3"]) == 0
    capsys.readouterr()
    save_model(tmp_path / "small", tiny_model(vocab_size=tok.vocab_size - 1), tok)
    assert cli.main(["generate", "--checkpoint", str(tmp_path / "small"), "--prompt", "the cat"]) == 2
    err = capsys.readouterr().err
    assert "tokens but the model only" in err and err.count("\n") == 1


def test_cli_generate_samples_reproducibly_with_a_seed(word_checkpoint, capsys):
    path, _, _ = word_checkpoint
    argv = ["generate", "--checkpoint", str(path), "--prompt", "a dog", "--max-new-tokens", "8",
            "--temperature", "1.0", "--top-k", "20", "--top-p", "0.9", "--seed", "3", "--num-samples", "2"]
    assert cli.main(argv) == 0
    first = capsys.readouterr().out
    assert cli.main(argv) == 0
    assert capsys.readouterr().out == first
    assert first.count("--- sample ") == 2


def test_cli_generate_with_the_gpt2_tokenizer(tiny_model, tmp_path, capsys):
    tok = get_tokenizer("gpt2")
    model = tiny_model(vocab_size=tok.vocab_size)
    save_model(tmp_path, model, tok)
    expected = "".join(stream_text(model, tok, "Hello, wörld", 8))
    assert cli.main(["generate", "--checkpoint", str(tmp_path), "--prompt", "Hello, wörld",
                     "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out == "Hello, wörld" + expected + "\n"


@pytest.mark.parametrize(
    "extra, message",
    [(["--temperature", "-1"], "temperature"), (["--top-p", "2"], "top_p"), (["--num-samples", "0"], "num-samples")],
)
def test_cli_generate_rejects_bad_settings(word_checkpoint, capsys, extra, message):
    path, _, _ = word_checkpoint
    assert cli.main(["generate", "--checkpoint", str(path), *extra]) == 2
    assert message in capsys.readouterr().err


def test_cli_generate_needs_a_model(capsys):
    assert cli.main(["generate", "--prompt", "hi"]) == 2
    assert "--checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("device, message", [("tpu", "unknown device 'tpu'"),
                                             ("cuda", "CUDA is not available"),
                                             ("mps", "MPS (Apple GPU) is not available")])
def test_cli_generate_names_a_device_it_cannot_use(word_checkpoint, capsys, device, message):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    if device == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    path, _, _ = word_checkpoint
    assert cli.main(["generate", "--checkpoint", str(path), "--device", device]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1


def test_cli_chat_continues_each_line_until_quit(word_checkpoint, capsys, monkeypatch):
    path, model, tok = word_checkpoint
    monkeypatch.setattr(sys, "stdin", io.StringIO("the cat\n\na dog\n/quit\nthe mat\n"))
    assert cli.main(["chat", "--checkpoint", str(path), "--max-new-tokens", "6"]) == 0
    lines = [prompt for prompt in ("the cat", "a dog")]
    expected = "".join("".join(stream_text(model, tok, p, 6)) + "\n" for p in lines)
    assert capsys.readouterr().out == expected


def test_cli_chat_uses_an_instruction_models_prompt_template(word_checkpoint, capsys, monkeypatch):
    from buildllm.finetune.instruct import get_prompt_template
    from buildllm.weights.loader import PROMPT_TEMPLATE

    path, model, tok = word_checkpoint
    template = get_prompt_template("alpaca")
    (path / PROMPT_TEMPLATE).write_text(json.dumps(template.to_dict()))
    monkeypatch.setattr(sys, "stdin", io.StringIO("the cat sat"))  # no newline, then end of input
    assert cli.main(["chat", "--checkpoint", str(path), "--max-new-tokens", "6"]) == 0
    with pytest.warns(UserWarning, match="the model sees only the last 16"):  # the template is long
        response = "".join(stream_text(model, tok, template.format("the cat sat"), 6))
    captured = capsys.readouterr()
    assert captured.out == response + "\n"
    assert "warning: the prompt has 27 tokens" in captured.err
    assert response != "".join(stream_text(model, tok, "the cat sat", 6))  # the template mattered


def test_buildllm_generate_is_the_function_in_any_import_order(tiny_model):
    import buildllm
    import buildllm.generation.sampling as module

    idx = torch.tensor([[1, 2]])
    assert buildllm.generate is module.generate
    assert torch.equal(buildllm.generate(tiny_model(), idx, 3), module.generate(tiny_model(), idx, 3))