"""logprobs, logit_bias, frequency_penalty and presence_penalty on SmolLM2, against llama-cpp-python's own values.

The worker runs in its own process (``model.test_worker.Worker``); the reference is
``llama_cpp.Llama`` on the same GGUF: its raw scores for logprobs, its ``create_completion`` at
temperature 0 for the penalties and the bias.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest

import llama_cpp
from model.test_worker import Worker, completion, text_of
from optimanode import protocol as p
from optimanode.constraints import explain

pytestmark = pytest.mark.timeout(600)

PROMPT = "The capital of France is"
# A prompt SmolLM2 answers by repeating itself at temperature 0: penalties must change that.
REPEATING = "apple, apple, apple, apple,"


@pytest.fixture(scope="module")
def worker(smollm2_path: Path) -> Iterator[Worker]:
    w = Worker()
    try:
        w.start(smollm2_path)
        yield w
        w.send(p.Shutdown())
        assert w.wait(timeout=10) == 0
    finally:
        w.kill()


@pytest.fixture(scope="module")
def llama(smollm2_path: Path) -> Iterator[llama_cpp.Llama]:
    # flash_attn: the worker's context keeps llama.cpp's default (auto: on, on a CPU);
    # llama-cpp-python turns it off unless asked, and its logits then differ by ~1e-2.
    llm = llama_cpp.Llama(model_path=str(smollm2_path), n_ctx=512, n_threads=2, logits_all=True, flash_attn=True,
                          verbose=False, seed=1)
    yield llm
    llm.close()


def _generate(w: Worker, prompt: str, **params: Any) -> tuple[list[p.Chunk], Any]:
    chunks, final = w.generate(completion(prompt, **params))
    assert w.proc.poll() is None
    return chunks, final


def _reference(llm: llama_cpp.Llama, prompt: str, **kw: Any) -> str:
    llm.reset()
    out = llm.create_completion(prompt, temperature=0.0, repeat_penalty=1.0, **kw)
    return out["choices"][0]["text"]  # type: ignore[index]


def _log_softmax(rows: np.ndarray) -> np.ndarray:
    rows = rows.astype(np.float64)
    high = rows.max(axis=-1, keepdims=True)
    return rows - high - np.log(np.exp(rows - high).sum(axis=-1, keepdims=True))


# -- logprobs --------------------------------------------------------------------------------------


def test_logprobs_of_greedy_tokens_equal_a_log_softmax_of_llama_cpp_pythons_scores(
        worker: Worker, llama: llama_cpp.Llama) -> None:
    chunks, done = _generate(worker, PROMPT, max_tokens=16, logprobs=5)
    assert isinstance(done, p.Done), done
    # One entry per token a chunk covers; together, one per completion token.
    assert all(c.logprobs is not msgspec.UNSET and len(c.logprobs) == c.tokens for c in chunks)
    entries = [e for c in chunks for e in c.logprobs]  # type: ignore[union-attr]
    assert len(entries) == done.usage.completion_tokens == 16
    assert b"".join(e.bytes for e in entries).decode() == text_of(chunks)

    prompt = llama.tokenize(PROMPT.encode(), add_bos=True, special=True)
    llama.reset()
    llama.eval(prompt + [e.id for e in entries])
    reference = _log_softmax(np.asarray(llama.scores[len(prompt) - 1:len(prompt) - 1 + len(entries)]))
    for k, e in enumerate(entries):
        row = reference[k]
        assert e.id == int(row.argmax())  # greedy: the likeliest token
        assert e.logprob == pytest.approx(row[e.id], abs=1e-3)
        assert e.text == llama.detokenize([e.id]).decode("utf-8", "replace") or e.bytes == llama.detokenize([e.id])
        assert len(e.top) == 5 and e.top[0].id == e.id
        assert [t.logprob for t in e.top] == sorted((t.logprob for t in e.top), reverse=True)
        expected = np.sort(row)[::-1][:5]
        assert [t.logprob for t in e.top] == pytest.approx(expected.tolist(), abs=1e-3)
        for t in e.top:
            assert t.logprob == pytest.approx(row[t.id], abs=1e-3)
            assert t.bytes == llama.detokenize([t.id]) or t.id in llama.tokenize(t.bytes, add_bos=False, special=True)


def test_logprobs_match_create_completion_logprobs(worker: Worker, llama: llama_cpp.Llama) -> None:
    """The values a llama-cpp-python user gets from create_completion(logprobs=N)."""
    chunks, _ = _generate(worker, PROMPT, max_tokens=8, logprobs=3)
    ours = [e for c in chunks for e in c.logprobs]  # type: ignore[union-attr]
    llama.reset()
    ref = llama.create_completion(PROMPT, max_tokens=8, temperature=0.0, logprobs=3)
    lp = ref["choices"][0]["logprobs"]  # type: ignore[index]
    assert len(lp["token_logprobs"]) == len(ours)
    assert [e.logprob for e in ours] == pytest.approx(lp["token_logprobs"], abs=1e-3)
    for e, top in zip(ours, lp["top_logprobs"]):
        # llama-cpp-python keys its top tokens by text (one entry per distinct text).
        assert sorted(top.values(), reverse=True)[:3] == pytest.approx([t.logprob for t in e.top][:len(top)],
                                                                       abs=1e-3)


def test_logprobs_zero_gives_the_chosen_token_only_and_no_logprobs_is_left_out_of_the_frame(worker: Worker) -> None:
    chunks, _ = _generate(worker, PROMPT, max_tokens=4, logprobs=0)
    entries = [e for c in chunks for e in c.logprobs]  # type: ignore[union-attr]
    assert len(entries) == 4 and all(e.top == [] and e.logprob <= 0 for e in entries)
    plain, _ = _generate(worker, PROMPT, max_tokens=4)
    assert all(c.logprobs is msgspec.UNSET for c in plain)
    assert b"logprobs" not in p.frame(plain[0])
    assert text_of(plain) == text_of(chunks)


def test_logprobs_follow_the_chunks_through_a_stop_string_and_sampling(worker: Worker) -> None:
    chunks, done = _generate(worker, "1, 2, 3, 4,", max_tokens=30, logprobs=2, stop=[" 8"])
    assert isinstance(done, p.Done) and done.finish_reason == "stop"
    assert sum(len(c.logprobs) for c in chunks) == done.usage.completion_tokens  # type: ignore[arg-type]
    chunks, done = _generate(worker, PROMPT, max_tokens=12, logprobs=4, temperature=0.9, seed=7)
    entries = [e for c in chunks for e in c.logprobs]  # type: ignore[union-attr]
    assert len(entries) == done.usage.completion_tokens
    # Sampled, the chosen token need not be the likeliest, but its logprob is at most the top one.
    assert all(e.logprob <= e.top[0].logprob + 1e-6 for e in entries)


def test_logprobs_under_a_grammar_report_the_raw_distribution(worker: Worker) -> None:
    fmt = p.GrammarFormat(gbnf='root ::= "yes" | "no"')
    chunks, done = _generate(worker, PROMPT, max_tokens=8, logprobs=1, response_format=fmt)
    assert isinstance(done, p.Done) and text_of(chunks) in ("yes", "no")
    entries = [e for c in chunks for e in c.logprobs]  # type: ignore[union-attr]
    assert len(entries) == done.usage.completion_tokens >= 1
    # The grammar forced the token; the logprob is still the model's own, so not the top one.
    assert entries[0].top[0].id != entries[0].id and entries[0].logprob < entries[0].top[0].logprob


# -- logit_bias ------------------------------------------------------------------------------------


def test_a_huge_negative_bias_on_the_greedy_token_changes_the_output_as_in_llama_cpp_python(
        worker: Worker, llama: llama_cpp.Llama) -> None:
    base, _ = _generate(worker, PROMPT, max_tokens=8, logprobs=0)
    first = base[0].logprobs[0].id  # type: ignore[index]
    biased, _ = _generate(worker, PROMPT, max_tokens=8, logprobs=0, logit_bias={first: -100.0})
    ids = [e.id for c in biased for e in c.logprobs]  # type: ignore[union-attr]
    assert first not in ids
    assert text_of(biased) != text_of(base)
    assert text_of(biased) == _reference(llama, PROMPT, max_tokens=8, logit_bias={first: -100.0})
    # The logprobs stay those of the raw logits: the banned token is still the likeliest there.
    assert biased[0].logprobs[0].logprob < 0  # type: ignore[index]


def test_a_positive_bias_forces_a_token(worker: Worker, llama: llama_cpp.Llama) -> None:
    banana = llama.tokenize(b" banana", add_bos=False, special=False)
    assert len(banana) == 1
    chunks, _ = _generate(worker, PROMPT, max_tokens=3, logit_bias={banana[0]: 100.0})
    assert text_of(chunks) == " banana" * 3
    assert text_of(chunks) == _reference(llama, PROMPT, max_tokens=3, logit_bias={banana[0]: 100.0})


def test_logit_bias_joins_the_sampled_chain_too(worker: Worker, llama: llama_cpp.Llama) -> None:
    banana = llama.tokenize(b" banana", add_bos=False, special=False)[0]
    chunks, _ = _generate(worker, PROMPT, max_tokens=3, temperature=0.8, seed=3, logit_bias={banana: 100.0})
    assert text_of(chunks) == " banana" * 3


# -- frequency_penalty and presence_penalty --------------------------------------------------------


@pytest.mark.parametrize("penalty", [{"frequency_penalty": 2.0}, {"presence_penalty": 2.0},
                                     {"frequency_penalty": 0.5, "presence_penalty": 1.0}],
                         ids=["frequency", "presence", "both"])
def test_penalties_change_greedy_output_as_llama_cpp_python_does(worker: Worker, llama: llama_cpp.Llama,
                                                                penalty: dict[str, float]) -> None:
    base, _ = _generate(worker, REPEATING, max_tokens=24)
    penalized, _ = _generate(worker, REPEATING, max_tokens=24, **penalty)
    assert text_of(penalized) != text_of(base)
    assert text_of(base) == _reference(llama, REPEATING, max_tokens=24)
    assert text_of(penalized) == _reference(llama, REPEATING, max_tokens=24, **penalty)


def test_a_negative_penalty_rewards_repetition(worker: Worker) -> None:
    chunks, _ = _generate(worker, "Once upon a time", max_tokens=24, frequency_penalty=-2.0)
    words = text_of(chunks).split()
    assert len(set(words)) < len(words)


# -- bad values ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("params", "message"), [
    ({"logprobs": 21}, "request.params.logprobs: expected an integer from 0 to 20"),
    ({"logprobs": -1}, "request.params.logprobs: expected an integer from 0 to 20"),
    ({"logit_bias": {5: 1000.0}}, "request.params.logit_bias: expected a map of at most 300 token ids"),
    ({"logit_bias": {i: 1.0 for i in range(301)}}, "request.params.logit_bias: expected a map of at most 300"),
    ({"frequency_penalty": 2.5}, "request.params.frequency_penalty: expected a number from -2 to 2"),
    ({"presence_penalty": -3.0}, "request.params.presence_penalty: expected a number from -2 to 2"),
    ({"logit_bias": {10_000_000: 5.0}}, "logit_bias: token 10000000 is not in the model's vocabulary (ids 0..49151)"),
])
def test_bad_values_are_bad_request_naming_the_field(worker: Worker, params: dict[str, Any], message: str) -> None:
    _, failed = _generate(worker, PROMPT, max_tokens=4, **params)
    assert isinstance(failed, p.Failed), failed
    assert failed.code == "bad_request" and failed.message.startswith(message), failed.message
    # The worker goes on serving.
    _, done = _generate(worker, PROMPT, max_tokens=2)
    assert isinstance(done, p.Done)


@pytest.mark.parametrize(("params", "field"), [
    ({"logprobs": 21}, "request.params.logprobs"),
    ({"logit_bias": {5: 1000.0}}, "request.params.logit_bias"),
    ({"logit_bias": {-1: 1.0}}, "request.params.logit_bias"),
    ({"logit_bias": {"5": 1.0}}, "request.params.logit_bias"),
    ({"logit_bias": {5: float("nan")}}, "request.params.logit_bias"),
    ({"presence_penalty": 2.01}, "request.params.presence_penalty"),
])
def test_a_gateway_frame_with_a_bad_value_names_the_field(params: dict[str, Any], field: str) -> None:
    raw = {"type": "infer", "id": "r", "model": "m", "request": {"type": "completion", "prompt": "x", "params": params}}
    with pytest.raises(msgspec.ValidationError) as info:
        p.decode_from_gateway(msgspec.msgpack.encode(raw))
    assert explain(info.value, p.GatewayToNode)[0] == field
