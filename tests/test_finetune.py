"""Fine-tuning: data reading and its errors, the collate masks, the classifier and instruction loops, CLI."""

import json
from functools import partial

import pytest
import torch
from conftest import (  # the suite's synthetic data
    KEYWORDS,
    instruction_records,
    write_csv,
)
from safetensors.torch import load_file

from buildllm.cli import main
from buildllm.errors import UserError
from buildllm.finetune.classify import (
    LabeledText,
    balance_classes,
    classifier_logits,
    collate_classification,
    finetune_classifier,
    load_classifier,
    make_classifier,
    read_labeled_texts,
)
from buildllm.finetune.common import split_items
from buildllm.finetune.instruct import (
    TEMPLATES,
    collate_instruction,
    finetune_instruct,
    get_prompt_template,
    load_prompt_template,
    read_instruction_data,
)
from buildllm.finetune.lora import ADAPTER_WEIGHTS, load_adapters
from buildllm.weights.checkpoint import save_model
from buildllm.weights.loader import load_model


@pytest.fixture
def tiny_model(tiny_gpt):
    return partial(tiny_gpt, context_length=32, n_layers=1)


# Reading data ------------------------------------------------------------------------------------


def test_csv_tsv_and_sniffed_files_read_alike(tmp_path):
    rows = [("one, with a comma", "b"), ("two", "a"), ("three", "c")]
    csv_path = tmp_path / "d.csv"
    csv_path.write_text('text,label\n"one, with a comma",b\ntwo,a\n\nthree,c\n')
    tsv_path = write_csv(tmp_path / "d.tsv", rows, sep="\t")
    sniffed = write_csv(tmp_path / "d.txt", rows, sep="\t")
    for path in (csv_path, tsv_path, sniffed):
        examples, labels = read_labeled_texts(path)
        assert labels == ["a", "b", "c"]
        assert [(e.text, e.label) for e in examples] == rows
    assert [e.line for e in read_labeled_texts(csv_path)[0]] == [2, 3, 5]


def test_headerless_file_with_column_numbers(tmp_path):
    path = tmp_path / "SMSSpamCollection.tsv"
    path.write_text("ham\tsee you soon\nspam\tWIN a prize now\n")
    examples, labels = read_labeled_texts(path, text_column=1, label_column=0, header=False)
    assert labels == ["ham", "spam"] and examples[1].text == "WIN a prize now"


def test_given_label_set_keeps_its_order(tmp_path):
    path = write_csv(tmp_path / "d.csv", [("x", "spam"), ("y", "ham")])
    assert read_labeled_texts(path, labels=["spam", "ham"])[1] == ["spam", "ham"]


@pytest.mark.parametrize(
    "content, kwargs, message",
    [
        ("txt,label\nhello,a\n", {}, r"d\.csv:1: no text column 'text'"),
        ("text,label\nhello,a\nworld\n", {}, r"d\.csv:3: 1 fields, the header has 2"),
        ("text,label\nhello,a\nworld,c\n", {"labels": ["a", "b"]}, r"d\.csv:3: label 'c' is not one of a, b"),
        ("text,label\nhello,a\n   ,b\n", {}, r"d\.csv:3: the text is empty"),
        ("text,label\nhello,a\nhi,a\n", {}, "at least 2 classes"),
    ],
)
def test_malformed_rows_name_the_file_and_line(tmp_path, content, kwargs, message):
    path = tmp_path / "d.csv"
    path.write_text(content)
    with pytest.raises(UserError, match=message):
        read_labeled_texts(path, **kwargs)


def test_balance_undersamples_to_the_smallest_class():
    rows = [LabeledText(f"t{i}", "ham" if i % 4 else "spam", i) for i in range(40)]  # 30 ham, 10 spam
    balanced = balance_classes(rows, seed=1)
    assert sum(r.label == "ham" for r in balanced) == 10
    assert sum(r.label == "spam" for r in balanced) == 10
    assert balanced == balance_classes(rows, seed=1)


