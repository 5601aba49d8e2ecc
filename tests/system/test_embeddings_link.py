"""Embeddings over the real Gateway link: NodeClient, NodePool and the CLI on TLS to a node serving SmolLM2.

The vectors themselves are checked against llama-cpp-python in tests/model/test_embeddings.py;
here: they reach a Gateway with the right shape and usage, errors come back with their stable
codes, the journal and the counters record an embed request as one, and ModelInfo names the
pooling.
"""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from optimanode import client_cli
from optimanode.client import NodePool, RemoteError
from optimanode.protocol import EmbedRequest, Infer, SamplingParams, encode_link
from system.test_gateway import client, raw_session, recv, started  # noqa: F401  (started: the module's node)

pytestmark = [pytest.mark.timeout(300), pytest.mark.asyncio(loop_scope="module")]

TEXTS = ["Hi", "The quick brown fox jumps over the lazy dog.", "Vectors for retrieval. " * 20]


async def test_embed_over_the_link_gives_one_unit_vector_per_input_and_the_usage(started):  # noqa: F811
    c = await client(started)
    try:
        assert c.minor >= 2
        before = await c.status(started.eid)
        assert before.info.pooling == "mean"  # SmolLM2 declares no pooling type: a decoder-only model
        vectors, usage = await c.embed(started.eid, TEXTS)
        v = np.asarray(vectors)
        assert v.shape == (3, 576)
        assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
        assert usage.completion_tokens == 0 and usage.prompt_tokens > 20 + 40  # the long input alone is 60+
        # The same inputs one at a time: the same vectors (batching moves them by far less than this).
        for i, text in enumerate(TEXTS):
            (one,), u = await c.embed(started.eid, [text])
            assert float(np.dot(one, v[i])) > 0.999
        raw, _ = await c.embed(started.eid, TEXTS[:1], normalize=False)
        assert abs(float(np.linalg.norm(raw[0])) - 1.0) > 0.05
        # Counted as a served request that generated no token; journaled as kind "embed", no TTFT.
        after = await c.status(started.eid)
        assert after.requests_served == before.requests_served + 5
        assert after.tokens_generated == before.tokens_generated
        for _ in range(50):  # the end is journaled just after the answer: poll, bounded
            events = await c.events(started.eid, limit=200)
            started_ev = [e for e in events if e.type == "request_started" and e.data.get("kind") == "embed"]
            finished = {e.data["request_id"]: e.data for e in events if e.type == "request_finished"}
            if started_ev and started_ev[-1].data["request_id"] in finished:
                break
            await asyncio.sleep(0.1)
        assert len(started_ev) >= 5
        last = finished[started_ev[-1].data["request_id"]]
        assert last["outcome"] == "stop" and last["completion_tokens"] == 0 and last.get("ttft_s") is None
        assert last["prompt_tokens"] > 0 and last["total_s"] > 0
    finally:
        await c.close()


async def test_a_node_pool_embeds_on_a_node_that_runs_the_model(started):  # noqa: F811
    pool = NodePool([await client(started, gateway_id="pool")])
    try:
        await pool.watch(interval=0.2)
        vectors, usage = await pool.embed(started.eid, TEXTS[:2])
        assert len(vectors) == 2 and len(vectors[0]) == 576 and usage.prompt_tokens > 0
    finally:
        await pool.close()


async def test_embed_errors_come_back_with_their_codes_and_the_node_goes_on(started):  # noqa: F811
    c = await client(started)
    try:
        with pytest.raises(RemoteError) as overflow:
            await c.embed(started.eid, ["fine", "word " * 600])
        assert overflow.value.code == "context_overflow" and "input[1]" in overflow.value.message
        with pytest.raises(RemoteError) as empty:
            await c.embed(started.eid, [])
        assert empty.value.code == "bad_request" and "request.input" in empty.value.message
        with pytest.raises(RemoteError) as many:
            await c.embed(started.eid, ["x"] * 257)
        assert many.value.code == "bad_request" and "request.input" in many.value.message
        with pytest.raises(RemoteError) as late:
            await c.embed(started.eid, [TEXTS[2] * 4] * 256, deadline_s=0.2)
        assert late.value.code == "deadline_exceeded"
        with pytest.raises(TypeError):
            await c.embed(started.eid, "a string, not a list")  # type: ignore[arg-type]
        vectors, _ = await c.embed(started.eid, ["still serving"])
        assert len(vectors) == 1
    finally:
        await c.close()


async def test_an_embed_frame_a_gateway_writes_by_hand_is_answered_with_done_and_embeddings(started):  # noqa: F811
    ws = await raw_session(started.server, started.key)
    try:
        await ws.send(encode_link(Infer(id="raw-embed", model=started.eid, request=EmbedRequest(
            input=["hand made"], normalize=False, params=SamplingParams(deadline_s=60)))))
        msg = await recv(ws, timeout=60)
        assert msg.id == "raw-embed" and msg.finish_reason == "stop"  # type: ignore[union-attr]
        assert len(msg.embeddings) == 1 and len(msg.embeddings[0]) == 576  # type: ignore[union-attr]
    finally:
        await ws.close()


async def test_the_client_command_line_embeds(started, capsys):  # noqa: F811
    base = ["--url", started.url, "--key-file", str(started.settings.key_path), "--fingerprint", started.fingerprint,
            "--gateway-id", "cli"]

    async def run(*argv: str) -> tuple[int, str, str]:
        rc = await asyncio.to_thread(client_cli.main, [*base, *argv])
        out = capsys.readouterr()
        return rc, out.out, out.err

    rc, out, err = await run("embed", started.eid, "hello", "world")
    vectors = json.loads(out)
    assert rc == 0 and len(vectors) == 2 and len(vectors[0]) == 576
    assert "2 vectors of 576 dimensions" in err
    rc, out, _ = await run("--json", "embed", started.eid, "hello", "--no-normalize")
    doc = json.loads(out)
    assert rc == 0 and doc["usage"]["completion_tokens"] == 0 and doc["usage"]["prompt_tokens"] >= 1
    assert abs(float(np.linalg.norm(doc["embeddings"][0])) - 1.0) > 0.05
    rc, _, err = await run("embed", started.eid, "word " * 600)
    assert rc == 1 and "context_overflow" in err
