"""`optimanode openai` driven by the official openai SDK: two real nodes on loopback, the front as a process.

Two in-process nodes (each its own state, key, certificate and SmolLM2 worker) behind their own
GatewayServers, and ``python -m optimanode openai --config FILE`` started as a child process from a
TOML file naming both; ``openai.AsyncOpenAI`` talks to it over HTTP. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import re
import secrets
import signal
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import jsonschema
import openai
import pytest
import pytest_asyncio

from optimanode.client import NodeClient
from optimanode.gateway import keys
from optimanode.gateway.server import GatewayServer
from optimanode.metrics import Sampler
from optimanode.node import Node
from optimanode.protocol import CompletionRequest, RequestFinished, SamplingParams, TokenChunk
from system.test_gateway import eventually, make_settings

pytestmark = [pytest.mark.timeout(300), pytest.mark.asyncio(loop_scope="module")]

FRONT_ID = "openai-front-test"
GREEDY = {"temperature": 0.0, "max_tokens": 8}


@dataclass
class NodeEnv:
    node: Node
    server: GatewayServer
    sampler: Sampler
    settings: object
    port: int
    name: str

    @property
    def url(self) -> str:
        return f"wss://127.0.0.1:{self.port}"


@dataclass
class Front:
    nodes: list[NodeEnv]
    eid: str
    idle: str
    token: str
    base_url: str
    proc: asyncio.subprocess.Process
    stderr: Path
    root: Path

    def client(self, token: str | None = None) -> openai.AsyncOpenAI:
        # No retries: the status a request got is what a test asserts.
        return openai.AsyncOpenAI(base_url=self.base_url, api_key=token or self.token, max_retries=0, timeout=120)

    def log(self) -> str:
        return self.stderr.read_text(errors="replace")[-4000:]


async def start_node(root: Path, name: str, files: dict[str, Path], port: int = 0) -> NodeEnv:
    models = root / "models"
    models.mkdir(parents=True, exist_ok=True)
    for fname, target in files.items():
        (models / fname).symlink_to(target)
    settings = make_settings(root)
    node = Node(settings)
    await node.start()
    sampler = Sampler(node.list, node_id=name)
    server = GatewayServer(node, settings, sampler.sample, name, host="127.0.0.1", port=port)
    await server.start()
    return NodeEnv(node=node, server=server, sampler=sampler, settings=settings, port=server.port, name=name)


def eid_of(node: Node, fname: str) -> str:
    return next(eid for eid, ex in node.executors.items() if Path(ex.info.path).name == fname)


async def start_front(root: Path, nodes: list[NodeEnv], token: str) -> tuple[asyncio.subprocess.Process, str, Path]:
    tokens = root / "tokens"
    tokens.write_text(f"# the test's token\n{token}\n")
    tokens.chmod(0o600)
    lines = ['listen = "127.0.0.1:0"', 'tokens_file = "tokens"', f'gateway_id = "{FRONT_ID}"',
             "metrics_interval_s = 0.5", ""]
    for n in nodes:
        assert n.server.fingerprint
        lines += ["[[nodes]]", f'url = "{n.url}"', f'key_file = "{n.settings.key_path}"',
                  f'fingerprint = "{n.server.fingerprint}"', ""]
    conf = root / "front.toml"
    conf.write_text("\n".join(lines))
    stderr = root / "front.stderr"
    with stderr.open("wb") as err:
        proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "optimanode", "openai", "--config", str(conf),
                                                    stdout=asyncio.subprocess.PIPE, stderr=err)
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(60):
            line = (await proc.stdout.readline()).decode()
    except TimeoutError:
        proc.kill()
        raise AssertionError(f"the front did not start within 60 s:\n{stderr.read_text()}") from None
    m = re.search(r"listening on (http://127\.0\.0\.1:\d+/v1) \((\d+) of (\d+) nodes connected\)", line)
    assert m, f"{line!r}\n{stderr.read_text()}"
    assert m.group(2) == m.group(3) == str(len(nodes)), line
    return proc, m.group(1), stderr


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def front(tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path) -> AsyncIterator[Front]:
    """Two nodes running SmolLM2 (the first also holds an idle copy), and the front on both."""
    root = tmp_path_factory.mktemp("openai-front")
    started: list[NodeEnv] = []
    proc = None
    try:
        started.append(await start_node(root / "a", "node-a", {"smollm2.gguf": smollm2_path, "idle.gguf": smollm2_path}))
        started.append(await start_node(root / "b", "node-b", {"smollm2.gguf": smollm2_path}))
        a, b = started
        eid = eid_of(a.node, "smollm2.gguf")
        assert eid == eid_of(b.node, "smollm2.gguf")  # the same file name: the same model id on both
        for n in started:
            await n.node.enable(eid, by="test")
        for n in started:
            await n.node.wait_for_state(eid, {"running"}, timeout=120)
        token = secrets.token_urlsafe(24)
        proc, base_url, stderr = await start_front(root, started, token)
        yield Front(nodes=started, eid=eid, idle=eid_of(a.node, "idle.gguf"), token=token, base_url=base_url,
                    proc=proc, stderr=stderr, root=root)
    finally:
        rc = None
        if proc is not None and proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(15):
                    rc = await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()
        for n in started:
            await n.server.stop()
            await n.node.stop()
            n.sampler.close()
        if proc is not None:  # SIGTERM is a clean stop: the node links closed, exit status 0
            assert rc == 0, (rc, (root / "front.stderr").read_text()[-3000:])
            assert "optimanode.openai: stopped" in (root / "front.stderr").read_text()


def served(f: Front) -> list[int]:
    return [n.node.status(f.eid).requests_served for n in f.nodes]


async def finished_since(node: Node, eid: str, seq: int) -> list[tuple[int, RequestFinished]]:
    """The model's request_finished events after journal sequence number ``seq``."""
    return [(e.seq, e.body) for e in await node.events(eid, limit=200)
            if isinstance(e.body, RequestFinished) and e.seq > seq]


