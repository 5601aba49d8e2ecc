"""logprobs, logit_bias and the penalties over the real Gateway link: a NodeClient on TLS to a node serving SmolLM2.

The values themselves are checked against llama-cpp-python in tests/model/test_sampling_extras.py;
here: they reach a Gateway on every chunk, are absent when not asked, and bad values come back
as ``bad_request`` naming the field.
"""

from __future__ import annotations

import msgspec
import pytest

from optimanode.client import RemoteError
from optimanode.protocol import CompletionRequest, SamplingParams
from system.test_gateway import client, collect, started  # noqa: F401  (started: the module's node)

pytestmark = [pytest.mark.timeout(240), pytest.mark.asyncio(loop_scope="module")]

PROMPT = "The capital of France is"


async def test_logprobs_reach_the_gateway_on_every_chunk_and_only_when_asked(started):  # noqa: F811
    c = await client(started)
    try:
        asked = CompletionRequest(prompt=PROMPT, params=SamplingParams(temperature=0.0, max_tokens=8, logprobs=3))
        chunks, done = await collect(c.infer(started.eid, asked))
        assert all(ch.logprobs is not msgspec.UNSET and len(ch.logprobs) == ch.tokens for ch in chunks)
        entries = [e for ch in chunks for e in ch.logprobs]  # type: ignore[union-attr]
        assert len(entries) == done.usage.completion_tokens == 8
        assert all(len(e.top) == 3 and e.top[0].id == e.id and e.logprob <= 0 for e in entries)
        assert b"".join(e.bytes for e in entries).decode() == "".join(ch.text for ch in chunks)

        plain = CompletionRequest(prompt=PROMPT, params=SamplingParams(temperature=0.0, max_tokens=8))
        chunks2, _ = await collect(c.infer(started.eid, plain))
        assert all(ch.logprobs is msgspec.UNSET for ch in chunks2)
        assert "".join(ch.text for ch in chunks2) == "".join(ch.text for ch in chunks)

        banned = CompletionRequest(prompt=PROMPT, params=SamplingParams(
            temperature=0.0, max_tokens=8, logprobs=0, logit_bias={entries[0].id: -100.0}, frequency_penalty=1.0))
        chunks3, _ = await collect(c.infer(started.eid, banned))
        assert entries[0].id not in [e.id for ch in chunks3 for e in ch.logprobs]  # type: ignore[union-attr]
    finally:
        await c.close()


@pytest.mark.parametrize(("params", "field"), [
    ({"logprobs": 21}, "request.params.logprobs"),
    ({"logit_bias": {5: 1000.0}}, "request.params.logit_bias"),
    ({"presence_penalty": 9.0}, "request.params.presence_penalty"),
])
async def test_bad_values_are_bad_request_naming_the_field(started, params, field):  # noqa: F811
    c = await client(started)
    try:
        with pytest.raises(RemoteError) as info:
            await collect(c.infer(started.eid, CompletionRequest(prompt=PROMPT, params=SamplingParams(**params))))
        assert info.value.code == "bad_request"
        assert info.value.details.get("field") == field, (info.value.details, str(info.value))
    finally:
        await c.close()


async def test_a_token_beyond_the_vocabulary_is_bad_request(started):  # noqa: F811
    c = await client(started)
    try:
        with pytest.raises(RemoteError) as info:
            await collect(c.infer(started.eid, CompletionRequest(
                prompt=PROMPT, params=SamplingParams(max_tokens=4, logit_bias={10_000_000: 1.0}))))
        assert info.value.code == "bad_request" and "logit_bias: token 10000000" in str(info.value)
    finally:
        await c.close()
