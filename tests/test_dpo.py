"""DPO: the loss against a hand computation, learning a rule from preference pairs, LoRA's single copy
of the weights, bad records, exact resume, and the command end to end."""

import copy
import json
import math
import random
from functools import partial

import pytest
import torch
from safetensors.torch import load_file

from buildllm.cli import main
from buildllm.errors import UserError
from buildllm.finetune.dpo import DPOTask, Reference, finetune_dpo
from buildllm.finetune.instruct import TEMPLATES
from buildllm.finetune.lora import apply_lora
from buildllm.finetune.preference_data import (
    collate_preference,
    encode_preferences,
    read_preference_data,
)
from buildllm.tokenizer import WordTokenizer
from buildllm.weights.checkpoint import save_model
from buildllm.weights.loader import load_model

ENGINE = {"device": "cpu", "dtype": "fp32", "progress": False, "log": None}

# A rule to learn: "odd or even : seven" is answered "odd .", never "even .". Random filler words
# in front make the held-out prompts sequences the model has not seen.
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven"]
FILLER = ["please", "tell", "me", "now", "quickly", "friend", "today", "say"]


def parity_records(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        k = rng.randrange(len(NUMBERS))
        words = [rng.choice(FILLER) for _ in range(rng.randint(0, 3))]
        right, wrong = ("even", "odd") if k % 2 == 0 else ("odd", "even")
        records.append({"prompt": " ".join([*words, "odd or even :", NUMBERS[k]]),
                        "chosen": f"{right} .", "rejected": f"{wrong} ."})
    return records


def tokenizer_for(texts) -> WordTokenizer:
    return WordTokenizer.from_text(list(texts))


@pytest.fixture
def tiny_model(tiny_gpt):
    return partial(tiny_gpt, context_length=32, n_layers=1)


@pytest.fixture
def parity(tmp_path):
    records = parity_records(120)
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path, tokenizer_for(" ".join(r.values()) for r in records)


# The loss ----------------------------------------------------------------------------------------


def answer_logprob_by_hand(model, prompt: list[int], answer: list[int]) -> float:
    """log p(answer | prompt), one token at a time, from the unpadded sequence: in float64."""
    ids = prompt + answer
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids]))[0].double(), dim=-1)
    # The token at position t is predicted by the output at position t - 1.
    return sum(logprobs[t - 1, ids[t]].item() for t in range(len(prompt), len(ids)))


def test_loss_on_a_fixed_batch_equals_a_hand_computation(tiny_model, parity):
    """sum over pairs of -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))), each log pi summed
    over the answer's tokens (end-of-text included) with the prompt and the padding left out."""
    path, tok = parity
    pairs = read_preference_data(path)[:5]
    encoded = encode_preferences(pairs, tok, TEMPLATES["alpaca"], max_length=32)
    policy = tiny_model(tok.vocab_size)
    reference = Reference(policy)  # the start, copied; then the policy moves away from it
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    beta = 0.1
    task = DPOTask(None, reference, beta, tok, None, None)
    batch = collate_preference(encoded, pad_id=tok.eot_id)  # padded: the prompts differ in length
    assert len({len(p) + len(c) for p, c, _ in encoded}) > 1

    expected = 0.0
    for prompt, chosen, rejected in encoded:
        pi_c, pi_r = (answer_logprob_by_hand(policy, prompt, a + [tok.eot_id]) for a in (chosen, rejected))
        ref_c, ref_r = (answer_logprob_by_hand(reference.network, prompt, a + [tok.eot_id]) for a in (chosen, rejected))
        z = beta * ((pi_c - ref_c) - (pi_r - ref_r))
        expected += math.log1p(math.exp(-z))  # -log sigmoid(z)
    loss = task.loss(policy, batch)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert abs(expected - 5 * math.log(2)) > 1e-3  # the policy moved: not the trivial value at the start
    loss.backward()  # the gradient reaches the policy, never the reference
    assert all(p.grad is not None for p in policy.parameters())
    assert all(p.grad is None for p in reference.network.parameters())


# Learning ----------------------------------------------------------------------------------------


