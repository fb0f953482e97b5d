"""Batch-1 decoding: buildllm against llama.cpp on the same weights, machine and thread count.

    .venv/bin/python benchmarks/llamacpp.py            # = make bench-llamacpp
    .venv/bin/python benchmarks/llamacpp.py --precisions fp32,int8 --threads 2 --repeats 5

1. llama.cpp is built from the llama-cpp-python sdist (``pip download --no-binary :all:``; CMake,
   the ``llama-bench`` and ``llama-quantize`` targets) into ``--cache`` once; later runs reuse it.
2. GPT-2 124M with seeded random weights is written by ``buildllm.save_pretrained`` (safetensors,
   vocab.json, merges.txt) and converted with llama.cpp's own ``convert_hf_to_gguf.py`` to F32,
   BF16 and Q8_0; ``llama-quantize`` makes Q4_0. Both programs decode from the very same weights.
3. ``llama-bench -p 0 -n N -t T`` times llama.cpp; buildllm decodes N tokens after a one-token
   prompt with the KV cache, greedy, at batch 1, the two alternating repeat by repeat. buildllm
   also decodes at batch 8 in each repeat (its gain: the median of the repeats' batch 8 / batch 1),
   and both time a ``--prompt``-token prompt's first token (llama.cpp's
   ``-p`` prompt rate; buildllm's prefill and first step).
4. A T-thread read of a 1 GiB tensor gives the memory bandwidth; a batch-1 step reads every weight
   once, so bandwidth / bytes of weights is the ceiling on tokens/s, and each row shows its share.

It compiles for minutes the first time and times for minutes after: it is not part of ``make test``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from run import cpu_name  # noqa: E402  (the harness next to this file)

ROOT = Path(__file__).resolve().parent.parent
SDIST = "llama-cpp-python"
MODELS = {"gpt2": "gpt2-124m", "llama-3.2-1b": "llama-3.2-1b"}  # buildllm preset: folder under --cache
PRECISIONS = {  # buildllm's name: (llama.cpp's type, how the GGUF is made, buildllm's weight form)
    "fp32": ("F32", "convert", None),
    "bf16": ("BF16", "convert", "bf16"),
    "int8": ("Q8_0", "convert", "int8"),
    "int4": ("Q4_0", "quantize", "int4"),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", type=Path, default=ROOT / ".cache" / "llamacpp",
                   help="where llama.cpp is built and the GGUF files are kept (default .cache/llamacpp)")
    p.add_argument("--precisions", default="fp32,bf16,int8,int4", help="comma-separated, from fp32,bf16,int8,int4")
    p.add_argument("--threads", type=int, default=2, help="threads for both (default 2)")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens decoded per repeat (default 128)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per contender (default 3)")
    p.add_argument("--batch", type=int, default=8, help="buildllm's batch for the batched row (default 8)")
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens for the time to first token (default 128)")
    p.add_argument("--model", choices=sorted(MODELS), default="gpt2",
                   help="gpt2 (124M, default) or llama-3.2-1b (its shape, random weights, GPT-2's vocabulary files)")
    p.add_argument("--json", metavar="OUT", help="also write the results as JSON to OUT")
    return p.parse_args(argv)


# llama.cpp: build, convert, time -----------------------------------------------------------------


def llama_cpp_source(cache: Path) -> Path:
    """The llama.cpp tree vendored in the llama-cpp-python sdist, downloaded and unpacked once."""
    found = sorted(cache.glob("llama_cpp_python-*/vendor/llama.cpp"))
    if found:
        return found[-1]
    cache.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", SDIST,
                    "-d", str(cache)], check=True)
    archive = sorted(cache.glob("llama_cpp_python-*.tar.gz"))[-1]
    with tarfile.open(archive) as tar:
        tar.extractall(cache, filter="data")
    return sorted(cache.glob("llama_cpp_python-*/vendor/llama.cpp"))[-1]


def build_llama_cpp(source: Path) -> Path:
    """``llama-bench`` and ``llama-quantize``, built with CMake for this CPU; returns the bin folder."""
    bin_dir = source / "build" / "bin"
    if (bin_dir / "llama-bench").exists() and (bin_dir / "llama-quantize").exists():
        return bin_dir
    if not shutil.which("cmake"):
        sys.exit("error: cmake is needed to build llama.cpp: install it (apt-get install cmake) and run again")
    print("building llama.cpp (a few minutes, once)", file=sys.stderr)
    subprocess.run(["cmake", "-S", str(source), "-B", str(source / "build"), "-DCMAKE_BUILD_TYPE=Release",
                    "-DLLAMA_CURL=OFF", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF"], check=True)
    subprocess.run(["cmake", "--build", str(source / "build"), "-j", str(os.cpu_count() or 1),
                    "--target", "llama-bench", "llama-quantize"], check=True)
    return bin_dir


def gguf_files(source: Path, bin_dir: Path, folder: Path, precisions: list[str]) -> dict[str, Path]:
    """One GGUF per precision, converted from the Hugging Face folder by llama.cpp's own tools."""
    files = {}
    env = {**os.environ, "PYTHONPATH": str(source / "gguf-py")}
    if importlib.util.find_spec("sentencepiece") is None:
        # The converter tries a Llama's SentencePiece vocabulary first and only falls back to the
        # GPT-2 one our folder carries when that file is missing: the import must succeed first.
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "sentencepiece"], check=True)
    for name in precisions:
        ggml_type, how, _ = PRECISIONS[name]
        out = folder / f"model-{ggml_type}.gguf"
        if not out.exists():
            if how == "convert":
                subprocess.run([sys.executable, str(source / "convert_hf_to_gguf.py"), str(folder), "--outtype",
                                ggml_type.lower(), "--outfile", str(out)], check=True, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            else:
                f32 = gguf_files(source, bin_dir, folder, ["fp32"])["fp32"]
                subprocess.run([str(bin_dir / "llama-quantize"), str(f32), str(out), ggml_type], check=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        files[name] = out
    return files


def llama_bench(bin_dir: Path, gguf: Path, new_tokens: int, threads: int, repeats: int) -> float:
    """llama.cpp's own measurement: tokens/s generating ``new_tokens`` at batch 1, mean of repeats."""
    result = subprocess.run([str(bin_dir / "llama-bench"), "-m", str(gguf), "-p", "0", "-n", str(new_tokens),
                             "-t", str(threads), "-r", str(repeats), "-o", "json"],
                            check=True, capture_output=True, text=True)
    return float(json.loads(result.stdout)[0]["avg_ts"])


# buildllm ----------------------------------------------------------------------------------------


def write_weights(folder: Path, preset: str) -> None:
    """The model with seeded random weights as a Hugging Face folder (the llama.cpp converter's input).

    It carries GPT-2's vocab.json and merges.txt, a tokenizer the converter knows; a Llama's larger
    vocabulary is padded by the converter. Speed does not depend on what the tokens mean.
    """
    from buildllm import save_pretrained
    from buildllm.models import registry
    from buildllm.tokenizer import get_tokenizer

    if (folder / "model.safetensors").exists():
        return
    torch.manual_seed(0)
    save_pretrained(registry.build_model(registry.preset(preset)), folder, get_tokenizer("gpt2"))


def buildllm_model(folder: Path, precision: str):
    from buildllm import load_model

    _, _, form = PRECISIONS[precision]
    dtype = torch.bfloat16 if form == "bf16" else torch.float32
    model, _ = load_model(folder, dtype=dtype, quantize=form if form in ("int8", "int4") else None)
    return model


def buildllm_decode(model, new_tokens: int, batch: int) -> float:
    """Seconds to decode ``new_tokens`` tokens after a one-token prompt, as ``buildllm generate`` does."""
    from buildllm import generate

    prompt = torch.zeros(batch, 1, dtype=torch.long)
    start = time.perf_counter()
    generate(model, prompt, new_tokens, temperature=0.0)
    return time.perf_counter() - start


def buildllm_first_token(model, prompt_tokens: int) -> float:
    """Seconds from a ``prompt_tokens``-token prompt to its first new token (prefill and one step)."""
    from buildllm import generate

    prompt = torch.randint(0, 1000, (1, prompt_tokens), generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    generate(model, prompt, 1, temperature=0.0)
    return time.perf_counter() - start


def llama_bench_prompt(bin_dir: Path, gguf: Path, prompt_tokens: int, threads: int, repeats: int) -> tuple[float, bool]:
    """llama.cpp's seconds to process a ``prompt_tokens``-token prompt (its first token follows), and
    whether it ran with its weights repacked (its default), or, where that crashes, without."""
    command = [str(bin_dir / "llama-bench"), "-m", str(gguf), "-p", str(prompt_tokens), "-n", "0",
               "-t", str(threads), "-r", str(repeats), "-o", "json"]
    result = subprocess.run(command, capture_output=True, text=True)
    repacked = result.returncode == 0
    if not repacked:  # 0.3.36's AMX kernels for repacked Q8_0 and Q4_0 crash on prompts on some Xeons
        result = subprocess.run(command + ["--repack", "0"], check=True, capture_output=True, text=True)
    return prompt_tokens / float(json.loads(result.stdout)[0]["avg_ts"]), repacked


def weight_bytes(model) -> int:
    """Bytes a batch-1 step reads: the weights of every layer but the embedding lookups (which read
    one row per token), each tensor once; a tied head is the token embedding read in full."""
    seen, total = set(), 0
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            continue
        tensors = {**dict(module.named_parameters(recurse=False)), **dict(module.named_buffers(recurse=False))}
        if tensors.get("_kernel_weight") is not None:  # int4: the kernel reads its own packed copy only
            tensors = {k: v for k, v in tensors.items() if k.startswith("_kernel") or k == "bias"}
        for t in tensors.values():
            if t is None or t.data_ptr() in seen or t.dtype == torch.bool:  # bool: attention masks
                continue
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def read_bandwidth(threads: int, gib: float = 1.0, repeats: int = 5) -> float:
    """Bytes/s of a ``threads``-thread read of a ``gib`` GiB tensor (a sum: one pass, little compute)."""
    torch.set_num_threads(threads)
    x = torch.ones(int(gib * (1 << 30)) // 4, dtype=torch.float32)
    x.sum()  # pages in
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - start)
    return x.numel() * 4 / min(times)


# The run -----------------------------------------------------------------------------------------


def main(argv=None) -> int:
    args = parse_args(argv)
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    unknown = [p for p in precisions if p not in PRECISIONS]
    if unknown:
        sys.exit(f"error: unknown precision {', '.join(unknown)}; choose from {', '.join(PRECISIONS)}")
    source = llama_cpp_source(args.cache)
    bin_dir = build_llama_cpp(source)
    folder = args.cache / MODELS[args.model]
    write_weights(folder, args.model)
    ggufs = gguf_files(source, bin_dir, folder, precisions)
    torch.set_num_threads(args.threads)
    bandwidth = read_bandwidth(args.threads)

    rows = []
    for name in precisions:
        model = buildllm_model(folder, name)
        buildllm_decode(model, 8, 1)  # warm up (and build the fast decoding step)
        ours, theirs, batched = [], [], []
        for _ in range(args.repeats):  # alternate, so that a burst of load elsewhere hits all three
            ours.append(args.new_tokens / buildllm_decode(model, args.new_tokens, 1))
            theirs.append(llama_bench(bin_dir, ggufs[name], args.new_tokens, args.threads, 1))
            batched.append(args.batch * args.new_tokens / buildllm_decode(model, args.new_tokens, args.batch))
        first = min(buildllm_first_token(model, args.prompt) for _ in range(3))
        ceiling = bandwidth / weight_bytes(model)
        theirs_first, repacked = llama_bench_prompt(bin_dir, ggufs[name], args.prompt, args.threads, args.repeats)
        row = {"precision": name, "llama_cpp_type": PRECISIONS[name][0], "buildllm_tok_s": statistics.median(ours),
               "llama_cpp_tok_s": statistics.median(theirs), "weight_mb": weight_bytes(model) / 1e6,
               "ceiling_tok_s": ceiling, "batched_tok_s": statistics.median(batched), "first_token_s": first,
               "llama_cpp_first_token_s": theirs_first, "llama_cpp_prompt_repacked": repacked}
        row["ratio"] = row["buildllm_tok_s"] / row["llama_cpp_tok_s"]
        row["share_of_ceiling"] = row["buildllm_tok_s"] / ceiling
        # batch 8 against batch 1 of the same repeat, a few seconds apart: the machine's minute cancels
        row["batched_gain"] = statistics.median(b / o for b, o in zip(batched, ours))
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
        del model

    machine = f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}"
    print(f"\n{args.model}, {args.new_tokens} new tokens, {args.threads} threads; "
          f"read bandwidth {bandwidth / 1e9:.1f} GB/s; {machine}\n")
    print(f"| precision | buildllm tok/s | llama.cpp tok/s | ratio | weights MB | ceiling tok/s | buildllm share "
          f"| batch {args.batch} tok/s (x batch 1) | first token after {args.prompt}: buildllm / llama.cpp |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['precision']} ({r['llama_cpp_type']}) | {r['buildllm_tok_s']:.1f} | {r['llama_cpp_tok_s']:.1f} | "
              f"{r['ratio']:.2f}x | {r['weight_mb']:.0f} | {r['ceiling_tok_s']:.0f} | {r['share_of_ceiling']:.0%} | "
              f"{r['batched_tok_s']:.0f} ({r['batched_gain']:.1f}x) | "
              f"{r['first_token_s'] * 1e3:.0f} ms / {r['llama_cpp_first_token_s'] * 1e3:.0f} ms"
              f"{'' if r['llama_cpp_prompt_repacked'] else ' (--repack 0)'} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"bandwidth": bandwidth, "machine": machine, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
