import json
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from buildllm.errors import UserError
from buildllm.models.gpt2 import (
    GELU,
    PRESETS,
    FeedForward,
    GPTConfig,
    GPTModel,
    KVCache,
    LayerNorm,
    MultiHeadAttention,
    count_parameters,
    describe,
)

TINY = GPTConfig(vocab_size=97, context_length=32, emb_dim=48, n_heads=4, n_layers=3)


def tiny_model(seed: int = 0, **overrides) -> GPTModel:
    torch.manual_seed(seed)
    return GPTModel(replace(TINY, **overrides)).eval()


# Components equal torch's own --------------------------------------------------------------------


def test_layernorm_equals_torch():
    torch.manual_seed(0)
    ours, theirs = LayerNorm(24), nn.LayerNorm(24, eps=1e-5)
    with torch.no_grad():
        ours.scale.normal_()
        ours.shift.normal_()
        theirs.weight.copy_(ours.scale)
        theirs.bias.copy_(ours.shift)
    x = torch.randn(3, 5, 24) * 4 + 2
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.written_out(x), theirs(x), atol=1e-5, rtol=0)  # the formula


def test_gelu_equals_torch_tanh_approximation():
    x = torch.linspace(-8, 8, 1001)
    torch.testing.assert_close(GELU()(x), nn.GELU(approximate="tanh")(x), atol=1e-6, rtol=0)
    torch.testing.assert_close(GELU().written_out(x), nn.GELU(approximate="tanh")(x), atol=1e-6, rtol=0)


def test_feedforward_expands_four_times_and_matches_manual():
    torch.manual_seed(0)
    ff = FeedForward(TINY)
    assert ff.fc.out_features == 4 * TINY.emb_dim and ff.proj.in_features == 4 * TINY.emb_dim
    x = torch.randn(2, 7, TINY.emb_dim)
    expected = F.linear(F.gelu(F.linear(x, ff.fc.weight, ff.fc.bias), approximate="tanh"), ff.proj.weight, ff.proj.bias)
    torch.testing.assert_close(ff(x), expected, atol=1e-5, rtol=0)


# The two forms of attention are one function ----------------------------------------------------


@pytest.mark.parametrize("qkv_bias", [True, False])
def test_readable_and_fast_attention_agree_on_outputs_and_gradients(qkv_bias):
    cfg = replace(TINY, qkv_bias=qkv_bias)
    torch.manual_seed(0)
    readable = MultiHeadAttention(replace(cfg, attention="readable"))
    fast = MultiHeadAttention(replace(cfg, attention="fast"))
    fast.load_state_dict(readable.state_dict())
    x = torch.randn(3, 20, cfg.emb_dim)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = readable(x1), fast(x2)
    torch.testing.assert_close(y1, y2, atol=1e-5, rtol=0)
    g = torch.randn_like(y1)
    y1.backward(g)
    y2.backward(g)
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-5, rtol=0)
    for (name, p1), p2 in zip(readable.named_parameters(), fast.parameters()):
        torch.testing.assert_close(p1.grad, p2.grad, atol=1e-5, rtol=0, msg=name)


def test_readable_and_fast_models_agree():
    readable, fast = tiny_model(attention="readable"), tiny_model(attention="fast")
    fast.load_state_dict(readable.state_dict())
    idx = torch.randint(0, TINY.vocab_size, (2, TINY.context_length))
    torch.testing.assert_close(readable(idx), fast(idx), atol=1e-5, rtol=0)


def test_attention_weights_are_causal_and_sum_to_one():
    torch.manual_seed(0)
    att = MultiHeadAttention(replace(TINY, attention="readable"))
    weights = {}
    att.dropout.register_forward_hook(lambda m, inp, out: weights.setdefault("w", out))
    att(torch.randn(1, 6, TINY.emb_dim))
    w = weights["w"][0]  # (heads, 6, 6)
    assert torch.all(w.triu(1) == 0)
    torch.testing.assert_close(w.sum(-1), torch.ones(TINY.n_heads, 6))