def test_split_sizes_and_seed():
    train, val, test = split_items(range(100), (0.7, 0.1, 0.2), seed=5)
    assert (len(train), len(val), len(test)) == (70, 10, 20)
    assert sorted(train + val + test) == list(range(100))
    assert (train, val, test) == split_items(range(100), (0.7, 0.1, 0.2), seed=5)
    assert train != split_items(range(100), (0.7, 0.1, 0.2), seed=6)[0]
    with pytest.raises(UserError, match="sum to 1"):
        split_items(range(10), (0.7, 0.2, 0.2), seed=0)


def test_instruction_data_json_and_jsonl(tmp_path):
    records = instruction_records(3)
    array = tmp_path / "d.json"
    array.write_text(json.dumps(records, indent=2))
    lines = tmp_path / "d.jsonl"
    lines.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    for path in (array, lines):
        examples = read_instruction_data(path)
        assert [(e.instruction, e.input, e.output) for e in examples] == [
            (r["instruction"], r["input"], r["output"]) for r in records
        ]
    assert [e.line for e in read_instruction_data(lines)] == [1, 2, 3]
    assert [e.line for e in read_instruction_data(array)] == [2, 7, 12]


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("d.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": }\n', r"d\.jsonl:2: invalid JSON"),
        ("d.jsonl", '{"instruction": "a", "output": "b"}\n\n{"instruction": "c"}\n', r"d\.jsonl:3: the record has no 'output'"),
        ("d.json", '[\n {"instruction": "a", "output": "b"},\n {"output": "c"}\n]', r"d\.json:3: the record has no 'instruction'"),
        ("d.json", '[\n {"instruction": "a", "output": "b"},\n {"instruction": "a" "output": "c"}\n]', r"d\.json:3: invalid JSON"),
        ("d.json", '[\n {"instruction": "a", "output": 5}\n]', r"d\.json:2: 'output' must be a string"),
    ],
)
def test_malformed_records_name_the_file_and_line(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(UserError, match=message):
        read_instruction_data(path)


# Prompt templates --------------------------------------------------------------------------------


def book_format_input(entry):
    """The book's chapter 7 format_input, verbatim in behaviour."""
    instruction_text = (
        f"Below is an instruction that describes a task. "
        f"Write an appropriate response to complete the request."
        f"\n\n### Instruction:\n{entry['instruction']}"
    )
    input_text = f"\n\n### Input:\n{entry['input']}" if entry["input"] else ""
    return instruction_text + input_text


@pytest.mark.parametrize("entry", [{"instruction": "Name a color.", "input": ""},
                                   {"instruction": "Rewrite {input}", "input": "it's {braces}"}])
def test_alpaca_template_is_the_books(entry):
    prompt = TEMPLATES["alpaca"].format(entry["instruction"], entry["input"])
    assert prompt == book_format_input(entry) + "\n\n### Response:\n"


def test_custom_template_file(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"instruction": "Q: {instruction}", "input": " ({input})", "response": "\nA:"}))
    template = get_prompt_template(path)
    assert template.format("why?", "context") == "Q: why? (context)\nA:"
    assert template.format("why?") == "Q: why?\nA:"
    path.write_text(json.dumps({"instruction": "Q:", "response": "A:"}))
    with pytest.raises(UserError, match=r"\{instruction\}"):
        get_prompt_template(path)


# Collate functions -------------------------------------------------------------------------------

PAD = 9
BATCH = [([1, 2, 3, 4], 2), ([5, 6], 1), ([7, 8, 1], 3)]  # (token ids, prompt length)


def test_instruction_collate_pads_shifts_and_masks():
    inputs, targets = collate_instruction(BATCH, pad_id=PAD)
    assert inputs.tolist() == [[1, 2, 3, 4], [5, 6, 9, 9], [7, 8, 1, 9]]
    # The first end-of-text target is kept (the model learns to stop); later padding is ignored.
    assert targets.tolist() == [[2, 3, 4, 9], [6, 9, -100, -100], [8, 1, 9, -100]]


def test_instruction_collate_masks_the_prompt():
    _, targets = collate_instruction(BATCH, pad_id=PAD, mask_prompt=True)
    # prompt of 2 tokens: target 0 (= token 1, still prompt) masked, target 1 (first response token) kept
    assert targets.tolist() == [[-100, 3, 4, 9], [6, 9, -100, -100], [-100, -100, 9, -100]]


