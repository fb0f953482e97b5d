"""torch.compile in the training loop: the forward pass and the loss compiled as one graph train
what eager training trains, a failed compile falls back to the very same eager run, and the
recipe compiles by default where the book does not."""

import pytest
import torch
from safetensors.torch import load_file

from buildllm.training.config import TrainConfig, resolve
from buildllm.training.engine import train

TINY_MODEL = {"emb_dim": 32, "n_heads": 2, "n_layers": 2, "context_length": 32, "drop_rate": 0.0}


@pytest.fixture(scope="module")
def prepared(play_corpus):
    return play_corpus("macbeth", 12000, prepared=True)["prepared"]


def tiny_run(prepared, out, **changes) -> TrainConfig:
    base = dict(data=prepared, out=str(out), preset="speedrun-cpu", model=dict(TINY_MODEL), batch_size=4,
                context_length=32, max_steps=4, warmup_steps=1, eval_interval=4, eval_iters=1, lr=3e-3,
                progress=False, sample_tokens=0, final_eval=False, dtype="fp32", device="cpu")
    return TrainConfig(**{**base, **changes})


def weights(out):
    return load_file(out / "model.safetensors")


def test_defaults_compile_the_recipe_but_not_the_book(eager_training, tmp_path):
    assert eager_training["bundled"] is True and eager_training["text"] is True  # (the suite itself trains eager)
    assert eager_training["book"] is False
    (tmp_path / "a.txt").write_text("some text " * 50)
    assert resolve(TrainConfig(data=str(tmp_path / "a.txt"), recipe="book", compile=None)).compile is False
    assert resolve(TrainConfig(compile=True)).compile is True


@pytest.mark.slow
def test_compiled_training_trains_what_eager_training_trains(prepared, tmp_path):
    """Four steps of the default model's levers, compiled (forward pass and loss as one graph)
    and eager: the same weights but for the order of float sums in fused kernels. AdamW: Muon's
    orthogonalization (in bf16) lifts such differences to full size in a matrix's smallest
    directions (tests/test_ddp.py), and the point here is the gradients."""
    train(tiny_run(prepared, tmp_path / "eager", compile=False, optimizer="adamw"))
    result = train(tiny_run(prepared, tmp_path / "compiled", compile=True, optimizer="adamw"))
    assert result.steps == 4
    eager, compiled = weights(tmp_path / "eager"), weights(tmp_path / "compiled")
    assert eager.keys() == compiled.keys()
    for name in eager:
        torch.testing.assert_close(compiled[name], eager[name], atol=5e-6, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


def test_a_failed_compile_falls_back_to_the_same_eager_run(prepared, tmp_path, monkeypatch):
    """A compiler that fails at the first step (no C++ compiler on a CPU, say): a warning naming
    why, then the run trains eager from the same batch and random state, bit for bit."""
    train(tiny_run(prepared, tmp_path / "eager", compile=False, model={**TINY_MODEL, "drop_rate": 0.1}))

    class NoCompiler(torch._dynamo.exc.TorchDynamoException):
        pass

    def failing_compile(fn, **kwargs):
        def compiled(*args):
            raise NoCompiler("InvalidCxxCompiler: No working C++ compiler found\nmore details")
        return compiled

    monkeypatch.setattr(torch, "compile", failing_compile)
    with pytest.warns(UserWarning, match=r"torch.compile failed \(InvalidCxxCompiler: No working C\+\+ compiler "
                                         r"found\); training goes on without it \(--no-compile"):
        result = train(tiny_run(prepared, tmp_path / "fell-back", compile=True, model={**TINY_MODEL, "drop_rate": 0.1}))
    assert result.steps == 4
    a, b = weights(tmp_path / "eager"), weights(tmp_path / "fell-back")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_a_compiled_run_resumes_bit_for_bit(prepared, tmp_path):
    """Compiled steps with dropout, stopped after 2 steps and resumed to 4 (the process compiles
    again, and the compiled dropout draws from the restored random state): the weights of 4 steps
    straight."""
    common = dict(compile=True, lr_schedule="constant", eval_interval=2, model={**TINY_MODEL, "drop_rate": 0.1})
    train(tiny_run(prepared, tmp_path / "straight", **common))
    train(tiny_run(prepared, tmp_path / "resumed", **{**common, "max_steps": 2}))
    train(tiny_run(prepared, tmp_path / "resumed", **common, resume=True))
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