# The model ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("attention", ["readable", "fast"])
def test_causality_future_tokens_never_change_the_past(attention):
    model = tiny_model(attention=attention)
    idx = torch.randint(0, TINY.vocab_size, (2, 20))
    base = model(idx)
    for t in (0, 7, 18):
        changed = idx.clone()
        changed[:, t + 1 :] = torch.randint(0, TINY.vocab_size, changed[:, t + 1 :].shape)
        assert torch.equal(model(changed)[:, : t + 1], base[:, : t + 1])


@pytest.mark.parametrize("batch", [1, 2, 5])
def test_any_batch_size_gives_logits_over_vocab(batch):
    model = tiny_model()
    idx = torch.randint(0, TINY.vocab_size, (batch, 11))
    logits = model(idx)
    assert logits.shape == (batch, 11, TINY.vocab_size)
    # Each row is independent of the others in the batch.
    torch.testing.assert_close(logits[-1:], model(idx[-1:]), atol=1e-5, rtol=0)


def test_input_longer_than_context_is_a_clear_error():
    model = tiny_model()
    with pytest.raises(UserError, match="exceeds the context length 32"):
        model(torch.zeros(1, TINY.context_length + 1, dtype=torch.long))


def test_same_seed_same_weights_and_logits():
    a, b, c = tiny_model(seed=1), tiny_model(seed=1), tiny_model(seed=2)
    for pa, pb in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(pa, pb)
    idx = torch.randint(0, TINY.vocab_size, (2, 9))
    assert torch.equal(a(idx), b(idx))
    assert not torch.equal(a(idx), c(idx))


def test_initialisation_follows_gpt2():
    torch.manual_seed(0)
    cfg = GPTConfig.from_preset("micro", vocab_size=4096)
    model = GPTModel(cfg)
    assert model.wte.weight.std().item() == pytest.approx(0.02, rel=0.02)
    assert model.blocks[0].ff.fc.weight.std().item() == pytest.approx(0.02, rel=0.05)
    residual_std = 0.02 / math.sqrt(2 * cfg.n_layers)
    assert model.blocks[0].att.out_proj.weight.std().item() == pytest.approx(residual_std, rel=0.05)
    assert model.blocks[-1].ff.proj.weight.std().item() == pytest.approx(residual_std, rel=0.05)
    assert all(torch.all(b.att.qkv.bias == 0) and torch.all(b.ff.fc.bias == 0) for b in model.blocks)
    assert model.out_head.weight is model.wte.weight  # tied


@pytest.mark.parametrize("preset", ["nano", "micro"])
def test_fresh_model_loss_is_uniform(preset):
    cfg = GPTConfig.from_preset(preset, vocab_size=5000)
    torch.manual_seed(0)
    model = GPTModel(cfg).eval()
    inputs = torch.randint(0, cfg.vocab_size, (4, 64))
    targets = torch.randint(0, cfg.vocab_size, (4, 64))
    loss = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
    assert abs(loss.item() - math.log(cfg.vocab_size)) < 0.1


def test_left_padding_changes_nothing_for_real_tokens():
    short = torch.randint(0, TINY.vocab_size, (1, 6))
    pad = torch.zeros(1, 4, dtype=torch.long)
    padded = torch.cat([pad, short], dim=1)
    padding = torch.tensor([[True] * 4 + [False] * 6])
    for attention in ("fast", "readable"):
        m = tiny_model(attention=attention)
        torch.testing.assert_close(m(padded, padding=padding)[:, 4:], m(short), atol=1e-5, rtol=0)


@pytest.mark.parametrize("attention", ["readable", "fast"])
def test_kv_cache_gives_the_same_logits_as_a_full_pass(attention):
    model = tiny_model(attention=attention)
    idx = torch.randint(0, TINY.vocab_size, (2, 20))
    full = model(idx)
    cache = KVCache(TINY, batch_size=2)
    pieces = [model(idx[:, :8], kv_cache=cache)]  # a prompt, then one token at a time, then three
    for t in range(8, 17):
        pieces.append(model(idx[:, t : t + 1], kv_cache=cache))
    pieces.append(model(idx[:, 17:20], kv_cache=cache))
    assert cache.length == 20
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=0)


# Configuration -----------------------------------------------------------------------------------


