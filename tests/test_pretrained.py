"""GPT-2 weights in and out: parity with transformers' GPT2LMHeadModel, errors, export, CLI.

No real weights can be downloaded here, so the reference is a random GPT2LMHeadModel made in the
test: if our loader maps every name and layout correctly, both models compute the same logits.
"""

import json
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from buildllm import cli
from buildllm.errors import UserError
from buildllm.generation.sampling import generate
from buildllm.models.gpt2 import GPTConfig, GPTModel
from buildllm.tokenizer import WordTokenizer, get_tokenizer, train_bpe
from buildllm.weights.checkpoint import save_model
from buildllm.weights.huggingface import read_safetensors, save_pretrained
from buildllm.weights.loader import load_pretrained
from buildllm.weights.openai import tf_to_hf_name

transformers = pytest.importorskip("transformers")

TINY = dict(n_layer=3, n_head=4, n_embd=64, vocab_size=2000, n_positions=128)


def hf_model(seed=0, **config):
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**TINY, **config}))
    return model.eval()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A random tiny GPT-2 from transformers, saved as a Hugging Face folder."""
    model = hf_model()
    folder = tmp_path_factory.mktemp("hf_tiny")
    model.save_pretrained(folder)
    return model, folder


def token_ids(vocab_size, shape=(2, 40), seed=1):
    return torch.randint(0, vocab_size, shape, generator=torch.Generator().manual_seed(seed))


def hf_greedy(model, ids, steps):
    """Greedy decoding the plain way: the whole sequence every step, argmax of the last logits."""
    with torch.no_grad():
        for _ in range(steps):
            next_id = model(ids).logits[:, -1].argmax(dim=-1, keepdim=True)
            ids = torch.cat([ids, next_id], dim=1)
    return ids


def assert_same_model(hf, ours, vocab_size, atol=1e-5):
    ids = token_ids(vocab_size, (2, min(40, ours.cfg.context_length)))
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours(ids)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=atol, rtol=0)
    prompt = ids[:, :8]
    assert torch.equal(generate(ours, prompt, max_new_tokens=20), hf_greedy(hf, prompt, 20))


# Loading -----------------------------------------------------------------------------------------


def test_safetensors_folder_matches_transformers(reference):
    hf, folder = reference
    model, tokenizer = load_pretrained(folder)
    assert model.cfg == GPTConfig(vocab_size=2000, context_length=128, emb_dim=64, n_heads=4, n_layers=3)
    assert tokenizer is None  # a 2000-token vocabulary cannot use GPT-2's tokenizer
    assert not model.training
    assert model.out_head.weight is model.wte.weight  # tied, as in GPT-2
    assert_same_model(hf, model, 2000)


def test_bin_folder_without_prefix_and_with_mask_buffers(reference, tmp_path):
    """The layout of OpenAI's pytorch_model.bin on the Hub: no "transformer." prefix, mask buffers."""
    hf, _ = reference
    state = {name.removeprefix("transformer."): t for name, t in hf.state_dict().items() if name != "lm_head.weight"}
    for i in range(TINY["n_layer"]):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 128, 128))
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(state, tmp_path / "pytorch_model.bin")
    hf.config.save_pretrained(tmp_path)
    model, _ = load_pretrained(tmp_path)
    assert_same_model(hf, model, 2000)


