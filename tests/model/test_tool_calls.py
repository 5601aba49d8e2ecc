"""Tool calls on SmolLM2 with a Hermes tool template: rendering, required and named calls that validate, a round trip, streaming, refusals.

The model is SmolLM2-135M-Instruct's weights with Qwen 2.5's tool template in its metadata
(tools/make-tool-model, the ``smollm2_tools_path`` fixture). It is far too small to choose tools
well: ``auto`` gets calls from it once the history shows it calling (few-shot); ``required`` and a
named function are constrained by a grammar and must always give a call whose arguments validate
(``jsonschema``). The Llama 3 and Mistral formats run on the same weights through a configured
Jinja template that speaks them. One in-process engine serves each template (its loop in a thread).
"""

from __future__ import annotations

import ctypes
import json
import queue
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import llama_cpp
import msgspec
import pytest
from llama_cpp import llama_grammar

from optimanode import protocol as p
from optimanode.worker import toolcalls
from optimanode.worker.engine import Engine, _strict_json_chars, route_llama_log
from optimanode.worker.jobs import _Job, _Jobs

pytestmark = pytest.mark.timeout(1500)

WEATHER = p.Tool(name="get_weather", description="Get the current weather in a city", parameters={
    "type": "object",
    "properties": {"city": {"type": "string", "minLength": 1, "maxLength": 24},
                   "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"], "additionalProperties": False})
TIME = p.Tool(name="get_time", description="The current time in a time zone", parameters={
    "type": "object", "properties": {"tz": {"enum": ["UTC", "CET", "EST"]}, "seconds": {"type": "boolean"}},
    "required": ["tz"], "additionalProperties": False})
TOOLS = [WEATHER, TIME]
SCHEMAS = {t.name: t.parameters for t in TOOLS}
ASK = [p.ChatMessage(role="user", content="What is the weather like in Paris right now?")]
CALL = p.ToolCall(id="call_0123456789abcdef01234567", name="get_weather", arguments='{"city":"Paris","unit":"celsius"}')
ROUND_TRIP = [*ASK, p.ChatMessage(role="assistant", tool_calls=[CALL]),
              p.ChatMessage(role="tool", tool_call_id=CALL.id, name="get_weather",
                            content='{"temperature": 21, "sky": "sunny"}')]


class Served:
    """An in-process engine whose loop runs in a thread; ``run`` sends requests and collects the answers."""

    def __init__(self, model: Path, **settings: Any) -> None:
        self.sent: queue.Queue[Any] = queue.Queue()
        self.engine = Engine(p.WorkerSettings(model_path=str(model), n_threads=2, **settings),
                             lambda msgs: [self.sent.put(m) for m in msgs])
        self.jobs = _Jobs()
        self.loop = threading.Thread(target=self.engine.serve, args=(self.jobs,), daemon=True)
        self.loop.start()
        self._n = 0

    def run(self, requests: list[p.ChatRequest], timeout: float = 900) -> list[tuple[list[p.Chunk], Any]]:
        ids = []
        for r in requests:
            self._n += 1
            ids.append(f"r{self._n}")
            assert self.jobs.add(_Job(id=ids[-1], request=r))
        chunks: dict[str, list[p.Chunk]] = {i: [] for i in ids}
        final: dict[str, Any] = {}
        while len(final) < len(ids):
            msg = self.sent.get(timeout=timeout)
            if isinstance(msg, p.Chunk):
                chunks[msg.id].append(msg)
            else:
                final[msg.id] = msg
        return [(chunks[i], final[i]) for i in ids]

    def rendered(self, request: p.ChatRequest) -> str:
        """The prompt the engine would decode, special tokens written out (call only while it is idle)."""
        buf = ctypes.create_string_buffer(256)
        out = b""
        for t in self.engine.prompt_tokens(request):
            n = llama_cpp.llama_token_to_piece(self.engine.vocab, t, buf, len(buf), 0, True)
            out += buf.raw[:n]
        return out.decode("utf-8")

    def close(self) -> None:
        self.jobs.close()
        self.loop.join(timeout=60)
        assert not self.loop.is_alive()
        self.engine.close()


@pytest.fixture(scope="module")
def served(smollm2_tools_path: Path) -> Iterator[Served]:
    route_llama_log()
    s = Served(smollm2_tools_path, n_ctx=4096, parallel=4)
    try:
        yield s
    finally:
        s.close()


