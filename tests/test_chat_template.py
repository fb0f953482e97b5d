"""Chat templates: rendered as transformers renders them, in a sandbox that refuses Python internals,
and used by `buildllm chat` on a Hugging Face folder.

The two templates are close to the published ones (Llama 3.2 Instruct's and Qwen3's), system
prompt, tools, dates, reasoning and all, so the environment must match transformers' in every
option the real templates lean on: whitespace control, namespaces, tojson, raise_exception,
strftime_now, loop controls.
"""

import io
import json
import sys

import pytest
import torch
from test_hf_tokenizer import ids_of, write_folder

from buildllm import cli
from buildllm.errors import UserError
from buildllm.generation.chat import chat_ids, chat_prompt, stop_ids, stop_strings
from buildllm.tokenizer import HFTokenizer, Tokenizer, get_tokenizer
from buildllm.weights.loader import load_model

transformers = pytest.importorskip("transformers")

LLAMA32 = r"""{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""

QWEN3 = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}"""

CHAT = [{"role": "system", "content": "You are terse. "}, {"role": "user", "content": "Héllo! What is 2+2?"},
        {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4 🎉"},
        {"role": "user", "content": "  And 日本語?\n"}]
TOOLS = [{"type": "function", "function": {"name": "add", "description": "Add <a> & <b>",
                                           "parameters": {"type": "object", "properties": {"a": {"type": "number"}}}}}]
TOOL_CHAT = [{"role": "user", "content": "add 2 and 3"},
             {"role": "assistant", "content": "", "tool_calls": [
                 {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}]},
             {"role": "tool", "content": "5"}]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat_templates")
    llama = write_folder(root / "llama", {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
                                          "chat_template": LLAMA32})
    end_of_text, eot = ids_of(llama, "<|end_of_text|>", "<|eot_id|>")
    (llama / "generation_config.json").write_text(json.dumps({"eos_token_id": [end_of_text, eot]}))
    # Qwen3: no bos token, the template in chat_template.jinja (which wins over tokenizer_config's)
    qwen = write_folder(root / "qwen", {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                                        "add_bos_token": False, "chat_template": "{{ 'not this one' }}"},
                        {"eos_token_id": ids_of(llama, "<|im_end|>", "<|endoftext|>")}, template_file=QWEN3)
    # the list form: the template named "default" is the chat template
    named = write_folder(root / "named", {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
                                          "chat_template": [{"name": "tool_use", "template": "{{ 'tools' }}"},
                                                            {"name": "default", "template": LLAMA32}]})
    return {"llama": llama, "qwen": qwen, "named": named}


def oracle(folder):
    return transformers.PreTrainedTokenizerFast.from_pretrained(str(folder))


CASES = [  # (folder, messages, template variables)
    ("llama", CHAT, {"date_string": "26 Jul 2024"}),
    ("llama", CHAT[1:2], {}),  # today's date, from strftime_now
    ("llama", TOOL_CHAT, {"tools": TOOLS, "date_string": "1 Jan 2025"}),
    ("named", CHAT, {"date_string": "26 Jul 2024"}),
    ("qwen", CHAT, {}),
    ("qwen", CHAT[1:], {"enable_thinking": False}),
    ("qwen", [*CHAT, {"role": "assistant", "content": "<think>\nhm\n</think>\n\nyes"}], {}),
    ("qwen", TOOL_CHAT, {"tools": TOOLS}),
]


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("name, messages, variables", CASES)
def test_templates_render_as_transformers_does(folders, name, messages, variables, add_generation_prompt):
    ours, hf = get_tokenizer(folders[name]), oracle(folders[name])
    expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                      **variables)
    assert ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **variables) == expected
    assert expected.startswith("<|begin_of_text|>" if name != "qwen" else "<|im_start|>")


def test_a_template_can_stop_rendering_with_one_line(folders):
    with pytest.raises(UserError, match="stopped: Cannot put tools in the first user message") as e:
        get_tokenizer(folders["llama"]).apply_chat_template([CHAT[0]], tools=TOOLS)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name", ["llama", "qwen"])
