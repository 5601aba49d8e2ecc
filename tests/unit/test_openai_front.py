"""The OpenAI front's pure parts: its TOML file and tokens, the mapping of OpenAI bodies to protocol requests, statuses."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import msgspec
import pytest

from optimanode.client import NodeClient, RemoteError, _GatewayConnection, _handshake, format_fingerprint
from optimanode import openai_front
from optimanode.errors import ConfigError
from optimanode.link import GatewayHandshake, Link, LinkProtocol, NodeHandshake
from optimanode.openai_front import (
    RECONNECT_FIRST_S,
    RECONNECT_MAX_S,
    STATUS_BY_CODE,
    ApiError,
    ChatBody,
    CompletionBody,
    EmbeddingBody,
    Fleet,
    FrontConfig,
    NodeTarget,
    Tokens,
    api_error,
    chat_request,
    completion_request,
    embed_requests,
    merge_embeddings,
    load_config,
)
from optimanode.protocol import ERROR_CODES, JsonSchemaFormat, NamedToolChoice
from unit.linkpair import open_pair

TOKEN = "t" * 24
FP = format_fingerprint(bytes(range(32)))


def write(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


@pytest.fixture
def conf(tmp_path: Path):
    write(tmp_path / "tokens", f"# comment\n\n{TOKEN}\n")
    write(tmp_path / "node.key", "ab" * 32 + "\n")

    def make(body: str = "", nodes: str | None = None) -> Path:
        nodes = nodes if nodes is not None else f'[[nodes]]\nurl = "wss://10.0.0.1:8022"\nkey_file = "node.key"\nfingerprint = "{FP}"\n'
        return write(tmp_path / "front.toml", 'tokens_file = "tokens"\n' + body + "\n" + nodes, 0o644)

    return make


def test_a_good_file_with_relative_paths_and_the_defaults(conf, tmp_path):
    cfg = load_config(conf())
    assert (cfg.host, cfg.port) == ("127.0.0.1", 8080)
    assert cfg.tokens_file == tmp_path / "tokens" and len(cfg.nodes) == 1
    assert cfg.nodes[0].key == bytes.fromhex("ab" * 32) and cfg.nodes[0].fingerprint == FP
    assert cfg.gateway_id.startswith("openai-front@")
    assert "ab" * 8 not in repr(cfg)  # the key is kept out of reprs (logs, tracebacks)
    cfg = load_config(conf('listen = "[::1]:0"\ngateway_id = "gw"'))
    assert (cfg.host, cfg.port, cfg.gateway_id) == ("::1", 0, "gw")


@pytest.mark.parametrize("body, nodes, key, says", [
    ('listen = "localhost"', None, "listen", "HOST:PORT"),
    ('listen = "1.2.3.4:99999"', None, "listen", "HOST:PORT"),
    ('lisen = "1.2.3.4:80"', None, "lisen", "unknown field `lisen`"),
    ("metrics_interval_s = 0", None, "metrics_interval_s", ">= 0.25"),
    ("", "", "nodes", "missing required field"),
    ("", '[[nodes]]\nurl = "wss://h:1"\nkey_file = "node.key"\n', "nodes[0].fingerprint", "fingerprint"),
    ("", '[[nodes]]\nurl = "wss://h:1"\nkey_file = "node.key"\nfingerprint = "sha256:12"\n', "nodes[0].fingerprint",
     "sha256:"),
    ("", '[[nodes]]\nurl = "ws://h:1"\nkey_file = "node.key"\n', "nodes[0].url", "insecure_plaintext"),
    ("", f'[[nodes]]\nurl = "wss://h:1"\nkey_file = "nope.key"\nfingerprint = "{FP}"\n', "nodes[0].key_file",
     "an existing access key file"),
    ("", f'[[nodes]]\nurl = "wss://h:1"\nkey_file = "node.key"\nfingerprint = "{FP}"\n' * 2, "nodes", "once"),
])
def test_mistakes_name_the_file_the_key_and_what_was_expected(conf, body, nodes, key, says):
    path = conf(body, nodes)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.source == str(path) and info.value.key == key and says in str(info.value), str(info.value)


def test_secret_files_must_be_private_well_formed_and_are_never_echoed(conf, tmp_path):
    path = conf()
    (tmp_path / "tokens").chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_config(path)
    write(tmp_path / "tokens", "short\n")
    with pytest.raises(ConfigError, match="at least 16 characters") as info:
        load_config(path)
    assert "short" not in str(info.value)
    write(tmp_path / "tokens", "# nothing\n")
    with pytest.raises(ConfigError, match="at least one token"):
        load_config(path)
    write(tmp_path / "tokens", TOKEN + "\n")
    write(tmp_path / "node.key", "secret-not-hex" * 4)
    with pytest.raises(ConfigError, match="64 hex digits") as info:
        load_config(path)
    assert "secret-not-hex" not in str(info.value)


def test_bearer_tokens_are_checked_and_a_changed_file_is_reread(tmp_path):
    f = write(tmp_path / "tokens", TOKEN + "\n" + "u" * 20 + "\n")
    tokens = Tokens(f)
    assert tokens.check(f"Bearer {TOKEN}") and tokens.check("bearer " + "u" * 20)
    assert not tokens.check(None) and not tokens.check(TOKEN) and not tokens.check("Bearer " + "x" * 24)
    assert not tokens.check(f"Basic {TOKEN}")
    write(f, "v" * 30 + "\n")
    os.utime(f, ns=(1, 1))  # a different stamp even within the file system's time resolution
    assert tokens.check("Bearer " + "v" * 30) and not tokens.check(f"Bearer {TOKEN}")
    write(f, "bad\n" + "v" * 30 + "\n")  # a broken new file keeps the tokens in force that it still holds
    os.utime(f, ns=(2, 2))
    assert tokens.check("Bearer " + "v" * 30)
    write(f, "# revoked\n\n")  # a file emptied of tokens revokes them all
    os.utime(f, ns=(3, 3))
    assert not tokens.check("Bearer " + "v" * 30)
    write(f, "w" * 30 + "\n")
    os.utime(f, ns=(4, 4))
    assert tokens.check("Bearer " + "w" * 30)
    f.unlink()  # and so does removing the file
    assert not tokens.check("Bearer " + "w" * 30)


def test_a_rotation_written_with_loose_permissions_never_keeps_the_old_token(tmp_path):
    """The usual rotation (write the new file, rename it over the old) done with umask 022 was
    refused for its mode and kept the OLD token valid; the chmod 600 the log asked for changed
    neither mtime nor size, so the fixed file was never read again: OLD stayed valid, NEW refused."""
    old, new = "o" * 30, "n" * 30
    f = write(tmp_path / "tokens", old + "\n")
    tokens = Tokens(f)
    assert tokens.check(f"Bearer {old}")
    staged = tmp_path / "tokens.new"
    staged.write_text(new + "\n")
    staged.chmod(0o644)
    os.utime(staged, ns=(5, 5))
    staged.rename(f)
    assert not tokens.check(f"Bearer {old}") and not tokens.check(f"Bearer {new}")
    f.chmod(0o600)  # only the mode (and the ctime) changes
    assert tokens.check(f"Bearer {new}") and not tokens.check(f"Bearer {old}")


def chat(**body) -> ChatBody:
    return msgspec.convert({"model": "m", **body}, ChatBody)


def test_a_chat_body_maps_to_the_protocol_request():
    body = chat(messages=[
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Weather "}, {"type": "text", "text": "in Paris?"}]},
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": "call_1", "type": "function",
                         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21 C"},
    ], tools=[{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}],
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, max_tokens=5,
        max_completion_tokens=7, temperature=0.2, top_p=0.9, stop="\n", seed=3, logprobs=True, top_logprobs=2,
        logit_bias={"15": -100, "16": 5.5}, frequency_penalty=0.5, presence_penalty=-0.5,
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}})
    req = chat_request(body)
    m = req.messages
    assert [x.role for x in m] == ["system", "user", "assistant", "tool"]
    assert m[1].content == "Weather in Paris?" and m[2].content == ""
    assert m[2].tool_calls[0].name == "get_weather" and m[2].tool_calls[0].arguments == '{"city": "Paris"}'
    assert m[3].tool_call_id == "call_1" and m[3].name == "get_weather"  # the name, found from the call
    assert req.tools[0].name == "get_weather" and req.tool_choice == NamedToolChoice(name="get_weather")
    p = req.params
    assert (p.max_tokens, p.temperature, p.top_p, p.stop, p.seed, p.logprobs) == (7, 0.2, 0.9, ["\n"], 3, 2)
    assert p.logit_bias == {15: -100.0, 16: 5.5} and (p.frequency_penalty, p.presence_penalty) == (0.5, -0.5)
    assert p.response_format == JsonSchemaFormat(schema={"type": "object"})
    # Left out: the node's defaults.
    plain = chat_request(chat(messages=[{"role": "user", "content": "x"}]))
    assert plain.params.temperature == 0.8 and plain.params.logprobs is None and plain.tool_choice == "auto"


@pytest.mark.parametrize("body, param", [
    ({"n": 2}, "n"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"logit_bias": {"a": 1}}, "logit_bias"),
    ({"temperature": -1}, "temperature"),
    ({"top_logprobs": 50, "logprobs": True}, "logprobs"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content"),
    ({"messages": []}, "messages"),
])
def test_what_cannot_be_served_is_a_400_naming_the_field(body, param):
    with pytest.raises(ApiError) as info:
        chat_request(chat(**{"messages": [{"role": "user", "content": "x"}], **body}))
    assert info.value.status == 400 and info.value.param == param, info.value.message


def test_completion_and_embedding_bodies():
    req = completion_request(msgspec.convert({"model": "m", "prompt": ["Hi"], "logprobs": 3, "stop": ["a", "b"]},
                                             CompletionBody))
    assert req.prompt == "Hi" and req.params.logprobs == 3 and req.params.stop == ["a", "b"]
    for bad in ({"echo": True}, {"suffix": "x"}, {"best_of": 2}, {"prompt": ["a", "b"]}):
        with pytest.raises(ApiError):
            completion_request(msgspec.convert({"model": "m", "prompt": "x", **bad}, CompletionBody))
    assert [r.input for r in embed_requests(msgspec.convert({"model": "m", "input": "one"}, EmbeddingBody))] == [["one"]]
    with pytest.raises(ApiError) as info:
        embed_requests(msgspec.convert({"model": "m", "input": []}, EmbeddingBody))
    assert info.value.param == "input"


def test_an_embeddings_request_past_the_links_256_inputs_goes_as_several_and_comes_back_as_one():
    """OpenAI takes 2,048 inputs, the link 256 a request: 300 inputs were a 400."""
    from optimanode.protocol import InferDone, Timings, Usage

    texts = [f"text {i}" for i in range(600)]
    reqs = embed_requests(msgspec.convert({"model": "m", "input": texts}, EmbeddingBody))
    assert [len(r.input) for r in reqs] == [256, 256, 88] and [t for r in reqs for t in r.input] == texts
    with pytest.raises(ApiError, match="at most 2048") as info:
        embed_requests(msgspec.convert({"model": "m", "input": ["x"] * 2049}, EmbeddingBody))
    assert info.value.param == "input"
    timings = Timings(ttft_s=0.0, tokens_per_s=0.0, total_s=0.0)
    dones = [InferDone(id=f"r{k}", finish_reason="stop", timings=timings,
                       usage=Usage(prompt_tokens=10 * len(r.input), completion_tokens=0),
                       embeddings=[[float(i)] for i in range(k * 256, k * 256 + len(r.input))])
             for k, r in enumerate(reqs)]
    merged = merge_embeddings(dones)
    assert merged.embeddings == [[float(i)] for i in range(600)] and merged.usage.prompt_tokens == 6000


def test_every_node_error_code_has_a_deliberate_status():
    assert set(STATUS_BY_CODE) == set(ERROR_CODES)
    expected = {"unknown_model": 404, "bad_request": 400, "context_overflow": 400, "overloaded": 429,
                "model_not_running": 503, "deadline_exceeded": 504}
    assert {k: STATUS_BY_CODE[k] for k in expected} == expected
    err = api_error(RemoteError("overloaded", "queue full"))
    assert err.status == 429 and err.headers == {"Retry-After": "1"}
    assert err.body() == {"error": {"message": "queue full", "type": "rate_limit_error", "param": None,
                                    "code": "overloaded"}}


def test_null_where_openais_spec_allows_it_is_the_default():
    """Clients generated from OpenAI's spec send `"stream": null` (and echo, encoding_format): 400 before."""
    body = chat(messages=[{"role": "user", "content": "x"}], stream=None, temperature=None, top_p=None)
    plain = chat(messages=[{"role": "user", "content": "x"}])
    assert not body.stream and chat_request(body).params == chat_request(plain).params
    # top_p 0 (OpenAI allows it; the link wants > 0): the likeliest token only, i.e. greedy.
    greedy = chat_request(chat(messages=[{"role": "user", "content": "x"}], top_p=0, temperature=0.8)).params
    assert greedy.temperature == 0.0 and greedy.top_p == chat_request(plain).params.top_p
    assert not msgspec.convert({"model": "m", "prompt": "x", "echo": None}, CompletionBody).echo
    assert msgspec.convert({"model": "m", "input": "x", "encoding_format": None}, EmbeddingBody).encoding_format is None