async def last_seq(node: Node, eid: str) -> int:
    return max((e.seq for e in await node.events(eid, limit=1)), default=0)


# -- listing, chat, completions ------------------------------------------------------------------


async def test_models_lists_what_runs_once_across_the_nodes_and_not_the_idle_one(front):
    c = front.client()
    listed = await c.models.list()
    assert [m.id for m in listed.data] == [front.eid]
    assert listed.data[0].owned_by == "optimanode" and listed.data[0].model_extra["nodes"] == 2
    assert (await c.models.retrieve(front.eid)).id == front.eid
    with pytest.raises(openai.NotFoundError):
        await c.models.retrieve(front.idle)


async def test_chat_non_streamed_and_streamed_give_the_same_greedy_text_and_usage(front):
    c = front.client()
    messages = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "What is the capital of France?"}]
    whole = await c.chat.completions.create(model=front.eid, messages=messages, **GREEDY)
    choice = whole.choices[0]
    assert whole.object == "chat.completion" and whole.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant" and choice.message.content and choice.finish_reason in ("stop", "length")
    assert choice.message.tool_calls is None and choice.logprobs is None
    assert 0 < whole.usage.completion_tokens <= 8
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
    stream = await c.chat.completions.create(model=front.eid, messages=messages, stream=True,
                                             stream_options={"include_usage": True}, **GREEDY)
    parts, roles, finishes, usage, ids = [], [], [], None, set()
    async for chunk in stream:
        ids.add(chunk.id)
        assert chunk.object == "chat.completion.chunk"
        if chunk.usage is not None:
            usage = chunk.usage
            assert chunk.choices == []
            continue
        delta = chunk.choices[0].delta
        roles.append(delta.role)
        parts.append(delta.content or "")
        finishes.append(chunk.choices[0].finish_reason)
    assert len(ids) == 1 and roles[0] == "assistant"
    assert finishes[-1] == choice.finish_reason and not any(finishes[:-1])
    assert "".join(parts) == choice.message.content  # greedy: the same text on either node
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens
    assert usage.prompt_tokens == whole.usage.prompt_tokens


