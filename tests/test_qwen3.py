"""Qwen3 from scratch against transformers' Qwen3ForCausalLM (the oracle, built in the test).

The tiny model has QK-norm, heads wider than ``hidden_size / heads`` (as every Qwen3 has), 2
key/value heads for 4 query heads and a tied head; every weight, the q/k norms included, is random.
"""

import json

import pytest
import torch
from hf_oracle import hf_logits, hf_qwen3, left_padded_batch

import buildllm
from buildllm.errors import UserError
from buildllm.finetune.classify import make_classifier
from buildllm.generation.sampling import generate
from buildllm.models.qwen3 import Qwen3Model
from buildllm.models.registry import preset
from buildllm.weights.huggingface import save_pretrained
from buildllm.weights.loader import load_model

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    hf = hf_qwen3()
    folder = tmp_path_factory.mktemp("qwen3")
    hf.save_pretrained(folder)
    return hf, folder, load_model(folder).model


def test_the_folder_is_read_as_a_qwen3_with_a_tied_head(reference):
    _, _, ours = reference
    assert isinstance(ours, Qwen3Model) and ours.cfg.arch == "qwen3" and ours.cfg.qk_norm
    assert ours.cfg.head_dim == 32 and ours.cfg.emb_dim == 64
    assert ours.out_head.weight is ours.wte.weight


def test_logits_equal_transformers_on_a_left_padded_batch(reference):
    hf, _, ours = reference
    ids, mask = left_padded_batch()
    with torch.no_grad():
        logits = ours(ids, padding=mask == 0)
    real = mask.bool()
    torch.testing.assert_close(logits[real], hf_logits(hf, ids, mask)[real], atol=1e-4, rtol=0)


def test_30_greedy_tokens_equal_transformers_generate_with_and_without_the_cache(reference):
    hf, _, ours = reference
    ids, mask = left_padded_batch()
    expected = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=30, do_sample=False,
                           min_new_tokens=30, pad_token_id=0)
    prompts = [row[m.bool()].tolist() for row, m in zip(ids, mask)]
    with_cache = generate(ours, prompts, 30)
    assert [row[-30:] for row in with_cache] == expected[:, -30:].tolist()
    assert generate(ours, prompts, 30, use_cache=False) == with_cache


def test_int8_logits_stay_close(reference):
    _, folder, ours = reference
    ids, mask = left_padded_batch()
    with torch.no_grad():
        exact = ours(ids, padding=mask == 0)[mask.bool()]
        quantized = load_model(folder, quantize="int8").model(ids, padding=mask == 0)[mask.bool()]
    assert (quantized - exact).abs().max() < 0.05 * exact.abs().max()  # bf16 activations in the matmuls
    assert (quantized.argmax(-1) == exact.argmax(-1)).float().mean() > 0.9


def test_save_pretrained_round_trips_through_transformers(reference, tmp_path):
    _, _, ours = reference
    save_pretrained(ours, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForCausalLM"] and config["tie_word_embeddings"]
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids, mask = left_padded_batch()
    with torch.no_grad():
        expected = ours(ids, padding=mask == 0)
    torch.testing.assert_close(hf_logits(back, ids, mask)[mask.bool()], expected[mask.bool()], atol=1e-5, rtol=0)
    assert isinstance(load_model(tmp_path).model, Qwen3Model)


def test_sliding_window_attention_is_refused(reference, tmp_path):
    config = {**json.loads((reference[1] / "config.json").read_text()), "use_sliding_window": True}
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").symlink_to(reference[1] / "model.safetensors")
    with pytest.raises(UserError, match="use_sliding_window=True is not supported"):
        load_model(tmp_path)


def test_a_qwen3_classifier_reads_the_last_token(reference):
    model = load_model(reference[1]).model
    make_classifier(model, num_classes=3, trainable="last_blocks")
    with torch.no_grad():
        logits = model(left_padded_batch()[0])
    assert logits.shape == (2, 12, 3)
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"blocks", "final_norm", "out_head"}


def test_presets_have_the_published_sizes():
    billions = {name: round(buildllm.count_parameters(preset(name))["total"] / 1e9, 3)
                for name in ("qwen3-0.6b", "qwen3-1.7b", "qwen3-4b", "qwen3-8b")}
    assert billions == {"qwen3-0.6b": 0.596, "qwen3-1.7b": 1.721, "qwen3-4b": 4.022, "qwen3-8b": 8.191}
    with torch.device("meta"):
        model = Qwen3Model(preset("qwen3-0.6b"))
    assert sum(p.numel() for p in model.parameters()) == buildllm.count_parameters(preset("qwen3-0.6b"))["total"]


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_generation_is_identical_with_and_without_the_cache(reference, scheme):
    model = load_model(reference[1], quantize=scheme).model
    prompts = [row[m.bool()].tolist() for row, m in zip(*left_padded_batch())]
    assert generate(model, prompts, 12, fast=False) == generate(model, prompts, 12, use_cache=False)
