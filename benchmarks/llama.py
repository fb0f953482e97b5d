"""A Llama-3.2-1B-shaped model: memory to load it, and batch-1 decoding, buildllm against transformers (issue 13).

The folder is what a download looks like: ``transformers.LlamaForCausalLM`` with random weights,
saved by its own ``save_pretrained`` in bf16 (made once, then reused). Both libraries load the
same folder, so they hold the same weights; their logits are checked to agree before anything
is timed.

Loading memory: a fresh subprocess per library imports what it needs, then loads the folder; the
peak resident set (``VmHWM``) is reported whole and as the growth over the imports, each against
the file size.

Decoding: greedy, batch 1, a 32-token prompt, ``--new-tokens`` tokens. The time per token is
taken between the first and the last new token (the prompt's prefill is left out), for
buildllm's ``stream`` and for transformers' ``generate`` through a streamer. The two contenders
of a race alternate repeat by repeat (A B, B A, ...) so that load from elsewhere slows both alike;
figures are medians. Races: buildllm bf16 against transformers bf16; transformers fp32 against
transformers bf16, to find transformers' best CPU setting; buildllm int8 and int4 against that.

    .venv/bin/python benchmarks/llama.py --folder /tmp/llama-3.2-1b-random
    .venv/bin/python benchmarks/llama.py --quick        # a tiny Llama, seconds: does the harness work?
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))  # the harness next to this file (run.py)

PROMPT_TOKENS = 32
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--folder", default="/tmp/buildllm-llama-3.2-1b-random", help="the HF folder (made if absent)")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens decoded per repeat (default 32)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per contender (default 3)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--quick", action="store_true", help="a tiny Llama instead of the 1B shape")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--memory-only", action="store_true", help="measure loading memory, not decoding")
    p.add_argument("--measure-load", choices=["buildllm", "transformers"], help=argparse.SUPPRESS)
    return p.parse_args(argv)


# The folder --------------------------------------------------------------------------------------


def make_folder(folder: Path, quick: bool) -> None:
    """Llama 3.2 1B's published shape (buildllm's preset, written out in HF's terms), random bf16 weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from buildllm.models.registry import preset
    from buildllm.weights.huggingface import config_to_hf

    hf_config = TINY if quick else {k: v for k, v in config_to_hf(preset("llama-3.2-1b")).items()
                                    if k not in ("architectures", "model_type")}
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16 directly: half the memory, no conversion
    try:
        model = LlamaForCausalLM(LlamaConfig(**hf_config))
    finally:
        torch.set_default_dtype(default)
    model.save_pretrained(folder)


def file_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


# Loading memory (in a subprocess each) -----------------------------------------------------------