def test_instruction_collate_allowed_max_length():
    inputs, targets = collate_instruction(BATCH, pad_id=PAD, allowed_max_length=3, ignore_index=-1)
    assert inputs.tolist() == [[1, 2, 3], [5, 6, 9], [7, 8, 1]]
    assert targets.tolist() == [[2, 3, 4], [6, 9, -1], [8, 1, 9]]


def test_classification_collate():
    batch = [([1, 2, 3], 0), ([4], 2)]
    inputs, lengths, labels = collate_classification(batch, pad_id=PAD)
    assert inputs.tolist() == [[1, 2, 3], [4, 9, 9]]
    assert lengths.tolist() == [3, 1] and labels.tolist() == [0, 2]
    assert collate_classification(batch, pad_id=PAD, pad_to=5)[0].tolist() == [[1, 2, 3, 9, 9], [4, 9, 9, 9, 9]]


def test_last_token_representation_ignores_padding(tiny_model):
    model = make_classifier(tiny_model(20).eval(), num_classes=3, trainable="head")
    batch = [([1, 2, 3, 4, 5], 0), ([6, 7], 1)]
    short = collate_classification(batch, pad_id=19)
    long = collate_classification(batch, pad_id=19, pad_to=20)
    with torch.no_grad():
        a = classifier_logits(model, short[0], short[1])
        b = classifier_logits(model, long[0], long[1])
        alone = classifier_logits(model, torch.tensor([[6, 7]]), torch.tensor([2]))
        book = classifier_logits(model, long[0], long[1], representation="last_position")
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    torch.testing.assert_close(a[1:], alone, atol=1e-6, rtol=0)
    assert not torch.allclose(book[1], a[1])  # the book's choice reads a padding position here


def test_make_classifier_trainable_parts(tiny_model):
    def trainable(model):
        return {n.split(".")[0] + ("." + n.split(".")[1] if n.startswith("blocks") else "")
                for n, p in model.named_parameters() if p.requires_grad}

    assert trainable(make_classifier(tiny_model(20, n_layers=3), 2, "head")) == {"out_head"}
    assert trainable(make_classifier(tiny_model(20, n_layers=3), 2, "last_blocks", 2)) == {
        "blocks.1", "blocks.2", "final_norm", "out_head"}
    assert len(trainable(make_classifier(tiny_model(20, n_layers=3), 2, "all"))) == 7
    model = make_classifier(tiny_model(20), 4)
    assert model.out_head.weight.shape == (4, 32) and model.out_head.weight is not model.wte.weight


# Training loops ----------------------------------------------------------------------------------


def test_classifier_reaches_full_train_accuracy(tiny_model, tmp_path, classification_data):
    data, tok = classification_data
    result = finetune_classifier(tiny_model(tok.vocab_size), data, tmp_path / "clf", tokenizer=tok, trainable="all",
                                 epochs=8, lr=3e-3, device="cpu", log=None)
    assert result.history[-1]["train_accuracy"] == 1.0
    assert result.labels == ["mid", "neg", "pos"]
    assert len(result.history) == 8 and 1 <= result.best_epoch <= 8
    meta = json.loads((tmp_path / "clf" / "classifier.json").read_text())
    assert meta["num_classes"] == 3 and meta["labels"] == ["mid", "neg", "pos"]
    metrics = json.loads((tmp_path / "clf" / "metrics.json").read_text())
    assert metrics["split_sizes"] == [63, 9, 18] and metrics["test_accuracy"] == result.test_accuracy

    classifier = load_classifier(tmp_path / "clf")
    predictions = classifier.predict(["it was good", "so awful", "meh"])
    assert [label for label, _ in predictions] == ["pos", "neg", "mid"]
    assert all(0.34 < p <= 1 for _, p in predictions)
    assert load_model(tmp_path / "clf").classifier["labels"] == ["mid", "neg", "pos"]  # the one loader knows it


