import copy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from buildllm import cli
from buildllm.errors import UserError
from buildllm.generation.quantization import (Int4Linear, Int8Linear, int8_by_row, int8_in_tiles, pack_codes, quantize,
                                              unpack_codes)
from buildllm.generation.sampling import cache_dtype, generate, stream_text
from buildllm.models.gpt2 import GPTConfig, GPTModel
from buildllm.tokenizer import WordTokenizer
from buildllm.weights.checkpoint import save_model
from buildllm.weights.huggingface import save_pretrained

TEXT = "the cat sat on the mat, then it slept. a dog ran! "


def random_linear(in_features=64, out_features=48, bias=True, seed=0) -> nn.Linear:
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        linear.weight.mul_(torch.linspace(0.1, 10, out_features)[:, None])  # rows of very different size
        if bias:
            linear.bias.normal_()
    return linear


def test_each_weight_is_within_half_a_step_of_the_original():
    linear = random_linear()
    q = Int8Linear.from_linear(linear)
    assert q.weight.dtype == torch.int8 and q.weight.shape == (48, 64) and q.scale.shape == (48,)
    assert int(q.codes().abs().max(dim=1).values.min()) == 127  # each row's largest weight uses the full range
    step = q.scale.float()[:, None]
    error = (q.dequantized() - linear.weight).abs()
    assert bool((error <= step / 2 + 1e-7).all())
    # The scale is per row: a row of small weights keeps its precision next to a row of large ones.
    assert float(q.scale[0]) < float(q.scale[-1]) / 50


@pytest.mark.parametrize("bias", [True, False])
def test_the_kernel_equals_the_written_out_form(bias):
    linear = random_linear(bias=bias)
    q = Int8Linear.from_linear(linear)
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        fast, written, original = q(x), q.written_out(x), linear(x)
    assert fast.shape == written.shape == (3, 5, 48) and fast.dtype == torch.float32
    # The kernel multiplies in bf16 (8 bits of mantissa): agreement to bf16 rounding of the inputs.
    assert torch.allclose(fast, written, rtol=2e-2, atol=2e-2 * float(written.abs().mean()))
    # And both are close to the original fp32 layer.
    assert torch.allclose(written, original, rtol=0, atol=0.01 * float(original.abs().max()))


