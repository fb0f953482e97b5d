"""`buildllm serve`: the OpenAI client against a real uvicorn server on a free local port.

The model is a tiny GPT-2 with a byte-level BPE of 300 tokens, both trained in a second on a few
sentences, so its answers are words; the library's own ``generate`` is the oracle for every answer.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from fastapi.testclient import TestClient

from buildllm.generation.chat import chat_prompt
from buildllm.generation.sampling import detokenize, generate
from buildllm.models.gpt2 import GPTConfig, GPTModel
from buildllm.serve.app import create_app
from buildllm.serve.config import ServeConfig
from buildllm.tokenizer import train_bpe
from buildllm.weights.checkpoint import save_model
from buildllm.weights.loader import load_model

TEXT = ("The cat sat on the mat. The dog ran in the park. A bird sang in the tree. "
        "The cat and the dog are friends. Hello, how are you? I am fine, thank you. ")
NAME = "tiny"


@functools.cache
def tiny_model():
    """(model, tokenizer): a GPT-2 with two small layers trained on TEXT (cached for every test module)."""
    return _train_tiny_model()  # on one thread, as the whole suite runs (conftest.one_thread)


def _train_tiny_model():
    torch.manual_seed(0)
    tokenizer = train_bpe(TEXT * 3, vocab_size=300)
    model = GPTModel(GPTConfig(vocab_size=tokenizer.vocab_size, context_length=128, emb_dim=32, n_heads=2, n_layers=2))
    ids = torch.tensor(tokenizer.encode(TEXT * 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(150):
        starts = torch.randint(0, len(ids) - 33, (8,)).tolist()
        x = torch.stack([ids[s : s + 32] for s in starts])
        y = torch.stack([ids[s + 1 : s + 33] for s in starts])
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), tokenizer


def tiny_model_folder(path: Path) -> Path:
    return save_model(path, *tiny_model())


class ServerThread:
    """The app on a real uvicorn server, on a free port of 127.0.0.1, in a thread."""

    def __init__(self, app):
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.01)
        self.url = f"http://127.0.0.1:{self.server.servers[0].sockets[0].getsockname()[1]}"
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return load_model(tiny_model_folder(tmp_path_factory.mktemp("serve") / NAME))


@pytest.fixture(scope="module")
def server(loaded):
    config = ServeConfig(max_batch=4, max_queue=32, max_tokens=20, max_body=20_000)
    with ServerThread(create_app(loaded, config, model_name=NAME)) as running:
        yield running


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def expected(loaded, prompt_ids, max_tokens, temperature=0.0, seed=None, top_k=None, top_p=None):
    """The library's answer: (text, tokens taken, finish reason), generate() with its own seeded generator."""
    model, tokenizer = loaded
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    out = generate(model, [prompt_ids], max_tokens, temperature, top_k, top_p, eos_id=tokenizer.eot_id,
                   generator=generator)[0][len(prompt_ids):]
    stopped = out[-1] == tokenizer.eot_id
    text = "".join(detokenize(tokenizer, out[:-1] if stopped else out, context=prompt_ids))
    return text, len(out), "stop" if stopped else "length"


def chat_ids(loaded, messages):
    return loaded.tokenizer.encode(chat_prompt(messages, loaded.tokenizer, loaded.prompt_template))


# The API ------------------------------------------------------------------------------------------


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == [NAME]
    assert client.models.retrieve(NAME).id == NAME
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["max_batch"] == 4


