from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Run every test on one thread: the suite's models are tiny, and a thread pool only adds
    synchronisation, and much of it when the cores are busy with anything else."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
