"""The recipe sized to the user's text and time (training/recipe.py): the sizing rules, a text file
and a folder trained end to end, the best model kept as the result, and the book's recipe."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from buildllm.data.shakespeare import shakespeare_plays
from buildllm.errors import UserError
from buildllm.models import registry
from buildllm.training import recipe
from buildllm.training.config import DEFAULT_PRESET, TrainConfig, resolve
from buildllm.training.engine import train
from buildllm.training.run_folder import checkpoint_dirs
from buildllm.training.task import LMTask

BASE = registry.preset(DEFAULT_PRESET, vocab_size=512)
UNLIMITED = lambda model_cfg: float("inf")  # noqa: E731  (a budget no model exhausts)


def rung_params(n_layers: int, emb_dim: int) -> int:
    cfg = registry.preset(DEFAULT_PRESET, vocab_size=512, **recipe.shape_overrides(BASE, n_layers, emb_dim))
    return recipe.block_params(cfg)


def test_vocabulary_grows_with_the_text_in_powers_of_two():
    sizes = [recipe.vocab_size_for(chars) for chars in (0, 10_000, 160_000, 600_000, 4_300_000, 10**10)]
    assert sizes == [512, 512, 512, 512, 4096, 32768]
    assert all(a <= b for a, b in zip(sizes, sizes[1:]))


@pytest.mark.parametrize("train_tokens", [0, 1_000, 20_000, 80_000, 400_000, 1_400_000, 50_000_000])
def test_the_data_rule_caps_the_model_whatever_the_budget(train_tokens):
    """A small text never gets a model bigger than the rule allows, even with all the time in the world."""
    n_layers, emb_dim = recipe.choose_shape(BASE, train_tokens, UNLIMITED)
    params = rung_params(n_layers, emb_dim)
    assert params <= max(rung_params(*recipe.LADDER[0]), recipe.MAX_PARAMS_PER_TOKEN * train_tokens)
    bigger = recipe.LADDER[recipe.LADDER.index((n_layers, emb_dim)) + 1:]
    if bigger:  # and it is the biggest the rule allows
        assert rung_params(*bigger[0]) > recipe.MAX_PARAMS_PER_TOKEN * train_tokens


def test_a_tiny_text_gets_the_smallest_model():
    assert recipe.choose_shape(BASE, 3_000, UNLIMITED) == recipe.LADDER[0]


def test_the_compute_rule_caps_the_model_to_the_time():
    """With endless text, the budget decides: every token budget gets the biggest model it can show
    MIN_TOKENS_PER_PARAM tokens per parameter, and a bigger budget never gets a smaller model."""
    chosen = []
    for budget in (1e5, 1e6, 7e6, 1e8, 1e10):
        shape = recipe.choose_shape(BASE, 10**12, lambda model_cfg, b=budget: b)
        assert budget >= recipe.MIN_TOKENS_PER_PARAM * rung_params(*shape) or shape == recipe.LADDER[0]
        chosen.append(recipe.LADDER.index(shape))
    assert chosen == sorted(chosen) and chosen[0] < chosen[-1]


def test_throughput_is_measured_on_the_model_and_optimizer_themselves(monkeypatch):
    small = registry.preset(DEFAULT_PRESET, vocab_size=512, context_length=32,
                            **recipe.shape_overrides(BASE, *recipe.LADDER[0]))
    stepped = []
    real_step = torch.optim.Muon.step
    monkeypatch.setattr(torch.optim.Muon, "step", lambda self, *a: stepped.append(1) or real_step(self, *a))
    cfg = resolve(TrainConfig())  # Muon for the blocks' matrices, as the run will train
    rate = recipe.measure_tokens_per_sec(small, cfg, torch.device("cpu"), torch.float32, batch_size=2, steps=1)
    assert rate > 0 and len(stepped) == 2  # warm-up and the timed step


@pytest.fixture
def text_file(tmp_path, monkeypatch):
    """A short play as a text file, with the working folder (where data/prepared/ goes) in tmp_path."""
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "play.txt"
    path.write_text(shakespeare_plays()["macbeth"][:30_000])
    return path


FAST = dict(progress=False, sample_tokens=0, device="cpu", dtype="fp32", batch_size=4, context_length=64)
NAMED = dict(preset=DEFAULT_PRESET, tokenizer="bpe:300", model=dict(n_layers=1, emb_dim=32, n_heads=2), **FAST)


def test_a_text_file_trains_the_sized_recipe(text_file, monkeypatch):
    """No model named: a BPE learned from the text, the smallest rung for a text this short, the
    steps from the measured throughput and the time, and Muon; resuming keeps every choice even
    when this machine now measures something else."""
    rates = iter([2_000.0, 50_000.0, 50_000.0, 50_000.0])
    monkeypatch.setattr(recipe, "measure_tokens_per_sec", lambda *a, **k: next(rates))
    out = text_file.parent / "run"
    result = train(TrainConfig(data=str(text_file), out=str(out), max_minutes=0.05, **FAST))
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["tokenizer"] == "bpe:512" and saved["optimizer"] == "muon" and saved["keep_best"]
    assert (saved["model"]["n_layers"], saved["model"]["emb_dim"]) == recipe.LADDER[0]
    # 2,000 tokens/s for what is left of 3 s, less the final scoring, in steps of 4 x 64 tokens
    assert 1 <= saved["max_steps"] <= 3 * 2_000 / 256
    assert result.val_bits_per_char is not None and Path("data/prepared").is_dir()
    resumed = train(TrainConfig(data=str(text_file), out=str(out), max_minutes=0.05, resume=True, **FAST))
    assert json.loads((out / "train_config.json").read_text()) == saved and resumed.steps == result.steps


def test_a_folder_of_texts_trains_too(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "texts").mkdir()
    for play in ("macbeth", "hamlet", "othello"):
        (tmp_path / "texts" / f"{play}.txt").write_text(shakespeare_plays()[play][:8_000])
    result = train(TrainConfig(data=str(tmp_path / "texts"), out=str(tmp_path / "run"), max_steps=2, **FAST))
    saved = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert result.steps == 2 and saved["tokenizer"] == "bpe:512" and saved["eval_interval"] == 1


def scripted_scores(monkeypatch, scores: list[float]) -> None:
    """The task scores its evaluations in this order (higher is better), whatever the losses."""
    order, given = iter(scores), {}

    def score(self, metrics):
        if metrics["val_loss"] not in given:  # one evaluation, however often it is asked
            given[metrics["val_loss"]] = next(order)
        return given[metrics["val_loss"]]

    monkeypatch.setattr(LMTask, "score", score)


def test_the_best_model_is_the_result_when_later_steps_are_worse(text_file, monkeypatch):
    """Evaluations at steps 2, 4, 6, 8 score best at step 4: the run folder's weights and its final
    score are step 4's, the last checkpoint keeps step 8's to resume from, and a resumed run that
    goes on still returns step 4's."""
    scripted_scores(monkeypatch, [1.0, 3.0, 2.0, 0.0, -1.0, -2.0])
    out = text_file.parent / "run"
    cfg = dict(data=str(text_file), out=str(out), max_steps=8, warmup_steps=2, eval_interval=2, keep_last=1, **NAMED)
    train(TrainConfig(**cfg))
    root, best = load_file(out / "model.safetensors"), load_file(out / "best" / "model.safetensors")
    last = load_file(checkpoint_dirs(out)[-1][1] / "model.safetensors")
    assert all(torch.equal(root[k], best[k]) for k in best)
    assert not all(torch.equal(root[k], last[k]) for k in last)
    final = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert final["kind"] == "final" and final["step"] == 8

    train(TrainConfig(**{**cfg, "max_steps": 12, "resume": True}))  # steps 10 and 12 score worse still
    root = load_file(out / "model.safetensors")
    assert all(torch.equal(root[k], best[k]) for k in best)