def test_dpo_learns_to_prefer_the_answers_that_follow_the_rule(tiny_model, tmp_path, parity):
    """Held-out preference accuracy from 0.5 (policy = reference: every reward ties) to >= 0.9, while
    the chosen answers' log-probability does not collapse (it stays within 1 nat of the start)."""
    path, tok = parity
    result = finetune_dpo(tiny_model(tok.vocab_size), path, tmp_path / "dpo", tokenizer=tok, epochs=2, lr=3e-3,
                          batch_size=16, val_fraction=0.2, **ENGINE)
    first, last = result.initial, result.history[-1]
    assert (first["val_accuracy"], first["val_margin"]) == (0.5, 0.0)
    assert first["val_loss"] == pytest.approx(math.log(2))
    assert last["val_accuracy"] >= 0.9 and last["val_margin"] > 0.1
    assert last["val_chosen_logp"] > first["val_chosen_logp"] - 1.0
    assert last["val_rejected_logp"] < first["val_rejected_logp"] - 1.0
    assert result.best_epoch == 2
    assert load_model(tmp_path / "dpo").model.cfg.vocab_size == tok.vocab_size  # an ordinary model folder
    assert not (tmp_path / "dpo" / "prompt_template.json").exists()  # raw prompts, plain model: no template


# LoRA: the reference is the same network --------------------------------------------------------


def storage_bytes(*modules) -> int:
    """Bytes of the distinct tensor storages behind the modules' parameters and buffers."""
    storages = {}
    for module in modules:
        for t in [*module.parameters(), *module.buffers()]:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


def test_lora_reference_holds_no_second_copy_of_the_weights(tiny_model):
    base = tiny_model(50)
    lora = apply_lora(copy.deepcopy(base), rank=2, alpha=4)
    with torch.no_grad():  # trained adapters: the policy now differs from the base
        for name, p in lora.named_parameters():
            if name.endswith("lora.B"):
                p.normal_()
    reference = Reference(lora)
    assert storage_bytes(lora, reference.network) == storage_bytes(lora)  # one copy of everything
    full = Reference(base)
    assert storage_bytes(base, full.network) == 2 * storage_bytes(base)  # without LoRA: a frozen copy

    x = torch.randint(0, 50, (2, 7))
    lora.train()
    assert torch.equal(reference(x), base.eval()(x))  # adapters off: exactly the base model
    assert not torch.allclose(lora(x), base(x))  # ... and on again afterwards, in training mode
    assert lora.training


# Bad input ---------------------------------------------------------------------------------------


Q = "odd or even : two"


@pytest.mark.parametrize("record, message", [
    ({"prompt": Q, "rejected": "odd ."}, "record 1: the record has no 'chosen' answer"),
    ({"prompt": Q, "chosen": "even ."}, "record 1: the record has no 'rejected' answer"),
    ({"prompt": Q, "chosen": "even .", "rejected": "even ."}, "record 1: chosen and rejected are the same answer"),
    ({"prompt": Q, "chosen": "even .", "rejected": "even  . "}, "record 1: chosen and rejected are the same tokens"),
    ({"prompt": "odd " * 31, "chosen": "even . even .", "rejected": "even . odd ."},
     "record 1: chosen and rejected are the same in the 2 tokens the window leaves after the prompt"),
    ({"prompt": Q, "chosen": "   ", "rejected": "odd ."}, "record 1: the chosen answer '   ' encodes to no tokens"),
    ({"prompt": "odd " * 40, "chosen": "even .", "rejected": "odd ."},
     "record 1: the prompt takes 40 tokens and leaves no room for the answer in the 32-token window"),
    ({"chosen": "even .", "rejected": "odd ."}, "record 1: give the record a 'prompt' or an 'instruction'"),
    ({"prompt": "two", "chosen": 2, "rejected": "odd ."}, "record 1: 'chosen' must be a string"),
])
def test_bad_records_are_one_line_naming_the_file_and_record(tmp_path, record, message):
    good = {"prompt": "odd or even : one", "chosen": "odd .", "rejected": "even ."}
    path = tmp_path / "prefs.json"
    path.write_text(json.dumps([good, record], indent=1))
    tok = tokenizer_for(["odd or even : one two ."])
    with pytest.raises(UserError) as e:
        encode_preferences(read_preference_data(path), tok, TEMPLATES["alpaca"], max_length=32)
    assert f"{path}:" in str(e.value) and message in str(e.value) and "\n" not in str(e.value)