def test_chat_prompt_and_ids_use_the_template(folders, name):
    """generation/chat.py with a chat model: its template, its control tokens as tokens (no second
    bos in front), its end-of-turn tokens, no stop strings."""
    ours, hf = get_tokenizer(folders[name]), oracle(folders[name])
    messages = CHAT[:2]
    prompt = chat_prompt(messages, ours)
    assert prompt == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert chat_ids(prompt, ours) == hf.encode(prompt, add_special_tokens=False)
    assert chat_ids(prompt, ours).count(ours.special_tokens["<|begin_of_text|>"]) == (name == "llama")
    assert stop_ids(ours) == ours.stop_ids and len(ours.stop_ids) == 2
    assert stop_strings(ours) == []
    saved = Tokenizer.load(ours.save(folders[name].parent / f"{name}_saved.json"))
    assert saved.chat_template == ours.chat_template and chat_prompt(messages, saved) == prompt
    # written back as Hugging Face files, transformers reads the same tokenizer and template
    exported = oracle(ours.save_hf_files(folders[name].parent / f"{name}_exported"))
    assert exported.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == prompt
    assert exported.encode(prompt, add_special_tokens=False) == chat_ids(prompt, ours)
    assert (exported.bos_token_id, exported.eos_token_id) == (hf.bos_token_id, hf.eos_token_id)


MALICIOUS = [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__ }}",  # the plain sandbox prints nothing here and carries on
    "{{ messages.__class__.__base__.__subclasses__() }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ raise_exception.__globals__['os'] }}",
    "{{ (messages | attr('__class__')) }}",
    "{{ '{0.__class__}'.format(messages) }}",
    "{% set ns = namespace(_hidden=1) %}",
    "{% set ns = namespace() %}{% set ns.__dict__ = 1 %}",
    "{{ messages.append({'role': 'user', 'content': 'x'}) }}",
    "{{ dict.__call__.__globals__ }}",
]


@pytest.mark.parametrize("template", MALICIOUS)
def test_templates_that_reach_python_internals_are_refused(tmp_path, folders, template):
    folder = write_folder(tmp_path / "evil", {"eos_token": "<|eot_id|>", "chat_template": template})
    tok = get_tokenizer(folder)
    with pytest.raises(UserError, match="refused") as e:
        tok.apply_chat_template(CHAT)
    assert "\n" not in str(e.value)


# `buildllm chat` on a Hugging Face folder ----------------------------------------------------------


def hf_chat_folder(folder, tokenizer_folder):
    """A tiny random GPT2LMHeadModel saved by transformers beside the Qwen3-style tokenizer files.

    Its <|endoftext|> (a stop token of generation_config.json) has 1.05x the output embedding of the
    token greedy decoding picks at the 3rd step of the first answer, so that answer ends there (or
    sooner), and later ones wherever the model prefers that token: stops the model really produces,
    not ones forced by the test.
    """
    folder.mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (folder / name).write_bytes((tokenizer_folder / name).read_bytes())
    hf_tok = oracle(folder)
    torch.manual_seed(0)
    end = hf_tok.eos_token_id
    # (weights wider than GPT-2's 0.02, so that greedy answers vary instead of repeating one token)
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=len(hf_tok), n_positions=256,
                                     bos_token_id=end, eos_token_id=end, initializer_range=0.5)
    model = transformers.GPT2LMHeadModel(config).eval()
    ids = torch.tensor([hf_tok.encode(rendered(hf_tok, CHAT[1:2]), add_special_tokens=False)])
    with torch.no_grad():
        for _ in range(3):
            logits = model(ids).logits[0, -1]
            ids = torch.cat([ids, logits.argmax().view(1, 1)], dim=1)
        assert logits.max() > 0
        end_of_text = hf_tok.convert_tokens_to_ids("<|endoftext|>")
        model.transformer.wte.weight[end_of_text] = 1.05 * model.transformer.wte.weight[int(ids[0, -1])]
    model.save_pretrained(folder)
    stops = [hf_tok.convert_tokens_to_ids("<|im_end|>"), end_of_text]
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": stops}))
    return model, hf_tok, stops


def rendered(hf_tok, messages):
    return hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def hf_answer(model, hf_tok, messages, stops, max_new_tokens=12):
    """transformers' greedy answer to the conversation (without its stop token) and its length."""
    ids = hf_tok.encode(rendered(hf_tok, messages), add_special_tokens=False)
    out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops,
                         pad_token_id=stops[-1])[0, len(ids):].tolist()
    return hf_tok.decode(out[:-1] if out[-1] in stops else out), len(out)


