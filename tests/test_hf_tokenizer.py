"""Hugging Face tokenizers (tokenizer.json) behind buildllm's Tokenizer, with transformers as the oracle.

No tokenizer can be downloaded here, so the test trains one with the `tokenizers` library, shaped
like Llama 3's (its pre-tokenizer regex, byte-level BPE, special tokens after the ordinary ones, a
post-processor that puts <|begin_of_text|> first), and saves it as a Hugging Face folder.
"""

import json

import pytest
import torch

from buildllm.errors import UserError
from buildllm.generation.sampling import generate, prompt_ids, stream, stream_text
from buildllm.models.gpt2 import GPTConfig, GPTModel
from buildllm.tokenizer import HFTokenizer, Tokenizer, get_tokenizer

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
            "<|im_start|>", "<|im_end|>", "<|endoftext|>"]
CORPUS = ["The cat sat on the mat. Then it slept!", "Héllo wörld, café au lait; naïve façade.",
          "日本語のテキストです。中文也可以。", "emoji 🎉🚀 party 👍🏽", "  spaces   and\ttabs\n\nnew lines\r\n",
          "def f(x):\n    return x * 2  # 42 1234567", "user assistant system: you are a helpful assistant."]
MIXED = ["Héllo wörld — café 🎉🚀👍🏽 日本語 and 中文!",
         "  leading, trailing   \n\n\t tabs and runs of   spaces  ",
         "<|begin_of_text|>hi<|eot_id|> and <|im_start|>user\nok<|im_end|>\n",
         "almost special: <|eot_id| <|unknown|> <|im_end|><|im_end|>",
         "numbers 1234567 and 'contractions' we'll they've I'M", ""]


def train_tokenizer():
    """A byte-level BPE trained on CORPUS, with Llama 3's pre-tokenizer and special tokens."""
    from tokenizers import Regex, decoders, models, pre_tokenizers, processors, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS * 10, trainer)
    tok.add_special_tokens(SPECIALS)
    bos = ("<|begin_of_text|>", tok.token_to_id("<|begin_of_text|>"))
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B:1",
                                      special_tokens=[bos])])
    return tok


def write_folder(folder, config: dict, generation_config: dict | None = None, template_file: str | None = None):
    """A Hugging Face tokenizer folder: tokenizer.json, tokenizer_config.json and friends."""
    folder.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer()
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False, **config}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    if generation_config is not None:
        (folder / "generation_config.json").write_text(json.dumps(generation_config))
    if template_file is not None:
        (folder / "chat_template.jinja").write_text(template_file)
    return folder


def ids_of(folder, *tokens):
    vocab = json.loads((folder / "tokenizer.json").read_text())["added_tokens"]
    by_content = {t["content"]: t["id"] for t in vocab}
    return [by_content[t] for t in tokens]


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama3_tok")
    write_folder(folder, {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"})
    end_of_text, eot, eom = ids_of(folder, "<|end_of_text|>", "<|eot_id|>", "<|im_end|>")
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [end_of_text, eom, eot]}))
    return folder


@pytest.fixture(scope="module")
def pair(llama_folder):
    """(ours, transformers') for the same folder."""
    return get_tokenizer(llama_folder), transformers.PreTrainedTokenizerFast.from_pretrained(str(llama_folder))


@pytest.mark.parametrize("text", MIXED)
def test_ids_equal_transformers_on_mixed_text(pair, text):
    ours, hf = pair
    # special tokens allowed: what transformers' encode does
    assert ours.encode(text, allowed_special="all") == hf.encode(text, add_special_tokens=False)
    # by default they are plain text (as split_special_tokens=True), so text cannot inject them
    assert ours.encode(text) == hf.encode(text, add_special_tokens=False, split_special_tokens=True)
    # a prompt starts with <|begin_of_text|>, as transformers' default encode puts it there
    assert prompt_ids(ours, text) == hf.encode(text, split_special_tokens=True)
    assert ours.decode(ours.encode(text)) == text
    assert ours.decode(ours.encode(text, "all")) == hf.decode(hf.encode(text, add_special_tokens=False)) == text


