"""The benchmark harness (benchmarks/run.py) runs, and measures what it says it measures."""

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import run  # noqa: E402
import twins  # noqa: E402

from buildllm.models.gpt2 import GPTConfig  # noqa: E402

TINY = GPTConfig(vocab_size=101, context_length=32, emb_dim=32, n_heads=4, n_layers=2)


def test_pair_holds_the_same_weights_and_gives_the_same_logits():
    ours, hf = run.make_pair(TINY, torch.device("cpu"))
    assert torch.equal(hf.transformer.h[1].mlp.c_fc.weight, ours.blocks[1].ff.fc.weight.t())
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()  # tied, as ours
    x = torch.randint(TINY.vocab_size, (3, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), run.HFLogits(hf.eval())(x), atol=1e-4, rtol=0)


@pytest.mark.parametrize("levers, hf_class", [({}, "GPT2LMHeadModel"), (twins.NEOX, "GPTNeoXForCausalLM"),
                                              (twins.QWEN3, "Qwen3ForCausalLM"),
                                              ({**twins.QWEN3, "zero_init": True, "tie_embeddings": False}, "Qwen3ForCausalLM")])
def test_twins_compute_what_ours_computes(levers, hf_class):
    """The transformers twin of each lever set that has one: the same logits on the same weights
    (perturbed from the init, so that no norm scale is all ones and no projection all zeros)."""
    torch.manual_seed(0)
    cfg = replace(TINY, **levers)
    ours = run.GPTModel(cfg).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.05 * torch.randn_like(p))
    hf = twins.twin(cfg).eval()
    twins.copy_weights(ours, hf)
    assert type(hf).__name__ == hf_class
    x = torch.randint(cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=x).logits, ours(x), atol=1e-5, rtol=0)


def test_no_twin_is_refused_in_one_line():
    with pytest.raises(SystemExit, match="no transformers model computes a GPT with .*'activation': 'relu2'"):
        twins.twin(replace(TINY, positions="rope", activation="relu2"))


def test_the_default_rows_race_the_default_run():
    """What train-default times: the default preset and training config, and for the twin the same
    optimizer (Muon for the same matrices: the twin's may be split, q/k/v, where ours is fused)."""
    from buildllm.training.config import DEFAULT_PRESET

    model_cfg, cfg = run.default_training(quick=True)
    assert model_cfg.non_gpt2_levers() == GPTConfig.from_preset(DEFAULT_PRESET).non_gpt2_levers()
    assert twins.kind_of(model_cfg) == "qwen3" and cfg.optimizer == "muon"
    ours, hf = run.make_pair(model_cfg, torch.device("cpu"))
    theirs = run.default_optimizer(run.HFLogits(hf), cfg, torch.device("cpu"), ours=False)
    mine = run.default_optimizer(ours, cfg, torch.device("cpu"), ours=True)
    muon_size = lambda opt: sum(p.numel() for p in opt.named["muon"].param_groups[0]["params"])  # noqa: E731
    assert muon_size(theirs) == muon_size(mine) > 0
    adamw_size = lambda opt: sum(p.numel() for g in opt.named["adamw"].param_groups for p in g["params"])  # noqa: E731
    assert adamw_size(theirs) == adamw_size(mine)


def test_decoding_agrees_token_for_token():
    ours, hf = run.make_pair(replace(TINY, context_length=64), torch.device("cpu"))
    out = {}
    run.decode_fn(ours, "ours", 2, 12, torch.device("cpu"), out=out)()
    run.decode_fn(hf, "hf", 2, 12, torch.device("cpu"), out=out)()
    assert out["ours"].shape == (2, run.PROMPT_TOKENS + 12)
    assert torch.equal(out["ours"], out["hf"])


def test_race_alternates_order_and_takes_medians():
    calls, now = [], [0.0]
    cost = {"a": 1.0, "b": 3.0}

    def contender(name):
        def call():
            calls.append(name)
            now[0] += cost[name]
        return call

    r = run.race({"a": contender("a"), "b": contender("b")}, repeats=4, warmup=1,
                 device=torch.device("cpu"), clock=lambda: now[0])
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b", "b", "a"]  # warmup, then A B / B A
    assert r.seconds == {"a": [1.0] * 4, "b": [3.0] * 4}
    assert r.first_call == {"a": 1.0, "b": 3.0}
    assert r.ratio("a", "b") == 3.0  # a is three times as fast


