"""Attention weights through the model's hook, their heatmaps, and `buildllm attention`."""

import math

import matplotlib.image
import pytest
import torch
from torch import nn

from buildllm.attention_maps import (
    attention_weights,
    plot_attention,
    save_attention_map,
)
from buildllm.cli import main
from buildllm.errors import UserError
from buildllm.models.blocks import apply_rope_written_out
from buildllm.models.llama import LlamaConfig
from buildllm.models.qwen3 import Qwen3Config
from buildllm.models.registry import build
from buildllm.tokenizer import WordTokenizer
from buildllm.weights.checkpoint import save_model

TEXT = "the cat sat on the mat and the dog sat on the log"


@pytest.fixture
def word_tokenizer():
    return WordTokenizer.from_text(TEXT)


@pytest.fixture
def model(tiny_gpt, word_tokenizer):
    return tiny_gpt(vocab_size=word_tokenizer.vocab_size, n_heads=4, n_layers=3, emb_dim=32, context_length=16)


def weights_by_hand(model, ids: torch.Tensor, layer: int) -> torch.Tensor:
    """Softmax(QK^T / sqrt(d) + causal mask) of ``layer``, computed from the model's own parameters."""
    x = model.wte(ids) + model.wpe(torch.arange(ids.shape[1]))
    for block in model.blocks[:layer]:
        x = block(x)
    att = model.blocks[layer].att
    q, k, _ = att.qkv(model.blocks[layer].norm1(x)).split(model.cfg.emb_dim, dim=2)
    q = q.view(1, -1, att.n_heads, att.head_dim).transpose(1, 2)
    k = k.view(1, -1, att.n_heads, att.head_dim).transpose(1, 2)
    scores = (q @ k.transpose(2, 3)) / math.sqrt(att.head_dim)
    n = ids.shape[1]
    scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), -torch.inf)
    return torch.softmax(scores, dim=-1)[0]


