import importlib.util
from pathlib import Path

import pytest
import torch

from buildllm.cli import main

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_shortcut_connections_keep_the_first_layers_gradient_alive():
    example = load_example("shortcut_connections")
    x = torch.tensor([[1.0, 0.0, -1.0]])
    norms = {}
    for use_shortcut in (False, True):
        torch.manual_seed(123)
        norms[use_shortcut] = example.gradient_norms(example.DeepNetwork([3, 3, 3, 3, 3, 1], use_shortcut), x)
    # The book's figures (Raschka, ch. 4): 0.0002 vs 0.22 at the first layer.
    assert norms[False][0] == pytest.approx(0.000202, abs=2e-6)
    assert norms[True][0] == pytest.approx(0.221698, abs=2e-5)
    assert norms[False][0] < norms[False][-1] / 20  # vanishing without shortcuts


def test_info_prints_the_gpt2_parameter_count(capsys):
    assert main(["info", "--preset", "gpt2"]) == 0
    out = capsys.readouterr().out
    assert "124,439,808" in out and "adamw state" in out


def test_info_on_a_config_file(tmp_path, capsys):
    from buildllm.models.gpt2 import GPTConfig

    GPTConfig.from_preset("gpt2", qkv_bias=False, tie_embeddings=False).save(tmp_path / "config.json")
    assert main(["info", "--config", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "163,009,536" in out and "38,597,376" in out


def test_info_unknown_preset_is_one_error_line(capsys):
    assert main(["info", "--preset", "gpt5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: unknown preset 'gpt5'")
