import pytest
import torch

from buildllm.errors import UserError
from buildllm.models.gpt2 import GPTConfig, GPTModel
from buildllm.weights.checkpoint import WEIGHTS, load_model, save_model

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
    with pytest.raises(UserError, match="model.txt is a file; give the checkpoint folder"):
        load_model(tmp_path / "model.txt")
    with pytest.raises(UserError, match="model.safetensors is missing"):
        load_model(tmp_path)