def test_lora_classifier_saves_adapters_and_head(tiny_model, tmp_path, classification_data):
    data, tok = classification_data
    result = finetune_classifier(tiny_model(tok.vocab_size), data, tmp_path / "clf", tokenizer=tok, lora_rank=2,
                                 lora_alpha=4, epochs=1, device="cpu", log=None)
    d = 32
    assert result.trainable_parameters == 2 * ((d + 3 * d) + (d + d) + (d + 4 * d) + (4 * d + d)) + 3 * d + 3
    state = load_file(tmp_path / "clf" / ADAPTER_WEIGHTS)
    assert {k for k in state if ".lora." not in k} == {"out_head.weight", "out_head.bias"}
    # Base model + classifier head + adapter file = the merged checkpoint.
    rebuilt = load_adapters(tmp_path / "clf", make_classifier(tiny_model(tok.vocab_size), 3)).eval()
    merged = load_classifier(tmp_path / "clf").model
    ids, lengths, _ = collate_classification([([1, 2, 3], 0), ([4, 5], 0)], pad_id=tok.eot_id)
    with torch.no_grad():
        torch.testing.assert_close(classifier_logits(rebuilt, ids, lengths), classifier_logits(merged, ids, lengths),
                                   atol=1e-5, rtol=0)


@pytest.mark.parametrize("lora_rank", [None, 4])
def test_one_instruction_epoch_lowers_the_loss(tiny_model, tmp_path, instruction_data, lora_rank):
    data, tok = instruction_data
    out = tmp_path / "inst"
    result = finetune_instruct(tiny_model(tok.vocab_size, context_length=64), data, out, tokenizer=tok, epochs=1,
                               lr=3e-3, mask_prompt=True, lora_rank=lora_rank, max_new_tokens=6, device="cpu",
                               log=None)
    assert result.history[0]["train_loss"] < result.initial_train_loss - 0.1
    assert result.history[0]["val_loss"] < result.initial_val_loss
    assert load_prompt_template(out) == TEMPLATES["alpaca"]
    model, saved_tok = load_model(out)  # merged: a plain language model either way
    assert saved_tok.vocab_size == tok.vocab_size
    responses = json.loads((out / "test_responses.json").read_text())
    assert len(responses) == 4 and set(responses[0]) == {"instruction", "input", "output", "model_response"}
    assert (out / "adapter_config.json").is_file() == bool(lora_rank)


def test_plain_model_has_no_template(tiny_model, tmp_path):
    model = tiny_model(20)
    save_model(tmp_path, model)
    assert load_prompt_template(tmp_path) is None


# Command line ------------------------------------------------------------------------------------


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    return err[0]


