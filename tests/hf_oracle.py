"""Tiny random Hugging Face models, the oracle of test_llama.py and test_qwen3.py (no network).

``transformers`` builds the model and writes the folder with its own ``save_pretrained``, so the
files are exactly what a downloaded checkpoint looks like. Every weight is drawn at random,
norm scales included (a fresh model has all-ones norms, which would hide a missing norm).
"""

import torch

VOCAB = 96


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.2 * noise if "norm" in name else 0.15 * noise)
    return model.eval()


def hf_llama(**overrides):
    """LlamaForCausalLM: 4 query heads sharing 2 key/value heads, Llama 3's RoPE scaling (with an
    original context short enough that the stretch matters within 64 tokens), untied head."""
    from transformers import LlamaConfig, LlamaForCausalLM

    settings = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                    rope_theta=10000.0, tie_word_embeddings=False, pad_token_id=0, eos_token_id=1,
                    bos_token_id=1,
                    rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
    return randomize(LlamaForCausalLM(LlamaConfig(**{**settings, **overrides})), seed=0)


def hf_qwen3(**overrides):
    """Qwen3ForCausalLM: QK-norm, heads wider than hidden_size / heads, tied head."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    settings = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=128,
                    rope_theta=1000000.0, tie_word_embeddings=True, pad_token_id=0, eos_token_id=1,
                    bos_token_id=1)
    return randomize(Qwen3ForCausalLM(Qwen3Config(**{**settings, **overrides})), seed=1)


def left_padded_batch():
    """Two prompts of different lengths, left-padded: ``(ids, attention_mask)`` as transformers takes them."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(2, VOCAB, (2, 12), generator=g)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :5] = 0
    ids[1, :5] = 0
    return ids, mask


def hf_logits(hf, ids, mask):
    """Transformers' logits with positions counted from each row's first real token."""
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    with torch.no_grad():
        return hf(input_ids=ids, attention_mask=mask, position_ids=positions).logits
