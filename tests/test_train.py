"""The pretraining loop: schedule, optimizer groups, both data modes, the run folder, exact resume
after SIGKILL, and every kind of bad input."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from buildllm.cli import main as cli_main
from buildllm.data.shakespeare import shakespeare_plays
from buildllm.errors import UserError
from buildllm.models.gpt2 import GPTConfig, GPTModel
from buildllm.tokenizer import train_bpe
from buildllm.training.config import DEFAULTS, TrainConfig, cli_config, resolve
from buildllm.training.engine import train
from buildllm.training.optim import learning_rate, param_groups
from buildllm.weights.loader import load_model

TEXT = shakespeare_plays()["macbeth"][:24000]
TINY_MODEL = {"emb_dim": 32, "n_heads": 2, "n_layers": 2, "context_length": 32}


@pytest.fixture(scope="module")
def files(play_corpus):
    """A short play (book mode), its BPE tokenizer, and the same text prepared (scale mode)."""
    return play_corpus("macbeth", len(TEXT), prepared=True)


def tiny(files, out, **changes) -> TrainConfig:
    """A model and batches small enough for a step in milliseconds."""
    base = dict(data=files["prepared"], out=str(out), preset="nano", model=dict(TINY_MODEL), optimizer="adamw", batch_size=4,
                context_length=32, max_steps=6, warmup_steps=2, eval_interval=3, eval_iters=2, lr=3e-3,
                progress=False, sample_tokens=0, dtype="fp32", device="cpu")
    return TrainConfig(**{**base, **changes})


def records(run, kind=None):
    lines = (Path(run) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if kind is None or r["kind"] == kind]


def steps_logged(run) -> int:
    """Step records of a run still being written (its last line may be cut)."""
    path = Path(run) / "metrics.jsonl"
    return path.read_text().count('"kind": "step"') if path.is_file() else 0


# Configuration ------------------------------------------------------------------------------------


def test_config_file_yaml_json_and_unknown_keys(tmp_path):
    (tmp_path / "c.yaml").write_text("max_steps: 7\nlr: 1.0e-3\nmodel:\n  n_layers: 3\nno_decay: [wpe, wte]\n")
    cfg = TrainConfig.from_file(tmp_path / "c.yaml")
    assert (cfg.max_steps, cfg.lr, cfg.model, cfg.no_decay) == (7, 1e-3, {"n_layers": 3}, ("wpe", "wte"))
    (tmp_path / "c.json").write_text(json.dumps({"batch_size": 3}))
    assert TrainConfig.from_file(tmp_path / "c.json").batch_size == 3
    (tmp_path / "bad.yaml").write_text("max_stepz: 7\n")
    with pytest.raises(UserError, match=r"unknown training config key\(s\) max_stepz; valid keys: .*max_steps"):
        TrainConfig.from_file(tmp_path / "bad.yaml")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(UserError, match="not valid json"):
        TrainConfig.from_file(tmp_path / "broken.json")


def test_resolve_fills_each_modes_defaults(files, tmp_path):
    bundled = resolve(TrainConfig())
    assert (bundled.preset, bundled.tokenizer, bundled.out) == ("speedrun-cpu", "bpe:4096", "runs/shakespeare")
    assert (bundled.optimizer, bundled.keep_best) == ("muon", True)
    assert bundled.context_length == GPTConfig.from_preset("speedrun-cpu").context_length
    assert bundled.max_minutes == DEFAULTS["bundled"]["max_minutes"]
    assert resolve(TrainConfig(max_steps=50)).max_minutes is None  # steps given: step-bounded
    book = resolve(TrainConfig(data=files["book"], recipe="book"))  # the book's chapter 5 settings
    assert (book.lr, book.weight_decay, book.batch_size, book.context_length) == (4e-4, 0.1, 2, 256)
    assert (book.tokenizer, book.preset, book.model["qkv_bias"], book.out) == ("gpt2", "gpt2", False, "runs/macbeth")
    scale = resolve(TrainConfig(data=files["prepared"], max_steps=10, preset="nano", eval_interval=5))
    assert scale.tokenizer is None and scale.warmup_steps == 1  # a short run still decays
    assert scale.save_interval == scale.eval_interval
    assert resolve(TrainConfig(data=files["prepared"], parallel="fsdp")).optimizer == "adamw"  # Muon needs whole matrices


def test_example_config_is_the_default_run(eager_training):
    example = TrainConfig.from_file(Path(__file__).resolve().parents[1] / "examples" / "shakespeare.yaml")
    assert resolve(example) == resolve(TrainConfig(compile=eager_training["bundled"]))  # (the suite trains eager)


def test_cli_config_layers_file_set_and_options(tmp_path):
    (tmp_path / "c.yaml").write_text("lr: 0.01\nbatch_size: 3\nmodel: {n_layers: 3}\n")
    cfg = cli_config(str(tmp_path / "c.yaml"), {"batch_size": 5, "lr": None},
                     ["model.emb_dim=64", "min_lr_ratio=0.05"])
    assert (cfg.lr, cfg.batch_size, cfg.min_lr_ratio) == (0.01, 5, 0.05)
    assert cfg.model == {"n_layers": 3, "emb_dim": 64}


def test_learning_rate_warmup_then_cosine_to_the_floor():
    cfg = TrainConfig(lr=1e-3, warmup_steps=10, min_lr_ratio=0.1, lr_schedule="cosine")
    assert learning_rate(1, cfg, 110) == pytest.approx(1e-4)
    assert learning_rate(10, cfg, 110) == pytest.approx(1e-3)
    assert learning_rate(60, cfg, 110) == pytest.approx(0.55e-3)  # halfway down
    assert learning_rate(110, cfg, 110) == pytest.approx(1e-4)
    # a time limit half spent at step 20 puts the schedule halfway, not at 10%
    assert learning_rate(20, cfg, 110, time_fraction=0.5) == pytest.approx(0.55e-3)
    assert learning_rate(50, TrainConfig(lr=1e-3, warmup_steps=10, lr_schedule="constant"), 110) == 1e-3


def test_weight_decay_only_on_matrices_and_not_on_positions():
    model = GPTModel(GPTConfig(vocab_size=50, **TINY_MODEL))
    decay, keep = param_groups(model, 0.1, ("wpe",))
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in keep["params"]}
    assert (decay["weight_decay"], keep["weight_decay"]) == (0.1, 0.0)
    assert "wte.weight" in decayed and "blocks.0.att.qkv.weight" in decayed and "blocks.1.ff.fc.weight" in decayed
    assert "wpe.weight" in kept and "blocks.0.att.qkv.bias" in kept and "final_norm.scale" in kept
    assert all(p.dim() >= 2 for p in decay["params"])
    assert len(decayed) + len(kept) == len(list(model.parameters()))


def test_rng_states_round_trip_through_a_weights_only_load(tmp_path):
    import random

    import numpy as np

    from buildllm.training.run_folder import rng_state, set_rng_state

    torch.save(rng_state(), tmp_path / "rng.pt")
    draws = (random.random(), np.random.rand(), np.random.randn(), torch.rand(1).item())
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.rand(), np.random.randn(), torch.rand(1).item()) == draws


# Training ----------------------------------------------------------------------------------------


def test_scale_mode_writes_a_complete_run(files, tmp_path):
    run = tmp_path / "run"
    result = train(tiny(files, run, max_steps=9, keep_last=2, sample_tokens=4))
    for name in ("train_config.json", "metrics.jsonl", "loss.png", "model.safetensors", "config.json",
                 "tokenizer.json", "best/model.safetensors"):
        assert (run / name).is_file(), name
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000006", "step-00000009"]
    steps, evals, final = records(run, "step"), records(run, "eval"), records(run, "final")
    assert [r["step"] for r in steps] == list(range(1, 10)) and [r["step"] for r in evals] == [3, 6, 9]
    keys = {"step", "tokens_seen", "train_loss", "val_loss", "lr", "tokens_per_sec"}
    assert all(keys <= set(r) for r in steps + evals + final)
    assert steps[-1]["tokens_seen"] == 9 * 4 * 32 == result.tokens_seen
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]  # it learns
    meta = json.loads((Path(files["prepared"]) / "meta.json").read_text())["val"]
    assert final[0]["val_bits_per_char"] == pytest.approx(
        final[0]["val_loss"] * (meta["tokens"] - 1) / meta["characters"] / math.log(2))  # all but the first scored
    assert result.val_bits_per_char == final[0]["val_bits_per_char"]
    # the folder alone is enough to generate
    model, tokenizer = load_model(run)
    assert tokenizer.vocab_size == model.cfg.vocab_size == 300
    saved = json.loads((run / "train_config.json").read_text())
    assert saved["max_steps"] == 9 and "resume" not in saved and TrainConfig.from_dict(saved).lr == 3e-3


def test_book_mode_epochs_and_gradient_accumulation(files, tmp_path):
    cfg = tiny(files, tmp_path / "book", data=files["book"], recipe="book", tokenizer=files["tokenizer"], max_steps=None,
               epochs=2, grad_accum=2, batch_size=8, eval_interval=50)
    result = train(cfg)
    n_tokens = len(train_bpe(TEXT, 300).encode(TEXT[: int(len(TEXT) * 0.9)]))
    windows = (n_tokens - 32 - 1) // 32 + 1  # stride = context_length
    assert result.steps == math.ceil(2 * (windows // 8) / 2)
    assert records(tmp_path / "book", "eval")[-1]["step"] == result.steps


def test_time_limit_ends_the_run_early_but_complete(files, tmp_path):
    result = train(tiny(files, tmp_path / "run", max_steps=1000, max_minutes=1e-6))
    assert result.steps == 1 and result.val_bits_per_char is not None
    assert [r["step"] for r in records(tmp_path / "run", "eval")] == [1]
    assert (tmp_path / "run/checkpoints/step-00000001").is_dir()


def test_gradient_accumulation_matches_the_big_batch(files, tmp_path):
    """4 sequences at once, or 2 micro-batches of 2: the same windows, the same update."""
    # No key bias: its true gradient is 0 (softmax ignores a constant), and Adam would blow its
    # rounding noise up to full-size steps.
    model = {**TINY_MODEL, "qkv_bias": False}
    big = train(tiny(files, tmp_path / "big", max_steps=3, final_eval=False, model=model))
    small = train(tiny(files, tmp_path / "acc", max_steps=3, batch_size=2, grad_accum=2, final_eval=False,
                       model=model))
    a, b = load_file(big.out / "model.safetensors"), load_file(small.out / "model.safetensors")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-5, msg=name)


def test_resume_in_process_across_an_epoch_boundary(files, tmp_path):
    """Book mode (constant lr): 5 steps, then 5 more on resume == 10 steps straight."""
    common = dict(data=files["book"], recipe="book", tokenizer=files["tokenizer"], batch_size=64, eval_interval=5,
                  lr_schedule="constant", model={**TINY_MODEL, "drop_rate": 0.1})
    straight = train(tiny(files, tmp_path / "a", max_steps=10, **common))
    train(tiny(files, tmp_path / "b", max_steps=5, **common))
    resumed = train(tiny(files, tmp_path / "b", max_steps=10, resume=True, **common))
    assert (tmp_path / "a/model.safetensors").read_bytes() == (tmp_path / "b/model.safetensors").read_bytes()
    assert [r["train_loss"] for r in records(tmp_path / "a")] == [r["train_loss"] for r in records(tmp_path / "b")]
    assert resumed.val_loss == straight.val_loss


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_sigkill_then_resume_is_bit_identical(files, tmp_path, optimizer):
    """Kill -9 a CLI run mid-training, resume it: same weights and losses as a run never killed
    (with Muon too: its momentum buffers are part of the checkpoint)."""
    args = ["--data", files["prepared"], "--preset", "nano", "--batch-size", "4", "--context-length", "32",
            "--max-steps", "150", "--warmup-steps", "10", "--eval-interval", "25", "--eval-iters", "2",
            "--save-interval", "10", "--dtype", "fp32", "--device", "cpu", "--no-progress",
            "--set", "sample_tokens=0", "--set", "model.drop_rate=0.1", "--grad-accum", "2",
            "--set", f"optimizer={optimizer}", "--no-compile"]
    args += [a for k, v in TINY_MODEL.items() for a in ("--set", f"model.{k}={v}")]
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "buildllm.cli", "train", *args, "--out", str(killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if steps_logged(killed) >= 37:
            break
        time.sleep(0.005)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 37 <= steps_logged(killed) < 150 and '"final"' not in (killed / "metrics.jsonl").read_text()

    assert cli_main(["train", *args, "--out", str(killed), "--resume"]) == 0
    assert cli_main(["train", *args, "--out", str(tmp_path / "straight")]) == 0
    a, b = load_file(killed / "model.safetensors"), load_file(tmp_path / "straight/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for kind in ("step", "eval", "final"):
        assert [r["step"] for r in records(killed, kind)] == [r["step"] for r in records(tmp_path / "straight", kind)]
        assert torch.equal(torch.tensor([[r["train_loss"], r["val_loss"] or 0.0] for r in records(killed, kind)]),
                           torch.tensor([[r["train_loss"], r["val_loss"] or 0.0] for r in records(tmp_path / "straight", kind)]))


def test_lora_on_a_trained_model_changes_only_adapters(files, tmp_path):
    base = train(tiny(files, tmp_path / "base", max_steps=2, final_eval=False))
    run = tmp_path / "lora"
    train(tiny(files, run, preset=None, model={}, init_from=str(base.out), lora_rank=2, max_steps=3, lr=1e-2,
               final_eval=False))
    before, after = load_file(base.out / "model.safetensors"), load_file(run / "model.safetensors")
    assert after.keys() == before.keys()  # merged: a plain model folder
    assert not torch.equal(before["blocks.0.att.qkv.weight"], after["blocks.0.att.qkv.weight"])
    assert torch.equal(before["wte.weight"], after["wte.weight"])  # not a LoRA target: frozen
    with pytest.raises(UserError, match="init_from"):
        train(tiny(files, tmp_path / "x", lora_rank=2))


# Bad input ---------------------------------------------------------------------------------------


def test_out_folder_holding_a_run_needs_resume_or_force(files, tmp_path):
    cfg = tiny(files, tmp_path / "run", max_steps=2, final_eval=False)
    train(cfg)
    with pytest.raises(UserError, match="already holds a training run: pass --resume .* --force"):
        train(cfg)
    with pytest.raises(UserError, match="different configuration.*lr"):
        train(cfg.replace(resume=True, lr=1e-2))
    (tmp_path / "run" / "notes.txt").write_text("mine")
    train(cfg.replace(force=True, max_steps=3))
    assert records(tmp_path / "run", "step")[-1]["step"] == 3 and len(records(tmp_path / "run", "step")) == 3
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"  # only the run's own files go
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x").write_text("x")
    with pytest.raises(UserError, match="not empty and holds no training run"):
        train(cfg.replace(out=str(tmp_path / "other")))
    with pytest.raises(UserError, match="no training run to resume"):
        train(cfg.replace(out=str(tmp_path / "empty"), resume=True))


def test_data_smaller_than_one_batch(files, tmp_path):
    (tmp_path / "short.txt").write_text(TEXT[:1500])
    with pytest.raises(UserError, match="fewer than one batch of 64"):
        train(tiny(files, tmp_path / "r", data=str(tmp_path / "short.txt"), recipe="book", tokenizer=files["tokenizer"],
                   batch_size=64))
    (tmp_path / "tiny.txt").write_text("To be, or not to be.")
    with pytest.raises(UserError, match="fewer than one window"):
        train(tiny(files, tmp_path / "r2", data=str(tmp_path / "tiny.txt"), recipe="book", tokenizer=files["tokenizer"]))
    assert not (tmp_path / "r").exists() and not (tmp_path / "r2").exists()  # refused before writing


def test_context_longer_than_the_model_and_unknown_names(files, tmp_path):
    with pytest.raises(UserError, match="context_length 64 exceeds the model's 32"):
        train(tiny(files, tmp_path / "r", context_length=64))
    with pytest.raises(UserError, match="unknown preset 'gpt5'; choose one of: gpt2.*nano"):
        train(tiny(files, tmp_path / "r", preset="gpt5"))
    with pytest.raises(UserError, match="valid keys: .*emb_dim"):
        train(tiny(files, tmp_path / "r", model={"layers": 2}))
    with pytest.raises(UserError, match="unknown training config key"):
        train({"data": files["prepared"], "stepz": 3})
    assert not (tmp_path / "r").exists()  # refused before writing anything


def test_nan_loss_stops_naming_the_step_and_keeps_the_checkpoint(files, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(UserError, match=r"loss became (nan|inf) at step \d+: training diverged; the last good checkpoint"):
        train(tiny(files, run, lr=1e30, warmup_steps=0, grad_clip=0.0, save_interval=1, max_steps=20))
    diverged_at = len(records(run, "step")) + 1
    assert (run / "checkpoints" / f"step-{diverged_at - 1:08d}").is_dir()
    load_model(run)  # the last good weights are still readable


def test_corrupt_checkpoint_on_resume_is_an_error_and_nothing_is_deleted(files, tmp_path):
    cfg = tiny(files, tmp_path / "run", max_steps=4, eval_interval=2, final_eval=False)
    train(cfg)
    state = tmp_path / "run/checkpoints/step-00000004/state.pt"
    state.write_bytes(state.read_bytes()[:1000])
    before = sorted(str(p) for p in (tmp_path / "run").rglob("*"))
    with pytest.raises(UserError, match="step-00000004 is corrupt or truncated: state.pt"):
        train(cfg.replace(resume=True, max_steps=6))
    assert sorted(str(p) for p in (tmp_path / "run").rglob("*")) == before


def test_cli_errors_are_one_line_and_exit_2(files, tmp_path, capsys):
    common = ["train", "--data", files["prepared"], "--out", str(tmp_path / "r"), "--no-progress"]
    for extra, message in (
        (["--preset", "gpt5"], "unknown preset 'gpt5'"),
        (["--set", "stepz=3"], "unknown training config key(s) stepz"),
        (["--preset", "nano", "--context-length", "4096"], "exceeds the model's 128"),
        (["--set", "lr=-1"], "lr must be a positive number"),
    ):
        assert cli_main(common + extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_buildllm_train_is_the_function_in_any_import_order():
    import buildllm
    import buildllm.training.config as config_module
    import buildllm.training.engine as module

    assert buildllm.train is module.train and buildllm.TrainConfig is config_module.TrainConfig


# Muon ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_muon_takes_the_blocks_matrices_and_adamw_the_rest(arch):
    from buildllm.models import registry
    from buildllm.training.optim import Optimizers, make_optimizer

    cfg = registry.preset("nano" if arch == "gpt2" else "llama-nano", vocab_size=50, tie_embeddings=arch == "gpt2")
    torch.manual_seed(0)
    model = registry.build(cfg)
    optimizer = make_optimizer(model, TrainConfig(optimizer="muon", lr=1e-3, muon_lr=0.02), torch.device("cpu"))
    assert isinstance(optimizer, Optimizers)
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)] for g in optimizer.named["muon"].param_groups for p in g["params"]}
    adamw = {names[id(p)] for g in optimizer.named["adamw"].param_groups for p in g["params"]}
    assert muon | adamw == set(names.values()) and not muon & adamw
    assert muon == {n for n, p in model.named_parameters() if n.startswith("blocks.") and p.dim() == 2}
    assert {"wte.weight", "final_norm.weight" if arch == "llama" else "final_norm.scale"} <= adamw
    assert ("out_head.weight" in adamw) == (arch == "llama")  # untied: its own matrix, AdamW's; tied: it is wte
    # each group its own learning rate: the schedule scales Muon's peak by the same factor
    assert [g["lr_scale"] for g in optimizer.named["muon"].param_groups] == [20.0]


def test_muon_trains_and_resumes_in_process(files, tmp_path):
    common = dict(optimizer="muon", muon_lr=0.02, max_steps=6, eval_interval=3, lr_schedule="constant")  # 3 + 3 == 6
    straight = train(tiny(files, tmp_path / "a", **common))
    train(tiny(files, tmp_path / "b", **{**common, "max_steps": 3}))
    train(tiny(files, tmp_path / "b", resume=True, **common))
    assert (tmp_path / "a/model.safetensors").read_bytes() == (tmp_path / "b/model.safetensors").read_bytes()
    losses = [r["train_loss"] for r in records(tmp_path / "a", "step")]
    assert losses[-1] < losses[0] and straight.val_loss < 6.0


@pytest.mark.parametrize("changes, message", [({"parallel": "fsdp"}, "FSDP shards them"),
                                              ({"dtype": "fp16"}, "not combined with fp16")])
def test_muon_refuses_what_it_cannot_do_in_one_line(files, tmp_path, changes, message):
    with pytest.raises(UserError, match=message):
        train(tiny(files, tmp_path / "x", optimizer="muon", **changes))
