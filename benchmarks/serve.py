"""Serving throughput: concurrent clients against one `buildllm serve`, batched and not (issue 15).

The server runs in this process on a free port of 127.0.0.1 (uvicorn in a thread; the model's
steps release the GIL), the clients are asyncio tasks streaming over HTTP. Each client sends
``--requests`` streamed completions one after the other (the same prompt, greedy, ``--max-tokens``
each); the row's throughput is every client's generated tokens (the servers' own ``usage``
counts) over the wall time from the first request to the last answer, and the time to first token
is from sending a request to its first text chunk. Each row runs twice: with continuous batching
(``max_batch`` = the most clients of any row) and one request at a time (``max_batch`` 1, the
others queue), on the same model.

    .venv/bin/python benchmarks/serve.py                        # gpt2 124M, 1, 4 and 16 clients
    .venv/bin/python benchmarks/serve.py --quick                # the nano preset, seconds
    .venv/bin/python benchmarks/serve.py --clients 1,8 --max-tokens 32 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import threading
import time

import httpx
import torch
import uvicorn

from buildllm.models.gpt2 import GPTConfig, GPTModel
from buildllm.serve.app import create_app
from buildllm.serve.config import ServeConfig
from buildllm.tokenizer import get_tokenizer
from buildllm.weights.loader import LoadedModel

PROMPT = ("The history of the printing press begins in the fifteenth century, when a goldsmith in Mainz "
          "combined movable metal type with an oil-based ink and a screw press, and")


class Server:
    """The app on uvicorn in a thread, on a free port."""

    def __init__(self, app):
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)
        return f"http://127.0.0.1:{self.server.servers[0].sockets[0].getsockname()[1]}"

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join()


async def one_request(http: httpx.AsyncClient, max_tokens: int) -> tuple[float, int]:
    """(seconds to the first text chunk, tokens generated) of one streamed completion."""
    body = {"model": "bench", "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    start, first, tokens = time.perf_counter(), None, 0
    async with http.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[len("data: "):])
            if first is None and chunk["choices"] and chunk["choices"][0]["text"]:
                first = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return first if first is not None else float("nan"), tokens


async def row(url: str, clients: int, requests: int, max_tokens: int) -> dict:
    async def client(http):
        return [await one_request(http, max_tokens) for _ in range(requests)]

    async with httpx.AsyncClient(base_url=url, timeout=None, limits=httpx.Limits(max_connections=clients)) as http:
        await one_request(http, 4)  # warm up: the first step allocates
        start = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(client(http) for _ in range(clients))) for r in rs]
        wall = time.perf_counter() - start
    ttft = [t for t, _ in results]
    tokens = sum(n for _, n in results)
    return {"clients": clients, "requests": len(results), "tokens": tokens, "seconds": round(wall, 2),
            "tokens_per_s": round(tokens / wall, 1), "ttft_median_s": round(statistics.median(ttft), 3),
            "ttft_max_s": round(max(ttft), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gpt2", help="the model's shape (random weights: speed only)")
    parser.add_argument("--clients", default="1,4,16", help="comma-separated numbers of concurrent clients")
    parser.add_argument("--requests", type=int, default=1, help="requests each client sends one after the other")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens generated per request")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="the nano preset and 8 tokens: does it run?")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    if args.quick:
        args.preset, args.max_tokens = "nano", 8
    if args.threads:
        torch.set_num_threads(args.threads)
    counts = [int(c) for c in args.clients.split(",")]

    torch.manual_seed(0)
    tokenizer = get_tokenizer("gpt2")
    model = GPTModel(GPTConfig.from_preset(args.preset)).eval()
    loaded = LoadedModel(model, tokenizer, source=args.preset)
    context = len(tokenizer.encode(PROMPT)) + args.max_tokens  # the KV cache holds what a request needs
    print(f"{args.preset}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"{torch.get_num_threads()} torch threads, {args.max_tokens} tokens per request")
    rows = []
    for mode, max_batch in (("batched", max(counts)), ("one at a time", 1)):
        config = ServeConfig(max_batch=max_batch, max_queue=max(counts) * args.requests, context=context)
        with Server(create_app(loaded, config, model_name="bench")) as url:
            for clients in counts:
                result = {"mode": mode, "max_batch": max_batch, **asyncio.run(row(url, clients, args.requests,
                                                                                   args.max_tokens))}
                print(f"  {mode:>13}  {clients:>3} clients  {result['tokens_per_s']:>8.1f} tokens/s  "
                      f"time to first token: median {result['ttft_median_s']:.3f} s, max {result['ttft_max_s']:.3f} s")
                rows.append(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