async def test_a_conversations_next_turn_lands_where_its_prefix_is_cached(front):
    c = front.client()
    system = (f"Session {uuid.uuid4().hex}. You answer questions about a hardware shop that sells screws, "
              "nails, hinges, door handles, paint brushes, rollers, tape measures, spirit levels and ladders. "
              "It opens at eight and closes at six, except on Sundays. Answer in one short sentence. ") * 2
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "Do you sell ladders?"}]
    first = await c.chat.completions.create(model=front.eid, messages=messages, **GREEDY)
    # A new system prompt: nothing of it cached (at most the template's opening tokens, from earlier tests).
    assert first.usage.prompt_tokens_details.cached_tokens <= 4
    messages += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": "When do you open?"}]
    # Two nodes behind the front: the pool sends the next turn to the node that served the first,
    # whose worker still holds its K/V (OpenAI's usage.prompt_tokens_details.cached_tokens says so).
    second = await c.chat.completions.create(model=front.eid, messages=messages, **GREEDY)
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens - 2


async def test_completion_non_streamed_and_streamed(front):
    c = front.client()
    whole = await c.completions.create(model=front.eid, prompt="The capital of France is", **GREEDY)
    assert whole.object == "text_completion" and "Paris" in whole.choices[0].text
    assert whole.usage.completion_tokens == 8 and whole.choices[0].finish_reason == "length"
    text, finish = [], None
    async for chunk in await c.completions.create(model=front.eid, prompt="The capital of France is", stream=True,
                                                  **GREEDY):
        text.append(chunk.choices[0].text)
        finish = chunk.choices[0].finish_reason or finish
    assert "".join(text) == whole.choices[0].text and finish == "length"
    # A stop string ends it early, as OpenAI's does (the stop text is not returned).
    stopped = await c.completions.create(model=front.eid, prompt="1, 2, 3, 4,", stop=[" 7"], temperature=0,
                                         max_tokens=16)
    assert stopped.choices[0].finish_reason == "stop" and " 7" not in stopped.choices[0].text
    assert "5" in stopped.choices[0].text


SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 16},
        "kind": {"enum": ["capital", "port", "village"]},
        "tags": {"type": "array", "items": {"enum": ["old", "big", "cold"]}, "maxItems": 2},
        "where": {"type": "object", "properties": {"country": {"type": "string", "maxLength": 12}},
                  "required": ["country"]},
    },
    "required": ["city", "kind", "tags", "where"],
    "additionalProperties": False,
}


async def test_response_format_json_schema_output_validates(front):
    c = front.client()
    for seed in (1, 2, 3):
        r = await c.chat.completions.create(
            model=front.eid, messages=[{"role": "user", "content": "Describe Paris as JSON."}], max_tokens=120,
            temperature=0.8, seed=seed,
            response_format={"type": "json_schema", "json_schema": {"name": "place", "schema": SCHEMA}})
        assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
        jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)
    obj = await c.chat.completions.create(
        model=front.eid, messages=[{"role": "user", "content": 'A JSON object with one key "ok" set to true.'}],
        max_tokens=100, temperature=0, response_format={"type": "json_object"})
    assert obj.choices[0].finish_reason == "stop", obj.choices[0].message.content
    json.loads(obj.choices[0].message.content)
    # A schema llama.cpp's converter refuses is the node's bad_request: 400 with its message.
    with pytest.raises(openai.BadRequestError) as info:
        await c.chat.completions.create(
            model=front.eid, messages=[{"role": "user", "content": "x"}], max_tokens=4,
            response_format={"type": "json_schema", "json_schema": {"name": "bad", "schema": {"$ref": "#/nope"}}})
    assert info.value.code == "bad_request"


