"""Shared fixtures: the tiny model builder, the synthetic fine-tuning data, the small play corpus."""

import json
import random
from pathlib import Path

import pytest
import torch

from buildllm.finetune.instruct import TEMPLATES
from buildllm.models.gpt2 import GPTConfig, GPTModel
from buildllm.tokenizer import WordTokenizer


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Run the whole suite on one thread per process, module fixtures included (``make test`` runs a
    pytest-xdist worker per core): the models are tiny, and a thread pool only adds
    synchronisation, a great deal of it when other work shares the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True, scope="session")
def eager_training():
    """Pretraining runs eager in the suite: torch.compile spends seconds on each new graph, far more
    than the tiny models' steps cost (tests/test_compile.py compiles where compiling is what it
    tests). Yields the real defaults, per data mode. Training started in a subprocess says
    --no-compile itself."""
    from buildllm.training.config import DEFAULTS

    real = {mode: defaults.get("compile") for mode, defaults in DEFAULTS.items()}
    for defaults in DEFAULTS.values():
        defaults["compile"] = False
    yield real
    for mode, value in real.items():
        DEFAULTS[mode]["compile"] = value


def write_play_corpus(root: Path, play: str, chars: int, prepared: bool = False) -> dict[str, str]:
    """The first ``chars`` characters of a bundled play as ``root/<play>.txt``, a 300-token BPE
    learned from it as ``root/tokenizer.json`` and, with ``prepared``, the text tokenized into
    ``root/prepared`` (scale mode): the small corpus the training tests run on."""
    from buildllm.data.prepare import prepare_corpus
    from buildllm.data.shakespeare import shakespeare_plays
    from buildllm.tokenizer import train_bpe

    text = shakespeare_plays()[play][:chars]
    files = {"book": str(root / f"{play}.txt"), "tokenizer": str(root / "tokenizer.json")}
    Path(files["book"]).write_text(text)
    train_bpe(text, 300).save(files["tokenizer"])
    if prepared:
        files["prepared"] = str(root / "prepared")
        prepare_corpus(files["book"], files["prepared"], tokenizer=files["tokenizer"], progress=False)
    return files


@pytest.fixture(scope="session")
def play_corpus(tmp_path_factory):
    """A factory of small training corpora (``write_play_corpus``), each in a fresh folder."""
    return lambda play, chars, prepared=False: write_play_corpus(tmp_path_factory.mktemp(play), play, chars,
                                                                 prepared)


def build_tiny_gpt(vocab_size: int = 61, seed: int = 0, context_length: int = 16, emb_dim: int = 32,
                   n_heads: int = 2, n_layers: int = 2, **overrides) -> GPTModel:
    """A seeded GPT-2 small enough for a test to train or decode in milliseconds, in eval mode
    (training code switches it to train mode itself)."""
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=vocab_size, context_length=context_length, emb_dim=emb_dim, n_heads=n_heads,
                    n_layers=n_layers, **overrides)
    return GPTModel(cfg).eval()


@pytest.fixture(scope="session")
def tiny_gpt():
    """The suite's one tiny-model builder (``build_tiny_gpt``); a test file that wants other
    defaults wraps it in a fixture of its own with ``functools.partial``."""
    return build_tiny_gpt


# Synthetic data ----------------------------------------------------------------------------------

KEYWORDS = {"pos": ["good", "great", "nice"], "neg": ["bad", "awful", "poor"], "mid": ["meh", "okay"]}
FILLER = ["the", "a", "it", "was", "is", "very", "so", "film", "food"]


def labeled_rows(n: int = 90, seed: int = 0) -> list[tuple[str, str]]:
    """Texts whose class is given by one keyword hidden among filler words: separable."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = list(KEYWORDS)[i % 3]
        words = [rng.choice(FILLER) for _ in range(rng.randint(2, 6))]
        words.insert(rng.randrange(len(words) + 1), rng.choice(KEYWORDS[label]))
        rows.append((" ".join(words), label))
    return rows


def write_csv(path, rows, sep=",", header=("text", "label")):
    lines = [sep.join(header)] if header else []
    lines += [sep.join((text, label)) for text, label in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def instruction_records(n: int = 40) -> list[dict]:
    return [
        {"instruction": f"add {i % 7} and {i % 5}", "input": "numbers" if i % 2 else "", "output": f"the answer is {i % 7 + i % 5} ."}
        for i in range(n)
    ]


def word_tokenizer(texts) -> WordTokenizer:
    return WordTokenizer.from_text(list(texts))


@pytest.fixture
def classification_data(tmp_path):
    rows = labeled_rows()
    return write_csv(tmp_path / "reviews.csv", rows), word_tokenizer(t for t, _ in rows)


@pytest.fixture
def instruction_data(tmp_path):
    records = instruction_records()
    path = tmp_path / "instructions.json"
    path.write_text(json.dumps(records, indent=1))
    texts = [TEMPLATES["alpaca"].format(r["instruction"], r["input"]) + r["output"] for r in records]
    return path, word_tokenizer(texts)
