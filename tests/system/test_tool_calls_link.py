"""Tool calls over the real Gateway link: a node serving SmolLM2 with a Hermes tool template, a NodeClient and the client CLI.

The parsing, the grammar and the formats are checked in tests/unit/test_toolcalls.py and
tests/model/test_tool_calls.py; here a call and its result make a round trip through a real node
(TLS WebSocket, worker process), and ``optimanode client infer --tools`` sends tools and prints the call.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import jsonschema
import pytest
import pytest_asyncio

from optimanode import client_cli
from optimanode.client import RemoteError
from optimanode.gateway import keys
from optimanode.gateway.server import GatewayServer
from optimanode.node import Node
from optimanode.protocol import ChatMessage, ChatRequest, NamedToolChoice, SamplingParams, Tool
from system.test_gateway import NODE_ID, Env, client, collect, fake_sampler, make_settings

pytestmark = [pytest.mark.timeout(900), pytest.mark.asyncio(loop_scope="module")]

WEATHER = {"name": "get_weather", "description": "Get the current weather in a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "minLength": 1, "maxLength": 24},
                                     "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"], "additionalProperties": False}}
TOOLS = [Tool(**WEATHER)]
ASK = [ChatMessage(role="user", content="What is the weather like in Paris right now?")]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def tools_node(tmp_path_factory: pytest.TempPathFactory, smollm2_tools_path: Path) -> AsyncIterator[Env]:
    root = tmp_path_factory.mktemp("tools")
    models = root / "models"
    models.mkdir()
    (models / "hermes.gguf").symlink_to(smollm2_tools_path)
    settings = make_settings(root, **{"model_defaults.n_ctx": "2048"})
    node = Node(settings)
    await node.start()
    try:
        eid = next(iter(node.executors))
        await node.enable(eid, by="test")
        await node.wait_for_state(eid, {"running"}, timeout=120)
        server = GatewayServer(node, settings, fake_sampler(node, NODE_ID), NODE_ID, host="127.0.0.1", port=0)
        await server.start()
        try:
            yield Env(node=node, settings=settings, server=server, eid=eid, idle="", key=keys.read_key(settings.key_path))
        finally:
            await server.stop()
    finally:
        await node.stop()


async def test_a_call_and_its_result_make_a_round_trip_over_the_link(tools_node: Env) -> None:
    c = await client(tools_node)
    try:
        asked = ChatRequest(messages=ASK, tools=TOOLS, tool_choice=NamedToolChoice(name="get_weather"),
                            params=SamplingParams(temperature=0.0, max_tokens=80))
        chunks, done = await collect(c.infer(tools_node.eid, asked), timeout=600)
        assert done.finish_reason == "tool_calls" and len(done.tool_calls) == 1, done
        call = done.tool_calls[0]
        assert [ch.tool_calls for ch in chunks if ch.tool_calls] == [done.tool_calls]
        assert "".join(ch.text for ch in chunks) == ""
        assert sum(ch.tokens for ch in chunks) == done.usage.completion_tokens
        assert call.name == "get_weather" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.arguments), WEATHER["parameters"])

        history = [*ASK, ChatMessage(role="assistant", tool_calls=[call]),
                   ChatMessage(role="tool", tool_call_id=call.id, name=call.name, content='{"temperature": 21}')]
        answer = ChatRequest(messages=history, tools=TOOLS, params=SamplingParams(temperature=0.0, max_tokens=24))
        chunks, done = await collect(c.infer(tools_node.eid, answer), timeout=600)
        assert done.finish_reason in ("stop", "length", "tool_calls"), done
        assert "".join(ch.text for ch in chunks).strip() or done.tool_calls

        with pytest.raises(RemoteError) as info:
            await collect(c.infer(tools_node.eid, ChatRequest(messages=ASK, tools=TOOLS,
                                                                 tool_choice=NamedToolChoice(name="nope"))))
        assert info.value.code == "bad_request" and "'nope', which is not among the tools" in info.value.message
    finally:
        await c.close()


async def test_the_client_command_line_sends_tools_and_prints_the_call(tools_node: Env, capsys, tmp_path: Path) -> None:
    base = ["--url", tools_node.url, "--key-file", str(tools_node.settings.key_path),
            "--fingerprint", tools_node.fingerprint, "--timeout", "600"]

    async def run(*argv: str) -> tuple[int, str, str]:
        rc = await asyncio.to_thread(client_cli.main, [*base, *argv])
        out = capsys.readouterr()
        return rc, out.out, out.err

    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps([{"type": "function", "function": WEATHER}]))  # OpenAI's shape
    ask = ("infer", tools_node.eid, "--prompt", ASK[0].content, "--tools", str(tools), "--max-tokens", "80",
           "--temperature", "0")
    rc, out, err = await run(*ask, "--tool-choice", "get_weather")
    assert rc == 0 and "[tool_calls;" in err, (out, err)
    line, = [x for x in out.splitlines() if x.startswith("tool call ")]
    call_id, rest = line.removeprefix("tool call ").split(": ", 1)
    assert call_id.startswith("call_") and rest.startswith("get_weather(") and rest.endswith(")")
    jsonschema.validate(json.loads(rest.removeprefix("get_weather(")[:-1]), WEATHER["parameters"])

    rc, out, _ = await run("--json", *ask, "--tool-choice", "required")
    doc = json.loads(out)
    assert rc == 0 and doc["finish_reason"] == "tool_calls" and doc["tool_calls"][0]["name"] == "get_weather"
    rc, out, _ = await run("--json", *ask, "--tool-choice", "required", "--stream")
    frames = [json.loads(x) for x in out.splitlines()]
    assert rc == 0 and frames[-1]["tool_calls"] == [f for f in frames if f.get("tool_calls")][0]["tool_calls"]

    rc, _, err = await run(*ask, "--tool-choice", "send_email")
    assert rc == 1 and "bad_request" in err and "'send_email', which is not among the tools" in err
    rc, _, err = await run(*ask[:5], str(tmp_path / "missing.json"))
    assert rc == 2 and "missing.json" in err
    tools.write_text('[{"name": "has space"}]')
    rc, _, err = await run(*ask)
    assert rc == 2 and "--tools" in err and "name" in err
