import pytest
import torch

from buildllm.errors import UserError
from buildllm.models.gpt2 import GPTConfig, GPTModel
from buildllm.weights.checkpoint import WEIGHTS, save_model
from buildllm.weights.loader import load_model

CFG = GPTConfig(vocab_size=61, context_length=16, emb_dim=32, n_heads=4, n_layers=2)


@pytest.mark.parametrize("tie", [True, False])
def test_save_and_load_round_trip_gives_identical_logits(tmp_path, tie):
    torch.manual_seed(0)
    cfg = GPTConfig(**{**CFG.to_dict(), "tie_embeddings": tie})
    model = GPTModel(cfg).eval()
    save_model(tmp_path, model)
    loaded, tokenizer = load_model(tmp_path)
    assert tokenizer is None and loaded.cfg == cfg
    assert (loaded.out_head.weight is loaded.wte.weight) == tie
    idx = torch.randint(0, cfg.vocab_size, (2, 16))
    assert torch.equal(model(idx), loaded(idx))
    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])


def test_no_temporary_files_are_left_behind(tmp_path):
    save_model(tmp_path, GPTModel(CFG))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]


def test_truncated_weights_are_a_clear_error(tmp_path):
    save_model(tmp_path, GPTModel(CFG))
    data = (tmp_path / WEIGHTS).read_bytes()
    (tmp_path / WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="corrupt or truncated"):
        load_model(tmp_path)
    assert (tmp_path / WEIGHTS).exists()  # nothing deleted


def test_shape_mismatch_names_the_first_tensor(tmp_path):
    save_model(tmp_path, GPTModel(CFG))
    GPTConfig(**{**CFG.to_dict(), "emb_dim": 64}).save(tmp_path / "config.json")
    with pytest.raises(UserError, match="tensor 'wte.weight' has shape \\(61, 32\\), the config needs \\(61, 64\\)"):
        load_model(tmp_path)


def test_missing_folder_or_files(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_model(tmp_path / "nope")
    (tmp_path / "model.txt").write_text("not a folder")
    with pytest.raises(UserError, match="model.txt is a file: pass the folder"):
        load_model(tmp_path / "model.txt")
    with pytest.raises(UserError, match="holds no model"):
        load_model(tmp_path)


def test_user_error_is_a_value_error():
    assert issubclass(UserError, ValueError)


def _word_tokenizer(n_words: int):
    from buildllm.tokenizer import WordTokenizer

    return WordTokenizer.from_text(" ".join(f"w{i}" for i in range(n_words)))


def test_one_vocabulary_rule_padded_loads_smaller_is_one_line(tmp_path):
    """The one loader: a model vocabulary padded past the tokenizer's loads; a smaller one does not."""
    import buildllm

    tok = _word_tokenizer(40)
    padded = GPTConfig(**{**CFG.to_dict(), "vocab_size": tok.vocab_size + 7})
    save_model(tmp_path / "padded", GPTModel(padded), tok)
    model, loaded_tok = buildllm.load_model(tmp_path / "padded")
    assert model.cfg.vocab_size == tok.vocab_size + 7 and loaded_tok.vocab_size == tok.vocab_size
    small = GPTConfig(**{**CFG.to_dict(), "vocab_size": tok.vocab_size - 1})
    save_model(tmp_path / "small", GPTModel(small), tok)
    with pytest.raises(UserError, match=r"the tokenizer has \d+ tokens but the model only \d+") as e:
        buildllm.load_model(tmp_path / "small")
    assert "\n" not in str(e.value)
    assert buildllm.load_pretrained is buildllm.load_model


def test_one_loader_takes_adapters_on_a_base_and_quantizes(tmp_path):
    import buildllm
    from buildllm.finetune.lora import apply_lora, save_adapters

    torch.manual_seed(0)
    base = GPTModel(CFG).eval()
    save_model(tmp_path / "base", base)
    import copy

    tuned = apply_lora(copy.deepcopy(base), rank=2, alpha=4)
    for layer in tuned.modules():
        if hasattr(layer, "B") and isinstance(layer.B, torch.nn.Parameter):
            torch.nn.init.normal_(layer.B)
    save_adapters(tmp_path / "adapters", tuned)
    with pytest.raises(UserError, match="pass base="):
        buildllm.load_model(tmp_path / "adapters")
    loaded, _ = buildllm.load_model(tmp_path / "adapters", base=tmp_path / "base")
    idx = torch.randint(0, CFG.vocab_size, (1, 16))
    assert torch.allclose(loaded(idx), tuned.eval()(idx), atol=1e-5)
    quantized, _ = buildllm.load_model(tmp_path / "base", quantize="int8")
    assert quantized.blocks[0].att.qkv.__class__.__name__ == "Int8Linear"


def test_config_save_is_atomic_and_names_its_arch(tmp_path):
    CFG.save(tmp_path / "config.json")
    assert '"arch": "gpt2"' in (tmp_path / "config.json").read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]
    assert GPTConfig.load(tmp_path / "config.json") == CFG


def test_one_loader_reads_classifier_and_instruction_folders(tmp_path):
    import buildllm
    from buildllm.files import write_json
    from buildllm.finetune.classify import load_classifier, save_classifier

    tok = _word_tokenizer(40)
    cfg = GPTConfig(**{**CFG.to_dict(), "vocab_size": tok.vocab_size})
    torch.manual_seed(0)
    model = GPTModel(cfg).eval()
    save_model(tmp_path / "instruct", model, tok)
    write_json(tmp_path / "instruct" / "prompt_template.json", {"name": "t", "instruction": "{instruction}"})
    loaded = buildllm.load_model(tmp_path / "instruct")
    assert loaded.prompt_template["name"] == "t" and loaded.classifier is None

    model.out_head = torch.nn.Linear(cfg.emb_dim, 2)
    save_classifier(tmp_path / "cls", model, tok, {"labels": ["no", "yes"], "max_length": 16})
    classifier = buildllm.load_model(tmp_path / "cls")
    assert classifier.classifier["labels"] == ["no", "yes"]
    idx = torch.randint(0, cfg.vocab_size, (1, 16))
    assert torch.equal(classifier.model(idx), load_classifier(tmp_path / "cls").model(idx))
    assert torch.equal(classifier.model(idx), model(idx))