def test_chat_completion_is_the_library_answer(client, loaded):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello, how are you?"}]
    reply = client.chat.completions.create(model=NAME, messages=messages, max_tokens=12, temperature=0)
    text, tokens, finish = expected(loaded, chat_ids(loaded, messages), 12)
    assert reply.object == "chat.completion" and reply.model == NAME
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == text and reply.choices[0].finish_reason == finish
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(chat_ids(loaded, messages)), tokens)
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_streamed_chat_is_the_same_answer_in_pieces(client, loaded):
    messages = [{"role": "user", "content": "The cat"}]
    settings = {"model": NAME, "messages": messages, "max_tokens": 15, "temperature": 0.9, "seed": 3}
    whole = client.chat.completions.create(**settings)
    chunks = list(client.chat.completions.create(**settings, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert len([p for p in pieces if p]) > 3  # token by token, not one block
    assert "".join(pieces) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert whole.choices[0].message.content == expected(loaded, chat_ids(loaded, messages), 15, 0.9, seed=3)[0]


def test_raw_stream_ends_with_done(server):
    body = {"model": NAME, "prompt": "The dog", "max_tokens": 4, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[len("data: "):]) for line in lines[:-1]]
    assert all(c["object"] == "text_completion" and "usage" not in c for c in chunks)


def test_completions_seed_n_and_top_k(client, loaded):
    prompt = "The cat sat"
    ids = loaded.tokenizer.encode(prompt)
    settings = {"model": NAME, "prompt": prompt, "max_tokens": 10, "temperature": 2.0, "seed": 11, "extra_body": {"top_k": 20}}
    three = client.completions.create(**settings, n=3)
    assert [c.index for c in three.choices] == [0, 1, 2]
    texts = [c.text for c in three.choices]
    assert len(set(texts)) > 1  # n answers differ...
    assert texts == [c.text for c in client.completions.create(**settings, n=3).choices]  # ...and repeat
    for i, text in enumerate(texts):  # answer i is the request seeded seed + i
        assert text == expected(loaded, ids, 10, 2.0, seed=11 + i, top_k=20)[0]
    assert three.usage.prompt_tokens == len(ids)  # the prompt counts once
    assert three.usage.completion_tokens == sum(expected(loaded, ids, 10, 2.0, 11 + i, 20)[1] for i in range(3))


def test_several_prompts_in_one_completion_request(client, loaded):
    prompts = ["The cat", "A bird sang"]
    reply = client.completions.create(model=NAME, prompt=prompts, max_tokens=5, temperature=0, n=2)
    answers = [expected(loaded, loaded.tokenizer.encode(p), 5) for p in prompts]
    assert [c.text for c in reply.choices] == [answers[0][0]] * 2 + [answers[1][0]] * 2  # prompt-major, as OpenAI
    assert reply.usage.prompt_tokens == sum(len(loaded.tokenizer.encode(p)) for p in prompts)
    assert reply.usage.completion_tokens == 2 * (answers[0][1] + answers[1][1])


def test_stop_strings_cut_the_text(client, loaded):
    prompt = "The dog ran"
    ids = loaded.tokenizer.encode(prompt)
    full, _, _ = expected(loaded, ids, 20)
    stop = full.split()[2]  # a word the model produces (not at the start: the text before it is kept)
    reply = client.completions.create(model=NAME, prompt=prompt, max_tokens=20, temperature=0, stop=[stop, "zzz"])
    assert reply.choices[0].text == full[: full.index(stop)] and reply.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model=NAME, prompt=prompt, max_tokens=20, temperature=0, stop=stop,
                                         stream=True, stream_options={"include_usage": True})
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == reply.choices[0].text
    # Usage: the tokens up to the one that completed the stop string.
    tokens = generate(loaded.model, [ids], 20)[0][len(ids):]
    taken = next(k for k in range(1, 21) if stop in loaded.tokenizer.decode(tokens[:k]))
    assert reply.usage.completion_tokens == chunks[-1].usage.completion_tokens == taken


# Bad input: OpenAI's error object, a 4xx, never a 500 -----------------------------------------

