"""Llama 3 from scratch against transformers' LlamaForCausalLM (the oracle, built in the test).

The tiny model has grouped-query attention (4 query heads, 2 key/value heads), Llama 3's RoPE
scaling and an untied head; every weight, norms included, is random. If the name map, the RoPE
frequencies, the head grouping or the padding arithmetic were off anywhere, the logits would
differ.
"""

import json

import pytest
import torch
from hf_oracle import VOCAB, hf_llama, hf_logits, left_padded_batch
from safetensors.torch import load_file, save_file

import buildllm
from buildllm import TrainConfig, train
from buildllm.errors import UserError
from buildllm.finetune.lora import apply_lora, merge_lora
from buildllm.generation.sampling import generate
from buildllm.models.llama import LlamaConfig, LlamaModel
from buildllm.models.registry import preset
from buildllm.weights.huggingface import save_pretrained
from buildllm.weights.loader import load_model

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The random LlamaForCausalLM, its folder, and buildllm's model loaded from that folder."""
    hf = hf_llama()
    folder = tmp_path_factory.mktemp("llama")
    hf.save_pretrained(folder)
    return hf, folder, load_model(folder).model


def test_the_folder_is_read_as_a_llama_with_its_settings(reference):
    _, _, ours = reference
    assert isinstance(ours, LlamaModel) and ours.cfg.arch == "llama"
    assert (ours.cfg.n_heads, ours.cfg.n_kv_heads, ours.cfg.tie_embeddings) == (4, 2, False)
    assert ours.cfg.rope_scaling["rope_type"] == "llama3" and ours.cfg.rope_scaling["factor"] == 4.0


def test_logits_equal_transformers_on_a_left_padded_batch(reference):
    hf, _, ours = reference
    ids, mask = left_padded_batch()
    with torch.no_grad():
        logits = ours(ids, padding=mask == 0)
    real = mask.bool()
    torch.testing.assert_close(logits[real], hf_logits(hf, ids, mask)[real], atol=1e-4, rtol=0)


def test_30_greedy_tokens_equal_transformers_generate(reference):
    hf, _, ours = reference
    ids, mask = left_padded_batch()
    expected = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=30, do_sample=False,
                           min_new_tokens=30, pad_token_id=0)
    prompts = [row[m.bool()].tolist() for row, m in zip(ids, mask)]
    ours_out = generate(ours, prompts, 30)
    assert [row[-30:] for row in ours_out] == expected[:, -30:].tolist()


def test_generation_is_identical_with_and_without_the_kv_cache(reference):
    _, _, ours = reference
    ids, mask = left_padded_batch()
    prompts = [row[m.bool()].tolist() for row, m in zip(ids, mask)]
    assert generate(ours, prompts, 40) == generate(ours, prompts, 40, use_cache=False)
    cache = ours.new_kv_cache(2, 64)
    assert cache.keys.shape[2] == 2  # the cache holds the 2 key/value heads, not the 4 query heads


def test_int8_logits_stay_close(reference):
    _, folder, ours = reference
    ids, mask = left_padded_batch()
    with torch.no_grad():
        exact = ours(ids, padding=mask == 0)[mask.bool()]
        quantized = load_model(folder, quantize="int8").model(ids, padding=mask == 0)[mask.bool()]
    # The int8 matmuls take bf16 activations: most of the difference is that rounding.
    assert (quantized - exact).abs().max() < 0.05 * exact.abs().max()
    assert (quantized.argmax(-1) == exact.argmax(-1)).float().mean() > 0.9


def test_save_pretrained_round_trips_through_transformers(reference, tmp_path):
    _, _, ours = reference
    save_pretrained(ours, tmp_path)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(back).__name__ == "LlamaForCausalLM"
    ids, mask = left_padded_batch()
    with torch.no_grad():
        expected = ours(ids, padding=mask == 0)
    torch.testing.assert_close(hf_logits(back, ids, mask)[mask.bool()], expected[mask.bool()], atol=1e-5, rtol=0)


