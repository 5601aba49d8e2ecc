"""Tool calls without a model: template families, the streaming parser of all three formats, the checks, the grammars' text.

The parser is driven the way the worker drives it, through ``CallStream`` with token bytes, split
at every byte boundary; the grammars compile against a real vocabulary in tests/model/test_tool_calls.py.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from llama_cpp.llama_chat_format import Jinja2ChatFormatter
from llama_cpp.llama_grammar import SchemaConverter

from optimanode import protocol as p
from optimanode.worker import toolcalls as tc

REPO = Path(__file__).resolve().parents[2]
WEATHER = p.Tool(name="get_weather", description="The weather in a city",
                 parameters={"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]})


def _run(family: tc.Family, pieces: list[bytes], stops: list[str] | None = None
         ) -> tuple[list[tuple[str, int, list[p.ToolCall]]], tc.CallStream]:
    out: list[tuple[str, int, list[p.ToolCall]]] = []
    stream = tc.CallStream(stops or [], family, lambda text, n, calls: out.append((text, n, list(calls))))
    for piece in pieces:
        if stream.feed(piece):
            break
    if not stream.stopped:
        stream.finish()
    return out, stream


def _splits(text: str) -> list[list[bytes]]:
    """The reply as one piece, byte by byte, and cut in two at every byte boundary."""
    b = text.encode("utf-8")
    return [[b], [b[i:i + 1] for i in range(len(b))]] + [[b[:i], b[i:]] for i in range(1, len(b))]


def _content(out: list[tuple[str, int, list[p.ToolCall]]]) -> str:
    return "".join(text for text, _, _ in out)


def _calls(out: list[tuple[str, int, list[p.ToolCall]]]) -> list[tuple[str, dict[str, Any]]]:
    return [(c.name, json.loads(c.arguments)) for _, _, calls in out for c in calls]


# (family, reply, content, calls)
CASES = [
    (tc.HERMES, 'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n',
     "Let me look.", [("get_weather", {"city": "Paris"})]),
    (tc.HERMES, '<tool_call>\n{"name": "a", "arguments": {"x": "</tool"}}\n</tool_call>\n<tool_call>\n'
                '{"arguments": {}, "name": "b"}\n</tool_call>', "", [("a", {"x": "</tool"}), ("b", {})]),
    (tc.HERMES, "1 < 2 and <tool is not a call: <tool_cal", "1 < 2 and <tool is not a call: <tool_cal", []),
    (tc.HERMES, 'Été à Paris? <tool_call>{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}</tool_call> ok',
     "Été à Paris? ok", [("get_weather", {"city": "Paris"})]),
    (tc.LLAMA3, ' {"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "b", "parameters": {}}', "",
     [("get_weather", {"city": "Paris"}), ("b", {})]),
    (tc.LLAMA3, '<|python_tag|>{"name": "get_weather", "arguments": {"city": "Nice"}}', "",
     [("get_weather", {"city": "Nice"})]),
    (tc.LLAMA3, '{"answer": 4} is JSON, not a call', '{"answer": 4} is JSON, not a call', []),
    (tc.LLAMA3, 'The answer is {"name": "x", "parameters": {}}', 'The answer is {"name": "x", "parameters": {}}', []),
    (tc.MISTRAL, '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "x]}"}}, {"name": "b", "arguments": {}}]',
     "", [("get_weather", {"city": "x]}"}), ("b", {})]),
    (tc.MISTRAL, "Plain [TOOL answer", "Plain [TOOL answer", []),
    # A family's markers inside an argument string are the argument's text, not the call's end or
    # the next call (escaped quotes included): the whole call was content, and a constrained one too.
    (tc.HERMES, '<tool_call>\n{"name": "w", "arguments": {"text": "wrap it in </tool_call> tags"}}\n</tool_call>',
     "", [("w", {"text": "wrap it in </tool_call> tags"})]),
    (tc.HERMES, '<tool_call>{"name": "w", "arguments": {"text": "say \\"<tool_call>\\" \\\\"}}</tool_call> ok',
     "ok", [("w", {"text": 'say "<tool_call>" \\'})]),
    (tc.MISTRAL, '[TOOL_CALLS][{"name": "w", "arguments": {"text": "x [TOOL_CALLS] y"}}]', "",
     [("w", {"text": "x [TOOL_CALLS] y"})]),
    (tc.LLAMA3, '<|python_tag|>{"name": "w", "parameters": {"text": "a <|python_tag|> b"}}', "",
     [("w", {"text": "a <|python_tag|> b"})]),
]


@pytest.mark.parametrize(("family", "reply", "content", "calls"), CASES, ids=lambda v: v.name if isinstance(v, tc.Family) else None)
def test_every_split_of_a_reply_gives_the_same_content_and_calls(family: tc.Family, reply: str, content: str,
                                                                  calls: list[tuple[str, dict[str, Any]]]) -> None:
    for pieces in _splits(reply):
        out, stream = _run(family, pieces)
        assert _content(out) == content, pieces
        assert _calls(out) == calls, pieces
        assert [(c.name, json.loads(c.arguments)) for c in stream.parser.calls] == calls
        # Every token is counted once, in the chunk that carries its text or its call.
        assert sum(n for _, n, _ in out) == len(pieces)


@pytest.mark.parametrize("family", [tc.HERMES, tc.LLAMA3, tc.MISTRAL], ids=lambda f: f.name)
def test_a_stream_never_shows_part_of_a_marker_and_sends_each_call_with_the_chunk_that_completes_it(
        family: tc.Family) -> None:
    call = {"hermes": '<tool_call>{"name": "f", "arguments": {"k": 1}}</tool_call>',
            "llama3": '<|python_tag|>{"name": "f", "parameters": {"k": 1}}',
            "mistral": '[TOOL_CALLS][{"name": "f", "arguments": {"k": 1}}]'}[family.name]
    reply = "Sure: " + call
    b = reply.encode()
    out, _ = _run(family, [b[i:i + 1] for i in range(len(b))])
    shown = [text for text, _, _ in out]
    assert "".join(shown) == "Sure:"
    assert all(not any(ch in text for ch in "<[{") for text in shown), shown
    with_calls = [i for i, (_, _, calls) in enumerate(out) if calls]
    assert len(with_calls) == 1 and out[with_calls[0]][2][0].arguments == '{"k":1}'
    # The call goes out with the byte that closes it, not later.
    assert sum(n for _, n, _ in out[:with_calls[0] + 1]) == len(b)


@pytest.mark.parametrize(("family", "reply"), [
    (tc.HERMES, "<tool_call>\nnot json\n</tool_call> after"),
    (tc.HERMES, '<tool_call>["a list"]</tool_call> after'),
    (tc.HERMES, '<tool_call>{"name": 3, "arguments": {}}</tool_call> after'),
    (tc.HERMES, '<tool_call>{"name": "f", "arguments": "not an object"}</tool_call> after'),
    (tc.MISTRAL, "[TOOL_CALLS][{\"name\": \"f\", \"arguments\": {}}, 42] after"),
    (tc.MISTRAL, "[TOOL_CALLS] never closed {"),
    (tc.LLAMA3, '<|python_tag|>brave_search.call(query="x") after'),
], ids=lambda v: v.name if isinstance(v, tc.Family) else None)
def test_a_malformed_call_comes_back_as_content_as_the_model_wrote_it(family: tc.Family, reply: str) -> None:
    for pieces in _splits(reply)[:2]:
        out, stream = _run(family, pieces)
        assert _content(out) == reply and not stream.parser.calls


@pytest.mark.parametrize(("family", "reply", "content"), [
    (tc.HERMES, '<tool_call>{"name": "a" <tool_call>{"name": "b", "arguments": {}}</tool_call>', '<tool_call>{"name": "a"'),
    (tc.MISTRAL, '[TOOL_CALLS][{"name": "a" [TOOL_CALLS][{"name": "b", "arguments": {}}]', '[TOOL_CALLS][{"name": "a"'),
    (tc.LLAMA3, '{x <|python_tag|>{"name": "b", "parameters": {}}', "{x"),
], ids=lambda v: v.name if isinstance(v, tc.Family) else None)
def test_a_broken_call_ends_where_the_next_marker_starts_and_does_not_swallow_the_next_call(
        family: tc.Family, reply: str, content: str) -> None:
    for pieces in _splits(reply)[:2]:
        out, _ = _run(family, pieces)
        assert _content(out) == content and _calls(out) == [("b", {})]


def test_an_unclosed_hermes_call_at_the_end_still_parses() -> None:
    out, _ = _run(tc.HERMES, [b'<tool_call>\n{"name": "f", "arguments": {}}\n'])
    assert _calls(out) == [("f", {})] and _content(out) == ""


def test_ids_are_the_models_when_unique_else_made_by_the_node() -> None:
    out, _ = _run(tc.MISTRAL, [b'[TOOL_CALLS][{"name": "f", "arguments": {}, "id": "abcdefghi"}, '
                               b'{"name": "g", "arguments": {}, "id": "abcdefghi"}, {"name": "h", "arguments": {}}]'])
    ids = [c.id for _, _, calls in out for c in calls]
    assert ids[0] == "abcdefghi" and len(set(ids)) == 3
    assert all(re.fullmatch(r"[A-Za-z0-9]{9}", i) for i in ids)  # what Mistral's templates accept
    out, _ = _run(tc.HERMES, [b'<tool_call>{"name": "f", "arguments": {}}</tool_call>'] * 2)
    ids = [c.id for _, _, calls in out for c in calls]
    assert len(set(ids)) == 2 and all(re.fullmatch(r"call_[0-9a-f]{24}", i) for i in ids)


def test_a_stop_string_ends_the_reply_and_a_call_before_it_still_counts() -> None:
    reply = b'<tool_call>{"name": "f", "arguments": {"a": [1, 2]}}</tool_call>\nSTOP and more'
    out, stream = _run(tc.HERMES, [reply[i:i + 3] for i in range(0, len(reply), 3)], stops=["STOP"])
    assert stream.stopped and _calls(out) == [("f", {"a": [1, 2]})] and _content(out) == ""


def test_whitespace_is_kept_in_a_reply_without_calls() -> None:
    out, _ = _run(tc.HERMES, [b"  two spaces,", b" a newline\n", b"\n"])
    assert _content(out) == "  two spaces, a newline\n\n"


# -- detection and the checks --------------------------------------------------------------------


def _tool_model_template() -> str:
    loader = importlib.machinery.SourceFileLoader("make_tool_model", str(REPO / "tools" / "make-tool-model"))
    spec = importlib.util.spec_from_loader("make_tool_model", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module.HERMES_TEMPLATE


def test_families_are_detected_from_the_template_text() -> None:
    assert tc.detect(_tool_model_template()) is tc.HERMES
    assert tc.detect("{% if message.role == 'ipython' %}<|python_tag|>{% endif %}") is tc.LLAMA3
    assert tc.detect("{{ '[TOOL_CALLS]' + tool_calls | tojson }}") is tc.MISTRAL
    assert tc.detect("{% for m in messages %}<|im_start|>{{ m.role }}{% endfor %}") is None


def _chat(**kw: Any) -> p.ChatRequest:
    return p.ChatRequest(messages=[p.ChatMessage(role="user", content="hi")], **kw)


@pytest.mark.parametrize(("request_", "family", "message"), [
    (_chat(tool_choice="required"), tc.HERMES, "needs tools"),
    (_chat(tool_choice=p.NamedToolChoice(name="get_weather")), tc.HERMES, "needs tools"),
    (_chat(tools=[WEATHER], tool_choice=p.NamedToolChoice(name="nope")), tc.HERMES, "'nope', which is not among"),
    (_chat(tools=[WEATHER, WEATHER]), tc.HERMES, "defined twice"),
    (_chat(tools=[WEATHER]), None, "has no tool-call format"),
    (_chat(tools=[WEATHER], tool_choice="none"), None, "has no tool-call format"),
    (_chat(tools=[WEATHER], params=p.SamplingParams(response_format=p.JsonObjectFormat())), tc.HERMES,
     "response_format cannot be combined"),
    (p.ChatRequest(messages=[p.ChatMessage(role="assistant", tool_calls=[p.ToolCall(id="c", name="f")])]), None,
     "messages carry tool_calls"),
], ids=["required-no-tools", "named-no-tools", "unknown-name", "twice", "no-family", "none-no-family",
        "response-format", "history-no-family"])
def test_requests_that_cannot_be_served_are_refused_with_the_reason(request_: p.ChatRequest, family: tc.Family | None,
                                                                     message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        tc.check(request_, family, "the built-in 'chatml' chat template")


def test_what_each_tool_choice_parses_and_constrains() -> None:
    assert tc.check(_chat(), tc.HERMES, "t") == (None, False)
    assert tc.check(_chat(tools=[WEATHER]), tc.HERMES, "t") == (tc.HERMES, False)
    assert tc.check(_chat(tools=[WEATHER], tool_choice="none"), tc.HERMES, "t") == (None, False)
    assert tc.check(_chat(tools=[WEATHER], tool_choice="required"), tc.LLAMA3, "t") == (tc.LLAMA3, True)
    named = _chat(tools=[WEATHER], tool_choice=p.NamedToolChoice(name="get_weather"))
    assert tc.check(named, tc.MISTRAL, "t") == (tc.MISTRAL, True)
    # "none" with a response_format: the tools are only shown, the format decides the reply.
    assert tc.check(_chat(tools=[WEATHER], tool_choice="none",
                          params=p.SamplingParams(response_format=p.JsonObjectFormat())), tc.HERMES, "t") == (None, False)


def test_the_tool_models_template_renders_tools_calls_and_results_as_qwen_does() -> None:
    fmt = Jinja2ChatFormatter(template=_tool_model_template(), eos_token="", bos_token="")
    history = [p.ChatMessage(role="user", content="Weather in Paris?"),
               p.ChatMessage(role="assistant", tool_calls=[p.ToolCall(id="call_1", name="get_weather",
                                                                      arguments='{"city": "Paris"}')]),
               p.ChatMessage(role="tool", tool_call_id="call_1", name="get_weather", content='{"temp_c": 21}')]
    text = fmt(messages=tc.template_messages(history), tools=tc.template_tools([WEATHER])).prompt
    assert '<tools>\n{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city"' in text
    assert '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert '<|im_start|>user\n<tool_response>\n{"temp_c": 21}\n</tool_response><|im_end|>\n<|im_start|>assistant\n' in text


def test_arguments_reach_a_template_as_a_mapping_that_prints_as_json() -> None:
    fmt = Jinja2ChatFormatter(template="{% for m in messages %}{% for c in m.tool_calls %}"
                                       "[{{ c.function.arguments }}|{{ c.function.arguments | tojson }}|"
                                       "{{ c.function.arguments is mapping }}|{{ c.function.arguments.city }}]"
                                       "{% endfor %}{% endfor %}", eos_token="", bos_token="")
    calls = [p.ToolCall(id="a", name="f", arguments='{"city": "Nice"}'), p.ToolCall(id="b", name="f", arguments="oops")]
    text = fmt(messages=tc.template_messages([p.ChatMessage(role="assistant", tool_calls=calls)])).prompt
    assert text == '[{"city":"Nice"}|{"city": "Nice"}|True|Nice][oops|"oops"|False|]'


# -- the grammars' text --------------------------------------------------------------------------


def _rules(gbnf: str) -> tuple[set[str], set[str]]:
    """(rules defined, rule names referenced) of GBNF text, quoted strings and classes left out."""
    defined, used = set(), set()
    for line in gbnf.strip().splitlines():
        name, body = line.split(" ::= ", 1)
        defined.add(name)
        body = re.sub(r'"(\\.|[^"\\])*"|\[(\\.|[^\]\\])*\]', " ", body)
        used |= set(re.findall(r"[A-Za-z][A-Za-z0-9-]*", body))
    return defined, used


@pytest.mark.parametrize(("family", "root"), [
    (tc.HERMES, r'root ::= "<tool_call>\n" call "\n</tool_call>"'),
    (tc.LLAMA3, "root ::= call"),
    (tc.MISTRAL, 'root ::= "[TOOL_CALLS][" call "]"'),
], ids=lambda v: v.name if isinstance(v, tc.Family) else None)
def test_a_required_calls_grammar_wraps_the_converters_rules_in_the_familys_markup(family: tc.Family, root: str) -> None:
    other = p.Tool(name="get_time", parameters={"type": "object", "properties": {"tz": {"enum": ["UTC", "CET"]}},
                                                "required": ["tz"], "$defs": {"unused": {"type": "string"}}})
    for choice in ("required", p.NamedToolChoice(name="get_time")):
        gbnf = tc.grammar(family, [WEATHER, other], choice, SchemaConverter)
        assert root in gbnf.splitlines()
        defined, used = _rules(gbnf)
        assert used <= defined, used - defined
        assert f'"\\"{family.args_key}\\""' in gbnf and '"\\"get_time\\""' in gbnf
        assert ('"\\"get_weather\\""' in gbnf) == (choice == "required")


def test_parameters_the_converter_refuses_are_named() -> None:
    bad = p.Tool(name="f", parameters={"type": "object", "properties": {"a": {"type": "string", "pattern": "(("}}})
    with pytest.raises(ValueError, match="tools: parameters do not convert to a grammar: .*Pattern"):
        tc.grammar(tc.HERMES, [bad], "required", SchemaConverter)
    clash = [p.Tool(name=n, parameters={"$defs": {"A": {"type": t}}}) for n, t in (("f", "string"), ("g", "integer"))]
    with pytest.raises(ValueError, match=r"define \$defs/A differently"):
        tc.grammar(tc.HERMES, clash, "required", SchemaConverter)


# -- any reply, any split ------------------------------------------------------------------------

_words = st.text(alphabet=st.sampled_from(list("abc xyz<>[]{}:;\"\n_é")), max_size=12)
_args = st.dictionaries(st.text(alphabet="abcxyz_", min_size=1, max_size=5),
                        st.one_of(st.integers(-5, 5), st.text(alphabet="ab <>}]{[\"\\é", max_size=6), st.booleans()),
                        max_size=3)
_names = st.text(alphabet="abc_.-", min_size=1, max_size=6)


def _markup(family: tc.Family, name: str, args: dict[str, Any]) -> str:
    body = json.dumps({"name": name, family.args_key: args}, ensure_ascii=False)
    return {"hermes": f"<tool_call>\n{body}\n</tool_call>", "llama3": f"<|python_tag|>{body}",
            "mistral": f"[TOOL_CALLS][{body}]"}[family.name]


@hsettings(max_examples=300, deadline=None)
@given(family=st.sampled_from([tc.HERMES, tc.LLAMA3, tc.MISTRAL]),
       parts=st.lists(st.one_of(_words, st.tuples(_names, _args)), max_size=5),
       cuts=st.lists(st.integers(1, 7), min_size=1, max_size=20))
def test_any_mix_of_text_and_calls_split_anywhere_gives_back_the_calls_and_the_text(
        family: tc.Family, parts: list[Any], cuts: list[int]) -> None:
    # The text's alphabet cannot spell a marker, nor a JSON object with a "name" (a Llama 3 call).
    texts = [part for part in parts if isinstance(part, str)]
    reply = "".join(part if isinstance(part, str) else _markup(family, *part) for part in parts)
    b = reply.encode()
    pieces, i, k = [], 0, 0
    while i < len(b):
        pieces.append(b[i:i + cuts[k % len(cuts)]])
        i += cuts[k % len(cuts)]
        k += 1
    out, stream = _run(family, pieces)
    expected = [(part[0], part[1]) for part in parts if not isinstance(part, str)]
    assert _calls(out) == expected
    # The text is what was written outside the calls, up to whitespace next to them.
    assert re.sub(r"\s+", "", _content(out)) == re.sub(r"\s+", "", "".join(t for t in texts))
    assert sum(n for _, n, _ in out) == len(pieces)
    # A marker is never shown, not even a part of it at the end of a chunk followed by the rest.
    for text, _, _ in out:
        assert not any(m in text for m in family.starts)