def test_cli_finetune_classify_then_classify(tiny_model, tmp_path, classification_data, capsys):
    data, tok = classification_data
    save_model(tmp_path / "base", tiny_model(tok.vocab_size), tok)
    code = main(["finetune", "classify", "--model", str(tmp_path / "base"), "--data", str(data),
                 "--out", str(tmp_path / "clf"), "--epochs", "1", "--trainable", "head", "--device", "cpu"])
    assert code == 0
    out = capsys.readouterr().out
    assert "trainable parameters: 99 of" in out and "test accuracy" in out
    assert main(["classify", "--checkpoint", str(tmp_path / "clf"), "good film", "so bad"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    for line in lines:
        label, probability = line.split("\t")
        assert label in KEYWORDS and 1 / 3 <= float(probability) <= 1


def test_cli_user_errors_exit_2_with_one_line(tiny_model, tmp_path, classification_data, instruction_data, capsys):
    data, tok = classification_data
    save_model(tmp_path / "base", tiny_model(tok.vocab_size), tok)
    base = ["--model", str(tmp_path / "base"), "--out", str(tmp_path / "o"), "--device", "cpu"]
    assert main(["finetune", "classify", *base, "--data", str(data), "--label-column", "stars"]) == 2
    assert "no label column 'stars'" in one_error_line(capsys)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\nnot json\n')
    assert main(["finetune", "instruct", *base, "--data", str(bad)]) == 2
    assert "bad.jsonl:2: invalid JSON" in one_error_line(capsys)
    assert main(["finetune", "instruct", *base, "--data", str(instruction_data[0]), "--split", "0.9,0.2"]) == 2
    assert "split" in one_error_line(capsys)
    assert main(["finetune", "classify", *base, "--data", str(data), "--lora-rank", "0"]) == 2
    one_error_line(capsys)
    assert main(["classify", "--checkpoint", str(tmp_path / "base"), "hello"]) == 2
    assert "not a classifier checkpoint" in one_error_line(capsys)


def test_chat_wraps_lines_in_the_instruction_template(tiny_model, tmp_path, instruction_data, capsys, monkeypatch):
    """The hook between `finetune instruct` and `buildllm chat`: an instruction checkpoint's saved
    template turns each stdin line into a prompt, and chat prints only the response."""
    import io

    from buildllm.generation.sampling import stream_text

    data, tok = instruction_data
    out = tmp_path / "inst"
    finetune_instruct(tiny_model(tok.vocab_size, context_length=64), data, out, tokenizer=tok, epochs=1, lr=3e-3,
                      test_responses=False, device="cpu", log=None)
    model, saved_tok = load_model(out)
    question = "add 3 and 4"
    templated = "".join(stream_text(model, saved_tok, TEMPLATES["alpaca"].format(question), max_new_tokens=8))
    raw = "".join(stream_text(model, saved_tok, question, max_new_tokens=8))
    assert templated != raw  # so the check below can tell whether the template was used

    monkeypatch.setattr("sys.stdin", io.StringIO(question + "\n"))
    assert main(["chat", "--checkpoint", str(out), "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out == templated + "\n"


def test_cli_finetune_reads_config_and_set_and_resumes_with_more_epochs(tiny_model, tmp_path, classification_data, capsys):
    """--config, then --set, then the options; a finished fine-tune continues with --resume --epochs."""
    from buildllm.finetune.classify import ClassifyConfig
    from buildllm.training.config import saved_config

    data, tok = classification_data
    save_model(tmp_path / "base", tiny_model(tok.vocab_size), tok)
    out = tmp_path / "clf"
    config = tmp_path / "classify.yaml"
    config.write_text(f"base: {tmp_path / 'base'}\ndata: {data}\nout: {out}\ntrainable: all\nepochs: 4\n"
                      "lr: 0.5\nbatch_size: 4\nseed: 7\n")
    first = ["finetune", "classify", "--config", str(config), "--set", "epochs=3", "--set", "lr=0.001",
             "--epochs", "1", "--trainable", "head", "--device", "cpu", "--no-progress"]
    assert main(first) == 0
    saved = saved_config(out, ClassifyConfig)
    assert (saved.epochs, saved.lr, saved.trainable, saved.batch_size, saved.seed) == (1, 0.001, "head", 4, 7)
    assert [h["epoch"] for h in json.loads((out / "metrics.json").read_text())["history"]] == [1]
    capsys.readouterr()

    assert main(first) == 2  # the out folder holds a run now: say what to do
    assert "already holds a training run: pass --resume" in one_error_line(capsys)
    assert main([*first, "--resume", "--epochs", "2"]) == 0
    assert [h["epoch"] for h in json.loads((out / "metrics.json").read_text())["history"]] == [1, 2]
    with pytest.raises(SystemExit):
        main([*first, "--resume", "--force"])  # they exclude each other: argparse's usage error, exit 2


def test_cli_finetune_instruct_takes_the_engine_options(tiny_model, tmp_path, instruction_data, capsys):
    data, tok = instruction_data
    save_model(tmp_path / "base", tiny_model(tok.vocab_size, context_length=64), tok)
    out = tmp_path / "inst"
    assert main(["finetune", "instruct", "--checkpoint", str(tmp_path / "base"), "--data", str(data), "--out",
                 str(out), "--epochs", "1", "--grad-accum", "2", "--dtype", "fp32", "--device", "auto",
                 "--no-test-responses", "--no-progress", "--split", "0.8", "0.1", "0.1"]) == 0
    assert "saved" in capsys.readouterr().out
    assert (out / "prompt_template.json").is_file() and not (out / "test_responses.json").exists()