def test_keep_best_off_keeps_the_last_weights(text_file, monkeypatch):
    scripted_scores(monkeypatch, [1.0, 3.0, 2.0, 0.0])
    out = text_file.parent / "run"
    train(TrainConfig(data=str(text_file), out=str(out), max_steps=8, eval_interval=2, keep_best=False, **NAMED))
    root, last = load_file(out / "model.safetensors"), load_file(checkpoint_dirs(out)[-1][1] / "model.safetensors")
    assert all(torch.equal(root[k], last[k]) for k in last)


def test_a_text_that_is_not_utf8_is_refused_with_what_to_do(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.txt").write_bytes(b"To be\xff or not")
    with pytest.raises(UserError, match=r"bad\.txt is not UTF-8 at byte 5.*buildllm prepare INPUT --errors replace"):
        train(TrainConfig(data=str(tmp_path / "bad.txt"), out=str(tmp_path / "run"), max_steps=1, **FAST))
    assert not (tmp_path / "run").exists()


def test_the_books_recipe_is_one_option_away(text_file):
    book = resolve(TrainConfig(data=str(text_file), recipe="book"))
    assert (book.preset, book.tokenizer, book.lr, book.batch_size, book.epochs) == ("gpt2", "gpt2", 4e-4, 2, 10)
    assert book.optimizer == "adamw" and book.keep_best is False and book.model["context_length"] == 256
    auto = resolve(TrainConfig(data=str(text_file)))
    assert auto.preset is None and auto.tokenizer is None and auto.max_minutes == 8.5  # sized when it runs
    with pytest.raises(UserError, match="one .txt file"):
        resolve(TrainConfig(recipe="book"))
    with pytest.raises(UserError, match="recipe must be"):
        resolve(TrainConfig(data=str(text_file), recipe="chapter5"))


def test_a_slow_first_step_does_not_end_a_timed_run(tmp_path, monkeypatch):
    """torch.compile compiles in the first step: that step's rate must not predict the final scoring's
    cost. It once did, and a compiled run stopped after one step: 256 tokens in 3 s promised more than
    30 s to score the ~8K held-out tokens of this play."""
    import time

    from buildllm.training import loop

    monkeypatch.chdir(tmp_path)
    (tmp_path / "hamlet.txt").write_text(shakespeare_plays()["hamlet"])
    real_step, calls = loop.train_step, []

    def slow_first(run):
        calls.append(1)
        if len(calls) == 1:
            time.sleep(3)
        return real_step(run)

    monkeypatch.setattr(loop, "train_step", slow_first)
    result = train(TrainConfig(data=str(tmp_path / "hamlet.txt"), out=str(tmp_path / "run"), max_steps=5,
                               max_minutes=0.5, eval_interval=5, **NAMED))
    assert result.steps == 5 and result.tokens_per_sec > 0