def test_bin_with_pickled_objects_is_refused(reference, tmp_path):
    hf, _ = reference
    hf.config.save_pretrained(tmp_path)
    torch.save({"wte.weight": torch.zeros(2), "evil": types.SimpleNamespace(a=1)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(UserError, match="pytorch_model.bin"):
        load_pretrained(tmp_path)


def test_untied_head_loads_and_exports(tmp_path):
    hf = hf_model(seed=3, tie_word_embeddings=False)
    with torch.no_grad():
        hf.lm_head.weight.normal_(std=0.02)  # its own weights, not a copy of wte
    hf.save_pretrained(tmp_path / "hf")
    model, _ = load_pretrained(tmp_path / "hf")
    assert not model.cfg.tie_embeddings
    assert_same_model(hf, model, 2000)
    save_pretrained(model, tmp_path / "out")
    again = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    assert_same_model(again, model, 2000)
    for name, tensor in hf.state_dict().items():  # the very same weights came back
        assert torch.equal(again.state_dict()[name], tensor), name


def test_dtype_conversion_and_none_keeps_stored(reference):
    _, folder = reference
    model, _ = load_pretrained(folder, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    model, _ = load_pretrained(folder, dtype=None, attention="readable", drop_rate=0.1)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert model.cfg.attention == "readable" and model.cfg.drop_rate == 0.1


def test_read_safetensors_equals_the_library(reference):
    _, folder = reference
    ours = read_safetensors(folder / "model.safetensors")
    theirs = load_file(folder / "model.safetensors")
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_truncated_safetensors_is_a_user_error(reference, tmp_path):
    hf, folder = reference
    hf.config.save_pretrained(tmp_path)
    data = (folder / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="cut short"):
        load_pretrained(tmp_path)


# Mismatches: one error naming the first offending tensor -----------------------------------------


def copy_with(folder, tmp_path, edit_state=None, edit_config=None):
    state = load_file(folder / "model.safetensors")
    config = json.loads((folder / "config.json").read_text())
    if edit_state:
        edit_state(state)
    if edit_config:
        edit_config(config)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


def test_unexpected_name_is_named(reference, tmp_path):
    def rename(state):
        state["transformer.h.1.mlp.c_fcx.weight"] = state.pop("transformer.h.1.mlp.c_fc.weight")

    with pytest.raises(UserError, match=r"unexpected tensor 'transformer\.h\.1\.mlp\.c_fcx\.weight'"):
        load_pretrained(copy_with(reference[1], tmp_path, rename))


def test_missing_tensor_is_named(reference, tmp_path):
    with pytest.raises(UserError, match=r"tensor 'transformer\.h\.2\.ln_2\.bias' is missing"):
        load_pretrained(copy_with(reference[1], tmp_path, lambda s: s.pop("transformer.h.2.ln_2.bias")))


def test_extra_layer_is_unexpected(reference, tmp_path):
    def add_layer(state):
        state["transformer.h.3.ln_1.weight"] = torch.ones(64)

    with pytest.raises(UserError, match=r"unexpected tensor 'transformer\.h\.3\.ln_1\.weight' \(the config has 3 layers"):
        load_pretrained(copy_with(reference[1], tmp_path, add_layer))


def test_shape_mismatch_is_named(reference, tmp_path):
    def bigger_context(config):
        config["n_positions"] = 256

    with pytest.raises(UserError, match=r"'transformer\.wpe\.weight' has shape \(128, 64\), the config needs \(256, 64\)"):
        load_pretrained(copy_with(reference[1], tmp_path, edit_config=bigger_context))


def test_linear_layout_instead_of_conv1d_is_caught(reference, tmp_path):
    def transpose(state):
        state["transformer.h.0.attn.c_attn.weight"] = state["transformer.h.0.attn.c_attn.weight"].t().contiguous()

    with pytest.raises(UserError, match=r"'transformer\.h\.0\.attn\.c_attn\.weight' has shape \(192, 64\), the config needs \(64, 192\)"):
        load_pretrained(copy_with(reference[1], tmp_path, transpose))


@pytest.mark.parametrize("key, value", [("activation_function", "relu"), ("model_type", "llama"),
                                        ("layer_norm_epsilon", 1e-6), ("n_inner", 100)])
def test_unsupported_config_is_refused(reference, tmp_path, key, value):
    with pytest.raises(UserError, match=key):
        load_pretrained(copy_with(reference[1], tmp_path, edit_config=lambda c: c.update({key: value})))


def test_folder_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(UserError, match="no model.safetensors or pytorch_model.bin"):
        load_pretrained(tmp_path)
    with pytest.raises(UserError, match="holds no model"):
        load_pretrained(tmp_path / "..")


# Model ids without a network ---------------------------------------------------------------------


def test_model_id_offline_is_one_line_with_the_download_command(monkeypatch, tmp_path):
    hub = pytest.importorskip("huggingface_hub")
    monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # no folder called "gpt2" here
    with pytest.raises(UserError) as error:
        load_pretrained("gpt2")
    message = str(error.value)
    assert "\n" not in message
    assert "hf download openai-community/gpt2" in message and "--local-dir DIR" in message


def test_model_id_without_huggingface_hub(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=r"buildllm\[hub\].*hf download openai-community/gpt2-medium"):
        load_pretrained("gpt2-medium")


def test_neither_folder_nor_model_id(tmp_path):
    with pytest.raises(UserError, match="neither a folder nor a model id"):
        load_pretrained(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        load_pretrained(tmp_path / "file")


# OpenAI's TensorFlow checkpoint ------------------------------------------------------------------


def test_tf_checkpoint_without_tensorflow_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorflow", None)
    (tmp_path / "hparams.json").write_text(json.dumps({"n_vocab": 2000, "n_ctx": 128, "n_embd": 64,
                                                       "n_head": 4, "n_layer": 3}))
    (tmp_path / "model.ckpt.index").write_bytes(b"")
    with pytest.raises(UserError, match=r"pip install 'buildllm\[tf\]'"):
        load_pretrained(tmp_path)


def test_tf_names():
    assert tf_to_hf_name("model/h0/attn/c_attn/w") == "h.0.attn.c_attn.weight"
    assert tf_to_hf_name("model/h11/ln_2/g") == "h.11.ln_2.weight"
    assert tf_to_hf_name("model/h3/mlp/c_proj/b") == "h.3.mlp.c_proj.bias"
    assert tf_to_hf_name("model/wte") == "wte.weight"
    assert tf_to_hf_name("model/ln_f/b") == "ln_f.bias"


def test_tf_checkpoint_route_with_a_stand_in_for_tensorflow(reference, monkeypatch, tmp_path):
    """TensorFlow is not installed here; a stand-in serves OpenAI's variables through the same three
    tf.train functions the loader calls, in OpenAI's layout (Conv1D weights as (1, in, out))."""
    hf, _ = reference
    variables = {"global_step": torch.tensor(7).numpy()}
    for name, tensor in hf.state_dict().items():
        if name == "lm_head.weight":
            continue
        parts = name.removeprefix("transformer.").split(".")
        if parts[0] == "h":
            parts[0:2] = [f"h{parts[1]}"]
        kind = parts.pop()
        if parts[-1] in ("wte", "wpe"):
            tf_name, array = "model/" + "/".join(parts), tensor.numpy()
        else:
            letter = {"bias": "b", "weight": "g" if parts[-1].startswith("ln") else "w"}[kind]
            tf_name = "model/" + "/".join(parts + [letter])
            array = tensor.numpy()[None] if tensor.ndim == 2 else tensor.numpy()
        variables[tf_name] = array
    train = types.SimpleNamespace(
        latest_checkpoint=lambda folder: str(Path(folder) / "model.ckpt"),
        list_variables=lambda ckpt: [(n, list(a.shape)) for n, a in variables.items()],
        load_variable=lambda ckpt, n: variables[n],
    )
    monkeypatch.setitem(sys.modules, "tensorflow", types.SimpleNamespace(train=train))
    (tmp_path / "hparams.json").write_text(json.dumps({"n_vocab": 2000, "n_ctx": 128, "n_embd": 64,
                                                       "n_head": 4, "n_layer": 3}))
    model, _ = load_pretrained(tmp_path)
    assert_same_model(hf, model, 2000)


# Export ------------------------------------------------------------------------------------------


def test_round_trip_through_save_pretrained(reference, tmp_path):
    hf, folder = reference
    model, _ = load_pretrained(folder)
    save_pretrained(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["GPT2LMHeadModel"] and config["model_type"] == "gpt2"
    assert (config["n_ctx"], config["n_embd"], config["n_layer"], config["n_head"]) == (128, 64, 3, 4)
    exported = load_file(tmp_path / "model.safetensors")
    assert exported["transformer.h.0.mlp.c_fc.weight"].shape == (64, 256)  # Conv1D layout again
    assert "lm_head.weight" not in exported  # tied
    again = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    assert_same_model(again, model, 2000)
    for name, tensor in hf.state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor), name
    reloaded, _ = load_pretrained(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), model.state_dict().values()))


def test_export_without_qkv_bias_writes_zero_bias(tmp_path):
    torch.manual_seed(0)
    model = GPTModel(GPTConfig(vocab_size=300, context_length=32, emb_dim=32, n_heads=2, n_layers=2,
                               qkv_bias=False)).eval()
    save_pretrained(model, tmp_path)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    assert_same_model(hf, model, 300)


def tiny_checkpoint(folder):
    text = "the cat sat on the mat . the dog sat on the log ."
    tokenizer = WordTokenizer.from_text(text)
    torch.manual_seed(0)
    model = GPTModel(GPTConfig(vocab_size=tokenizer.vocab_size, context_length=32, emb_dim=32, n_heads=2,
                               n_layers=2)).eval()
    save_model(folder, model, tokenizer)
    return model, tokenizer


def test_convert_cli_refuses_non_empty_out_without_force(tmp_path, capsys):
    model, tokenizer = tiny_checkpoint(tmp_path / "ckpt")
    out = tmp_path / "hf"
    assert cli.main(["convert", "--checkpoint", str(tmp_path / "ckpt"), "--to", "hf", str(out)]) == 0
    hf = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    assert_same_model(hf, model, tokenizer.vocab_size)
    loaded, loaded_tokenizer = load_pretrained(out)
    assert loaded_tokenizer.fingerprint() == tokenizer.fingerprint()
    capsys.readouterr()
    assert cli.main(["convert", "--checkpoint", str(tmp_path / "ckpt"), "--to", "hf", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert cli.main(["convert", "--checkpoint", str(tmp_path / "ckpt"), "--to", "hf", str(out), "--force"]) == 0


def test_generate_cli_with_pretrained(tmp_path, capsys):
    model, tokenizer = tiny_checkpoint(tmp_path / "ckpt")
    save_pretrained(model, tmp_path / "hf", tokenizer)
    argv = ["generate", "--pretrained", str(tmp_path / "hf"), "--prompt", "the cat", "--max-new-tokens", "5"]
    assert cli.main(argv) == 0
    expected = generate(model, [tokenizer.encode("the cat")], max_new_tokens=5)[0]
    assert capsys.readouterr().out.strip() == tokenizer.decode(expected)
    assert cli.main(argv + ["--checkpoint", str(tmp_path / "ckpt")]) == 2  # one model, not two


def test_load_pretrained_reads_buildllm_checkpoints(tmp_path):
    model, tokenizer = tiny_checkpoint(tmp_path)
    loaded, loaded_tokenizer = load_pretrained(tmp_path, drop_rate=0.2)
    assert loaded.cfg.drop_rate == 0.2 and loaded_tokenizer.fingerprint() == tokenizer.fingerprint()
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


# The real GPT-2 shapes ---------------------------------------------------------------------------


@pytest.mark.slow
def test_gpt2_124m_shapes_parity_and_round_trip(tmp_path):
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config()).eval()
    hf.save_pretrained(tmp_path / "hf")
    model, tokenizer = load_pretrained(tmp_path / "hf")
    assert model.cfg == GPTConfig.from_preset("gpt2")
    assert tokenizer.name == "gpt2"
    ids = torch.tensor([tokenizer.encode("Every effort moves you")])
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=1e-5, rtol=0)
    assert torch.equal(generate(model, ids, max_new_tokens=20), hf_greedy(hf, ids, 20))
    save_pretrained(model, tmp_path / "out")
    again = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        assert torch.equal(again(ids).logits, hf(ids).logits)


# The tokenizer in GPT-2's own files --------------------------------------------------------------

TOKENIZER_TEXTS = [
    "Hello, world! It's 2026; they'll say: \"naïve café\" costs €12.50.",
    "  leading spaces,\ttabs\n\nand blank lines   \n",
    "emoji 🤖🎉, CJK 你好世界, Greek Ελληνικά, combining é",
    "I'd've thought you're right—we've 3.14159 and 1,000,000 reasons.",
    "ROMEO:\nBut, soft! what light through yonder window breaks?",
]


def check_hf_tokenizer(folder, tokenizer):
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    for text in TOKENIZER_TEXTS:
        ids = tokenizer.encode(text)
        assert hf_tokenizer(text)["input_ids"] == ids, text
        assert hf_tokenizer.decode(ids) == text
    assert hf_tokenizer.eos_token_id == tokenizer.eot_id
    assert len(hf_tokenizer) == tokenizer.vocab_size


def test_gpt2_tokenizer_exports_as_openais_vocab_and_merges(tmp_path):
    tokenizer = get_tokenizer("gpt2")
    vocab, merges = tokenizer.to_vocab_and_merges()
    # Spot checks against OpenAI's published encoder.json and vocab.bpe.
    assert (vocab["!"], vocab["Ġthe"], vocab["<|endoftext|>"], len(vocab)) == (0, 262, 50256, 50257)
    assert merges[:3] == [("Ġ", "t"), ("Ġ", "a"), ("h", "e")] and len(merges) == 50000
    torch.manual_seed(0)
    model = GPTModel(GPTConfig(vocab_size=50257, context_length=32, emb_dim=8, n_heads=2, n_layers=1)).eval()
    save_pretrained(model, tmp_path, tokenizer)
    assert (tmp_path / "merges.txt").read_text(encoding="utf-8").splitlines()[1] == "Ġ t"
    check_hf_tokenizer(tmp_path, tokenizer)


def test_a_trained_bpe_exports_for_transformers(tmp_path):
    tokenizer = train_bpe(" ".join(TOKENIZER_TEXTS) * 20, vocab_size=400)
    torch.manual_seed(0)
    model = GPTModel(GPTConfig(vocab_size=tokenizer.vocab_size, context_length=32, emb_dim=8, n_heads=2,
                               n_layers=1)).eval()
    save_pretrained(model, tmp_path, tokenizer)
    check_hf_tokenizer(tmp_path, tokenizer)


def test_a_word_tokenizer_is_kept_in_buildllms_file_only(tmp_path):
    model, tokenizer = tiny_checkpoint(tmp_path / "ckpt")
    save_pretrained(model, tmp_path / "hf", tokenizer)
    assert (tmp_path / "hf" / "buildllm_tokenizer.json").is_file()
    assert not (tmp_path / "hf" / "vocab.json").exists()  # no GPT-2 file format for a word vocabulary