def test_attention_weights_are_each_layers_causal_softmax(model, word_tokenizer):
    ids = torch.tensor([word_tokenizer.encode("the dog sat on the cat")])
    model.train()  # dropout would be on: the weights must come from eval mode all the same
    weights = attention_weights(model, ids[0].tolist())
    assert weights.shape == (3, 4, 6, 6)
    assert model.training  # the caller's mode is back
    with torch.no_grad():
        for layer in range(3):
            torch.testing.assert_close(weights[layer], weights_by_hand(model.eval(), ids, layer), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(weights.sum(-1), torch.ones(3, 4, 6))
    assert not weights.triu(1).any()  # no query sees a later key
    assert all(block.att.attention_recorder is None for block in model.blocks)  # the hook is unset again


def test_the_hook_changes_no_output(model, word_tokenizer):
    """With the recorder set, the fast model takes the readable path: the same logits."""
    ids = torch.tensor([word_tokenizer.encode("the mat and the log")])
    with torch.no_grad():
        fast = model(ids)
        seen = []
        for block in model.blocks:
            block.att.attention_recorder = lambda layer, w: seen.append(layer)
        readable = model(ids)
    assert seen == [0, 1, 2]
    torch.testing.assert_close(readable, fast, atol=1e-5, rtol=1e-5)


def test_a_model_without_the_hook_is_one_clear_error():
    with pytest.raises(UserError, match="attention_recorder"):
        attention_weights(nn.Sequential(nn.Embedding(10, 4)), [1, 2])


def test_a_prompt_longer_than_the_context_is_refused(model):
    with pytest.raises(UserError, match="17 tokens.*holds 16"):
        attention_weights(model, [1] * 17)


@pytest.mark.parametrize("heads, grid", [(4, (1, 4)), (6, (2, 4)), (1, (1, 1))])
def test_one_heatmap_panel_per_head(heads, grid):
    torch.manual_seed(0)
    weights = torch.softmax(torch.randn(heads, 5, 5), dim=-1)
    fig = plot_attention(weights, tokens=list("abcde"), title="t")
    panels = [ax for ax in fig.axes if ax.images]
    assert [ax.get_title() for ax in panels] == [f"head {h}" for h in range(heads)]
    assert len(fig.axes) == heads + 1  # the panels and one shared colour bar; unused grid cells removed
    assert panels[-1].images[0].get_array().shape == (5, 5)
    rows, cols = grid
    assert {ax.get_subplotspec().get_gridspec().get_geometry() for ax in panels} == {grid}
    assert [t.get_text() for t in panels[0].get_xticklabels()] == list("abcde")
    assert rows * cols >= heads


def test_buildllm_attention_writes_the_heatmap(model, word_tokenizer, tmp_path, capsys):
    save_model(tmp_path / "run", model, word_tokenizer)
    out = tmp_path / "attn.png"
    assert main(["attention", "--model", str(tmp_path / "run"), "--prompt", "the cat sat on the log",
                 "--out", str(out), "--layer", "1"]) == 0
    assert capsys.readouterr().out.strip() == f"{out}: layer 1, 4 heads, 6 tokens"
    # The same drawing through the API: its figure has the PNG's size and one panel per head.
    fig = save_attention_map(model, word_tokenizer, "the cat sat on the log", tmp_path / "api.png", layer=1)
    width, height = (fig.get_size_inches() * 100).round().astype(int)
    pixels = matplotlib.image.imread(out)
    assert pixels.shape == (height, width, 4)
    assert (width, height) == (1196, 324)  # 4 panels of 2.74 inches in a row and a title, 100 dpi
    assert sum(1 for ax in fig.axes if ax.images) == 4
    assert (matplotlib.image.imread(tmp_path / "api.png") == pixels).all()  # the CLI draws what the API does


@pytest.mark.parametrize("argv, message", [
    (["--layer", "3"], "error: layer 3 does not exist: the model has 3 layers"),
    (["--out", "attn.jpg"], "error: cannot draw into attn.jpg: give a file name ending in .png, .svg, .pdf"),
    (["--prompt", ""], "error: give the text to look at"),
])
def test_buildllm_attention_bad_input_is_one_error_line(model, word_tokenizer, tmp_path, capsys, monkeypatch, argv,
                                                         message):
    save_model(tmp_path / "run", model, word_tokenizer)
    monkeypatch.chdir(tmp_path)
    assert main(["attention", "--model", "run", "--prompt", "the cat", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(message)
    assert not list(tmp_path.glob("*.png")) and not list(tmp_path.glob("*.jpg"))


# Llama 3 and Qwen3: grouped-query attention offers the same hook ---------------------------------


def modern_model(arch: str, vocab_size: int):
    """A tiny Llama 3 (two query heads per key/value head, Llama 3's RoPE scaling) or Qwen3 (QK-norm,
    heads wider than emb_dim / n_heads), with random norm scales so that a skipped norm would show."""
    torch.manual_seed(0)
    if arch == "llama":
        scaling = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8}
        cfg = LlamaConfig.from_preset("llama-nano", vocab_size=vocab_size, context_length=16, rope_scaling=scaling)
    else:
        cfg = Qwen3Config.from_preset("qwen3-nano", vocab_size=vocab_size, context_length=16, head_dim=24)
    model = build(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.3)  # sharper attention than the initialisation's near-uniform rows
    return model.eval()


def gqa_weights_by_hand(model, ids: torch.Tensor, layer: int) -> torch.Tensor:
    """Softmax(rope(q) rope(k)^T / sqrt(d) + causal mask) of ``layer``, query head h reading key
    head h // (n_heads / n_kv_heads), from the model's own parameters and written-out blocks."""
    n = ids.shape[1]
    x = model.wte(ids)
    rope = model.rope(torch.arange(n), x.dtype)
    for block in model.blocks[:layer]:
        x = block(x, rope)
    att = model.blocks[layer].att
    h = model.blocks[layer].norm1.written_out(x)
    q = att.q_proj(h).view(1, n, att.n_heads, att.head_dim)
    k = att.k_proj(h).view(1, n, att.n_kv_heads, att.head_dim)
    if att.qk_norm:
        q, k = att.q_norm.written_out(q), att.k_norm.written_out(k)
    q = apply_rope_written_out(q.transpose(1, 2), *rope)
    k = apply_rope_written_out(k.transpose(1, 2), *rope)
    k = k[:, [head * att.n_kv_heads // att.n_heads for head in range(att.n_heads)]]
    scores = (q @ k.transpose(2, 3)) / math.sqrt(att.head_dim)
    scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), -torch.inf)
    return torch.softmax(scores, dim=-1)[0]


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_grouped_query_attention_offers_its_weights_per_query_head(arch, word_tokenizer):
    model = modern_model(arch, word_tokenizer.vocab_size)
    ids = torch.tensor([word_tokenizer.encode("the dog sat on the cat and the mat")])
    with torch.no_grad():
        fast = model(ids)
    weights = attention_weights(model, ids[0].tolist())
    assert weights.shape == (2, 4, 9, 9)  # 4 query heads, though only 2 key/value heads
    with torch.no_grad():
        for layer in range(2):
            torch.testing.assert_close(weights[layer], gqa_weights_by_hand(model, ids, layer), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 9))
    assert not weights.triu(1).any()
    assert not torch.allclose(weights[:, 0], weights[:, 1])  # two heads of one group still look differently
    assert all(block.att.attention_recorder is None for block in model.blocks)
    # With the recorder set the fast model takes the readable path: the same logits.
    seen = []
    for block in model.blocks:
        block.att.attention_recorder = lambda layer, w: seen.append((layer, tuple(w.shape)))
    with torch.no_grad():
        readable = model(ids)
    assert seen == [(0, (1, 4, 9, 9)), (1, (1, 4, 9, 9))]
    torch.testing.assert_close(readable, fast, atol=1e-5, rtol=1e-5)


def test_buildllm_attention_draws_a_llama_folder(word_tokenizer, tmp_path, capsys):
    model = modern_model("llama", word_tokenizer.vocab_size)
    save_model(tmp_path / "llama", model, word_tokenizer)
    out = tmp_path / "attn.png"
    assert main(["attention", "--model", str(tmp_path / "llama"), "--prompt", "the cat sat on the log",
                 "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"{out}: layer 1, 4 heads, 6 tokens"
    fig = save_attention_map(model, word_tokenizer, "the cat sat on the log", tmp_path / "api.png")
    assert sum(1 for ax in fig.axes if ax.images) == 4  # one panel per query head
    assert (matplotlib.image.imread(tmp_path / "api.png") == matplotlib.image.imread(out)).all()