@pytest.mark.parametrize("rows, inputs", [(40, 128), (61, 96), (16, 32), (3, 48), (17, 70)])
def test_int8_codes_sit_in_tiles_of_16_rows_and_come_back(rows, inputs):
    codes = torch.randint(-127, 128, (rows, inputs), dtype=torch.int8, generator=torch.Generator().manual_seed(rows))
    tiled = int8_in_tiles(codes)
    assert tiled.shape == (-(-rows // 16) * 16, -(-inputs // 32) * 32)
    back = int8_by_row(tiled)
    assert torch.equal(back[:rows, :inputs], codes) and not back[rows:].any() and not back[:, inputs:].any()
    run = tiled.reshape(-1)[:64].view(16, 4)  # the first 4 inputs of each of the first tile's 16 rows
    assert torch.equal(run[: min(rows, 16)], codes[:16, :4])


def test_int8_rows_multiply_as_pytorchs_int8_kernel_does(monkeypatch):
    """Where it is built, the compiled extension multiplies by the codes as bf16 (exact: identity
    rows give them back, a width of 96 leaving a last 32), then by the scales: the matrix product
    from MATRIX_ROWS rows on rounds the sums to bf16 and again after the scale; below it the
    decoding step's kernel rounds once, as PyTorch's int8 kernel does."""
    from buildllm.generation import quantization
    from buildllm.generation.native import extension
    from buildllm.generation.quantization import MATRIX_ROWS

    q = Int8Linear.from_linear(random_linear(bias=False))
    if (native := extension()) is not None:
        for rows, inputs in [(48, 64), (61, 96), (3, 48), (20, 40)]:
            codes = torch.randint(-127, 128, (rows, inputs), dtype=torch.int8, generator=torch.Generator().manual_seed(3))
            ones = torch.ones(rows, dtype=torch.bfloat16)
            for identity in (torch.eye(inputs), torch.eye(inputs)[:7]):  # the matrix product; the step's kernel
                back = native.quantized_matmul(identity.to(torch.bfloat16), int8_in_tiles(codes), ones, None, 0, inputs, rows)
                assert torch.equal(back[:, :rows], codes.T[: len(identity)].to(torch.bfloat16))
        # small whole numbers: every sum exact in fp32, so the roundings alone decide
        for count, roundings in [(MATRIX_ROWS + 3, 2), (5, 1)]:
            rows = torch.randint(-3, 4, (count, 64), generator=torch.Generator().manual_seed(count)).to(torch.bfloat16)
            sums = (rows.double() @ q.codes().double().T).float()
            want = (sums.to(torch.bfloat16).float() if roundings == 2 else sums) * q.scale.float()
            assert torch.equal(q._kernel(rows)[:, :48], want.to(torch.bfloat16))
    for without_extension in (False, True):  # where it is not built: the bf16 product from MATRIX_ROWS, PyTorch's kernel below
        if without_extension:
            monkeypatch.setattr(quantization, "extension", lambda: None)
        for count in (MATRIX_ROWS + 3, MATRIX_ROWS - 1, 1):
            rows = torch.randn(count, 64, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
            kernel = torch._weight_int8pack_mm(rows, q.codes().contiguous(), q.scale).float()
            product = q._kernel(rows).float()[:, :48]
            torch.testing.assert_close(product, kernel, rtol=8e-3, atol=1e-3 * float(kernel.abs().max()))


@pytest.mark.parametrize("scheme, layer", [("int8", Int8Linear), ("int4", Int4Linear)])
def test_quantize_replaces_every_linear_and_only_those(scheme, layer):
    torch.manual_seed(0)
    model = GPTModel(GPTConfig(vocab_size=61, context_length=16, emb_dim=32, n_heads=4, n_layers=2))
    embedding = model.wte.weight.detach().clone()
    assert quantize(model, scheme) is model
    assert not any(type(m) is nn.Linear for m in model.modules())
    assert sum(isinstance(m, layer) for m in model.modules()) == 2 * 4 + 1  # qkv, out, fc, proj; head
    assert model.wte.weight.dtype == torch.float32 and torch.equal(model.wte.weight, embedding)
    assert not model.training
    with pytest.raises(UserError, match="quantized already"):
        quantize(model, scheme)


def test_int4_weights_are_within_half_a_step_of_their_group():
    linear = random_linear(in_features=128, out_features=40)
    q = Int4Linear.from_linear(linear, group_size=32)
    assert q.weight.dtype == torch.uint8 and q.weight.shape == (48, 64)  # two per byte, tiles of 16 rows
    assert q.scale.shape == q.zero.shape == (3, 4, 16) and q.scales().shape == q.zeros().shape == (40, 4)
    codes = q.codes()
    assert int(codes.max()) <= 15 and q.codes().shape == (40, 128)
    step = q.scales().float().repeat_interleave(32, dim=1)
    error = (q.dequantized() - linear.weight).abs()
    assert bool((error <= step / 2 + 1e-6).all())
    # Each group spans its own range: its smallest and largest weights take the extreme codes.
    groups = codes.view(40, 4, 32)
    assert bool((groups.amin(-1) <= 1).all() and (groups.amax(-1) >= 14).all())


@pytest.mark.parametrize("rows, inputs", [(40, 128), (61, 96), (16, 32), (3, 64)])
def test_int4_codes_pack_in_tiles_of_16_rows_and_back(rows, inputs):
    codes = torch.randint(0, 16, (rows, inputs), dtype=torch.uint8, generator=torch.Generator().manual_seed(rows))
    packed = pack_codes(codes)
    assert packed.shape == (-(-rows // 16) * 16, inputs // 2)
    assert torch.equal(unpack_codes(packed)[:rows], codes) and not unpack_codes(packed)[rows:].any()
    if inputs >= 64:  # run 0 of the first tile: bytes 0..3 of its 16 rows, holding inputs 0..3 and 32..35
        run = packed.reshape(-1)[:64].view(16, 4)
        tile = torch.cat([codes, codes.new_zeros(16, inputs)])[:16]
        assert torch.equal(run & 15, tile[:, :4]) and torch.equal(run >> 4, tile[:, 32:36])


@pytest.mark.parametrize("out_features", [48, 61])  # 61: the kernel pads the output to 64 and cuts it
def test_the_int4_kernel_equals_the_written_out_form(out_features):
    linear = random_linear(in_features=128, out_features=out_features)
    q = Int4Linear.from_linear(linear, group_size=64)
    x = torch.randn(2, 7, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        fast, written, original = q(x), q.written_out(x), linear(x)
    assert fast.shape == written.shape == (2, 7, out_features)
    assert torch.allclose(fast, written, rtol=2e-2, atol=2e-2 * float(written.abs().mean()))
    assert torch.allclose(written, original, rtol=0, atol=0.1 * float(original.abs().max()))


@pytest.mark.parametrize("in_features, group_size", [(128, 32), (96, 32), (256, 64), (256, 128)])
def test_a_prompts_rows_multiply_the_int4_weight_the_codes_stand_for(in_features, group_size, monkeypatch):
    """Where it is built, the compiled extension turns the codes into the bf16 weight, a chunk at a
    time (96 inputs leave a last block of 32), and multiplies by it: identity rows give back the
    very numbers of ``dequantized`` rounded to bf16, through the matrix product and through the
    decoding step's kernel (few rows); and the same products as PyTorch's int4 kernel (elsewhere)."""
    from buildllm.generation import quantization
    from buildllm.generation.native import extension
    from buildllm.generation.quantization import MATRIX_ROWS

    native = extension()
    if native is None:
        pytest.skip("needs the compiled extension (x86-64 with AVX-512 BF16 and a C++ compiler)")
    q = Int4Linear.from_linear(random_linear(in_features=in_features, out_features=40), group_size=group_size)
    weight = q.dequantized(torch.float32).to(torch.bfloat16)
    for identity in (torch.eye(in_features), torch.eye(in_features)[:7]):  # the matrix product; the step's kernel
        back = native.quantized_matmul(identity.to(torch.bfloat16), q.weight, q.scale, q.zero, group_size, in_features, 40)
        assert torch.equal(back[:, :40], weight.T[: len(identity)])
    rows = torch.randn(MATRIX_ROWS + 1, in_features, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    products = [q._kernel(rows).float()[:, :40], q._kernel(rows[:5]).float()[:, :40]]
    monkeypatch.setattr(quantization, "extension", lambda: None)
    kernel = q._kernel(rows).float()[:, :40]  # PyTorch's int4 kernel
    for product in products:
        torch.testing.assert_close(product, kernel[: len(product)], rtol=8e-3, atol=2e-3 * float(kernel.abs().max()))


def test_int4_refuses_layers_it_cannot_group():
    with pytest.raises(UserError, match="multiple of the group size"):
        Int4Linear.from_linear(random_linear(in_features=48), group_size=32)
    torch.manual_seed(0)
    model = GPTModel(GPTConfig(vocab_size=61, context_length=16, emb_dim=48, n_heads=4, n_layers=1))
    before = [type(m) for m in model.modules()]
    with pytest.raises(UserError, match="use int8"):
        quantize(model, "int4")
    assert [type(m) for m in model.modules()] == before  # nothing half-converted
    with pytest.raises(UserError, match="unknown quantization 'int2'"):
        quantize(model, "int2")


def trained_model(tok: WordTokenizer, steps: int = 150) -> GPTModel:
    """A tiny model that has learned TEXT by heart, so its predictions have real margins."""
    torch.manual_seed(0)
    model = GPTModel(GPTConfig(vocab_size=tok.vocab_size, context_length=16, emb_dim=32, n_heads=4, n_layers=2))
    ids = torch.tensor(tok.encode(TEXT * 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(steps):
        start = step % (len(ids) - 17)
        x, y = ids[start : start + 16], ids[start + 1 : start + 17]
        loss = F.cross_entropy(model(x[None])[0], y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def word_model():
    tok = WordTokenizer.from_text(TEXT)
    return trained_model(tok), tok


@pytest.mark.parametrize("scheme, loss_change", [("int8", 0.02), ("int4", 0.15)])
def test_a_quantized_model_predicts_like_the_full_precision_one(word_model, scheme, loss_change):
    model, tok = word_model
    quantized = quantize(copy.deepcopy(model), scheme)
    ids = torch.tensor([tok.encode(TEXT * 2)[:16]])
    with torch.no_grad():
        full, low = model(ids), quantized(ids)
        loss_full = F.cross_entropy(full[0, :-1], ids[0, 1:])
        loss_low = F.cross_entropy(low[0, :-1], ids[0, 1:])
    assert float(loss_full) < 0.5  # it did learn the text
    assert abs(float(loss_low) - float(loss_full)) < loss_change * float(loss_full) + 1e-3
    assert float((full - low).abs().max()) < loss_change * float(full.abs().max())
    prompt = ids[:, :4]
    assert torch.equal(generate(quantized, prompt, 20), generate(model, prompt, 20))


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_models_cache_bf16_keys_and_values_and_their_logits_barely_move(word_model, scheme):
    """Generation keeps a quantized model's KV cache in bf16 (sampling.cache_dtype): the logits of
    12 steps over it are those over an fp32 cache, within 1% of the largest."""
    model, tok = word_model
    quantized = quantize(copy.deepcopy(model), scheme)
    assert cache_dtype(quantized) == torch.bfloat16 and cache_dtype(model) == torch.float32
    ids = torch.tensor([tok.encode(TEXT * 2)[:16]])
    logits = {}
    with torch.no_grad():
        for dtype in (torch.float32, torch.bfloat16):
            cache = quantized.new_kv_cache(1, 16, dtype=dtype)
            quantized(ids[:, :4], kv_cache=cache)
            logits[dtype] = torch.cat([quantized(ids[:, i : i + 1], kv_cache=cache)[:, -1] for i in range(4, 16)])
    error = (logits[torch.bfloat16] - logits[torch.float32]).abs().max() / logits[torch.float32].abs().max()
    assert 0 < error < 1e-2, error


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_the_kv_cache_gives_the_tokens_of_no_cache_with_quantized_weights(word_model, scheme):
    model, tok = word_model
    quantized = quantize(copy.deepcopy(model), scheme)
    prompts = [tok.encode("the cat sat"), tok.encode("a dog"), tok.encode("then it slept . a dog ran")]
    # Past the 16-token window too, and with prompts of different lengths in one batch. (The readable
    # model's steps: the C++ step rounds its inputs to int8, see test_fast_decode.py.)
    with_cache = generate(quantized, prompts, 30, use_cache=True, fast=False)
    assert with_cache == generate(quantized, prompts, 30, use_cache=False)
    assert with_cache[1] == generate(quantized, [prompts[1]], 30, fast=False)[0]


def test_a_quantized_model_is_not_saved(word_model, tmp_path):
    model, tok = word_model
    quantized = quantize(copy.deepcopy(model), "int4")
    with pytest.raises(UserError, match="cannot save a quantized model"):
        save_model(tmp_path / "run", quantized, tok)
    with pytest.raises(UserError, match="cannot export a quantized model"):
        save_pretrained(quantized, tmp_path / "hf")
    assert not (tmp_path / "run" / "model.safetensors").exists() and not (tmp_path / "hf" / "model.safetensors").exists()


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_cli_generate_and_eval_quantized(word_model, tmp_path, capsys, scheme):
    model, tok = word_model
    save_model(tmp_path / "run", model, tok)
    expected = "the cat" + "".join(stream_text(quantize(copy.deepcopy(model), scheme), tok, "the cat", 12)) + "\n"
    argv = ["generate", "--checkpoint", str(tmp_path / "run"), "--prompt", "the cat", "--max-new-tokens", "12"]
    assert cli.main([*argv, "--quantize", scheme]) == 0
    out = capsys.readouterr().out
    assert out == expected
    assert cli.main(argv) == 0
    assert capsys.readouterr().out == out  # the text is learned by heart: quantizing changes no word of it

    (tmp_path / "text.txt").write_text(TEXT * 3)
    scores = {}
    for extra in ([], ["--quantize", scheme]):
        assert cli.main(["eval", "--checkpoint", str(tmp_path / "run"), "--data", str(tmp_path / "text.txt"),
                         "--stride", "8", *extra]) == 0
        line = next(l for l in capsys.readouterr().out.splitlines() if "nats per token" in l)
        scores[bool(extra)] = float(line.split()[1])
    assert scores[True] == pytest.approx(scores[False], rel=0.05 if scheme == "int8" else 0.2, abs=1e-3)
    with pytest.raises(SystemExit) as exit_:
        cli.main([*argv, "--quantize", "int2"])
    assert exit_.value.code == 2 and "invalid choice: 'int2'" in capsys.readouterr().err


def test_int8_layers_of_any_width_run():
    """PyTorch's int8 kernel crashes on inputs that are not a multiple of 16 wide: those layers
    multiply the dequantized weight instead, with the same result."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(40, 24)
    q = Int8Linear.from_linear(linear)
    x = torch.randn(3, 40)
    assert torch.allclose(q(x), linear(x), rtol=0.05, atol=0.05)


def test_decode_quality_scores_the_same_text_both_ways(word_model, tmp_path, capsys):
    """benchmarks/decode_quality.py: at fp32 the C++ step's score is the readable forward's."""
    from buildllm.generation.native import extension

    if extension() is None:
        pytest.skip("needs the compiled extension (x86-64 with AVX-512 BF16 and a C++ compiler)")
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import decode_quality

    model, tok = word_model
    save_model(tmp_path / "run", model, tok)
    (tmp_path / "text.txt").write_text(TEXT * 20)
    argv = ["--model", str(tmp_path / "run"), "--text", str(tmp_path / "text.txt"), "--windows", "2", "--new-tokens", "6",
            "--threads", str(torch.get_num_threads())]  # the process's own: later tests depend on it
    assert decode_quality.main(argv) == 0
    rows = {line.split(" | ")[0].strip("| "): line.strip("| ").split(" | ") for line in capsys.readouterr().out.splitlines()
            if line.startswith("| fp32") or line.startswith("| int")}
    assert set(rows) == {"fp32", "int8", "int4"}
    assert rows["fp32"][1] == rows["fp32"][2] and rows["fp32"][3:] == ["1.000"] * 3
    assert abs(float(rows["int8"][1]) - float(rows["int8"][2])) < 0.01
    (tmp_path / "short.txt").write_text("the cat")
    with pytest.raises(SystemExit, match="fewer than 16 tokens .* give a longer text"):
        decode_quality.main([*argv[:2], "--text", str(tmp_path / "short.txt"), *argv[-2:]])