async def test_logprobs_in_chat_and_completions(front):
    c = front.client()
    r = await c.chat.completions.create(model=front.eid, messages=[{"role": "user", "content": "Say hi."}],
                                        temperature=0, max_tokens=4, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 4
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 3 and t.logprob <= 0 and bytes(t.bytes).decode(errors="replace") == t.token
        # Greedy: the chosen token is the likeliest one.
        assert t.top_logprobs[0].token == t.token and math.isclose(t.top_logprobs[0].logprob, t.logprob, abs_tol=1e-5)
    comp = await c.completions.create(model=front.eid, prompt="The capital of France is", temperature=0, max_tokens=3,
                                      logprobs=2)
    lp = comp.choices[0].logprobs
    assert len(lp.tokens) == 3 and "".join(lp.tokens) == comp.choices[0].text
    assert all(len(top) == 2 for top in lp.top_logprobs) and lp.text_offset[0] == 0
    assert lp.text_offset[1] == len(lp.tokens[0])
    # logit_bias with OpenAI's string keys: a bias of -100 on the greedy first token changes it.
    first_id, first_text = await greedy_first_token(front, "The capital of France is")
    plain = await c.completions.create(model=front.eid, prompt="The capital of France is", temperature=0, max_tokens=1)
    assert plain.choices[0].text == first_text
    biased = await c.completions.create(model=front.eid, prompt="The capital of France is", temperature=0,
                                        max_tokens=1, logit_bias={str(first_id): -100})
    assert biased.choices[0].text != first_text


async def greedy_first_token(front: Front, prompt: str) -> tuple[int, str]:
    """The id and text of the greedy first token, asked of node A directly (OpenAI's shape carries no ids)."""
    a = front.nodes[0]
    async with await NodeClient.connect(a.url, keys.read_key(a.settings.key_path), fingerprint=a.server.fingerprint) as nc:
        async for msg in nc.infer(front.eid, CompletionRequest(prompt=prompt, params=SamplingParams(
                temperature=0, max_tokens=1, logprobs=1))):
            if isinstance(msg, TokenChunk):
                (t,) = msg.logprobs
                return t.id, t.text
    raise AssertionError("no token came")


async def post(front: Front, path: str, data: bytes) -> tuple[int, dict]:
    """A raw POST (urllib in a thread): what the SDK would not send."""
    req = urllib.request.Request(front.base_url + path, data=data, method="POST",
                                 headers={"Authorization": f"Bearer {front.token}", "Content-Type": "application/json"})

    def go() -> tuple[int, dict]:
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    return await asyncio.to_thread(go)


# -- errors --------------------------------------------------------------------------------------


async def test_errors_get_the_right_status_and_openais_error_body(front):
    c = front.client()
    with pytest.raises(openai.NotFoundError) as nf:
        await c.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    assert nf.value.code == "unknown_model" and nf.value.param == "model"
    with pytest.raises(openai.AuthenticationError) as auth:
        await front.client(token="x" * 32).chat.completions.create(
            model=front.eid, messages=[{"role": "user", "content": "x"}])
    assert auth.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        await front.client(token="x" * 32).models.list()
    # Longer than the 512-token context: the node's context_overflow, a 400 (and streamed too: the
    # front waits for the node's first frame before it answers).
    long = "hello " * 800
    with pytest.raises(openai.BadRequestError) as over:
        await c.completions.create(model=front.eid, prompt=long, max_tokens=4)
    assert over.value.code == "context_overflow"
    with pytest.raises(openai.BadRequestError) as over_stream:
        await c.completions.create(model=front.eid, prompt=long, max_tokens=4, stream=True)
    assert over_stream.value.code == "context_overflow"
    # A model the node has but does not run: 503 (the SDK's InternalServerError covers 5xx).
    with pytest.raises(openai.InternalServerError) as idle:
        await c.completions.create(model=front.idle, prompt="x", max_tokens=2)
    assert idle.value.status_code == 503 and idle.value.code == "model_not_running"
    # The front's own checks name the field.
    with pytest.raises(openai.BadRequestError) as n2:
        await c.chat.completions.create(model=front.eid, messages=[{"role": "user", "content": "x"}], n=2)
    assert n2.value.param == "n"
    with pytest.raises(openai.BadRequestError) as temp:
        await c.chat.completions.create(model=front.eid, messages=[{"role": "user", "content": "x"}],
                                        temperature=1000)
    assert "temperature" in str(temp.value)
    with pytest.raises(openai.BadRequestError) as bias:
        await c.completions.create(model=front.eid, prompt="x", logit_bias={"not-an-id": 1})
    assert bias.value.param == "logit_bias"
    with pytest.raises(openai.BadRequestError) as role:
        await c.chat.completions.create(model=front.eid, messages=[{"content": "no role"}])  # type: ignore[list-item]
    assert role.value.param and "role" in role.value.param
    # A route that does not exist, and a body that is not JSON, in the same shape.
    status, body = await post(front, "/nope", b"{}")
    assert status == 404 and body["error"]["message"].startswith("no route")
    status, body = await post(front, "/chat/completions", b"{not json")
    assert status == 400 and "not JSON" in body["error"]["message"]
    # A body nested ~5,000 deep (a tool's parameters) was a text/plain 500 the SDK retried, with a
    # traceback each time: a 400 in OpenAI's shape.
    deep = (b'{"model":"%s","messages":[{"role":"user","content":"x"}],"tools":[{"type":"function","function":'
            b'{"name":"f","parameters":{"a":%s}}}]}' % (front.eid.encode(), b"[" * 5000 + b"]" * 5000))
    status, body = await post(front, "/chat/completions", deep)
    assert status == 400 and "nested too deeply" in body["error"]["message"], (status, body)
    # A client that leaves while uploading its body: no traceback in the front's log (there was one each).
    port = int(front.base_url.split(":")[2].split("/")[0])
    before = front.stderr.read_text().count("Traceback")
    for _ in range(2):
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {front.token}\r\n"
                f"Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n{{\"model\":".encode())
        await w.drain()
        await asyncio.sleep(0.3)  # the front is reading the body when the client goes
        w.close()
    # Nothing above disturbed the nodes: the next request is served (and by then the front has long
    # handled the two uploads that ended).
    ok = await c.completions.create(model=front.eid, prompt="Hi", **GREEDY)
    assert front.stderr.read_text().count("Traceback") == before, front.stderr.read_text()[-2000:]
    assert ok.usage.completion_tokens == 8


