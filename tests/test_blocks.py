"""The building blocks of models/blocks.py: each fast form equals its written-out form, Llama 3's
RoPE frequencies equal transformers', and the forward contract (left padding, the KV cache) holds."""

import pytest
import torch

from buildllm.models.blocks import (
    GroupedQueryAttention,
    RMSNorm,
    RotaryEmbedding,
    SwiGLU,
    apply_rope,
    apply_rope_written_out,
    rope_frequencies,
)
from buildllm.models.llama import LlamaConfig, LlamaModel
from buildllm.models.qwen3 import Qwen3Config

SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 64}
CFG = LlamaConfig(vocab_size=50, context_length=64, emb_dim=32, n_heads=4, n_kv_heads=2, n_layers=2,
                  hidden_dim=48, rope_theta=10000.0, rope_scaling=SCALING)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_fast_equals_written_out(dtype):
    norm = RMSNorm(16, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(16, generator=gen()))
    norm = norm.to(dtype)
    x = (3 * torch.randn(4, 5, 16, generator=gen(1))).to(dtype)
    torch.testing.assert_close(norm(x), norm.written_out(x), atol=1e-6, rtol=1e-6)


def test_rope_fast_equals_the_complex_rotation_and_keeps_lengths():
    rope = RotaryEmbedding(CFG)
    cos, sin = rope(torch.arange(10), torch.float32)
    x = torch.randn(2, 4, 10, CFG.head_dim, generator=gen())
    rotated = apply_rope(x, cos, sin)
    torch.testing.assert_close(rotated, apply_rope_written_out(x, cos, sin), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(rotated.norm(dim=-1), x.norm(dim=-1))  # a rotation: lengths stay


def test_rope_scores_depend_only_on_the_distance():
    rope = RotaryEmbedding(CFG)
    q, k = torch.randn(CFG.head_dim, generator=gen()), torch.randn(CFG.head_dim, generator=gen(1))

    def score(i, j):
        cos, sin = rope(torch.tensor([i, j]), torch.float32)
        return apply_rope(q[None], cos[:1], sin[:1]) @ apply_rope(k[None], cos[1:], sin[1:]).T

    torch.testing.assert_close(score(3, 1), score(40, 38), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scaling", [None, SCALING])
def test_rope_frequencies_equal_transformers(scaling):
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf_cfg = transformers.LlamaConfig(hidden_size=32, num_attention_heads=4, max_position_embeddings=512,
                                      rope_theta=10000.0, rope_scaling=scaling)
    kind = "llama3" if scaling else "default"
    if kind == "default":
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        expected, _ = LlamaRotaryEmbedding.compute_default_rope_parameters(hf_cfg)
    else:
        expected, _ = ROPE_INIT_FUNCTIONS[kind](hf_cfg, "cpu")
    assert torch.equal(rope_frequencies(8, 10000.0, scaling), expected)


def test_swiglu_fast_equals_written_out():
    ff = SwiGLU(16, 24)
    x = torch.randn(3, 16, generator=gen())
    torch.testing.assert_close(ff(x), ff.written_out(x), atol=1e-6, rtol=1e-6)


def _attention_pair(cfg):
    fast = GroupedQueryAttention(cfg)
    readable = GroupedQueryAttention(LlamaConfig(**{**cfg.to_dict(), "attention": "readable"}))
    readable.load_state_dict(fast.state_dict())
    return fast, readable


@pytest.mark.parametrize("cfg", [CFG, Qwen3Config(vocab_size=50, context_length=64, emb_dim=32, n_heads=4,
                                                  n_kv_heads=1, n_layers=2, head_dim=16, hidden_dim=48)])
def test_grouped_query_attention_fast_equals_readable_with_gradients(cfg):
    fast, readable = _attention_pair(cfg)
    x = torch.randn(2, 7, cfg.emb_dim, generator=gen(), requires_grad=True)
    rope = RotaryEmbedding(cfg)(torch.arange(7), torch.float32)
    out_fast, out_readable = fast(x, rope), readable(x, rope)
    torch.testing.assert_close(out_fast, out_readable, atol=1e-5, rtol=1e-5)
    (grad_fast,) = torch.autograd.grad(out_fast.sum(), x)
    (grad_readable,) = torch.autograd.grad(out_readable.sum(), x)
    torch.testing.assert_close(grad_fast, grad_readable, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attention", ["fast", "readable"])
def test_a_left_padded_row_gives_what_it_gives_alone_with_and_without_the_cache(attention):
    torch.manual_seed(0)
    model = LlamaModel(LlamaConfig(**{**CFG.to_dict(), "attention": attention})).eval()
    row = torch.randint(0, 50, (1, 6), generator=gen())
    batch = torch.cat([torch.randint(0, 50, (1, 9), generator=gen(1)), torch.cat([torch.zeros(1, 3).long(), row], 1)])
    padding = torch.zeros(2, 9, dtype=torch.bool)
    padding[1, :3] = True
    with torch.no_grad():
        alone = model(row)
        torch.testing.assert_close(model(batch, padding=padding)[1, 3:], alone[0], atol=1e-5, rtol=1e-5)
        cache = model.new_kv_cache(2, 12)
        model(batch[:, :5], kv_cache=cache, padding=padding[:, :5])  # prefill in two pieces
        step = model(batch[:, 5:], kv_cache=cache)
    assert cache.length == 9 and cache.keys.shape[2] == CFG.n_kv_heads
    torch.testing.assert_close(step[1], alone[0, 2:], atol=1e-5, rtol=1e-5)


def test_rope_frequencies_stay_fp32_when_the_model_goes_bf16():
    model = LlamaModel(CFG).to(torch.bfloat16)
    assert model.rope.freqs.dtype == torch.float32
    cos, _ = model.rope(torch.tensor([1000]), torch.bfloat16)
    expected = torch.cos(1000 * rope_frequencies(CFG.head_dim, CFG.rope_theta, SCALING))
    torch.testing.assert_close(cos[0, : CFG.head_dim // 2].float(), expected, atol=4e-3, rtol=0)
