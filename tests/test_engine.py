"""The one training engine under the fine-tuning tasks: resume after SIGKILL, many processes,
gradient accumulation and bf16, as pretraining has them."""

import json
import os
import subprocess
import sys
import time
from functools import partial

import pytest
import torch
from safetensors.torch import load_file

from buildllm.finetune.classify import ClassifyConfig, finetune_classifier
from buildllm.finetune.instruct import finetune_instruct
from buildllm.weights.checkpoint import save_model


@pytest.fixture
def tiny_model(tiny_gpt):
    # No key bias: its true gradient is 0 (softmax ignores a constant), and Adam would blow its
    # rounding noise up to full-size steps, so runs that should agree would not.
    return partial(tiny_gpt, context_length=64, n_layers=1, qkv_bias=False)



def weights(folder):
    return load_file(folder / "model.safetensors")


def assert_close(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=atol, msg=name)


ENGINE = dict(device="cpu", dtype="fp32", progress=False)


# Resume ------------------------------------------------------------------------------------------


CLASSIFY_RUN = """
import sys
from buildllm.finetune.classify import finetune_classifier
finetune_classifier(sys.argv[1], sys.argv[2], sys.argv[3], trainable="all", epochs=3, batch_size=4, lr=1e-3,
                    save_interval=2, device="cpu", dtype="fp32", progress=False, log=None,
                    resume=len(sys.argv) > 4)
"""


def checkpoints(run):
    folder = run / "checkpoints"
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) if folder.is_dir() else []


@pytest.mark.slow
def test_classifier_killed_and_resumed_is_bit_identical(tiny_model, tmp_path, classification_data):
    """SIGKILL a classification fine-tune after a checkpoint, resume it: same weights as never killed."""
    data, tok = classification_data
    save_model(tmp_path / "base", tiny_model(tok.vocab_size, drop_rate=0.1), tok)  # dropout: RNG state matters
    script = tmp_path / "run.py"
    script.write_text(CLASSIFY_RUN)
    killed, straight = tmp_path / "killed", tmp_path / "straight"
    args = [sys.executable, str(script), str(tmp_path / "base"), str(data)]
    proc = subprocess.Popen([*args, str(killed)], stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None and len(checkpoints(killed)) < 2:  # step 4 done
        time.sleep(0.005)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    os.kill(proc.pid, 9)
    proc.wait()
    last = checkpoints(killed)[-1]
    assert last < "step-00000045"  # killed mid-run (3 epochs of 15 steps)

    subprocess.run([*args, str(killed), "--resume"], check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    subprocess.run([*args, str(straight)], check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    for folder in ("checkpoints/step-00000045", "."):  # the last step's weights, and the best epoch's
        a, b = weights(killed / folder), weights(straight / folder)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), folder
    a, b = (json.loads((run / "metrics.json").read_text()) for run in (killed, straight))
    assert [h["val_loss"] for h in a["history"]] == [h["val_loss"] for h in b["history"]]
    assert a["best_epoch"] == b["best_epoch"] and len(a["history"]) == 3


def test_resume_needs_the_same_settings(tiny_model, tmp_path, classification_data):
    data, tok = classification_data
    base = tmp_path / "base"
    save_model(base, tiny_model(tok.vocab_size), tok)
    finetune_classifier(base, data, tmp_path / "out", epochs=1, log=None, **ENGINE)
    from buildllm.errors import UserError

    with pytest.raises(UserError, match="already holds a training run"):
        finetune_classifier(base, data, tmp_path / "out", epochs=1, log=None, **ENGINE)
    with pytest.raises(UserError, match="different configuration"):
        finetune_classifier(base, data, tmp_path / "out", epochs=2, lr=1.0, resume=True, log=None, **ENGINE)
    # more epochs is a longer run of the same training: it continues
    cfg = ClassifyConfig(epochs=2, **ENGINE)
    result = finetune_classifier(base, data, tmp_path / "out", config=cfg, resume=True, log=None)
    assert [h["epoch"] for h in result.history] == [1, 2]


# Many processes ----------------------------------------------------------------------------------


INSTRUCT_RUN = """
import sys
from buildllm.finetune.instruct import finetune_instruct
finetune_instruct(sys.argv[1], sys.argv[2], sys.argv[3], epochs=1, batch_size=4, lr=3e-3, mask_prompt=True,
                  test_responses=False, device="cpu", dtype="fp32", progress=False, log=None)
"""


@pytest.mark.slow
def test_instruct_on_two_processes_matches_one(tiny_model, tmp_path, instruction_data):
    """2 gloo processes, each with half of every batch, reach the weights of 1 process.

    The examples differ in length and the prompt is masked, so the processes score different
    numbers of tokens: the loss must be the mean over the whole batch's tokens, not per process.
    """
    data, tok = instruction_data
    save_model(tmp_path / "base", tiny_model(tok.vocab_size), tok)
    script = tmp_path / "run.py"
    script.write_text(INSTRUCT_RUN)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(script), str(tmp_path / "base"), str(data), str(tmp_path / "one")],
                   check=True, env=env)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(tmp_path / "base"), str(data), str(tmp_path / "two")],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_close(weights(tmp_path / "one/checkpoints/step-00000008"),
                 weights(tmp_path / "two/checkpoints/step-00000008"), atol=1e-5)
    a, b = (json.loads((tmp_path / run / "metrics.json").read_text()) for run in ("one", "two"))
    assert a["history"][0]["val_loss"] == pytest.approx(b["history"][0]["val_loss"], abs=1e-5)


# Accumulation and precision ----------------------------------------------------------------------


@pytest.mark.parametrize("task", ["classify", "instruct"])
def test_gradient_accumulation_matches_the_big_batch(tiny_model, tmp_path, classification_data, instruction_data, task):
    """8 examples at once, or 2 micro-batches of 4: the same examples, the same update."""
    data, tok = classification_data if task == "classify" else instruction_data
    finetune, extra = ((finetune_classifier, dict(trainable="all")) if task == "classify"
                       else (finetune_instruct, dict(mask_prompt=True, test_responses=False)))
    runs = {}
    for name, batch, accum in (("big", 8, 1), ("accum", 4, 2)):
        finetune(tiny_model(tok.vocab_size), data, tmp_path / name, tokenizer=tok, batch_size=batch,
                 grad_accum=accum, max_steps=3, lr=3e-3, log=None, **extra, **ENGINE)
        runs[name] = weights(tmp_path / name / "checkpoints/step-00000003")
    assert_close(runs["big"], runs["accum"], atol=1e-5)


def test_bf16_fine_tuning_runs_and_learns(tiny_model, tmp_path, classification_data):
    data, tok = classification_data
    result = finetune_classifier(tiny_model(tok.vocab_size), data, tmp_path / "clf", tokenizer=tok,
                                 trainable="all", epochs=3, lr=3e-3, log=None,
                                 **{**ENGINE, "dtype": "bf16"})
    losses = [h["train_loss"] for h in result.history]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    assert result.test_accuracy > 0.5
    records = [json.loads(line) for line in (tmp_path / "clf/metrics.jsonl").read_text().splitlines()]
    assert {r["kind"] for r in records} == {"step", "eval"} and (tmp_path / "clf/loss.png").is_file()
