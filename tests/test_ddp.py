"""Two CPU processes under torchrun (gloo) reach the weights of one process with the same global batch."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from buildllm.training.config import TrainConfig
from buildllm.training.engine import train

TINY = ["--preset", "nano", "--batch-size", "4", "--grad-accum", "2", "--context-length", "32",
        "--max-steps", "5", "--warmup-steps", "1", "--lr", "3e-3", "--eval-interval", "5", "--eval-iters", "1",
        "--dtype", "fp32", "--device", "cpu", "--no-progress", "--set", "sample_tokens=0",
        "--set", "model.emb_dim=32", "--set", "model.n_heads=2", "--set", "model.n_layers=2",
        "--set", "model.context_length=32", "--set", "model.qkv_bias=false"]


@pytest.fixture(scope="module")
def single(play_corpus):
    """The prepared corpus, and what one process makes of it."""
    root = Path(play_corpus("tempest", 20000, prepared=True)["prepared"]).parent
    train(TrainConfig(data=str(root / "prepared"), out=str(root / "single"), preset="nano", batch_size=4,
                      grad_accum=2, context_length=32, max_steps=5, warmup_steps=1, lr=3e-3, eval_interval=5,
                      eval_iters=1, dtype="fp32", device="cpu", progress=False, sample_tokens=0,
                      model={"emb_dim": 32, "n_heads": 2, "n_layers": 2, "context_length": 32,
                             # no key bias: its true gradient is 0 and Adam would amplify the noise
                             "qkv_bias": False}))
    return root


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_match_one(single, parallel):
    out = single / parallel
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "buildllm.cli", "train", "--data", str(single / "prepared"), "--out", str(out),
           "--parallel", parallel, *TINY]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("5 steps, 1,280 tokens") == 1  # rank 0 alone reports
    one, two = load_file(single / "single/model.safetensors"), load_file(out / "model.safetensors")
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=1e-5, msg=name)
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000005"]