CHAT = {"model": NAME, "messages": [{"role": "user", "content": "hi"}]}
BAD = [
    ("not json", b'{"model": "tiny", ', 400, None),
    ("wrong type", {**CHAT, "temperature": "hot"}, 400, "temperature"),
    ("float tokens", {**CHAT, "max_tokens": 1.5}, 400, "max_tokens"),
    ("out of range", {**CHAT, "top_p": 0}, 400, "top_p"),
    ("unknown field", {**CHAT, "logprobs": True}, 400, "logprobs"),
    ("empty messages", {**CHAT, "messages": []}, 400, "messages"),
    ("bad role", {**CHAT, "messages": [{"role": "robot", "content": "x"}]}, 400, "messages.0.role"),
    ("no model", {"messages": CHAT["messages"]}, 400, "model"),
    ("unknown model", {**CHAT, "model": "gpt-5"}, 404, "model"),
    ("n over the limit", {**CHAT, "n": 9}, 400, "n"),
    ("prompt too long", {**CHAT, "messages": [{"role": "user", "content": "cat, " * 200}]}, 400, "messages"),
    ("body too large", {**CHAT, "messages": [{"role": "user", "content": "x" * 30_000}]}, 413, None),
]


@pytest.mark.parametrize("body, status, param", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_gets_an_openai_error(server, body, status, param):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(server.url + "/v1/chat/completions", content=content, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param
    assert error["message"] and "Traceback" not in r.text


def test_openai_client_raises_on_bad_input(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=CHAT["messages"])
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model=NAME, prompt="dog " * 300)


def test_routes_and_methods_that_do_not_exist(server):
    assert httpx.get(server.url + "/v1/nothing").json()["error"]["code"] == "not_found"
    r = httpx.get(server.url + "/v1/chat/completions")
    assert r.status_code == 405 and "error" in r.json()


def test_long_prompts_cropped_when_asked_and_max_tokens_capped(loaded):
    config = ServeConfig(crop_prompts=True, max_tokens=500)
    with TestClient(create_app(loaded, config, model_name=NAME)) as http:
        body = {"model": NAME, "prompt": "dog " * 300, "max_tokens": 8, "temperature": 0}
        usage = http.post("/v1/completions", json=body).json()["usage"]
        assert usage["prompt_tokens"] == 128 - 8
        body = {"model": NAME, "prompt": "The cat", "temperature": 0}  # default max_tokens 500: capped
        reply = http.post("/v1/completions", json=body).json()
        assert reply["usage"]["total_tokens"] <= 128


def test_an_instruction_model_answers_in_its_prompt_template(loaded):
    from buildllm.weights.loader import LoadedModel

    template = {"instruction": "Q: {instruction}", "input": " ({input})", "response": "\nA:"}  # a short one
    instruct = LoadedModel(loaded.model, loaded.tokenizer, prompt_template=template)
    messages = [{"role": "system", "content": "a cat"}, {"role": "user", "content": "Describe it."}]
    with TestClient(create_app(instruct, ServeConfig(), model_name=NAME)) as http:
        body = {"model": NAME, "messages": messages, "max_tokens": 6, "temperature": 0}
        reply = http.post("/v1/chat/completions", json=body).json()
    ids = instruct.tokenizer.encode(chat_prompt(messages, instruct.tokenizer, template))
    assert ids != chat_ids(loaded, messages)  # not the base model's transcript
    assert reply["usage"]["prompt_tokens"] == len(ids)
    assert reply["choices"][0]["message"]["content"] == expected(instruct, ids, 6)[0]


def test_api_key_guards_v1_only(loaded):
    with TestClient(create_app(loaded, ServeConfig(api_key="s3cret"), model_name=NAME)) as http:
        assert http.get("/v1/models").status_code == 401
        r = http.get("/v1/models", headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert http.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert http.get("/health").status_code == 200 and http.get("/").status_code == 200
        assert "access-control-allow-origin" not in http.get("/health", headers={"Origin": "http://a.b"}).headers
    http = TestClient(create_app(loaded, ServeConfig(cors_origin=("http://a.b",)), model_name=NAME))
    assert http.get("/health", headers={"Origin": "http://a.b"}).headers["access-control-allow-origin"] == "http://a.b"


def test_full_queue_answers_429_and_a_closed_engine_503(loaded):
    from buildllm.serve.batching import Request, Sampling

    app = create_app(loaded, ServeConfig(max_batch=1, max_queue=1), model_name=NAME)
    http = TestClient(app)  # no lifespan: the engine does not run, so what is queued stays queued
    engine = app.state.engine
    engine.submit([Request([1], Sampling(5), lambda *e: None) for _ in range(2)])  # the free slot + one waiting
    r = http.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
    engine.close()
    assert http.post("/v1/chat/completions", json=CHAT).status_code == 503


@pytest.mark.parametrize("stream", [True, False], ids=["streaming", "waiting"])
def test_a_client_that_hangs_up_frees_its_slot(server, loaded, stream, monkeypatch):
    from buildllm.serve.batching import BatchEngine

    decode = BatchEngine._decode  # each step slow enough to hang up mid-way (the C++ step skips model hooks)
    monkeypatch.setattr(BatchEngine, "_decode", lambda self, busy: (time.sleep(0.01), decode(self, busy))[1])
    hook = loaded.model.register_forward_hook(lambda *_: time.sleep(0.01))  # and the prefill
    try:
        before = httpx.get(server.url + "/health").json()["finished"].get("cancelled", 0)
        body = {"model": NAME, "prompt": "The cat", "max_tokens": 100, "stream": stream}
        if stream:
            with httpx.stream("POST", server.url + "/v1/completions", json=body) as r:
                next(r.iter_lines())  # one event, then hang up
        else:
            with pytest.raises(httpx.ReadTimeout):  # the client gives up waiting
                httpx.post(server.url + "/v1/completions", json=body, timeout=0.3)
        deadline = time.monotonic() + 10
        while (health := httpx.get(server.url + "/health").json())["running"] or \
                health["finished"].get("cancelled", 0) == before:
            assert time.monotonic() < deadline, health
            time.sleep(0.05)
    finally:
        hook.remove()


def test_32_concurrent_clients_get_what_they_get_one_by_one(server):
    # Half stream, half do not; all sample with their own seed; the server batches them (4 slots,
    # the rest queue). Each text must equal the same request sent alone afterwards.
    async def ask(client, i):
        settings = {"model": NAME, "messages": [{"role": "user", "content": f"The cat {i}"}], "max_tokens": 12,
                        "temperature": 2.0, "seed": i}
        if i % 2:
            stream = await client.chat.completions.create(**settings, stream=True)
            return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        return (await client.chat.completions.create(**settings)).choices[0].message.content

    async def run(concurrent: bool):
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0) as client:
            if concurrent:
                return await asyncio.wait_for(asyncio.gather(*(ask(client, i) for i in range(32))), 60)
            return [await ask(client, i) for i in range(32)]

    together = asyncio.run(run(True))
    assert together == asyncio.run(run(False))
    assert len(set(together)) > 16
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["running"] == health["waiting"] == 0


def test_bad_server_options_fail_before_the_model_loads(capsys):
    from buildllm import cli

    assert cli.main(["serve", "--model", "does-not-exist", "--max-batch", "0"]) == 2
    assert capsys.readouterr().err == "error: max_batch must be at least 1, got 0\n"


def test_ctrl_c_finishes_the_request_in_flight_and_exits_0(tmp_path, capsys):
    # `buildllm serve` runs here in the main thread (where signals arrive); a client thread waits
    # for it, starts a stream, sends this process SIGINT mid-way, and reads the stream to its end.
    import socket

    from buildllm import cli

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url, seen = f"http://127.0.0.1:{port}", {}

    def client():
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                httpx.get(url + "/health")
                break
            except httpx.TransportError:
                time.sleep(0.05)
        body = {"model": NAME, "prompt": "The cat", "max_tokens": 60, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            next(lines)  # the request is in flight
            os.kill(os.getpid(), signal.SIGINT)
            seen["rest"] = [line for line in lines if line]

    thread = threading.Thread(target=client)
    thread.start()
    assert cli.main(["serve", "--model", str(tiny_model_folder(tmp_path / NAME)), "--port", str(port)]) == 0
    thread.join(timeout=30)
    rest = seen["rest"]
    assert rest[-1] == "data: [DONE]" and '"finish_reason": "length"' in rest[-2]  # it finished
    out, err = capsys.readouterr()
    assert out.startswith(f"serving {NAME} on {url} ") and "Traceback" not in err
