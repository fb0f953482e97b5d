"""Continuous batching gives each request exactly the tokens it gives alone."""

import pytest
import torch

from buildllm.generation.sampling import generate
from buildllm.models.gpt2 import GPTConfig, GPTModel
from buildllm.serve.batching import BatchEngine, QueueFull, Request, Sampling


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPTModel(GPTConfig(vocab_size=97, context_length=24, emb_dim=32, n_heads=4, n_layers=2)).eval()


def alone(model, prompt, sampling):
    """What ``generate`` gives for one prompt with its own seeded generator: the reference."""
    gen = torch.Generator().manual_seed(sampling.seed) if sampling.seed is not None else None
    out = generate(model, [prompt], sampling.max_tokens, sampling.temperature, sampling.top_k, sampling.top_p,
                   eos_id=sampling.stop_ids[0] if sampling.stop_ids else None, generator=gen)[0]
    return out[len(prompt):]


def request(prompt, **sampling):
    events = []
    r = Request(prompt, Sampling(**sampling), lambda token, reason: events.append((token, reason)))
    r.events = events
    return r


def run(engine, schedule, steps=200):
    """Step the engine, submitting ``schedule[i]`` (a list of requests) before step i."""
    for i in range(steps):
        if schedule.get(i):
            engine.submit(schedule[i])
        engine.step()
        if i >= max(schedule) and not engine.waiting and engine.free_slots() == len(engine.slots):
            return
    raise AssertionError("the engine did not finish")


SETTINGS = [
    {"max_tokens": 10, "seed": 1},  # greedy
    {"max_tokens": 14, "temperature": 1.0, "seed": 2},
    {"max_tokens": 6, "temperature": 0.8, "top_k": 5, "seed": 3},
    {"max_tokens": 12, "temperature": 1.2, "top_p": 0.9, "seed": 4},
    {"max_tokens": 9, "temperature": 1.0, "seed": 5, "stop_ids": (7, 11)},
    {"max_tokens": 16, "seed": 6},
]
PROMPTS = [[5, 6, 7], [9] * 8, [1, 2], [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50], [3], [60, 61, 62, 63, 64, 65]]


def test_rows_that_join_midway_give_what_they_give_alone(model, monkeypatch):
    # Capacity 24 with max_batch 3: requests wait for slots, join at different steps, leave at
    # different steps, a long prompt joins a short batch (shift right) and the cache compacts
    # (shift left) several times. Every request must still give exactly its tokens alone.
    engine = BatchEngine(model, max_batch=3, max_waiting=10)
    shifts = []
    shift = engine._shift
    monkeypatch.setattr(engine, "_shift", lambda by: shifts.append(by) or shift(by))
    requests = [request(p, **s) for p, s in zip(PROMPTS, SETTINGS)]
    run(engine, {0: requests[:2], 3: requests[2:4], 5: requests[4:5], 11: requests[5:]})
    for r in requests:
        expected = alone(model, r.prompt, r.sampling)
        assert r.tokens == expected, (r.prompt, r.sampling)
        assert [t for t, _ in r.events] == expected
        reason = "stop" if expected[-1] in r.sampling.stop_ids else "length"
        assert r.events[-1][1] == r.finish_reason == reason
        assert all(reason is None for _, reason in r.events[:-1])
    assert engine.counts["length"] + engine.counts["stop"] == len(requests)
    assert min(shifts) < 0 < max(shifts), shifts  # the cache was compacted and also grown on the left


def test_a_cancelled_request_frees_its_slot_and_leaves_the_others_exact(model):
    engine = BatchEngine(model, max_batch=2, max_waiting=4)
    a, b, c = request([4, 5], max_tokens=20, seed=0), request([8], max_tokens=15, temperature=1.0, seed=9), \
        request([30, 31], max_tokens=8, temperature=0.7, seed=7)
    engine.submit([a, b, c])  # c waits: two slots
    for _ in range(3):
        engine.step()
    assert c.slot is None and len(a.tokens) == 4  # the prefill's token, then one per step
    engine.cancel(a)
    run(engine, {0: []})
    assert a.finish_reason == "cancelled" and a.events[-1] == (None, "cancelled") and len(a.tokens) == 4
    assert b.tokens == alone(model, b.prompt, b.sampling)
    assert c.tokens == alone(model, c.prompt, c.sampling)


def test_queue_limit_and_context_limit(model):
    engine = BatchEngine(model, max_batch=1, max_waiting=1)
    engine.submit([request([1], max_tokens=3)])
    engine.submit([request([1], max_tokens=3)])  # one free slot + one waiting
    with pytest.raises(QueueFull):
        engine.submit([request([1], max_tokens=3)])
    with pytest.raises(ValueError, match="fit the context of 24"):
        BatchEngine(model).submit([request([1] * 20, max_tokens=5)])