def peak_rss_bytes() -> int:
    """This process's peak resident set (VmHWM). Not ``ru_maxrss``: Linux carries that over from
    the parent through fork and exec, so a child would report the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise SystemExit("no VmHWM in /proc/self/status: the memory figures need Linux")


def measure_load(who: str, folder: str) -> None:
    """Peak memory after loading, and after a first forward pass: a memory-mapped file's pages
    count once they are read, which may be only when the weights are first used."""
    if who == "buildllm":
        from buildllm.weights.loader import load_model

        before = peak_rss_bytes()
        start = time.perf_counter()
        model = load_model(folder).model
        forward = model
    else:
        from transformers import AutoModelForCausalLM
        from transformers.models.llama import modeling_llama  # noqa: F401 - imported before, not counted

        before = peak_rss_bytes()
        start = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
        forward = lambda ids: model(ids).logits  # noqa: E731
    seconds, loaded = time.perf_counter() - start, peak_rss_bytes()
    with torch.inference_mode():
        forward(torch.zeros(1, 8, dtype=torch.long))
    print(json.dumps({"imports_rss": before, "peak_rss": loaded, "seconds": seconds,
                      "peak_rss_after_forward": peak_rss_bytes()}))


def load_memory(folder: Path) -> dict:
    size = file_bytes(folder)
    rows = {"file_bytes": size}
    for who in ("buildllm", "transformers"):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"),
                                                            os.environ.get("PYTHONPATH", "")])}
        out = subprocess.run([sys.executable, __file__, "--measure-load", who, "--folder", str(folder)],
                             capture_output=True, text=True, check=True, env=env)
        got = json.loads(out.stdout.strip().splitlines()[-1])
        got["peak_over_file"] = got["peak_rss"] / size
        got["growth_over_file"] = (got["peak_rss"] - got["imports_rss"]) / size
        got["after_forward_over_file"] = got["peak_rss_after_forward"] / size
        rows[who] = got
    return rows


# Decoding ----------------------------------------------------------------------------------------


class TokenClock:
    """A transformers streamer that notes the time of every new token (its first call is the prompt)."""

    def __init__(self):
        self.times, self.prompt_seen = [], False

    def put(self, value):
        if self.prompt_seen:
            self.times.append(time.perf_counter())
        self.prompt_seen = True

    def end(self):
        pass


def seconds_per_token(contender, prompt: torch.Tensor, new_tokens: int) -> float:
    """Mean time per new token after the first: decoding only, no prefill."""
    kind, model = contender
    if kind == "buildllm":
        from buildllm.generation.sampling import stream

        times = []
        for _ in stream(model, prompt, new_tokens):
            times.append(time.perf_counter())
    else:
        clock = TokenClock()
        with torch.inference_mode():
            model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                           streamer=clock, pad_token_id=0)
        times = clock.times
    return (times[-1] - times[0]) / (len(times) - 1)


def race(a, b, prompt, args) -> dict:
    """Tokens per second of ``a`` and ``b``, alternating which goes first; medians."""
    for contender in (a, b):
        seconds_per_token(contender, prompt, 4)  # warm up
    timings = {0: [], 1: []}
    for repeat in range(args.repeats):
        order = (0, 1) if repeat % 2 == 0 else (1, 0)
        for i in order:
            timings[i].append(seconds_per_token((a, b)[i], prompt, args.new_tokens))
    rate = [1 / statistics.median(timings[i]) for i in (0, 1)]
    return {"tokens_per_s": rate, "ratio": rate[0] / rate[1]}


def check_agreement(ours, hf, prompt) -> float:
    with torch.inference_mode():
        a, b = ours(prompt)[0, -1].float(), hf(prompt).logits[0, -1].float()
    error = ((a - b).abs().max() / b.abs().max()).item()
    if error > 0.05:
        raise SystemExit(f"buildllm and transformers disagree on the logits (relative error {error:.3f})")
    return error


def decoding(folder: Path, args) -> dict:
    from transformers import AutoModelForCausalLM

    from buildllm.weights.loader import load_model

    def ours(**kwargs):
        return ("buildllm", load_model(folder, **kwargs).model)

    def hf(dtype):
        return ("transformers", AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval())

    prompt = torch.randint(0, 500, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(0))
    results = {}
    hf_bf16, ours_bf16 = hf(torch.bfloat16), ours()
    results["logits_relative_error_bf16"] = check_agreement(ours_bf16[1], hf_bf16[1], prompt)
    results["buildllm_bf16_vs_transformers_bf16"] = race(ours_bf16, hf_bf16, prompt, args)
    del ours_bf16
    gc.collect()
    hf_fp32 = hf(torch.float32)
    results["transformers_fp32_vs_transformers_bf16"] = race(hf_fp32, hf_bf16, prompt, args)
    fp32_wins = results["transformers_fp32_vs_transformers_bf16"]["ratio"] > 1
    best, results["transformers_best"] = (hf_fp32, "fp32") if fp32_wins else (hf_bf16, "bf16")
    del hf_fp32, hf_bf16
    gc.collect()
    for scheme in ("int8", "int4"):
        quantized = ours(quantize=scheme)
        results[f"buildllm_{scheme}_vs_transformers_best"] = race(quantized, best, prompt, args)
        del quantized
        gc.collect()
    return results


def machine() -> dict:
    from run import cpu_name  # here, not at the top: the load-measuring subprocess would count its imports

    return {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "load_average": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.measure_load:
        measure_load(args.measure_load, args.folder)
        return
    torch.set_num_threads(args.threads)
    folder = Path(args.folder + ("-quick" if args.quick else ""))
    if not (folder / "config.json").is_file():
        print(f"making {folder} ...", file=sys.stderr)
        make_folder(folder, args.quick)
    import transformers

    report = {"machine": {**machine(), "transformers": transformers.__version__}, "folder": str(folder)}
    report["load_memory"] = load_memory(folder)
    print(json.dumps(report, indent=1), flush=True)
    if not args.memory_only:
        report["decoding"] = decoding(folder, args)
        print(json.dumps(report["decoding"], indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
