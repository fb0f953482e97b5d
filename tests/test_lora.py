"""LoRA: exact start at the base model, exact merge, only adapters train, adapters save on their own."""

import copy
import math
from functools import partial

import pytest
import torch
from safetensors.torch import load_file

from buildllm.errors import UserError
from buildllm.finetune.lora import (
    ADAPTER_WEIGHTS,
    ALL_TARGETS,
    LinearWithLoRA,
    LoRALayer,
    apply_lora,
    count_parameters,
    load_adapters,
    lora_layers,
    merge_lora,
    save_adapters,
)
from buildllm.models.gpt2 import GPTConfig, GPTModel
from buildllm.weights.checkpoint import save_model
from buildllm.weights.loader import load_model

CFG = GPTConfig.from_preset("nano", vocab_size=97, context_length=16, emb_dim=32, n_heads=2, n_layers=2)


@pytest.fixture
def tiny_model(tiny_gpt):
    return partial(tiny_gpt, **CFG.to_dict())


def tokens(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, CFG.vocab_size, (3, 12), generator=torch.Generator().manual_seed(seed))


def perturb_adapters(model, seed: int = 2) -> None:
    """Make every update non-zero (B starts at zero) so merging has something to fold in."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora.B.copy_(torch.randn(layer.lora.B.shape, generator=g) * 0.05)


def test_lora_layer_init_and_scaling():
    torch.manual_seed(0)
    layer = LoRALayer(in_dim=10, out_dim=6, rank=4, alpha=8)
    # kaiming_uniform_(a=sqrt(5)) on a (10, 4) tensor: fan_in = 4, bound = 1/sqrt(4); one uniform_ draw.
    torch.manual_seed(0)
    expected_a = torch.empty(10, 4).uniform_(-1 / math.sqrt(4), 1 / math.sqrt(4))
    assert torch.equal(layer.A, expected_a)
    assert torch.equal(layer.B, torch.zeros(4, 6))
    with torch.no_grad():
        layer.B.normal_()
    x = torch.randn(5, 10)
    torch.testing.assert_close(layer(x), (8 / 4) * (x @ layer.A @ layer.B))
    torch.testing.assert_close(x @ layer.delta_weight().T, layer(x))


def test_at_init_the_lora_model_equals_the_base_model_exactly(tiny_model):
    base = tiny_model()
    adapted = apply_lora(copy.deepcopy(base), rank=4, alpha=8, targets=ALL_TARGETS)
    wrapped = lora_layers(adapted)
    # qkv, out_proj, fc, proj in each of 2 blocks, plus the output head
    assert len(wrapped) == 4 * CFG.n_layers + 1 and isinstance(adapted.out_head, LinearWithLoRA)
    assert torch.equal(adapted(tokens()), base(tokens()))


def test_only_lora_parameters_get_gradients(tiny_model):
    model = apply_lora(tiny_model(), rank=2, alpha=4)
    perturb_adapters(model)  # with B = 0 the gradient of A would be zero
    loss = model(tokens()).logsumexp(-1).mean()
    loss.backward()
    for name, p in model.named_parameters():
        is_lora = ".lora." in name
        assert p.requires_grad == is_lora, name
        if is_lora:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_trainable_parameter_count(tiny_model):
    model = apply_lora(tiny_model(), rank=3, alpha=3)
    d = CFG.emb_dim
    # rank * (in + out) per adapted layer: qkv d->3d, out_proj d->d, fc d->4d, proj 4d->d
    per_block = 3 * ((d + 3 * d) + (d + d) + (d + 4 * d) + (4 * d + d))
    trainable, total = count_parameters(model)
    assert trainable == CFG.n_layers * per_block
    assert total == sum(p.numel() for p in tiny_model().parameters()) + trainable


def test_merged_equals_unmerged_and_saves_as_a_plain_model(tiny_model, tmp_path):
    model = apply_lora(tiny_model(), rank=4, alpha=8)
    perturb_adapters(model)
    with torch.no_grad():
        unmerged = model(tokens())
    assert (unmerged - tiny_model()(tokens())).abs().max() > 1e-3  # the adapters do change the output
    merged = merge_lora(model)
    assert not lora_layers(merged)
    assert all(type(m).__name__ != "LinearWithLoRA" for m in merged.modules())
    with torch.no_grad():
        torch.testing.assert_close(merged(tokens()), unmerged, atol=1e-5, rtol=0)
    save_model(tmp_path, merged)
    reloaded, _ = load_model(tmp_path)
    with torch.no_grad():
        assert torch.equal(reloaded(tokens()), merged(tokens()))


def test_merging_an_adapted_tied_head_unties_it(tiny_model):
    base = tiny_model()
    model = apply_lora(copy.deepcopy(base), rank=2, alpha=2, targets=("out_head",))
    perturb_adapters(model)
    with torch.no_grad():
        unmerged = model(tokens())
    merged = merge_lora(model)
    assert not merged.cfg.tie_embeddings
    assert merged.out_head.weight is not merged.wte.weight
    assert torch.equal(merged.wte.weight, base.wte.weight)  # the embedding is not changed by the merge
    with torch.no_grad():
        torch.testing.assert_close(merged(tokens()), unmerged, atol=1e-5, rtol=0)


def test_adapter_file_round_trip(tiny_model, tmp_path):
    model = apply_lora(tiny_model(), rank=4, alpha=8, targets=("qkv", "fc"))
    perturb_adapters(model)
    save_adapters(tmp_path, model)
    state = load_file(tmp_path / ADAPTER_WEIGHTS)
    assert set(state) == {f"blocks.{i}.{m}.lora.{p}" for i in range(2) for m in ("att.qkv", "ff.fc") for p in "AB"}
    assert sum(t.numel() for t in state.values()) < sum(p.numel() for p in tiny_model().parameters()) / 10
    restored = load_adapters(tmp_path, tiny_model())
    for name, p in restored.named_parameters():
        assert p.requires_grad == (".lora." in name)
    with torch.no_grad():
        assert torch.equal(restored(tokens()), model(tokens()))


def test_adapters_that_do_not_fit_are_an_error(tiny_model, tmp_path):
    model = apply_lora(tiny_model(), rank=2, alpha=2)
    save_adapters(tmp_path, model)
    other = GPTModel(GPTConfig.from_preset("nano", vocab_size=97, context_length=16, emb_dim=32, n_layers=3))
    with pytest.raises(UserError, match="does not fit"):
        load_adapters(tmp_path, other)


@pytest.mark.parametrize(
    "rank, alpha, targets, message",
    [(0, 1, ("qkv",), "rank"), (2, 0, ("qkv",), "alpha"), (2, 2, ("attn",), "unknown LoRA target")],
)
def test_bad_settings_are_user_errors(tiny_model, rank, alpha, targets, message):
    with pytest.raises(UserError, match=message):
        apply_lora(tiny_model(), rank, alpha, targets)
