"""The C++ decoding step (generation/fast_decode.py) against the readable model it stands for.

fp32: the same tokens, logits equal to float rounding. bf16: logits within 1% of the largest
logit of the readable model at that precision (the step rounds where PyTorch rounds, but sums in
another order). int8 and int4: within 2%, because the step multiplies the codes by its inputs as
int8 numbers per block of 32, as llama.cpp does, where PyTorch's kernels take them in bf16.
"""

import warnings

import pytest
import torch

from buildllm.errors import UserError
from buildllm.finetune.lora import apply_lora
from buildllm.generation import fast_decode
from buildllm.generation.fast_decode import fast_decoder
from buildllm.generation.quantization import QuantizedLinear, quantize
from buildllm.generation.sampling import cache_dtype, generate
from buildllm.models import registry
from buildllm.models.gpt2 import GPTConfig, GPTModel
from buildllm.serve.batching import BatchEngine, Request, Sampling

pytestmark = pytest.mark.skipif(fast_decode.extension() is None,
                                reason="the fast decoding step needs x86-64 with AVX-512 BF16 and a C++ compiler")

TOLERANCE = {"fp32": 1e-5, "bf16": 1e-2, "int8": 2e-2, "int4": 2e-2}  # of the largest logit


def gpt(seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = GPTConfig(**{**dict(vocab_size=97, context_length=48, emb_dim=64, n_heads=4, n_layers=2), **overrides})
    return GPTModel(cfg).eval()


def llama(arch="llama", seed=0):
    torch.manual_seed(seed)
    overrides = dict(vocab_size=97, context_length=48, emb_dim=64, n_heads=4, n_kv_heads=2, hidden_dim=96)
    if arch == "llama":  # Llama 3's stretched RoPE frequencies, and an untied head
        overrides.update(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
                         tie_embeddings=False)
    preset = "llama-nano" if arch == "llama" else "qwen3-nano"  # Qwen3: QK-norm, its own head_dim
    return registry.build_model(registry.preset(preset, **overrides)).eval()


def at_precision(model, precision):
    if precision == "bf16":
        return model.to(torch.bfloat16)
    return quantize(model, precision) if precision in ("int8", "int4") else model


def largest_step_error(model, steps=6, prompt_length=5, batch=3):
    """Prefill a left-padded batch through the model, then compare the C++ step with the model's own
    one-token forward at each step; the largest difference relative to the largest logit."""
    dtype = cache_dtype(model)  # bf16 keys and values under int8 and int4 weights, as generation has them
    tokens = torch.randint(0, model.cfg.vocab_size, (batch, prompt_length + steps))
    padding = torch.zeros(batch, prompt_length, dtype=torch.bool)
    padding[0, :2] = True  # row 0 starts two tokens later
    caches = [model.new_kv_cache(batch, prompt_length + steps, dtype=dtype) for _ in range(2)]
    decoder = fast_decoder(model)
    assert decoder is not None
    worst = 0.0
    with torch.inference_mode():
        for cache in caches:
            model(tokens[:, :prompt_length], kv_cache=cache, padding=padding)
        for i in range(prompt_length, prompt_length + steps):
            readable = model(tokens[:, i : i + 1], kv_cache=caches[0])[:, -1].float()
            fast = decoder.step(tokens[:, i], caches[1])
            worst = max(worst, ((fast - readable).abs().max() / readable.abs().max()).item())
    assert caches[1].length == caches[0].length
    close = 1e-5 if dtype == torch.float32 and not any(b.dtype != dtype for b in model.buffers()) else 2e-2
    if any(isinstance(m, QuantizedLinear) for m in model.modules()):
        close = 5e-2  # keys after Qwen3's QK-norm carry the int8 inputs' rounding most
    assert torch.allclose(caches[1].keys.float(), caches[0].keys.float(), rtol=close, atol=close)
    assert torch.allclose(caches[1].values.float(), caches[0].values.float(), rtol=close, atol=close)
    return worst


@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8", "int4"])
@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen3"])
def test_a_step_gives_the_readable_models_logits(arch, precision):
    model = gpt() if arch == "gpt2" else llama(arch)
    assert largest_step_error(at_precision(model, precision)) < TOLERANCE[precision]


@pytest.mark.parametrize("make", [gpt, llama], ids=["gpt2", "llama"])
def test_fp32_generation_gives_the_same_tokens(make):
    model = make(seed=1)
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15]]  # left-padded together
    fast = generate(model, prompts, 30)
    assert fast == generate(model, prompts, 30, fast=False)
    assert fast == [generate(model, [p], 30, fast=False)[0] for p in prompts]


def test_a_one_token_prompt_starts_with_the_fast_step_and_gives_the_same_tokens():
    model = gpt(seed=3)
    prompts = torch.tensor([[5], [17], [40]])
    forwards = []
    hook = model.register_forward_hook(lambda *_: forwards.append(1))
    fast = generate(model, prompts, 20)
    hook.remove()
    assert not forwards  # no prefill through the model: every step in C++
    assert torch.equal(fast, generate(model, prompts, 20, fast=False))


@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8", "int4"])
def test_every_batch_up_to_eight_rows_gives_the_readable_models_logits(precision):
    """Each batch size has its own kernels (several weight rows at once for some formats and sizes,
    the rows left over one at a time); 96 inputs leave int4 a last group of 32."""
    model = at_precision(gpt(emb_dim=96), precision)
    for batch in range(1, 9):
        assert largest_step_error(model, steps=2, batch=batch) < TOLERANCE[precision], batch


