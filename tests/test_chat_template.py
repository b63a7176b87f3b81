"""Chat templates: rendering equal to transformers' apply_chat_template, the default template, errors.

The reference is transformers' ``apply_chat_template(..., tokenize=False)`` on a tiny tokenizer
built here, for templates written here in the shape of real ones (ChatML as SmolLM2 and Qwen use
it, Llama 3's headers, and one that uses tojson, strftime_now, namespace and loop controls).
"""

import pytest

from llmscratch.data.chat_template import (
    DEFAULT_SOURCE,
    DEFAULT_TEMPLATE,
    ChatFormat,
    chat_format,
    render_chat,
)
from llmscratch.data.pretrained_tokenizer import PretrainedTokenizer
from llmscratch.data.tokenizer import EOT, BPETokenizer, CharTokenizer
from llmscratch.errors import ChatTemplateError

transformers = pytest.importorskip("transformers")

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|eot_id|>"]
BOOK_PREAMBLE = ("Below is an instruction that describes a task. "
                 "Write a response that appropriately completes the request.")

# ChatML with a default system prompt, as SmolLM2's and Qwen2's templates do.
CHATML = """{% for message in messages %}
{% if loop.first and messages[0]['role'] != 'system' %}
{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}
{% endif %}
{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}
{% endfor %}
{% if add_generation_prompt %}
{{ '<|im_start|>assistant\n' }}
{% endif %}"""

# Llama 3's shape: BOS, header tokens, trimmed contents, a dated system block.
LLAMA3 = """{{- bos_token }}
{%- if not date_string is defined %}
    {%- set date_string = strftime_now("%d %b %Y") %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{{- system_message + "<|eot_id|>" }}
{%- for message in messages %}
    {%- if message['role'] not in ['user', 'assistant'] %}
        {{- raise_exception("Only user and assistant roles are supported after the system message!") }}
    {%- endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""

# Tools as JSON (HTML characters must stay as they are), a namespace counter, loop controls.
TOOLS = """{%- set ns = namespace(users=0) %}
{%- if tools %}Tools: {{ tools | tojson }}
{% endif %}
{%- for message in messages %}
    {%- if message['role'] == 'system' %}{% continue %}{% endif %}
    {%- if message['content'] == 'STOP' %}{% break %}{% endif %}
    {%- if message['role'] == 'user' %}{% set ns.users = ns.users + 1 %}{% endif %}
[{{ message['role'] }} {{ ns.users }}] {{ message | tojson(indent=2) }}
{% endfor %}
{%- if add_generation_prompt %}[assistant]{% endif %}"""

CONVERSATIONS = [
    [{"role": "user", "content": "Hi!"}],
    [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Sky colour?"}],
    [{"role": "system", "content": "  Be brief.  "}, {"role": "user", "content": "Hi!"},
     {"role": "assistant", "content": "Hello. "}, {"role": "user", "content": "Name a colour <b>&</b>."},
     {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another, in 日本語 🙂?"}],
    [{"role": "user", "content": "Braces {{ not a template }} and {% raw %} stay text"},
     {"role": "assistant", "content": "Quotes ' \" and \\ too"}, {"role": "user", "content": "STOP"},
     {"role": "user", "content": "after the stop"}],
]


@pytest.fixture(scope="module")
def reference():
    """A transformers tokenizer with the special tokens the templates name."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(["hello world, a tiny chat"] * 5, trainer=trainers.BpeTrainer(
        vocab_size=300, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|begin_of_text|>",
                                                eos_token="<|eot_id|>")


@pytest.mark.parametrize("template", [CHATML, LLAMA3, TOOLS, DEFAULT_TEMPLATE], ids=["chatml", "llama3", "tools", "default"])
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_render_equals_transformers(reference, template, add_generation_prompt):
    for messages in CONVERSATIONS:
        if template is DEFAULT_TEMPLATE and len(messages) > 3:
            continue  # the STOP conversation has two user messages in a row: fine, but not the default's shape
        extra = {"tools": [{"name": "add", "description": "a <b>sum</b> & more"}]} if template is TOOLS else {}
        expected = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                                 chat_template=template, **extra)
        ours = render_chat(template, messages, add_generation_prompt=add_generation_prompt,
                           bos_token=reference.bos_token, eos_token=reference.eos_token, **extra)
        assert ours == expected


def test_render_leaves_the_messages_alone():
    messages = [{"role": "system", "content": "x"}, {"role": "user", "content": "y"}]
    render_chat(LLAMA3, messages, bos_token="<s>", date_string="1 Jan 2025")  # the template reassigns `messages`
    assert messages == [{"role": "system", "content": "x"}, {"role": "user", "content": "y"}]


# --------------------------------------------------------------------------- the default template