def _request(choice: p.ToolChoice, messages: list[p.ChatMessage] = ASK, tools: list[p.Tool] = TOOLS,
             **params: Any) -> p.ChatRequest:
    return p.ChatRequest(messages=messages, tools=tools, tool_choice=choice,
                         params=p.SamplingParams(**{"max_tokens": 120, "temperature": 0.0, **params}))


def _check_streamed_call(chunks: list[p.Chunk], done: Any) -> p.ToolCall:
    """One call, sent in exactly one chunk and again in Done; no text (the template's whitespace
    around the call is left out); every token counted."""
    assert isinstance(done, p.Done), done
    assert done.finish_reason == "tool_calls", done
    assert done.tool_calls is not msgspec.UNSET and len(done.tool_calls) == 1, done
    carrying = [c for c in chunks if c.tool_calls]
    assert len(carrying) == 1 and carrying[0].tool_calls == done.tool_calls
    assert "".join(c.text for c in chunks) == ""
    assert sum(c.tokens for c in chunks) == done.usage.completion_tokens
    call = done.tool_calls[0]
    assert call.id.startswith("call_") and json.loads(call.arguments) is not None
    return call


def test_the_models_template_renders_the_tools_and_a_call_round_trip(served: Served) -> None:
    text = served.rendered(_request("auto"))
    assert "<tools>\n" in text and json.dumps(toolcalls.template_tools([WEATHER])[0], ensure_ascii=False) in text
    assert text.endswith("<|im_start|>user\nWhat is the weather like in Paris right now?<|im_end|>\n"
                         "<|im_start|>assistant\n")
    # tool_choice "none" still shows the tools (only the reply is not parsed).
    assert served.rendered(_request("none")) == text
    back = served.rendered(_request("auto", ROUND_TRIP))
    assert ('<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", '
            '"unit": "celsius"}}\n</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\n'
            '{"temperature": 21, "sky": "sunny"}\n</tool_response><|im_end|>\n<|im_start|>assistant\n') in back
    # Without tools the same template renders a plain chat.
    plain = served.rendered(p.ChatRequest(messages=ASK))
    assert "<tools>" not in plain and "SmolLM" in plain


def test_required_and_named_calls_always_parse_and_validate_greedy_and_sampled(served: Served) -> None:
    named_time, named_weather = p.NamedToolChoice(name="get_time"), p.NamedToolChoice(name="get_weather")
    requests = [_request("required"), _request(named_time),
                *[_request("required", temperature=0.9, seed=s) for s in (1, 2, 3)],
                *[_request(named_weather, temperature=0.9, seed=s) for s in (4, 5, 6)]]
    answers = served.run(requests)
    for request, (chunks, done) in zip(requests, answers):
        call = _check_streamed_call(chunks, done)
        if isinstance(request.tool_choice, p.NamedToolChoice):
            assert call.name == request.tool_choice.name
        jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])
    # Greedy is repeatable: the same request gives the same call (ids aside).
    again = served.run([requests[0]])[0]
    assert _check_streamed_call(*again).arguments == answers[0][1].tool_calls[0].arguments


def test_a_constrained_call_whose_argument_holds_the_end_marker_still_parses(served: Served) -> None:
    """An argument the grammar forces to say "wrap it in </tool_call> tags" came back as content,
    no call, finish "stop": the parser took the marker inside the JSON string for the call's end."""
    note = p.Tool(name="write_note", description="Save a note", parameters={
        "type": "object", "properties": {"note": {"const": "wrap it in </tool_call> tags"}},
        "required": ["note"], "additionalProperties": False})
    (chunks, done), = served.run([_request(p.NamedToolChoice(name="write_note"), tools=[note], max_tokens=64)])
    call = _check_streamed_call(chunks, done)
    assert call.name == "write_note" and json.loads(call.arguments) == {"note": "wrap it in </tool_call> tags"}


def test_a_tool_result_in_the_history_is_answered_in_text(served: Served) -> None:
    (chunks, done), (chunks_none, done_none) = served.run([
        _request("auto", ROUND_TRIP, max_tokens=32), _request("none", ROUND_TRIP, max_tokens=32)])
    for cs, d in ((chunks, done), (chunks_none, done_none)):
        assert isinstance(d, p.Done) and d.finish_reason in ("stop", "length"), d
        assert "".join(c.text for c in cs).strip()
    assert done_none.tool_calls is msgspec.UNSET and not any(c.tool_calls for c in chunks_none)