def test_a_model_whose_node_is_reconnecting_is_a_503_not_a_404(tmp_path):
    """Two nodes, each with its own model; B's link dropped: its model was a 404 unknown_model
    (final for the SDK and for LangChain's fallbacks) for as long as B reconnected."""
    from types import SimpleNamespace

    from optimanode.client import NoNodeAvailable

    nodes = [NodeTarget(f"ws://{n}.test/", b"k" * 32, None, plaintext=True) for n in "ab"]
    fleet = Fleet(FrontConfig(host="127.0.0.1", port=0, tokens_file=tmp_path / "tokens", nodes=nodes,
                              gateway_id="gw"))
    report = SimpleNamespace(executors=[SimpleNamespace(id="model-a")])
    fleet.pool.clients.append(SimpleNamespace(closed=False, latest_metrics=report))  # node a, up
    fleet.state = {"ws://a.test/": "connected (a)", "ws://b.test/": "reconnecting"}
    fleet.last_models = {"ws://b.test/": {"model-b"}}
    err = api_error(NoNodeAvailable("none"), fleet, "model-b")
    assert (err.status, err.code, err.headers) == (503, "model_not_running", {"Retry-After": "1"})
    assert api_error(NoNodeAvailable("none"), fleet, "no-such-model").status == 404
    fleet.state["ws://b.test/"] = "connected (b)"  # back, and no longer has it: unknown again
    assert api_error(NoNodeAvailable("none"), fleet, "model-b").status == 404


