"""The command line: options generated from config dataclasses, one name for the model, one-line errors."""

from __future__ import annotations

import argparse
import dataclasses
import types
from dataclasses import dataclass, field
from typing import Literal

import pytest

from buildllm import cli
from buildllm.cli_options import GenerateOptions, add_options, complete, field_help
from buildllm.training.config import TrainConfig

COMMANDS = [["info"], ["prepare"], ["train"], ["tokenize"], ["finetune", "classify"], ["finetune", "instruct"],
            ["classify"], ["generate"], ["chat"], ["convert"], ["eval"]]
MODEL_COMMANDS = [["train"], ["finetune", "classify"], ["finetune", "instruct"], ["classify"], ["generate"],
                  ["chat"], ["convert"], ["eval"], ["info"]]


def subparser(*names) -> argparse.ArgumentParser:
    parser = cli.build_parser()
    for name in names:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[name]
    return parser


def options_of(parser) -> dict[str, list[argparse.Action]]:
    """dest -> the actions (option names) that set it."""
    out: dict = {}
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            out.setdefault(action.dest, []).append(action)
    return out


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main([*command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: buildllm " + " ".join(command))
    if command in MODEL_COMMANDS:
        assert "--model" in out
    for old in ("--checkpoint", "--pretrained", "--init-from"):
        assert old not in out  # old names still work but are not advertised
    # the commands built on a config dataclass read a config file; info's old --config is hidden
    assert ("--config FILE" in out) == (command in (["train"], ["finetune", "classify"], ["finetune", "instruct"]))


@pytest.mark.parametrize("argv", [["classify", "text"], ["generate"], ["chat"], ["eval"]], ids=" ".join)
def test_device_defaults_to_auto_everywhere(argv):
    args = cli.build_parser().parse_args(argv)
    if hasattr(args, "options"):
        complete(args, args.options)  # as main does
    assert args.device == "auto"


def test_train_device_default_is_the_configs():
    assert not hasattr(cli.build_parser().parse_args(["train"]), "device") and TrainConfig().device == "auto"


@pytest.mark.parametrize("task", ["classify", "instruct"])
def test_finetune_device_default_is_the_configs(task):
    from buildllm.finetune.classify import ClassifyConfig
    from buildllm.finetune.instruct import InstructConfig

    args = cli.build_parser().parse_args(["finetune", task, "--data", "d", "--out", "o"])
    assert not hasattr(args, "device") and ClassifyConfig().device == InstructConfig().device == "auto"


@pytest.mark.parametrize("argv, message", [
    (["generate", "--quantize", "int2"], "invalid choice: 'int2'"),
    (["train", "--dtype", "fp8"], "invalid choice: 'fp8'"),
    (["prepare", "--errors", "ignore"], "invalid choice: 'ignore'"),
    (["eval", "--lr-schedule", "cosine"], "unrecognized arguments"),
    (["generate", "--max-new-tokens", "ten"], "invalid int value: 'ten'"),
    (["train", "--max-steps", "1.5"], "invalid int value: '1.5'"),
    (["train", "--lr", "fast"], "invalid float value: 'fast'"),
])
def test_bad_options_are_one_error_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1, err


def test_the_readme_and_makefile_command_lines_still_parse():
    parser = cli.build_parser()
    train = parser.parse_args(["train", "--out", "runs/shakespeare", "--resume-if-exists"])
    assert (train.out, train.resume) == ("runs/shakespeare", "auto")
    generate = parser.parse_args(["generate", "--checkpoint", "runs/shakespeare", "--prompt", "ROMEO:",
                                  "--max-new-tokens", "200", "--temperature", "0.8", "--top-k", "50", "--seed", "0"])
    assert (generate.model, generate.max_new_tokens, generate.temperature, generate.top_k, generate.seed) == \
        ("runs/shakespeare", 200, 0.8, 50, 0)


def test_two_different_models_are_an_error(capsys):
    assert cli.main(["generate", "--model", "a", "--checkpoint", "b"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: give one model, not two: a and b") and len(err.strip().splitlines()) == 1
    assert cli.main(["train", "--model", "a", "--init-from", "b"]) == 2
    assert "give one model, not two: a and b" in capsys.readouterr().err
    assert cli.main(["generate", "--model", "a", "--checkpoint", "a", "--device", "tpu"]) == 2  # same one twice is fine
    assert "unknown device 'tpu'" in capsys.readouterr().err


@pytest.mark.parametrize("command, old, dest", [
    (["generate"], "--checkpoint", "model"), (["generate"], "--pretrained", "model"), (["chat"], "--checkpoint", "model"),
    (["eval"], "--pretrained", "model"), (["convert", "out"], "--checkpoint", "model"),
    (["classify", "text"], "--checkpoint", "model"), (["info"], "--config", "model"),
    (["train"], "--init-from", "init_from"), (["train"], "--model", "init_from"),
    (["finetune", "classify", "--data", "d", "--out", "o"], "--checkpoint", "base"),
    (["finetune", "instruct"], "--checkpoint", "base"), (["finetune", "instruct"], "--model", "base"),
])
def test_old_model_flags_are_aliases_of_model(command, old, dest):
    args = cli.build_parser().parse_args([*command, old, "runs/x"])
    assert getattr(args, dest) == "runs/x"


def test_train_options_cover_every_config_field_with_help_and_no_default():
    options = options_of(subparser("train"))
    fields = TrainConfig.keys()
    # model (a mapping of GPTConfig overrides) is set with --set model.KEY=VALUE
    assert set(fields) - set(options) == {"model"}
    assert set(options) - set(fields) == {"config", "set"}
    for name in fields:
        for action in options.get(name, []):
            # a default here would be a second one besides TrainConfig's: the parser holds none
            assert action.default is argparse.SUPPRESS, name
        shown = [a for a in options.get(name, []) if a.help != argparse.SUPPRESS]
        assert name == "model" or (shown and all(a.help for a in shown)), f"--{name} has no help"
    assert [a.option_strings for a in options["init_from"]] == [["--model"], ["--init-from"]]


@pytest.mark.parametrize("task", ["classify", "instruct"])
def test_finetune_options_cover_every_config_field_with_help_and_no_default(task):
    from buildllm.finetune.classify import ClassifyConfig
    from buildllm.finetune.instruct import InstructConfig

    cls = {"classify": ClassifyConfig, "instruct": InstructConfig}[task]
    options = options_of(subparser("finetune", task))
    fields = cls.keys()
    assert set(options) - set(fields) == {"config", "set"}
    assert set(fields) - set(options) == set()  # every field, resume and force included
    for name in fields:
        for action in options[name]:
            assert action.default is argparse.SUPPRESS, name  # the one default is the dataclass's
        shown = [a for a in options[name] if a.help != argparse.SUPPRESS]
        assert shown and all(a.help for a in shown), f"--{name} has no help"
    assert [a.option_strings for a in options["base"]] == [["--model"], ["--checkpoint"]]
    for name in ("dtype", "grad_accum", "device", "resume", "force"):
        assert name in options


def test_finetune_lists_take_commas_or_spaces_and_names_take_dashes():
    parser = cli.build_parser()
    args = parser.parse_args(["finetune", "classify", "--split", "0.8,0.1,0.1", "--lora-targets", "qkv", "fc",
                              "--labels", "ham,spam", "--trainable", "last-blocks", "--representation",
                              "last-position", "--no-header", "--text-column", "1", "--label-column", "0"])
    assert (args.split, args.lora_targets, args.labels) == ((0.8, 0.1, 0.1), ("qkv", "fc"), ("ham", "spam"))
    assert (args.trainable, args.representation, args.header) == ("last_blocks", "last_position", False)
    assert (args.text_column, args.label_column) == (1, 0)
    assert cli.main(["finetune", "classify", "--split", "0.8,x"]) == 2


def test_finetune_without_a_model_is_one_error_line(capsys):
    assert cli.main(["finetune", "instruct", "--data", "d", "--out", "o"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: give a model: --model") and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("cls_name", ["InfoOptions", "PrepareOptions", "TokenizeOptions", "ModelOptions",
                                      "GenerateOptions", "SamplingOptions", "EvalOptions", "ConvertOptions"])
def test_inference_options_have_help_and_their_defaults_come_from_the_dataclass(cls_name):
    import buildllm.cli_options as co

    cls = getattr(co, cls_name)
    parser = argparse.ArgumentParser()
    assert add_options(parser, cls) == []  # every field is an option
    helps = field_help(cls)
    assert set(helps) == {f.name for f in dataclasses.fields(cls)}
    args = parser.parse_args([])
    assert vars(args) == {}  # nothing typed, nothing there
    assert complete(args, cls) == cls()


def test_options_not_given_are_the_dataclass_defaults():
    args = cli.build_parser().parse_args(["generate", "--checkpoint", "runs/x", "--top-k", "5", "--no-cache"])
    options = complete(args, args.options)
    assert options == dataclasses.replace(GenerateOptions(), model="runs/x", top_k=5, cache=False)
    assert (args.temperature, args.max_new_tokens, args.device) == (0.0, 100, "auto")


@pytest.fixture
def captured_train(monkeypatch):
    """Replace the training engine by one that records the config it is given."""
    import buildllm.training.engine as engine

    seen = []
    monkeypatch.setattr(engine, "train", lambda cfg: seen.append(cfg) or types.SimpleNamespace(rank=1))
    return seen


def test_train_layers_options_over_set_over_config(tmp_path, captured_train):
    (tmp_path / "c.yaml").write_text("lr: 0.01\nbatch_size: 3\nprogress: false\ncompile: true\n"
                                     "no_decay: [wpe, wte]\nmodel: {n_layers: 3}\n")
    argv = ["train", "--config", str(tmp_path / "c.yaml"), "--set", "model.emb_dim=64", "--set", "batch_size=4",
            "--batch-size", "5", "--no-compile", "--lr-schedule", "constant", "--model", "runs/base"]
    assert cli.main(argv) == 0
    cfg = captured_train[0]
    assert (cfg.lr, cfg.batch_size, cfg.compile, cfg.progress) == (0.01, 5, False, False)
    assert (cfg.lr_schedule, cfg.init_from, cfg.no_decay) == ("constant", "runs/base", ("wpe", "wte"))
    assert cfg.model == {"n_layers": 3, "emb_dim": 64}


def test_train_without_options_is_the_default_config(captured_train):
    assert cli.main(["train"]) == 0
    assert captured_train == [TrainConfig()]
    assert cli.main(["train", "--resume-if-exists", "--no-decay", "wpe", "lm_head", "--max-minutes", "1"]) == 0
    assert (captured_train[1].resume, captured_train[1].no_decay, captured_train[1].max_minutes) == \
        ("auto", ("wpe", "lm_head"), 1.0)


def test_train_config_and_set_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("lr: [1\n")
    for argv, message in ((["--config", str(tmp_path / "missing.yaml")], "cannot read config"),
                          (["--config", str(tmp_path / "bad.yaml")], "is not valid yaml"),
                          (["--set", "lr"], "--set wants KEY=VALUE")):
        assert cli.main(["train", *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1, err


@dataclass
class Base:
    # A section comment is not help.
    size: int = 3  # how big
    name: str | None = None


@dataclass
class Example(Base):
    mode: Literal["a", "b"] = "a"  # which way
    tags: tuple[str, ...] = (
        "x",
    )  # a comment after a field that spans lines
    loud: bool = True  # say it out loud
    extra: dict = field(default_factory=dict)  # not a command-line type
    level: float = field(default=0.5, metadata={"help": "from metadata"})


def test_the_generator_reads_types_defaults_and_trailing_comments(capsys):
    assert field_help(Example) == {"size": "how big", "mode": "which way", "loud": "say it out loud",
                                   "tags": "a comment after a field that spans lines", "extra": "not a command-line type",
                                   "level": "from metadata"}
    parser = argparse.ArgumentParser()
    assert add_options(parser, Example, flags={"size": "--n"}, aliases={"size": ["--old-size"]}) == ["extra"]
    args = parser.parse_args(["--old-size", "7", "--mode", "b", "--tags", "p", "q", "--no-loud"])
    assert complete(args, Example) == Example(size=7, mode="b", tags=("p", "q"), loud=False)
    help_text = parser.format_help()
    assert "--n N" in help_text and "how big (default: 3)" in help_text and "--old-size" not in help_text
    assert "--loud, --no-loud" in help_text


def test_stop_string_cuts_the_text_even_when_split_over_pieces(monkeypatch, capsys):
    import buildllm.generation.sampling as sampling
    from buildllm.cli_generate import _print_continuation

    monkeypatch.setattr(sampling, "stream_text", lambda *a, **kw: iter(["ab", "c<", "|st", "op|>", "zz"]))
    _print_continuation(None, None, "", {}, stop="<|stop|>")
    assert capsys.readouterr().out == "abc\n"
    _print_continuation(None, None, "", {}, stop="never")
    assert capsys.readouterr().out == "abc<|stop|>zz\n"
    _print_continuation(None, None, "", {})
    assert capsys.readouterr().out == "abc<|stop|>zz\n"


def test_generate_with_dtype_and_stop(tmp_path, capsys):
    import torch

    from buildllm.generation.sampling import stream_text
    from buildllm.models.gpt2 import GPTConfig, GPTModel
    from buildllm.tokenizer import WordTokenizer
    from buildllm.weights.checkpoint import save_model

    torch.manual_seed(0)
    tok = WordTokenizer.from_text("the cat sat on the mat, then it slept. a dog ran!")
    model = GPTModel(GPTConfig(vocab_size=tok.vocab_size, context_length=16, emb_dim=16, n_heads=2, n_layers=1))
    save_model(tmp_path / "run", model, tok)
    argv = ["generate", "--model", str(tmp_path / "run"), "--prompt", "the cat", "--max-new-tokens", "12"]
    assert cli.main(argv) == 0
    full = capsys.readouterr().out
    assert full == "the cat" + "".join(stream_text(model.eval(), tok, "the cat", 12)) + "\n"
    stop = full[len("the cat"):].split()[2]  # a word the model produces
    assert cli.main([*argv, "--stop", stop]) == 0
    assert capsys.readouterr().out == full[: full.index(stop, len("the cat"))] + "\n"
    assert cli.main([*argv, "--dtype", "bf16"]) == 0
    assert capsys.readouterr().out.startswith("the cat")
    assert cli.main([*argv, "--dtype", "bf16", "--quantize", "int8"]) == 2
    assert "drop --dtype bf16" in capsys.readouterr().err