def test_parameter_counts_match_hugging_face_and_the_book():
    gpt2 = count_parameters(GPTConfig.from_preset("gpt2"))
    assert gpt2["total"] == 124_439_808
    book = count_parameters(GPTConfig.from_preset("gpt2", qkv_bias=False, tie_embeddings=False))
    assert book["total"] == 163_009_536
    assert book["total"] - book["head"] == 124_412_160
    # The formula agrees with a real model's parameters (shared weights counted once).
    cfg = replace(TINY, tie_embeddings=False, qkv_bias=False)
    assert count_parameters(cfg)["total"] == sum(p.numel() for p in GPTModel(cfg).parameters())
    assert count_parameters(TINY)["total"] == sum(p.numel() for p in GPTModel(TINY).parameters())


def test_gpt2_preset_model_has_124_439_808_parameters():
    with torch.device("meta"):
        model = GPTModel(GPTConfig.from_preset("gpt2"))
    assert sum(p.numel() for p in model.parameters()) == 124_439_808


def test_presets_have_openai_shapes():
    shapes = {name: (c.emb_dim, c.n_layers, c.n_heads, c.context_length, c.vocab_size) for name, c in PRESETS.items()}
    assert shapes["gpt2"] == (768, 12, 12, 1024, 50257)
    assert shapes["gpt2-medium"] == (1024, 24, 16, 1024, 50257)
    assert shapes["gpt2-large"] == (1280, 36, 20, 1024, 50257)
    assert shapes["gpt2-xl"] == (1600, 48, 25, 1024, 50257)


def test_attention_dropout_follows_drop_rate_unless_set():
    """attention_drop_rate=0 drops only the embeddings and shortcuts: in training mode the attention
    of a layer then gives what it gives in eval mode (and HF's attn_pdrop says so)."""
    from buildllm.models.gpt2_hf import config_to_hf

    assert replace(TINY, drop_rate=0.3).attention_dropout == 0.3
    cfg = replace(TINY, drop_rate=0.5, attention_drop_rate=0.0)
    assert (config_to_hf(cfg)["attn_pdrop"], config_to_hf(cfg)["resid_pdrop"]) == (0.0, 0.5)
    torch.manual_seed(0)
    attention = MultiHeadAttention(cfg)
    x = torch.randn(2, 8, cfg.emb_dim)
    trained = attention.train()(x)
    torch.testing.assert_close(trained, attention.eval()(x))
    attention = MultiHeadAttention(replace(cfg, attention_drop_rate=None))  # drop_rate 0.5 again
    assert not torch.allclose(attention.train()(x), attention.eval()(x))
    with pytest.raises(UserError, match=r"attention_drop_rate must be in \[0, 1\)"):
        replace(TINY, attention_drop_rate=1.0)


def test_config_round_trips_through_json(tmp_path):
    cfg = GPTConfig.from_preset("micro", vocab_size=321, attention="readable", drop_rate=0.2)
    cfg.save(tmp_path / "config.json")
    assert GPTConfig.load(tmp_path / "config.json") == cfg
    assert GPTConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_bad_config_errors_name_the_valid_choices(tmp_path):
    with pytest.raises(UserError, match="unknown preset 'gpt5'.*gpt2-medium"):
        GPTConfig.from_preset("gpt5")
    with pytest.raises(UserError, match="unknown model config key.*n_embd.*valid keys"):
        GPTConfig.from_dict({"n_embd": 768})
    with pytest.raises(UserError, match="not divisible"):
        GPTConfig(emb_dim=100, n_heads=3)
    with pytest.raises(UserError, match="attention"):
        GPTConfig(attention="flash")


def test_describe_reports_memory_and_flops():
    info = describe(GPTConfig.from_preset("gpt2"))
    n = 124_439_808
    assert info["params_total"] == n
    assert info["weights_fp32_bytes"] == 4 * n and info["adamw_state_fp32_bytes"] == 8 * n
    # nanoGPT's estimate for GPT-2 124M at context 1024: 6N + 12 L d T (N without position embedding).
    assert info["train_flops_per_token"] == 6 * (n - 1024 * 768) + 12 * 12 * 768 * 1024