def _weather(city: str, n: int) -> p.ToolCall:
    return p.ToolCall(id=f"call_{n}", name="get_weather", arguments=f'{{"city":"{city}","unit":"celsius"}}')


def test_auto_parses_the_calls_the_model_writes_unconstrained(served: Served) -> None:
    # Unconstrained, SmolLM2 calls a tool once the history shows it calling one (few-shot).
    follow_up = [*ASK, p.ChatMessage(role="assistant", tool_calls=[CALL]),
                 p.ChatMessage(role="user", content="What is the weather like in Berlin right now?")]
    few_shot = [p.ChatMessage(role="user", content="What is the weather like in Rome right now?"),
                p.ChatMessage(role="assistant", tool_calls=[_weather("Rome", 1)]),
                p.ChatMessage(role="user", content="What is the weather like in Oslo right now?"),
                p.ChatMessage(role="assistant", tool_calls=[_weather("Oslo", 2)]), *ASK]
    answers = served.run([_request("auto", follow_up, max_tokens=60), _request("auto", few_shot, max_tokens=60),
                          _request("auto", few_shot, max_tokens=60, temperature=0.7, seed=3)])
    for (chunks, done), city in zip(answers[:2], ("Berlin", "Paris")):  # greedy: these calls, every time
        call = _check_streamed_call(chunks, done)
        assert call.name == "get_weather" and json.loads(call.arguments)["city"] == city, call
        jsonschema.validate(json.loads(call.arguments), SCHEMAS["get_weather"])
    chunks, done = answers[2]  # sampled: free to answer in text, but a call never shows as text
    assert isinstance(done, p.Done) and not _holds_a_call("".join(c.text for c in chunks))
    assert sum(c.tokens for c in chunks) == done.usage.completion_tokens
    for c in done.tool_calls or []:
        assert c.name and isinstance(json.loads(c.arguments), dict)


def _holds_a_call(text: str) -> bool:
    if "<tool_call>" not in text or "</tool_call>" not in text.split("<tool_call>", 1)[1]:
        return False
    body = text.split("<tool_call>", 1)[1].split("</tool_call>", 1)[0]
    try:
        value = json.loads(body)
    except ValueError:
        return False
    return isinstance(value, dict) and isinstance(value.get("name"), str)


@pytest.mark.parametrize(("request_", "message"), [
    (_request(p.NamedToolChoice(name="send_email")), "tool_choice names 'send_email', which is not among the tools"),
    (_request("required", tools=[]), "tool_choice required needs tools"),
    (_request("auto", response_format=p.JsonObjectFormat()), "response_format cannot be combined with tools"),
    (_request("required", tools=[p.Tool(name="f", parameters={"type": "object", "properties": {
        "a": {"type": "string", "pattern": "(("}}})]), "tools: parameters do not convert to a grammar"),
], ids=["unknown-function", "required-without-tools", "with-response-format", "parameters-do-not-convert"])
def test_a_tool_choice_that_cannot_be_served_is_bad_request(served: Served, request_: p.ChatRequest,
                                                            message: str) -> None:
    (chunks, failed), = served.run([request_])
    assert not chunks and isinstance(failed, p.Failed) and failed.code == "bad_request", failed
    assert message in failed.message


# -- the three formats' grammars against the real vocabulary --------------------------------------

CANONICAL = {
    "hermes": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>',
    "llama3": '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}',
    "mistral": '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}]',
}