def test_a_bf16_folder_loads_in_bf16_unless_a_dtype_is_asked_for(tmp_path):
    hf = hf_llama().to(torch.bfloat16)
    hf.save_pretrained(tmp_path)
    ours = load_model(tmp_path).model
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    assert load_model(tmp_path, dtype=torch.float32).model.wte.weight.dtype == torch.float32
    ids, mask = left_padded_batch()
    with torch.no_grad():
        logits = ours(ids, padding=mask == 0)
    expected = hf_logits(hf, ids, mask)[mask.bool()]
    torch.testing.assert_close(logits[mask.bool()], expected, atol=0.1, rtol=0)  # bf16 rounding apart


def test_sharded_safetensors_load(reference, tmp_path):
    hf, _, ours = reference
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    sharded = load_model(tmp_path).model
    assert all(torch.equal(a, b) for a, b in zip(sharded.state_dict().values(), ours.state_dict().values()))


def _edit_folder(source, target, config=None, tensors=None):
    """A copy of the HF folder with its config.json updated and its tensors passed through ``tensors``."""
    target.mkdir(exist_ok=True)
    hf_config = {**json.loads((source / "config.json").read_text()), **(config or {})}
    (target / "config.json").write_text(json.dumps(hf_config))
    state = load_file(source / "model.safetensors")
    save_file(tensors(state) if tensors else state, target / "model.safetensors")
    return target


@pytest.mark.parametrize("config, tensors, message", [
    ({"model_type": "mistral"}, None, "model_type 'mistral' is not one buildllm can load"),
    ({"architectures": ["LlamaForSequenceClassification"]}, None, "LlamaForSequenceClassification"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, None, "'yarn' is not supported"),
    ({"attention_bias": True}, None, "attention_bias=True is not supported"),
    ({"hidden_act": "gelu"}, None, "hidden_act='gelu'"),
    (None, lambda s: {k: v for k, v in s.items() if "layers.1.mlp.up_proj" not in k},
     "'model.layers.1.mlp.up_proj.weight' is missing"),
    (None, lambda s: {**s, "model.layers.0.self_attn.k_proj.weight": torch.zeros(64, 64)},
     "'model.layers.0.self_attn.k_proj.weight' has shape (64, 64), the config needs (32, 64)"),
    (None, lambda s: {**s, "model.layers.0.self_attn.q_proj.bias": torch.zeros(64)},
     "unexpected tensor 'model.layers.0.self_attn.q_proj.bias'"),
])
def test_what_the_model_cannot_honour_is_one_line_naming_it(reference, tmp_path, config, tensors, message):
    folder = _edit_folder(reference[1], tmp_path / "edited", config, tensors)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")) as error:
        load_model(folder)
    assert "\n" not in str(error.value)


def test_lora_adapts_all_seven_projections_and_merges_exactly(reference):
    _, folder, _ = reference
    model = load_model(folder).model
    ids = left_padded_batch()[0]
    with torch.no_grad():
        base = model(ids)
    apply_lora(model, rank=2, alpha=4.0)
    adapted = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(adapted) == 2 * 7 * 2  # A and B, 7 layers per block, 2 blocks
    with torch.no_grad():
        assert torch.equal(model(ids), base)  # B starts at zero
        for name, p in model.named_parameters():
            if name.endswith("lora.B"):
                p.normal_(std=0.1)
        adapted_logits = model(ids)
    merged = merge_lora(model)
    with torch.no_grad():
        torch.testing.assert_close(merged(ids), adapted_logits, atol=1e-4, rtol=0)


def test_presets_have_the_published_sizes():
    billions = {name: buildllm.count_parameters(preset(name))["total"] / 1e9
                for name in ("llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b")}
    assert billions == pytest.approx({"llama-3.2-1b": 1.236, "llama-3.2-3b": 3.213, "llama-3.1-8b": 8.030}, abs=1e-3)
    assert buildllm.count_parameters(preset("smollm2-135m"))["total"] == 134_515_008
    with torch.device("meta"):
        for name in ("llama-nano", "smollm2-135m"):
            model = LlamaModel(preset(name))
            assert sum(p.numel() for p in model.parameters()) == buildllm.count_parameters(preset(name))["total"]