def test_some_special_tokens_allowed_and_batches(pair):
    ours, _ = pair
    text = "a<|eot_id|>b<|im_end|>c"
    eot = ours.special_tokens["<|eot_id|>"]
    expected = ours.encode("a") + [eot] + ours.encode("b<|im_end|>c")
    assert ours.encode(text, allowed_special={"<|eot_id|>"}) == expected
    assert ours.encode_batch(MIXED) == [ours.encode(t) for t in MIXED]
    assert ours.encode_batch(MIXED, "all") == [ours.encode(t, "all") for t in MIXED]
    assert ours.encode_batch([text], {"<|eot_id|>"}) == [expected]


def test_special_tokens_and_stop_ids_come_from_the_configs(pair, llama_folder):
    ours, hf = pair
    end_of_text, eot, im_end = ids_of(llama_folder, "<|end_of_text|>", "<|eot_id|>", "<|im_end|>")
    assert ours.vocab_size == len(hf)
    assert ours.special_tokens == {t: hf.convert_tokens_to_ids(t) for t in SPECIALS}
    assert ours.eot_id == hf.eos_token_id == eot
    assert ours.stop_ids == (eot, end_of_text, im_end)  # eos_token, then generation_config's others
    assert ours.bos_id == hf.bos_token_id
    assert ours.chat_template is None
    with pytest.raises(UserError, match="has no chat template"):
        ours.apply_chat_template([{"role": "user", "content": "hi"}])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        ours.decode([ours.vocab_size])


def test_save_and_load_round_trip(pair, tmp_path):
    ours, _ = pair
    path = ours.save(tmp_path / "saved.json")
    back = Tokenizer.load(path)
    assert isinstance(back, HFTokenizer) and back.fingerprint() == ours.fingerprint()
    assert (back.vocab_size, back.eot_id, back.stop_ids, back.bos_id, back.special_tokens) == \
        (ours.vocab_size, ours.eot_id, ours.stop_ids, ours.bos_id, ours.special_tokens)
    for text in MIXED:
        assert back.encode(text) == ours.encode(text) and back.encode(text, "all") == ours.encode(text, "all")
    assert get_tokenizer(path).fingerprint() == ours.fingerprint()
    # a Hugging Face tokenizer.json named by its path brings the configs beside it
    assert Tokenizer.load(ours.origin).fingerprint() == ours.fingerprint()


def test_added_tokens_decoder_adds_what_tokenizer_json_lacks(tmp_path, llama_folder):
    vocab_size = get_tokenizer(llama_folder).vocab_size
    token = {"content": "<|extra|>", "special": True, "lstrip": False, "rstrip": False, "normalized": False,
             "single_word": False}
    folder = write_folder(tmp_path / "extra", {"eos_token": {"content": "<|eot_id|>", "__type": "AddedToken"},
                                               "added_tokens_decoder": {str(vocab_size): token}})
    ours = get_tokenizer(folder)
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(str(folder))
    assert ours.special_tokens["<|extra|>"] == vocab_size and ours.vocab_size == vocab_size + 1
    assert ours.encode("a<|extra|>b", "all") == hf.encode("a<|extra|>b", add_special_tokens=False)
    assert ours.bos_id == ours.special_tokens["<|begin_of_text|>"]  # from the post-processor alone

    bad = write_folder(tmp_path / "bad", {"eos_token": "<|eot_id|>",
                                          "added_tokens_decoder": {str(vocab_size + 5): token}})
    with pytest.raises(UserError, match="puts '<|extra|>' at id"):
        get_tokenizer(bad)


@pytest.mark.parametrize("config, generation, message", [
    ({"eos_token": "<|nope|>"}, None, "eos_token '<|nope|>' is not in the vocabulary"),
    ({"eos_token": "<|eot_id|>"}, {"eos_token_id": [1, "two"]}, "eos_token_id must be a token id"),
    ({"eos_token": "<|eot_id|>"}, {"eos_token_id": 10**6}, "eos_token_id 1000000 is outside"),
    ({"chat_template": [{"name": "tool_use", "template": "x"}]}, None, "none named 'default'"),
    ({"chat_template": "{% for m in messages %}"}, None, "not valid Jinja2"),
])
def test_bad_configs_are_one_line_errors(tmp_path, config, generation, message):
    folder = write_folder(tmp_path / "tok", config, generation)
    with pytest.raises(UserError, match=message) as e:
        get_tokenizer(folder)
    assert "\n" not in str(e.value)