def test_bf16_inputs_wider_than_the_l1_cache_take_four_weight_rows_at_once():
    """From batch 5, bf16 layers whose inputs outgrow the L1 cache (bf16_rows_by_four) run 4 rows at
    a time: here the feed-forward's 4104-wide output layer, with 72 rows (a last tile of 8) and a
    last block of 8 inputs."""
    model = registry.build_model(registry.preset("llama-nano", vocab_size=97, context_length=48, emb_dim=72,
                                                  n_heads=4, n_kv_heads=2, hidden_dim=4104)).eval()
    model = model.to(torch.bfloat16)
    for batch in (4, 5, 8):
        assert largest_step_error(model, steps=2, batch=batch) < TOLERANCE["bf16"], batch


def test_a_batch_wider_than_eight_rows_and_a_bigger_int4_group():
    model = quantize(gpt(), "int4", group_size=64)
    assert largest_step_error(model) < TOLERANCE["int4"]
    tokens = torch.randint(0, 97, (11, 4))
    assert generate(model, tokens, 8).shape == (11, 12)


def test_the_server_batches_through_the_fast_step_and_gives_each_request_its_own_tokens():
    model = gpt(seed=2)
    engine = BatchEngine(model, max_batch=4)
    assert engine.fast is not None
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8], [9]]
    requests = [Request(p, Sampling(max_tokens=12, temperature=0.0), lambda token, reason: None) for p in prompts]
    engine.submit(requests)
    while any(r.finish_reason is None for r in requests):
        engine.step()
    for prompt, r in zip(prompts, requests):
        assert r.tokens == generate(model, [prompt], 12, fast=False)[0][len(prompt) :]


def test_models_it_does_not_implement_decode_as_before():
    lora = apply_lora(gpt(), rank=2, alpha=4)
    assert fast_decoder(lora) is None  # LoRA's layers add their own path
    assert fast_decoder(gpt().half()) is None  # fp16
    tokens = torch.randint(0, 97, (2, 4))
    assert torch.equal(generate(lora, tokens, 6), generate(lora, tokens, 6, fast=False))


def test_a_step_past_the_cache_is_refused_in_one_line():
    model = gpt()
    cache = model.new_kv_cache(1, 3)
    with torch.inference_mode():
        model(torch.zeros(1, 3, dtype=torch.long), kv_cache=cache)
        with pytest.raises(UserError, match="exceeds the context length"):
            fast_decoder(model).step(torch.zeros(1, dtype=torch.long), cache)


def test_no_compiler_or_switched_off_means_the_readable_path(monkeypatch):
    import torch.utils.cpp_extension

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Error building extension: g++ not found")

    try:
        fast_decode.extension.cache_clear()
        monkeypatch.setattr(torch.utils.cpp_extension, "load", no_compiler)
        with pytest.warns(UserWarning, match="could not be built .*g\\+\\+ not found"):
            assert fast_decoder(gpt()) is None
        fast_decode.extension.cache_clear()
        monkeypatch.setenv("BUILDLLM_FAST_DECODE", "0")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert fast_decoder(gpt()) is None
    finally:
        fast_decode.extension.cache_clear()
        monkeypatch.undo()
    assert fast_decoder(gpt()) is not None


@pytest.mark.parametrize("levers", [dict(positions="rope", norm="rmsnorm", qk_norm=True, activation="relu2"),
                                    dict(activation="swiglu", tie_embeddings=False)], ids=["rope-rms-qk-relu2", "swiglu"])
def test_gpt_with_the_speedruns_levers(levers):
    model = gpt(**levers)
    assert largest_step_error(model) < TOLERANCE["fp32"]
    assert largest_step_error(at_precision(gpt(**levers), "bf16")) < TOLERANCE["bf16"]


def test_levers_it_does_not_compute_decode_through_the_model():
    assert fast_decoder(gpt(logit_softcap=15.0)) is None
    assert fast_decoder(gpt(value_embeddings=True)) is None


@pytest.mark.parametrize("threads", [1, 2])
def test_greedy_picks_made_with_the_logits_are_the_first_largest_nan_included(threads):
    model = gpt()  # 97 tokens: six blocks of 16 and a last one of 1
    parts = model.decode_parts()
    head, u = parts.head.weight, torch.full((64,), 0.1)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            parts.final_norm.scale.zero_()  # every row's last hidden state is u
            parts.final_norm.shift.copy_(u)
            head[[5, 21, 96]] = 1000 * u  # tied for the largest (5 and 21 in one lane of 16): the first wins
        for batch, nan_rows, expected in [(3, [], 5), (11, [], 5), (11, [96], 96), (3, [60, 80], 60)]:
            with torch.no_grad():
                head[nan_rows] = float("nan")  # a NaN logit is the largest, as max(-1) has it
            cache = model.new_kv_cache(batch, 4)
            with torch.inference_mode():
                logits, picks = fast_decoder(model).step_greedy(torch.arange(batch) + 1, cache)
            assert torch.equal(picks, logits.max(dim=-1).indices)
            assert picks.tolist() == [expected] * batch
    finally:
        torch.set_num_threads(previous)
