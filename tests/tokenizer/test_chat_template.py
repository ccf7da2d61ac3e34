"""Chat template rendering: HF-compatible globals and filters, and the sandbox."""

from __future__ import annotations

import datetime

import pytest

from esp_core.tokenizer import ChatTemplate, ChatTemplateError, TokenizerError

USER = [{"role": "user", "content": "hi"}]


def render(source, messages=USER, **kw):
    return ChatTemplate(source).render(messages, **kw)


def test_trim_and_lstrip_blocks_like_hf():
    # without trim_blocks/lstrip_blocks this would render "\n    hi\n"
    src = "{% for m in messages %}\n    {% if true %}{{ m['content'] }}{% endif %}\n{% endfor %}"
    assert render(src) == "hi"


def test_raise_exception_becomes_template_error(bl_tok):
    with pytest.raises(ChatTemplateError, match="unknown role tool"):
        bl_tok.apply_chat_template([{"role": "tool", "content": "x"}])
    assert issubclass(ChatTemplateError, TokenizerError)


def test_llama2_template_rejects_bad_alternation(sp_tok):
    with pytest.raises(ChatTemplateError, match="alternate"):
        sp_tok.apply_chat_template([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


def test_tojson_does_not_html_escape():
    out = render("{{ tools | tojson }}", tools=[{"name": "f", "d": "<a & b>", "u": "日本"}])
    assert out == '[{"name": "f", "d": "<a & b>", "u": "日本"}]'
    assert render("{{ x | tojson(indent=2) }}", x={"a": 1}) == '{\n  "a": 1\n}'


def test_strftime_now():
    today = datetime.datetime.now().strftime("%Y")
    assert render("{{ strftime_now('%Y') }}") == today


def test_template_variables(bl_tok):
    src = "{{ bos_token }}|{{ eos_token }}|{{ pad_token }}|{{ add_generation_prompt }}|{{ enable_thinking }}"
    out = bl_tok.apply_chat_template(USER, chat_template=src, enable_thinking=False)
    assert out == "<s>|<|im_end|>|<pad>|True|False"


def test_loopcontrols_namespace_and_generation_tag():
    src = (
        "{% set ns = namespace(n=0) %}{% for m in messages %}{% if loop.index > 2 %}{% break %}"
        "{% endif %}{% set ns.n = ns.n + 1 %}{% generation %}<{{ m.content }}>{% endgeneration %}"
        "{% endfor %}{{ ns.n }}"
    )
    msgs = [{"role": "user", "content": c} for c in "abc"]
    assert render(src, msgs) == "<a><b>2"


@pytest.mark.parametrize(
    "src",
    [
        "{{ messages.__class__.__mro__ }}",
        "{{ ''.__class__.__subclasses__() }}",
        "{{ cycler.__init__.__globals__ }}",
        "{% set ns = namespace(_x=1) %}",
        "{{ messages.append(1) }}",  # immutable sandbox: no mutation of our objects
    ],
)
def test_sandbox_blocks_escapes(src):
    with pytest.raises(ChatTemplateError):
        render(src)


def test_rich_objects_are_flattened():
    class Message:  # a pydantic-like object with a dangerous method
        def model_dump(self):
            return {"role": "user", "content": "dumped"}

        def delete_everything(self):
            raise AssertionError("must not be reachable")

    assert render("{{ messages[0].content }}", [Message()]) == "dumped"


def test_bad_templates_are_clear():
    with pytest.raises(ChatTemplateError, match="does not compile"):
        ChatTemplate("{% for %}")
    with pytest.raises(ChatTemplateError, match="non-empty"):
        ChatTemplate("")
    with pytest.raises(ChatTemplateError, match="must be dicts"):
        render("x", ["not a dict"])
    with pytest.raises(ChatTemplateError, match="failed"):
        render("{{ messages[0]['content'] + 1 }}")


def test_continue_final_message(bl_tok):
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Once upon"}]
    out = bl_tok.apply_chat_template(msgs, add_generation_prompt=False, continue_final_message=True)
    assert out.endswith("<|im_start|>assistant\nOnce upon")


@pytest.mark.parametrize(
    "source", ["{{ 'A' * 2000000 }}", "{{ 2000000 * 'A' }}", "{{ ['x'] * 10**7 }}", "{{ 10 ** 100000 }}"]
)
def test_templates_cannot_build_huge_values_in_one_step(source):
    with pytest.raises(ChatTemplateError, match="too large"):
        render(source)


def test_small_repetitions_still_render():
    assert render("{{ '=' * 3 }}{{ 2 ** 3 }}") == "===8"