@pytest.mark.parametrize("family", [toolcalls.HERMES, toolcalls.LLAMA3, toolcalls.MISTRAL], ids=lambda f: f.name)
def test_each_formats_grammar_compiles_accepts_its_canonical_call_then_only_the_end(served: Served,
                                                                                    family: toolcalls.Family) -> None:
    engine = served.engine
    grammar = engine._compile(_strict_json_chars(toolcalls.grammar(family, TOOLS, "required", llama_grammar.SchemaConverter)), "tools")
    cand = (llama_cpp.llama_token_data * 1)()
    arr = llama_cpp.llama_token_data_array(data=ctypes.cast(cand, ctypes.POINTER(llama_cpp.llama_token_data)),
                                           size=1, selected=-1, sorted=False)

    def allowed(token: int) -> bool:
        cand[0].id, cand[0].logit, cand[0].p = token, 0.0, 0.0
        arr.size = 1
        llama_cpp.llama_sampler_apply(grammar, ctypes.byref(arr))
        return cand[0].logit != float("-inf")

    try:
        text = CANONICAL[family.name]
        tokens = engine.tokenize(text.encode(), add_bos=False, special=True)
        for t in tokens:
            assert allowed(t), (family.name, engine.piece(t))
            llama_cpp.llama_sampler_accept(grammar, t)
        eos = llama_cpp.llama_vocab_eos(engine.vocab)
        assert allowed(eos) and not allowed(tokens[0])
    finally:
        llama_cpp.llama_sampler_free(grammar)
    out: list[p.ToolCall] = []
    stream = toolcalls.CallStream([], family, lambda _t, _n, calls: out.extend(calls))
    for t in tokens:
        stream.feed(engine.piece(t))
    stream.finish()
    assert [(c.name, json.loads(c.arguments)) for c in out] == [("get_weather", {"city": "Paris", "unit": "celsius"})]


# Chat templates that speak the Llama 3 and Mistral formats (the parts that matter: the tools in
# the system turn, the calls of the history), over SmolLM2's chatml turns.
LLAMA3_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nEnvironment: ipython\nAnswer with a JSON function call "
    "{\"name\": function name, \"parameters\": dictionary of arguments}. Functions:\n"
    "{% for t in tools %}{{ t | tojson }}\n{% endfor %}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.tool_calls %}{% for c in m.tool_calls %}"
    "{\"name\": \"{{ c.function.name }}\", \"parameters\": {{ c.function.arguments | tojson }}}{% endfor %}"
    "{% else %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}<|im_start|>assistant\n")
MISTRAL_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.tool_calls %}[TOOL_CALLS]["
    "{% for c in m.tool_calls %}{\"name\": \"{{ c.function.name }}\", \"arguments\": {{ c.function.arguments | tojson }}, "
    "\"id\": \"{{ c.id }}\"}{% endfor %}]{% else %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}"
    "<|im_start|>assistant\n")


@pytest.mark.parametrize(("template", "family"), [(LLAMA3_TEMPLATE, "llama3"), (MISTRAL_TEMPLATE, "mistral")])
def test_a_configured_template_in_another_format_gets_calls_in_that_format(smollm2_tools_path: Path, template: str,
                                                                           family: str) -> None:
    route_llama_log()
    s = Served(smollm2_tools_path, n_ctx=2048, parallel=2, chat_template=template)
    try:
        assert s.engine.tool_family is toolcalls.FAMILIES[family]
        answers = s.run([_request(p.NamedToolChoice(name="get_weather")),
                         _request("required", temperature=0.9, seed=11)])
        for chunks, done in answers:
            assert isinstance(done, p.Done) and done.finish_reason == "tool_calls", done
            assert "".join(c.text for c in chunks) == "" and len(done.tool_calls) == 1
            call = done.tool_calls[0]
            if family == "mistral":
                assert len(call.id) == 9 and call.id.isalnum()
            jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])
        # The call goes back into the history in the format's own shape.
        call = answers[0][1].tool_calls[0]
        history = [*ASK, p.ChatMessage(role="assistant", tool_calls=[call])]
        marker = "[TOOL_CALLS][" if family == "mistral" else ""
        args = json.dumps(json.loads(call.arguments), ensure_ascii=False)
        assert f'{marker}{{"name": "get_weather", "{"arguments" if family == "mistral" else "parameters"}": {args}' \
            in s.rendered(_request("auto", history))
    finally:
        s.close()


def test_a_builtin_template_cannot_be_sent_tools(smollm2_tools_path: Path) -> None:
    route_llama_log()
    s = Served(smollm2_tools_path, n_ctx=512, parallel=1, chat_template="chatml")
    try:
        assert s.engine.tool_family is None
        (chunks, failed), (_, also) = s.run([_request("auto", max_tokens=4), _request("none", ROUND_TRIP, tools=[])])
        assert isinstance(failed, p.Failed) and failed.code == "bad_request"
        assert "the built-in 'chatml' chat template has no tool-call format this node knows" in failed.message
        assert isinstance(also, p.Failed) and "messages carry tool_calls" in also.message
        # A plain chat still works.
        (_, done), = s.run([p.ChatRequest(messages=ASK, params=p.SamplingParams(max_tokens=4, temperature=0.0))])
        assert isinstance(done, p.Done)
    finally:
        s.close()