# Resume ------------------------------------------------------------------------------------------


def test_lora_dpo_adapts_another_architectures_own_layers(tmp_path, parity):
    """LoRA's default targets are the architecture's: a Llama's seven projections, not GPT-2's names."""
    from buildllm import LlamaConfig, LlamaModel
    from buildllm.finetune.lora import lora_layers

    path, tok = parity
    torch.manual_seed(0)
    llama = LlamaModel(LlamaConfig(vocab_size=tok.vocab_size, context_length=32, emb_dim=32, n_heads=4, n_kv_heads=2,
                                   n_layers=1, hidden_dim=64))
    finetune_dpo(llama, path, tmp_path / "dpo", tokenizer=tok, epochs=1, lora_rank=2, batch_size=16, **ENGINE)
    assert {name.rpartition(".")[2] for name in lora_layers(llama)} == set(llama.lora_targets)
    assert (tmp_path / "dpo" / "adapter.safetensors").is_file()


def test_resumed_run_matches_an_uninterrupted_one(tiny_model, tmp_path, parity):
    """One epoch, then --resume with two: the same weights as two epochs straight. Without LoRA the
    reference is a frozen copy taken before the checkpoint loads, so it is the starting model in both."""
    path, tok = parity
    save_model(tmp_path / "base", tiny_model(tok.vocab_size), tok)
    run = dict(batch_size=16, lr=3e-3, **ENGINE)
    finetune_dpo(tmp_path / "base", path, tmp_path / "resumed", epochs=1, **run)
    resumed = finetune_dpo(tmp_path / "base", path, tmp_path / "resumed", epochs=2, resume=True, **run)
    straight = finetune_dpo(tmp_path / "base", path, tmp_path / "straight", epochs=2, **run)
    a, b = (load_file(tmp_path / name / "model.safetensors") for name in ("resumed", "straight"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.history == [{**h, "seconds": r["seconds"]} for h, r in zip(straight.history, resumed.history)]


# The command -------------------------------------------------------------------------------------


def book_records(n: int = 24) -> list[dict]:
    """The book's preference data: instruction, input, output, and the chosen and rejected answers."""
    return [{"instruction": f"Is {NUMBERS[i % 12]} odd or even?", "input": "number" if i % 2 else "",
             "output": "It is odd.", "chosen": "It is " + ("even." if i % 2 == 0 else "odd."),
             "rejected": "no idea"} for i in range(n)]


def test_cli_dpo_with_lora_on_the_books_format(tiny_model, tmp_path, capsys):
    records = book_records()
    data = tmp_path / "instruction-data-with-preference.json"
    data.write_text(json.dumps(records, indent=1))
    template = TEMPLATES["alpaca"]
    tok = tokenizer_for(template.format(r["instruction"], r["input"]) + r["chosen"] + " " + r["rejected"]
                        for r in records)
    save_model(tmp_path / "base", tiny_model(tok.vocab_size, context_length=64), tok)
    out = tmp_path / "dpo"
    assert main(["finetune", "dpo", "--model", str(tmp_path / "base"), "--data", str(data), "--out", str(out),
                 "--epochs", "1", "--batch-size", "4", "--lr", "1e-3", "--beta", "0.5", "--lora-rank", "2",
                 "--seed", "1", "--device", "cpu", "--no-progress"]) == 0
    assert f"saved {out} (epoch 1)" in capsys.readouterr().out
    loaded = load_model(out)  # a plain model folder, the adapters merged
    assert loaded.prompt_template == template.to_dict()  # instruction records: chat lays prompts out alike
    assert (out / "adapter.safetensors").is_file() and (out / "checkpoints").is_dir()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["initial"]["val_accuracy"] == 0.5 and metrics["split_sizes"] == [22, 2]
    saved = json.loads((out / "train_config.json").read_text())
    assert (saved["beta"], saved["lora_rank"], saved["seed"]) == (0.5, 2, 1)

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{**records[0], "rejected": records[0]["chosen"]}], indent=1))
    assert main(["finetune", "dpo", "--model", str(tmp_path / "base"), "--data", str(bad), "--out",
                 str(tmp_path / "o"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {bad}:2: record 0: chosen and rejected are the same answer: a pair must differ"]