def test_config_errors_are_user_errors():
    with pytest.raises(UserError, match="not a multiple of n_kv_heads"):
        LlamaConfig(n_heads=6, n_kv_heads=4, emb_dim=48)
    with pytest.raises(UserError, match="rope_scaling must be Llama 3's"):
        LlamaConfig(rope_scaling={"rope_type": "linear", "factor": 2.0})


def test_train_arch_llama_and_resume(play_corpus, tmp_path):
    """`buildllm train --arch llama` trains the arch's CPU preset; a resumed run equals a straight one."""
    files = play_corpus("macbeth", 6000)
    common = dict(data=files["book"], recipe="book", tokenizer=files["tokenizer"], arch="llama", preset="llama-nano",
                  batch_size=4, context_length=32, eval_interval=2, eval_iters=1, lr=3e-3,
                  lr_schedule="constant", progress=False, sample_tokens=0, dtype="fp32", device="cpu")
    straight = train(TrainConfig(out=str(tmp_path / "a"), max_steps=4, **common))
    train(TrainConfig(out=str(tmp_path / "b"), max_steps=2, **common))
    resumed = train(TrainConfig(out=str(tmp_path / "b"), max_steps=4, resume=True, **common))
    assert resumed.steps == 4 and resumed.train_loss == straight.train_loss
    model, tokenizer = load_model(tmp_path / "a")
    assert isinstance(model, LlamaModel) and model.cfg.context_length == 128
    assert len(generate(model, [tokenizer.encode("MACBETH:")], 5)[0]) == len(tokenizer.encode("MACBETH:")) + 5
    with pytest.raises(UserError, match="is a gpt2 model, not llama"):
        train(TrainConfig(out=str(tmp_path / "c"), **{**common, "preset": "nano"}))


def test_vocab_is_the_folders(reference):
    assert reference[2].cfg.vocab_size == VOCAB


def test_instruction_and_classification_fine_tuning_take_a_llama(tmp_path):
    from buildllm.finetune.classify import finetune_classifier
    from buildllm.finetune.instruct import TEMPLATES, finetune_instruct
    from buildllm.tokenizer import WordTokenizer

    records = [{"instruction": f"add {i % 7} and {i % 5}", "input": "", "output": f"it is {i % 7 + i % 5} ."}
               for i in range(12)]
    (tmp_path / "inst.json").write_text(json.dumps(records))
    rows = [(f"{word} thing {i}", label) for i in range(12) for word, label in [("good", "pos"), ("bad", "neg")]]
    (tmp_path / "rows.csv").write_text("text,label\n" + "".join(f"{t},{lab}\n" for t, lab in rows))
    tok = WordTokenizer.from_text([TEMPLATES["alpaca"].format(r["instruction"], "") + r["output"] for r in records]
                                  + [t for t, _ in rows])

    def llama():
        torch.manual_seed(0)
        return LlamaModel(preset("llama-nano", vocab_size=tok.vocab_size, context_length=64))

    result = finetune_instruct(llama(), tmp_path / "inst.json", tmp_path / "inst", tokenizer=tok, epochs=1,
                               lr=3e-3, lora_rank=2, max_new_tokens=4, device="cpu", log=None)
    assert result.history[0]["train_loss"] < result.initial_train_loss
    assert isinstance(load_model(tmp_path / "inst").model, LlamaModel)  # merged: a plain llama
    clf = finetune_classifier(llama(), tmp_path / "rows.csv", tmp_path / "clf", tokenizer=tok, trainable="all",
                              epochs=2, lr=3e-3, device="cpu", log=None)
    assert clf.history[-1]["train_accuracy"] > 0.9


def test_a_folder_without_a_tokenizer_never_gets_gpt2s(tmp_path):
    """GPT-2's BPE fills in for a GPT-2 folder without tokenizer files, never for another arch,
    whose ids it would turn into the wrong text, however large the vocabulary."""
    hf_llama(vocab_size=50304).save_pretrained(tmp_path)
    assert load_model(tmp_path).tokenizer is None


def test_info_reads_a_hugging_face_folder(reference, capsys):
    from buildllm.cli import main

    _, folder, ours = reference
    assert main(["info", "--model", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "(llama): 2 layers, 4 heads (2 key/value)" in out
    assert f"{sum(p.numel() for p in ours.parameters()):,}" in out