async def test_a_client_that_leaves_a_stream_cancels_the_node_request(front):
    c = front.client()
    before = {n.name: await last_seq(n.node, front.eid) for n in front.nodes}
    stream = await c.completions.create(model=front.eid, prompt="1, 2, 3,", temperature=0, max_tokens=400,
                                        stream=True)
    got = 0
    async for chunk in stream:
        got += 1
        if got == 3:
            break
    await stream.close()  # the HTTP connection goes; 400 tokens would take most of a minute here

    async def cancelled() -> bool:
        for n in front.nodes:
            for _, rf in await finished_since(n.node, front.eid, before[n.name]):
                if rf.outcome == "cancelled":
                    assert rf.completion_tokens < 400
                    return True
        return False

    deadline = time.monotonic() + 20
    while not await cancelled():
        assert time.monotonic() < deadline, "the node request was not cancelled within 20 s\n" + front.log()
        await asyncio.sleep(0.2)
    await eventually(lambda: all(n.node.status(front.eid).in_flight == 0 for n in front.nodes), timeout=10,
                     what="both workers free")
    # A client that gives up on a whole (non-streamed) reply cancels it too: a raw HTTP request, then
    # the socket closed once a worker is busy with it.
    before = {n.name: await last_seq(n.node, front.eid) for n in front.nodes}
    port = int(front.base_url.rsplit(":", 1)[1].split("/")[0])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    body = json.dumps({"model": front.eid, "prompt": "1, 2, 3,", "temperature": 0, "max_tokens": 400}).encode()
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Authorization: Bearer {front.token}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    await writer.drain()
    await eventually(lambda: any(n.node.status(front.eid).in_flight for n in front.nodes), timeout=20,
                     what="the request reached a worker")
    writer.close()
    deadline = time.monotonic() + 20
    while not await cancelled():
        assert time.monotonic() < deadline, "the whole-reply request was not cancelled within 20 s\n" + front.log()
        await asyncio.sleep(0.2)


# -- two nodes -----------------------------------------------------------------------------------