def test_select_rows_takes_ids_and_prefixes():
    cpu = torch.device("cpu")
    assert run.select_rows("decode-b1,train-small", cpu) == ["train-small-fp32", "train-small-bf16", "decode-b1"]
    assert run.select_rows("train-bf16", cpu) == ["train-bf16"]
    assert run.select_rows(None, cpu) == list(run.ROWS)
    with pytest.raises(SystemExit, match="unknown row 'nope'"):
        run.select_rows("nope", cpu)


def test_raw_tiktoken_counts_what_prepare_writes(tmp_path):
    path = run.make_corpus(tmp_path, 2.5)  # > 2 pieces of 1 MB: the cuts must not change tokens
    assert 2.4e6 < path.stat().st_size < 2.6e6
    from buildllm.tokenizer import get_tokenizer

    whole = len(get_tokenizer("gpt2").encode(path.read_text(encoding="utf-8")))
    assert run.raw_tiktoken(path) == whole
    # prepare_corpus ends the training part and the held-out part with <|endoftext|> each
    assert run.run_prepare(path, tmp_path / "out") == whole + 2


def test_peak_rss_sees_an_allocation():
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("resetting the peak RSS needs Linux")
    # In a fresh process, as the harness measures: this one may hold freed memory that an
    # allocation would reuse without growing (training.keep_freed_memory, run by other tests).
    code = ("import sys, torch; sys.path.insert(0, 'benchmarks'); import run; base = run._reset_peak_rss(); "
            "x = torch.ones(25_000_000); print(run._peak_rss_mb() - base)")  # 100 MB, touched
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).parents[1], check=True)
    grown = float(proc.stdout.split()[-1])
    assert 90 < grown < 200


@pytest.mark.slow
def test_quick_run_prints_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert run.main(["--quick", "--threads", "1", "--device", "cpu", "--no-memory", "--json", str(out),
                     "--rows", "train-fp32,forward-bf16,decode-b1,decode-b1-int8,prepare"]) == 0
    table = capsys.readouterr().out
    for row in ("train-fp32", "forward-bf16", "decode-b1", "prepare", "matmul peak"):
        assert row in table
    result = json.loads(out.read_text())
    assert [r["id"] for r in result["rows"]] == ["train-fp32", "forward-bf16", "decode-b1", "decode-b1-int8",
                                                 "prepare"]
    assert result["peaks"]["fp32"] > 0 and result["machine"]["threads"] == 1
    for r in result["rows"]:
        assert r["ours_tps"] > 0 and r["hf_tps"] > 0 and r["ratio"] > 0
    train, decode, int8, prepare = result["rows"][0], result["rows"][2], result["rows"][3], result["rows"][4]
    assert train["tokens"] == 2 * 32 and 0 < train["ours_mfu"]
    assert decode["notes"]["same_tokens"] == 1.0
    assert "int8" in int8["what"] and int8["tokens"] == decode["tokens"]
    assert prepare["notes"]["ours_tokens"] == prepare["notes"]["tiktoken_tokens"] + 2


@pytest.mark.slow
def test_memory_rows_run_in_fresh_processes():
    args = run.parse_args(["--quick", "--threads", "1", "--device", "cpu"])
    cfg = run.model_config(args.preset, args.seq, args.quick)
    ours, hf = run.measure_memory("train-fp32", cfg, args, torch.device("cpu"))
    # nano with GPT-2's vocabulary: 3.3 M parameters; weights, gradients and AdamW's two moments
    # take 4 x 13 MB at least, for either contender.
    assert ours > 40 and hf > 40


def test_cuda_refused_cleanly_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(SystemExit, match="CUDA is not available"):
        run.main(["--quick", "--device", "cuda"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_rows_run(tmp_path):
    out = tmp_path / "bench.json"
    assert run.main(["--quick", "--device", "cuda", "--json", str(out),
                     "--rows", "train-bf16,train-compile-bf16,decode-b1"]) == 0
    result = json.loads(out.read_text())
    assert result["machine"]["device"].startswith("cuda") and "gpu" in result["machine"]
    assert [r["id"] for r in result["rows"]] == ["train-bf16", "train-compile-bf16", "decode-b1"]
    assert all(r["ours_tps"] > 0 and r["hf_tps"] > 0 for r in result["rows"])
    assert result["rows"][0]["ours_mem_mb"] > 0  # torch.cuda.max_memory_allocated
    assert "ours_compile_s" in result["rows"][1]["notes"]
