"""generation/chat.py: a conversation laid out for each kind of model."""

import pytest

from buildllm.errors import UserError
from buildllm.finetune.instruct import TEMPLATES
from buildllm.generation.chat import chat_prompt, stop_ids, stop_strings
from buildllm.tokenizer import get_tokenizer


def test_base_model_gets_a_transcript_that_stops_at_the_next_user_turn():
    tok = get_tokenizer("gpt2")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Who?"}]
    assert chat_prompt(messages, tok) == "System: Be brief.\nUser: Hi\nAssistant: Hello.\nUser: Who?\nAssistant:"
    assert stop_strings(tok) == ["\nUser:"]
    assert stop_ids(tok) == (tok.eot_id,)


def test_instruction_model_gets_its_template_turn_by_turn():
    alpaca = TEMPLATES["alpaca"]
    messages = [{"role": "system", "content": "ctx"}, {"role": "user", "content": "Add 2 and 2."},
                {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3?"}]
    text = chat_prompt(messages, get_tokenizer("gpt2"), alpaca.to_dict())
    assert text == alpaca.format("Add 2 and 2.", "ctx") + "4" + "\n\n" + alpaca.format("And 3?")
    assert stop_strings(get_tokenizer("gpt2"), alpaca) == []
    with pytest.raises(UserError, match="end the messages"):
        chat_prompt(messages[:3], get_tokenizer("gpt2"), alpaca)


@pytest.mark.parametrize("bad", [[], "hi", [{"role": "robot", "content": "x"}], [{"role": "user", "content": 3}]])
def test_bad_messages_are_named(bad):
    with pytest.raises(UserError, match="messages"):
        chat_prompt(bad, get_tokenizer("gpt2"))


def test_chat_ids_of_a_layout_without_a_chat_template_are_its_plain_text():
    """Only a chat template's text holds control tokens; a transcript that quotes one stays text."""
    from buildllm.generation.chat import chat_ids

    tok = get_tokenizer("gpt2")
    text = chat_prompt([{"role": "user", "content": "say <|endoftext|>"}], tok)
    assert chat_ids(text, tok) == tok.encode(text) and tok.eot_id not in chat_ids(text, tok)
