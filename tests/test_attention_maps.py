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