def test_default_template_single_turn_is_the_books_prompt():
    ch07 = pytest.importorskip("llms_from_scratch.ch07")
    entry = {"instruction": "Rewrite the sentence in passive voice.", "input": ""}
    prompt = render_chat(DEFAULT_TEMPLATE, [{"role": "user", "content": entry["instruction"]}],
                         add_generation_prompt=True, eos_token=EOT)
    assert prompt == ch07.format_input(entry) + "\n\n### Response:\n"


def test_default_template_multi_turn_and_system():
    messages = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
                {"role": "user", "content": "Another?"}]
    assert render_chat(DEFAULT_TEMPLATE, messages, add_generation_prompt=True, eos_token=EOT) == (
        f"{BOOK_PREAMBLE}\n\n### Instruction:\nName a colour.\n\n### Response:\nBlue.{EOT}"
        "\n\n### Instruction:\nAnother?\n\n### Response:\n")
    system = [{"role": "system", "content": "You answer in French."}, *messages[:2]]
    assert render_chat(DEFAULT_TEMPLATE, system) == (  # no eos_token (the char tokenizer has none)
        "You answer in French.\n\n### Instruction:\nName a colour.\n\n### Response:\nBlue.")


def test_default_template_refuses_other_roles():
    for messages in ([{"role": "tool", "content": "42"}],
                     [{"role": "user", "content": "a"}, {"role": "system", "content": "late system"}]):
        with pytest.raises(ChatTemplateError) as err:
            chat_format(CharTokenizer.from_text("abc")).render(messages)
        role = messages[-1]["role"]
        assert str(err.value) == (f"{DEFAULT_SOURCE} refuses this conversation: it knows the roles user and "
                                  f"assistant, and system as the first message only, not a message with the role {role}")


# --------------------------------------------------------------------------- per tokenizer


def test_chat_format_of_our_kinds_is_the_default():
    char = chat_format(CharTokenizer.from_text("abc"))
    assert char.is_default and char.template == DEFAULT_TEMPLATE and char.stop_ids == () and char.eos_token is None
    bpe = BPETokenizer.train("some text to learn from " * 20, vocab_size=300)
    form = chat_format(bpe)
    assert form.is_default and form.stop_ids == (bpe.eot_id,) and form.eos_token == EOT and form.bos_token is None
    messages = [{"role": "user", "content": "Hi"}]
    assert form.prompt_ids(messages) == bpe.encode(form.render(messages, add_generation_prompt=True))
    assert bpe.prompt_ids("Hi") == bpe.encode("Hi")  # our kinds never add BOS


def test_chat_format_of_a_pretrained_tokenizer(reference, tmp_path):
    reference.save_pretrained(tmp_path)
    (tmp_path / "chat_template.jinja").write_text(LLAMA3, encoding="utf-8")
    tok = PretrainedTokenizer.from_hf_dir(tmp_path)
    form = chat_format(tok)
    assert not form.is_default and form.template == LLAMA3 and str(tmp_path / "chat_template.jinja") in form.source
    assert form.stop_ids == (tok.eos_id,) and (form.bos_token, form.eos_token) == ("<|begin_of_text|>", "<|eot_id|>")
    messages = CONVERSATIONS[1]
    ids = form.prompt_ids(messages, date_string="1 Jan 2025")
    assert ids.count(tok.bos_id) == 1 and ids[0] == tok.bos_id  # the template writes BOS
    # a tokenizer whose prompts start with BOS gets it once, whether or not the template writes it
    bos_first = PretrainedTokenizer(tok.backend, bos_id=tok.bos_id, eos_id=tok.eos_id, add_bos=True, chat_template=CHATML)
    for template in (CHATML, LLAMA3):
        form = ChatFormat(template, "t", (), "<|begin_of_text|>", "<|eot_id|>", False, bos_first)
        ids = form.prompt_ids(messages, date_string="1 Jan 2025")
        assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1


# --------------------------------------------------------------------------- errors


def test_template_errors_name_the_source():
    messages = CONVERSATIONS[0]
    with pytest.raises(ChatTemplateError) as err:
        render_chat("{% for m in messages %}{{ m.content }", messages, source="the chat template of model.gguf")
    assert str(err.value).startswith("the chat template of model.gguf is not a valid Jinja template: ")
    assert "(line 1); fix the template or use another" in str(err.value)
    with pytest.raises(ChatTemplateError) as err:
        render_chat(LLAMA3, [{"role": "tool", "content": "42"}], bos_token="<s>", source="Llama's template")
    assert str(err.value) == ("Llama's template refuses this conversation: Only user and assistant roles are "
                              "supported after the system message!")
    with pytest.raises(ChatTemplateError, match=r"^T failed on this conversation: UndefinedError: 'nope' is undefined"):
        render_chat("{{ nope.field }}", messages, source="T")
    with pytest.raises(ChatTemplateError, match="^T tried something the sandbox forbids"):
        render_chat("{{ messages.append(1) }}", messages, source="T")
    with pytest.raises(ChatTemplateError, match="message 2 of the conversation for T should be a dict"):
        render_chat(CHATML, [{"role": "user", "content": "a"}, "just text"], source="T")