async def test_concurrent_requests_spread_over_both_nodes_and_a_node_going_down_cuts_only_its_stream(front):
    c = front.client()
    before = served(front)

    async def one(i: int) -> int:
        r = await c.chat.completions.create(model=front.eid, messages=[{"role": "user", "content": f"Count to {i}."}],
                                            **GREEDY)
        return r.usage.completion_tokens

    async with asyncio.timeout(180):
        tokens = await asyncio.gather(*(one(i) for i in range(6)))
    assert all(0 < t <= 8 for t in tokens)
    after = served(front)
    gained = [x - y for x, y in zip(after, before)]
    assert sum(gained) == 6 and all(g >= 1 for g in gained), gained
    # The node serving a stream stops its link mid-stream: the stream ends with OpenAI's error event,
    # carrying the node's code (the SDK raises it), and everything after goes to the other node, with nothing failing.
    stream = await c.completions.create(model=front.eid, prompt="1, 2, 3,", temperature=0, max_tokens=400,
                                        stream=True)
    assert (await anext(aiter(stream))).choices[0].text is not None
    (x,) = [n for n in front.nodes if n.node.status(front.eid).in_flight == 1]
    (y,) = [n for n in front.nodes if n is not x]
    await x.server.stop()
    with pytest.raises(openai.APIError) as cut:
        async with asyncio.timeout(30):
            async for _ in stream:
                pass
    assert cut.value.code == "shutting_down", cut.value  # what a stopping node ends its requests with
    before = served(front)
    async with asyncio.timeout(180):
        tokens = await asyncio.gather(*(one(i) for i in range(3)))
    assert all(0 < t <= 8 for t in tokens)
    gained = {n.name: after - prev for n, after, prev in zip(front.nodes, served(front), before)}
    assert gained == {x.name: 0, y.name: 3}, gained
    assert [m.model_extra["nodes"] for m in (await c.models.list()).data] == [1]
    # The node comes back on the same port: the front reconnects by itself (backoff 0.5 s doubling).
    x.server = GatewayServer(x.node, x.settings, x.sampler.sample, x.name, host="127.0.0.1", port=x.port)
    await x.server.start()
    deadline = time.monotonic() + 30
    while [m.model_extra["nodes"] for m in (await c.models.list()).data] != [2]:
        assert time.monotonic() < deadline, "the front did not reconnect within 30 s\n" + front.log()
        await asyncio.sleep(0.5)


# -- embeddings and tool calls (protocol minor 2) ------------------------------------------------


async def test_embeddings_float_and_base64_are_the_nodes_own_vectors(front):
    c = front.client()
    texts = ["Hi", "The quick brown fox jumps over the lazy dog."]
    r = await c.embeddings.create(model=front.eid, input=texts, encoding_format="float")
    assert r.object == "list" and r.model == front.eid and [d.index for d in r.data] == [0, 1]
    vecs = [d.embedding for d in r.data]
    assert all(len(v) == 576 and math.isclose(math.sqrt(sum(x * x for x in v)), 1.0, abs_tol=1e-4) for v in vecs)
    # The node's own answer to the same request, asked directly: the front passes it on unchanged.
    a = front.nodes[0]
    async with await NodeClient.connect(a.url, keys.read_key(a.settings.key_path), fingerprint=a.server.fingerprint) as nc:
        own, usage = await nc.embed(front.eid, texts)
    for v, w in zip(vecs, own):
        assert sum(x * y for x, y in zip(v, w)) > 0.999
    assert r.usage.prompt_tokens == r.usage.total_tokens == usage.prompt_tokens
    # base64 (what the SDK asks for when no format is given): little-endian float32 of the same vectors.
    status, raw = await post(front, "/embeddings",
                             json.dumps({"model": front.eid, "input": texts, "encoding_format": "base64"}).encode())
    assert status == 200
    import array

    for d, v in zip(raw["data"], vecs):
        got = array.array("f", base64.b64decode(d["embedding"]))
        assert len(got) == 576 and all(math.isclose(x, y, abs_tol=1e-6) for x, y in zip(got, v))
    sdk = await c.embeddings.create(model=front.eid, input=texts)  # the SDK's default: base64, decoded by it
    assert all(math.isclose(x, y, abs_tol=1e-6) for x, y in zip(sdk.data[1].embedding, vecs[1]))
    one = await c.embeddings.create(model=front.eid, input="Hi", encoding_format="float")
    assert len(one.data) == 1 and sum(x * y for x, y in zip(one.data[0].embedding, vecs[0])) > 0.999
    with pytest.raises(openai.BadRequestError) as empty:
        await c.embeddings.create(model=front.eid, input=[])
    assert empty.value.param == "input"
    with pytest.raises(openai.BadRequestError) as dims:
        await c.embeddings.create(model=front.eid, input="Hi", dimensions=8)
    assert dims.value.param == "dimensions"
    # Past the link's 256 inputs a request (OpenAI takes 2,048): several node requests, one answer in order.
    many = [texts[i % 2] for i in range(300)]
    big = await c.embeddings.create(model=front.eid, input=many, encoding_format="float")
    assert [d.index for d in big.data] == list(range(300))
    for i, d in enumerate(big.data):
        assert sum(x * y for x, y in zip(d.embedding, vecs[i % 2])) > 0.999
    assert big.usage.prompt_tokens == 150 * usage.prompt_tokens