def test_damaged_tokenizer_json_is_a_user_error(tmp_path):
    (tmp_path / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "Nope"}}))
    with pytest.raises(UserError, match="is not a tokenizers tokenizer.json"):
        get_tokenizer(tmp_path)


# Stopping on several stop ids -------------------------------------------------------------------


@pytest.fixture(scope="module")
def model(pair):
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=pair[0].vocab_size, context_length=32, emb_dim=32, n_heads=2, n_layers=2)
    return GPTModel(cfg).eval()


def test_several_stop_ids_end_each_row_at_its_first_stop(model):
    prompts = [[5, 9, 40, 7], [100, 3, 77]]
    free = generate(model, prompts, max_new_tokens=12)  # no stop: what greedy decoding gives
    new = [row[len(p):] for row, p in zip(free, prompts)]
    # one stop token that row 0 produces at its 3rd step, one that row 1 produces at its 6th
    stops = {new[0][2], new[1][5]}
    ends = [next(i for i, t in enumerate(row) if t in stops) for row in new]
    assert ends[0] <= 2 and ends[1] <= 5
    for eos in (stops, sorted(stops), tuple(stops), torch.tensor(sorted(stops))):
        got = generate(model, prompts, max_new_tokens=12, eos_id=eos)
        assert got == [p + row[: end + 1] for p, row, end in zip(prompts, new, ends)]
    steps = list(stream(model, prompts, 12, eos_id=stops))
    assert len(steps) == max(ends) + 1  # the stream ends once every row has stopped
    row = min(range(2), key=lambda r: ends[r])
    assert all(int(s[row]) == new[row][ends[row]] for s in steps[ends[row]:])  # padded with its own stop
    tensor = generate(model, torch.tensor([prompts[0]]), 12, eos_id=stops)
    assert tensor[0].tolist() == prompts[0] + new[0][: ends[0] + 1]
    assert generate(model, prompts, 12, eos_id=new[0][2]) == generate(model, prompts, 12, eos_id=[new[0][2]])
    with pytest.raises(UserError, match="eos_id must be"):
        generate(model, prompts, 3, eos_id=["x"])


def test_stream_text_stops_at_any_of_the_tokenizers_stop_ids(model, pair, llama_folder, tmp_path):
    ours, _ = pair
    text = "The cat"
    ids = prompt_ids(ours, text)
    new = generate(model, [ids], max_new_tokens=10)[0][len(ids):]
    # a folder whose generation_config names, besides eos, the token the model makes at step 4
    folder = write_folder(tmp_path / "stops", {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
                          {"eos_token_id": [ours.eot_id, new[3]]})
    tok = get_tokenizer(folder)
    end = next(i for i, t in enumerate(new) if t in tok.stop_ids)
    assert end <= 3
    assert "".join(stream_text(model, tok, text, 10)) == tok.decode(new[:end])
    assert "".join(stream_text(model, tok, text, 10, stop_at_eot=False)) == tok.decode(new)


def test_save_pretrained_writes_the_tokenizer_files_transformers_reads(pair, tmp_path):
    """A Llama with a Hugging Face tokenizer goes out as a folder whose tokenizer, chat template and
    stop ids transformers reads as they were, and comes back through the one loader the same."""
    from buildllm import LlamaConfig, LlamaModel, load_model, save_pretrained

    ours, theirs = pair
    ours = HFTokenizer(ours.backend.to_str(), ours.config, ours.generation_config, "{{ messages[0]['content'] }}")
    torch.manual_seed(0)
    llama = LlamaModel(LlamaConfig(vocab_size=ours.vocab_size, context_length=32, emb_dim=32, n_heads=4,
                                   n_kv_heads=2, n_layers=1, hidden_dim=64))
    save_pretrained(llama, tmp_path, ours)
    reread = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    text = MIXED[0]
    assert reread.encode(text) == theirs.encode(text)
    assert reread.chat_template == ours.chat_template
    generation = transformers.GenerationConfig.from_pretrained(str(tmp_path))
    assert sorted(generation.eos_token_id) == sorted(ours.stop_ids)
    loaded = load_model(tmp_path).tokenizer
    assert loaded.stop_ids == ours.stop_ids and loaded.encode(text) == ours.encode(text)