def test_buildllm_chat_uses_the_template_keeps_the_conversation_and_stops_at_end_of_turn(
        tmp_path, folders, capsys, monkeypatch):
    model, hf_tok, stops = hf_chat_folder(tmp_path / "model", folders["qwen"])
    turns, messages, answers = ["Héllo! What is 2+2?", "And 日本語?"], [], []
    for turn in turns:  # what transformers answers in the same conversation
        messages.append({"role": "user", "content": turn})
        answer, length = hf_answer(model, hf_tok, messages, stops)
        messages.append({"role": "assistant", "content": answer})
        answers.append(answer)
        if turn == turns[0]:
            assert length <= 3  # the first answer ended at a stop token, well before max_new_tokens

    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(turns) + "\n"))
    assert cli.main(["chat", "--model", str(tmp_path / "model"), "--max-new-tokens", "12"]) == 0
    assert capsys.readouterr().out == answers[0] + "\n" + answers[1] + "\n"

    # /reset forgets the conversation: the second question alone gets another answer
    alone, _ = hf_answer(model, hf_tok, [{"role": "user", "content": turns[1]}], stops)
    assert answers[1] and alone != answers[1]
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{turns[0]}\n/reset\n{turns[1]}\n"))
    assert cli.main(["chat", "--model", str(tmp_path / "model"), "--max-new-tokens", "12"]) == 0
    assert capsys.readouterr().out == answers[0] + "\n" + alone + "\n"


def test_buildllm_generate_on_a_hugging_face_folder_starts_with_bos(tmp_path, folders, capsys):
    """A plain prompt gets the tokenizer's <|begin_of_text|> in front, as transformers' encode puts
    it there, and the continuation stops at any stop id of generation_config.json."""
    folder = tmp_path / "llama_model"
    torch.manual_seed(1)
    hf_tok = oracle(folders["llama"])
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=len(hf_tok), n_positions=64,
                                     bos_token_id=hf_tok.bos_token_id, eos_token_id=hf_tok.eos_token_id)
    model = transformers.GPT2LMHeadModel(config).eval()
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        (folder / name).write_bytes((folders["llama"] / name).read_bytes())
    stops = json.loads((folder / "generation_config.json").read_text())["eos_token_id"]
    ids = hf_tok("The cat")["input_ids"]
    assert ids[0] == hf_tok.bos_token_id
    out = model.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False, eos_token_id=stops,
                         pad_token_id=stops[0])[0, len(ids):].tolist()
    expected = hf_tok.decode(out[:-1] if out[-1] in stops else out)
    assert cli.main(["generate", "--model", str(folder), "--prompt", "The cat", "--max-new-tokens", "10"]) == 0
    assert capsys.readouterr().out == "The cat" + expected + "\n"

    # the one loader: the folder's tokenizer.json with its configs; buildllm's own file wins when present
    tok = load_model(folder).tokenizer
    assert isinstance(tok, HFTokenizer) and tok.stop_ids == (hf_tok.eos_token_id, *[i for i in stops
                                                                                     if i != hf_tok.eos_token_id])
    get_tokenizer("gpt2").save(folder / "buildllm_tokenizer.json")
    model.resize_token_embeddings(50257)
    model.save_pretrained(folder)
    assert load_model(folder).tokenizer is get_tokenizer("gpt2")


def test_the_server_answers_with_the_models_template_and_stops_at_end_of_turn(tmp_path, folders):
    """`buildllm serve`'s chat completions lay a conversation out with the folder's chat template
    and end at its end-of-turn token: the answer transformers gives, with finish_reason "stop"."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from buildllm.serve.app import create_app
    from buildllm.serve.config import ServeConfig
    from buildllm.weights.loader import load_model

    model, hf_tok, stops = hf_chat_folder(tmp_path / "model", folders["qwen"])
    messages = [{"role": "user", "content": "Héllo! What is 2+2?"}]
    answer, length = hf_answer(model, hf_tok, messages, stops)
    with TestClient(create_app(load_model(tmp_path / "model"), ServeConfig(), model_name="qwenish")) as http:
        body = {"model": "qwenish", "messages": messages, "max_tokens": 12, "temperature": 0}
        reply = http.post("/v1/chat/completions", json=body).json()
    prompt = hf_tok.encode(rendered(hf_tok, messages), add_special_tokens=False)
    assert reply["usage"]["prompt_tokens"] == len(prompt)
    assert reply["choices"][0]["message"]["content"] == answer
    assert reply["choices"][0]["finish_reason"] == "stop" and length <= 3
