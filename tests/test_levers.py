"""The levers of the GPT-2 speedrun as GPTConfig switches (issue 14): each changes what it should and
nothing else, every path of the package still works with them on, and benchmarks/recipe.py's parts."""

import functools
import math
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import build_tiny_gpt

from buildllm.errors import UserError
from buildllm.models.blocks import ReLUSquared, RMSNorm, SwiGLU
from buildllm.models.gpt2 import GPTConfig, GPTModel, LayerNorm, count_parameters

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import recipe  # noqa: E402

# Every lever away from GPT-2 at once (the untied head included).
ALL_LEVERS = dict(positions="rope", norm="rmsnorm", qk_norm=True, activation="swiglu", zero_init=True,
                  logit_softcap=15.0, value_embeddings=True, tie_embeddings=False)

tiny = functools.partial(build_tiny_gpt, vocab_size=61, context_length=24, emb_dim=32, n_heads=4, n_layers=3)


def ids(batch=2, tokens=12, seed=0):
    return torch.randint(0, 61, (batch, tokens), generator=torch.Generator().manual_seed(seed))


def nudged(model: GPTModel, seed=1) -> GPTModel:
    """Move every weight a little (zero_init's zeros and value_mix's halves would hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


# Each lever alone ---------------------------------------------------------------------------------


@pytest.mark.parametrize("lever", [{}, *({k: v} for k, v in ALL_LEVERS.items()), ALL_LEVERS])
def test_parameter_counts_follow_the_levers(lever):
    model = tiny(**lever)
    assert count_parameters(model.cfg)["total"] == sum(p.numel() for p in model.parameters())


def test_defaults_are_gpt2():
    assert GPTConfig().non_gpt2_levers() == {} and GPTConfig(zero_init=True).non_gpt2_levers() == {}
    names = {n for n, _ in tiny().named_parameters()}
    assert "wpe.weight" in names and not any("value" in n or "q_norm" in n for n in names)
    assert count_parameters(GPTConfig.from_preset("gpt2"))["total"] == 124_439_808


@pytest.mark.parametrize("positions", ["rope", "learned"])
def test_rope_replaces_the_position_embedding_and_sees_only_distances(positions, monkeypatch):
    model = tiny(positions=positions)
    x = ids()
    before = model(x)
    if positions == "learned":  # the control: shifting GPT-2's absolute positions changes its logits
        wpe = model.wpe
        monkeypatch.setattr(wpe, "forward", lambda p: type(wpe).forward(wpe, p + 5))
        assert (model(x) - before).abs().max() > 1e-3
        return
    assert not hasattr(model, "wpe") and not any(n.startswith("wpe") for n in model.state_dict())
    assert count_parameters(model.cfg)["total"] == count_parameters(tiny().cfg)["total"] - 24 * 32
    # Every position moved 5 further on: the same distances, the same logits.
    rope = model.rope
    monkeypatch.setattr(rope, "forward", lambda p, dtype: type(rope).forward(rope, p + 5, dtype))
    torch.testing.assert_close(model(x), before, atol=1e-4, rtol=0)


def test_rmsnorm_replaces_every_layernorm():
    model = tiny(norm="rmsnorm")
    norms = [m for m in model.modules() if isinstance(m, (LayerNorm, RMSNorm))]
    assert len(norms) == 2 * 3 + 1 and all(isinstance(m, RMSNorm) for m in norms)


def test_qk_norm_makes_attention_blind_to_the_scale_of_queries_and_keys():
    model, plain = nudged(tiny(qk_norm=True)), nudged(tiny())
    x = ids()
    before, plain_before = model(x), plain(x)
    with torch.no_grad():
        for m in (model, plain):  # queries and keys 10x larger in layer 0
            m.blocks[0].att.qkv.weight[: 2 * 32] *= 10
            m.blocks[0].att.qkv.bias[: 2 * 32] *= 10
    torch.testing.assert_close(model(x), before, atol=1e-4, rtol=0)
    assert (plain(x) - plain_before).abs().max() > 1e-2  # without QK-norm the scores change


def test_relu2_computes_relu_squared():
    model = tiny(activation="relu2")
    act = model.blocks[0].ff.activation
    assert isinstance(act, ReLUSquared)
    x = torch.randn(4, 7, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(act(x), F.relu(x) ** 2, atol=0, rtol=0)
    torch.testing.assert_close(act.written_out(x), act(x), atol=0, rtol=0)


def test_swiglu_keeps_the_parameter_count_and_its_lora_targets():
    cfg = GPTConfig.from_preset("shakespeare-cpu", activation="swiglu")
    assert cfg.swiglu_hidden_dim == 352 and GPTConfig(emb_dim=768).swiglu_hidden_dim == 2048
    gelu, swiglu = count_parameters(replace(cfg, activation="gelu")), count_parameters(cfg)
    assert abs(swiglu["total"] / gelu["total"] - 1) < 0.02
    model = tiny(activation="swiglu")
    assert isinstance(model.blocks[0].ff, SwiGLU) and model.lora_targets == ("qkv", "out_proj", "gate", "up", "down")


def test_zero_init_starts_every_block_as_the_identity():
    model = tiny(zero_init=True)
    for block in model.blocks:
        assert not block.att.out_proj.weight.any() and not block.ff.proj.weight.any()
        assert block.att.qkv.weight.std() > 0.01 and block.ff.fc.weight.std() > 0.01
    x = ids()
    with torch.no_grad():  # the blocks add nothing: logits come straight from the embeddings
        expected = model.out_head(model.final_norm(model.wte(x) + model.wpe(torch.arange(12))))
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=0)


def test_softcap_bounds_the_logits_and_is_tanh_of_the_plain_ones():
    capped, plain = tiny(logit_softcap=2.0), tiny()
    with torch.no_grad():
        for m in (capped, plain):
            m.out_head.weight.mul_(10)  # logits well beyond the cap
    x = ids()
    logits, raw = capped(x), plain(x)
    assert raw.abs().max() > 4 and logits.abs().max() < 2.0
    torch.testing.assert_close(logits, 2.0 * torch.tanh(raw / 2.0), atol=1e-5, rtol=0)


def test_value_embeddings_sit_in_alternate_layers_and_mix_into_the_values():
    assert GPTConfig(n_layers=4, value_embeddings=True).value_embedding_layers() == [1, 3]
    assert GPTConfig(n_layers=3, value_embeddings=True).value_embedding_layers() == [0, 2]
    model, plain = tiny(value_embeddings=True), tiny()
    assert sorted(model.value_embeds) == ["0", "2"] and model.blocks[1].att.value_mix is None
    assert model.blocks[0].att.value_mix.tolist() == [0.5, 0.5]
    # mix (1, 0) takes the values alone: the same logits as the model without value embeddings
    with torch.no_grad():
        plain_state = {k: v for k, v in model.state_dict().items() if "value" not in k}
        plain.load_state_dict(plain_state)
        for layer in (0, 2):
            model.blocks[layer].att.value_mix.copy_(torch.tensor([1.0, 0.0]))
    x = ids()
    torch.testing.assert_close(model(x), plain(x), atol=1e-6, rtol=0)
    with torch.no_grad():
        model.blocks[2].att.value_mix.copy_(torch.tensor([1.0, 0.5]))
    assert (model(x) - plain(x)).abs().max() > 1e-3


def test_bad_lever_values_are_one_clear_error():
    with pytest.raises(UserError, match="positions must be one of 'learned', 'rope', not 'alibi'"):
        GPTConfig(positions="alibi")
    with pytest.raises(UserError, match="activation must be one of"):
        GPTConfig(activation="relu")
    with pytest.raises(UserError, match="logit_softcap must be positive"):
        GPTConfig(logit_softcap=0.0)
    with pytest.raises(UserError, match="even head width"):
        GPTConfig(emb_dim=30, n_heads=2, positions="rope")


# Every path of the package with all the levers on -------------------------------------------------


def test_readable_equals_fast_with_every_lever_on_outputs_and_gradients():
    fast, readable = nudged(tiny(**ALL_LEVERS)), tiny(**ALL_LEVERS, attention="readable")
    readable.load_state_dict(fast.state_dict())
    x = ids()
    out_fast, out_readable = fast(x), readable(x)
    torch.testing.assert_close(out_fast, out_readable, atol=1e-5, rtol=0)
    out_fast.square().sum().backward()
    out_readable.square().sum().backward()
    for (name, p), q in zip(fast.named_parameters(), readable.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("attention", ["fast", "readable"])
def test_kv_cache_and_left_padding_with_rope_give_the_logits_of_a_full_pass(attention):
    model = nudged(tiny(**ALL_LEVERS, attention=attention))
    row = ids(1, 7, seed=3)
    batch = torch.cat([ids(1, 10, seed=4), torch.cat([torch.zeros(1, 3, dtype=torch.long), row], 1)])
    padding = torch.zeros(2, 10, dtype=torch.bool)
    padding[1, :3] = True
    with torch.no_grad():
        alone, full = model(row), model(batch, padding=padding)
        torch.testing.assert_close(full[1, 3:], alone[0], atol=1e-5, rtol=0)
        cache = model.new_kv_cache(2, 12)
        pieces = [model(batch[:, :5], kv_cache=cache, padding=padding[:, :5])]
        pieces += [model(batch[:, t : t + 1], kv_cache=cache) for t in range(5, 10)]
    torch.testing.assert_close(torch.cat(pieces, 1)[:, 3:], full[:, 3:], atol=1e-5, rtol=0)


def test_generation_is_the_same_with_and_without_the_cache():
    from buildllm.generation.sampling import generate

    model = nudged(tiny(**ALL_LEVERS))
    prompts = [ids(1, 5, seed=5)[0].tolist(), ids(1, 2, seed=6)[0].tolist()]  # left-padded together
    cached = generate(model, prompts, max_new_tokens=30, temperature=0)  # beyond the 24-token window
    recomputed = generate(model, prompts, max_new_tokens=30, temperature=0, use_cache=False)
    assert cached == recomputed and len(cached[0]) == 5 + 30


def test_muon_takes_the_new_block_matrices_and_adamw_the_value_embeddings():
    from buildllm.training.config import TrainConfig
    from buildllm.training.optim import make_optimizer

    model = tiny(**ALL_LEVERS)
    optimizer = make_optimizer(model, TrainConfig(optimizer="muon", lr=1e-3), torch.device("cpu"))
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)] for g in optimizer.named["muon"].param_groups for p in g["params"]}
    adamw = {names[id(p)] for g in optimizer.named["adamw"].param_groups for p in g["params"]}
    assert muon | adamw == set(names.values()) and not muon & adamw
    assert muon == {f"blocks.{i}.{m}.weight" for i in range(3)
                    for m in ("att.qkv", "att.out_proj", "ff.gate", "ff.up", "ff.down")}
    assert {"value_embeds.0.weight", "value_embeds.2.weight", "wte.weight", "out_head.weight",
            "blocks.0.att.q_norm.weight", "blocks.0.att.value_mix", "final_norm.weight"} <= adamw


def test_hugging_face_gpt2_refuses_the_levers_it_cannot_hold(tmp_path):
    from buildllm.weights.huggingface import save_pretrained
    from buildllm.weights.loader import load_model

    with pytest.raises(UserError, match=r"^a Hugging Face GPT-2 \(GPT2LMHeadModel\) cannot hold positions='rope', "
                                        r"norm='rmsnorm', .*value_embeddings=True: keep"):
        save_pretrained(tiny(**ALL_LEVERS), tmp_path / "hf")
    assert not (tmp_path / "hf").exists()  # nothing written
    # zero_init and an untied head are GPT-2's shape: exported, and read back with the same logits
    model = nudged(tiny(zero_init=True, tie_embeddings=False))
    save_pretrained(model, tmp_path / "ok")
    back, _ = load_model(tmp_path / "ok")
    torch.testing.assert_close(back(ids()), model(ids()), atol=1e-5, rtol=0)
    with pytest.raises(UserError, match="cannot hold activation='relu2'"):  # nor is one read into a lever
        load_model(tmp_path / "ok", activation="relu2")


def test_a_levered_model_round_trips_through_its_own_checkpoint(tmp_path):
    from buildllm.weights.checkpoint import save_model
    from buildllm.weights.loader import load_model

    model = nudged(tiny(**ALL_LEVERS))
    save_model(tmp_path / "ckpt", model)
    back, _ = load_model(tmp_path / "ckpt")
    assert back.cfg == model.cfg
    torch.testing.assert_close(back(ids()), model(ids()), atol=0, rtol=0)


@pytest.mark.parametrize("precision, tolerance", [("int8", 0.02), ("int4", 0.2)])
def test_quantized_levered_model_stays_close(precision, tolerance):
    from buildllm.generation.quantization import quantize

    model = nudged(tiny(**ALL_LEVERS))
    x = ids()
    with torch.no_grad():
        reference = model(x)
        out = quantize(model, precision)(x)
    assert not any(type(m) is torch.nn.Linear for m in model.modules())
    assert (out - reference).abs().max() / reference.abs().max() < tolerance


def test_lora_adapts_a_levered_model_and_merges_back():
    from buildllm.finetune.lora import apply_lora, lora_layers, merge_lora

    model = nudged(tiny(**ALL_LEVERS))
    x = ids()
    base = model(x).detach()
    apply_lora(model, rank=2, alpha=4)
    assert {n.rpartition(".")[2] for n in lora_layers(model)} == {"qkv", "out_proj", "gate", "up", "down"}
    torch.testing.assert_close(model(x), base, atol=0, rtol=0)  # B = 0: the base model
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora.B.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
    adapted = model(x).detach()
    assert (adapted - base).abs().max() > 1e-3
    torch.testing.assert_close(merge_lora(model)(x), adapted, atol=1e-5, rtol=0)


def test_training_with_every_lever_and_muon_learns_and_saves_them(play_corpus, tmp_path):
    from buildllm.training.config import TrainConfig
    from buildllm.training.engine import train
    from buildllm.weights.loader import load_model

    files = play_corpus("macbeth", 6000, prepared=True)
    model = dict(emb_dim=32, n_heads=4, n_layers=2, context_length=32, **ALL_LEVERS)
    result = train(TrainConfig(data=files["prepared"], out=str(tmp_path / "run"), preset="nano", model=model,
                               batch_size=4, max_steps=12, warmup_steps=1, eval_interval=6, eval_iters=2, lr=1e-2,
                               optimizer="muon", progress=False, sample_tokens=0, dtype="fp32", device="cpu"))
    trained, _ = load_model(tmp_path / "run")
    assert trained.cfg == GPTConfig(vocab_size=trained.cfg.vocab_size, **model)
    assert not torch.equal(trained.out_head.weight, trained.wte.weight)  # untied, each trained its own way
    assert trained.blocks[0].att.out_proj.weight.any()  # zero at the start, no longer
    assert result.val_loss < math.log(trained.cfg.vocab_size) - 0.5  # a fresh model's is about log(vocab)


# benchmarks/recipe.py ------------------------------------------------------------------------------


def test_recipe_runs_are_the_old_default_with_one_change_each():
    args = recipe.parse_args(["--only", "muon,rope", "--minutes", "0.5"])
    assert args.runs == ["rope", "muon"]  # in the table's order
    rope, muon, old, new = (recipe.run_config(n, args) for n in ("rope", "muon", "default", "new"))
    assert old.preset == "shakespeare-cpu" and old.optimizer == "adamw" and old.model == {} and old.data is None
    assert new.preset is None and new.optimizer is None and new.model == {}  # what `buildllm train` resolves
    assert rope.model == {"positions": "rope"} and rope.preset == "shakespeare-cpu" and rope.optimizer == "adamw"
    assert muon.optimizer == "muon" and muon.preset == "shakespeare-cpu"
    assert rope.max_minutes == 0.5 and rope.out.endswith("recipe/rope") and rope.force
    for name in recipe.LEVERS:  # every lever is a real GPTConfig/TrainConfig setting
        cfg = recipe.run_config(name, args)
        GPTConfig.from_preset(cfg.preset, **cfg.model)
        assert set(recipe.RUNS[name][1]) <= {"model", "compile", "optimizer"}
    with pytest.raises(SystemExit, match="unknown run"):
        recipe.parse_args(["--only", "rope,alibi"])


def test_recipe_on_a_users_text(tmp_path):
    text = tmp_path / "poem.txt"
    text.write_text("O\n")
    args = recipe.parse_args(["--text", str(text), "--minutes", "2"])
    new, old, nanogpt = (recipe.run_config(n, args) for n in args.runs)
    assert all(c.data == str(text) and c.max_minutes == 2 for c in (new, old, nanogpt))
    assert new.preset is None and new.tokenizer is None  # sized when it runs
    assert (old.preset, old.tokenizer, old.optimizer, old.keep_best) == ("shakespeare-cpu", "bpe:4096", "adamw", False)
    assert (nanogpt.tokenizer, nanogpt.context_length, nanogpt.batch_size, nanogpt.lr, nanogpt.dtype) == \
        ("bpe:257", 64, 12, 1e-3, "fp32")
    assert recipe.markers(args)[0] == "<!-- recipe.py --text poem.txt: begin -->"


def test_recipe_table_and_readme_section(tmp_path):
    from buildllm.training.engine import TrainResult

    def result(bpc, steps):
        return TrainResult(Path("x"), steps, 0, None, None, bpc, None, 60.0, 15000.0)

    text = recipe.table({"default": result(2.085, 3659), "rope": result(2.050, 3600)})
    assert "| rope | rotary positions, no learned position embedding | 2.050 | -0.035 | 15,000 | 3,600 |" in text
    assert "| default | the old default" in text
    readme = tmp_path / "README.md"
    readme.write_text("# Benchmarks\n\nabove\n")
    recipe.write_readme(f"{recipe.BEGIN}\nfirst\n{recipe.END}", readme)
    recipe.write_readme(f"{recipe.BEGIN}\nsecond\n{recipe.END}", readme)  # replaces its own section
    content = readme.read_text()
    assert content.startswith("# Benchmarks\n\nabove\n") and "second" in content and "first" not in content
    assert content.count(recipe.BEGIN) == 1
