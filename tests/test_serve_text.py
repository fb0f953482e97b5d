"""A request's tokens become text pieces: whole characters only, cut at the first stop string."""

from buildllm.generation.sampling import detokenize
from buildllm.serve.text import TextOutput
from buildllm.tokenizer import get_tokenizer

TOKENIZER = get_tokenizer("gpt2")


def feed(out: TextOutput, ids):
    pieces = [out.add(t) for t in ids]
    return pieces, pieces + [out.finish()]


def test_pieces_are_whole_characters_and_add_up_to_detokenize():
    prompt = TOKENIZER.encode("Say:")
    ids = TOKENIZER.encode(" caf\u00e9 \U0001f642\U0001f680 \u4f60\u597d done")
    assert TOKENIZER.decode(ids[4:5]).endswith("\ufffd")  # an emoji split over tokens
    out = TextOutput(TOKENIZER, prompt)
    pieces, all_pieces = feed(out, ids)
    assert not any("\ufffd" in p for p in pieces)
    assert "".join(all_pieces) == "".join(detokenize(TOKENIZER, ids, context=prompt))
    assert out.tokens == len(ids) and not out.stopped


def test_a_stop_string_split_over_tokens_is_never_sent():
    text = " the end is near. THE END. more words"
    ids = TOKENIZER.encode(text)
    out = TextOutput(TOKENIZER, [], stop=["THE END", "never"])
    sent = []
    for t in ids:
        sent.append(out.add(t))
        assert "THE" not in "".join(sent)  # held back until it is clear, then cut
        if out.stopped:
            break
    assert "".join(sent) + out.finish() == " the end is near. "
    assert TOKENIZER.decode(ids[: out.tokens]).endswith(" END")  # counted up to the token completing it
    assert out.add(ids[-1]) == "" and out.tokens == len(sent)  # nothing after the stop


def test_a_stop_id_ends_the_text_and_counts():
    ids = TOKENIZER.encode("Hello there") + [TOKENIZER.eot_id]
    out = TextOutput(TOKENIZER, [], stop_ids=[TOKENIZER.eot_id])
    assert "".join(feed(out, ids)[1]) == "Hello there"
    assert out.stopped and out.tokens == len(ids)