def test_the_command_refuses_a_bad_file_with_one_line_and_status_2(conf, tmp_path, capsys):
    from optimanode import cli

    assert cli.main(["openai", "--config", str(tmp_path / "missing.toml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("optimanode openai: bad configuration:") and "missing.toml" in err and len(err.splitlines()) == 1
    path = conf('listen = "nowhere"')
    assert cli.main(["openai", "--config", str(path)]) == 2
    assert "listen: expected HOST:PORT" in capsys.readouterr().err


# -- keeping a node connected -----------------------------------------------------------------------


class _NodeThatDropsEachSession(LinkProtocol):
    """The node's end of the real link core: a good handshake, then close 1011 at once."""

    key = bytes(range(32))

    def __init__(self, sessions: list[int]) -> None:
        super().__init__(Link.server(ping_interval_s=None, ping_timeout_s=None))
        self.sessions, self.handshake = sessions, NodeHandshake("flaky", lambda: [self.key])
        self.on_message = self.on_text = self._message

    def on_open(self) -> None:
        self.send(self.handshake.challenge())

    def _message(self, data) -> None:
        if self.handshake.hello is None:
            self.send(self.handshake.receive(data))
            self.sessions.append(1)
            self.close(1011, "internal error")


async def _keep_flaky_node(monkeypatch, tmp_path: Path, *, window_s: float, most: int) -> tuple[list[int], list[float]]:
    """Run Fleet's keeper against a node that drops each session after its handshake (wired
    without a socket by tests/unit/linkpair.py; the handshake is the real one), with a virtual
    clock: asyncio.sleep only adds to it, and once it reaches ``window_s`` the keeper's next sleep
    never ends. Returns (the sessions the node saw, the delays the keeper slept), stopping at
    ``most`` sessions whatever the clock says."""
    sessions: list[int] = []

    async def connect(url: str, key: bytes, *, gateway_id: str | None = None, **_: object) -> NodeClient:
        conn = _GatewayConnection(Link.client(url, ping_interval_s=None, ping_timeout_s=None), None)
        await open_pair(_NodeThatDropsEachSession(sessions), conn)
        await conn.opened
        welcome = await _handshake(conn, GatewayHandshake(key, gateway_id or "gw"))
        return NodeClient(conn, url=url, node_id=welcome.node_id, gateway_id=gateway_id or "gw",
                          version=welcome.version, max_frame_bytes=welcome.max_frame_bytes, call_timeout=5.0)

    monkeypatch.setattr(openai_front.NodeClient, "connect", staticmethod(connect))
    slept: list[float] = []
    parked = asyncio.Event()
    real_sleep = asyncio.sleep

    async def virtual_sleep(delay: float, result=None):
        if sum(slept) >= window_s:
            parked.set()
            await asyncio.Event().wait()
        slept.append(delay)
        await real_sleep(0)
        return result

    monkeypatch.setattr(asyncio, "sleep", virtual_sleep)
    target = NodeTarget("ws://node.test/", _NodeThatDropsEachSession.key, None, plaintext=True)
    fleet = Fleet(FrontConfig(host="127.0.0.1", port=0, tokens_file=tmp_path / "tokens", nodes=[target],
                              gateway_id="gw", connect_timeout_s=5.0))
    keeper = asyncio.create_task(fleet._keep(target, asyncio.Event()))
    try:
        async with asyncio.timeout(30):
            while not parked.is_set() and len(sessions) < most and not keeper.done():
                await real_sleep(0.01)
    finally:
        keeper.cancel()
        await asyncio.gather(keeper, return_exceptions=True)
        await fleet.pool.close()
    return sessions, [d for d in slept if d != 0.25]  # (not the poll while a session is up)


async def test_a_node_that_drops_each_session_is_reconnected_with_a_growing_delay(monkeypatch, tmp_path) -> None:
    sessions, delays = await _keep_flaky_node(monkeypatch, tmp_path, window_s=120.0, most=30)
    # Two virtual minutes: 0.5 + 1 + 2 + ... + 16 + 30 + 30 s, not hundreds of reconnects.
    assert len(sessions) <= 10, f"{len(sessions)} sessions in 120 s (delays {delays})"
    assert delays[:8] == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, RECONNECT_MAX_S, RECONNECT_MAX_S]


async def test_the_delay_starts_again_only_after_a_session_that_stayed_up(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(openai_front, "STABLE_SESSION_S", 0.0)  # every session counts as one that stayed up
    sessions, delays = await _keep_flaky_node(monkeypatch, tmp_path, window_s=1e9, most=5)
    assert len(sessions) >= 5 and len(delays) >= 4 and set(delays) == {RECONNECT_FIRST_S}