WEATHER = [{"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24}},
                   "required": ["city"]}}}]


async def test_a_tool_call_round_trip_streamed_and_not(front, smollm2_tools_path):
    a = front.nodes[0]
    (Path(a.settings.models_dir) / "smollm2-tools.gguf").symlink_to(smollm2_tools_path)
    await a.node.rescan()
    tools_eid = eid_of(a.node, "smollm2-tools.gguf")
    await a.node.enable(tools_eid, by="test")
    c = front.client()
    try:
        await a.node.wait_for_state(tools_eid, {"running"}, timeout=120)
        deadline = time.monotonic() + 15  # the front routes by the node's metrics (every 0.5 s)
        while tools_eid not in [m.id for m in (await c.models.list()).data]:
            assert time.monotonic() < deadline, "the front never saw the tools model running"
            await asyncio.sleep(0.25)
        messages: list[dict] = [{"role": "user", "content": "What is the weather in Paris?"}]
        named = {"type": "function", "function": {"name": "get_weather"}}
        r1 = await c.chat.completions.create(model=tools_eid, messages=messages, tools=WEATHER, tool_choice=named,
                                             temperature=0, max_tokens=60)
        choice = r1.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        (call,) = choice.message.tool_calls
        assert call.type == "function" and call.function.name == "get_weather" and call.id
        args = json.loads(call.function.arguments)
        assert isinstance(args.get("city"), str)
        assert "<tool_call>" not in (choice.message.content or "")
        # The same request streamed: the call arrives as a tool_calls delta, the finish says so.
        calls: dict[int, dict] = {}
        finish = None
        async for chunk in await c.chat.completions.create(model=tools_eid, messages=messages, tools=WEATHER,
                                                           tool_choice="required", temperature=0, max_tokens=60,
                                                           stream=True):
            ch = chunk.choices[0]
            finish = ch.finish_reason or finish
            assert "<tool_call>" not in (ch.delta.content or "")
            for d in ch.delta.tool_calls or []:
                entry = calls.setdefault(d.index, {"name": "", "arguments": ""})
                entry["name"] += d.function.name or ""
                entry["arguments"] += d.function.arguments or ""
        assert finish == "tool_calls" and list(calls) == [0] and calls[0]["name"] == "get_weather"
        assert isinstance(json.loads(calls[0]["arguments"]).get("city"), str)
        # Round trip: the call and its result go back in the history; the model answers in text.
        messages += [choice.message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"city": args["city"],
                                                                                       "temperature_c": 21})}]
        r2 = await c.chat.completions.create(model=tools_eid, messages=messages, tools=WEATHER, tool_choice="none",
                                             temperature=0, max_tokens=24)
        assert r2.choices[0].finish_reason in ("stop", "length") and r2.choices[0].message.content
        assert r2.choices[0].message.tool_calls is None
        # The template rendered the call and its result: the second prompt holds the first and more.
        assert r2.usage.prompt_tokens > r1.usage.prompt_tokens + 10
    finally:
        await a.node.disable(tools_eid, by="test")
        await a.node.wait_for_state(tools_eid, {"discovered"}, timeout=60)  # its worker gone
