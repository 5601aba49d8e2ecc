"""The pure part of embeddings: packing inputs into decodes, unit vectors, reply bounds, pooling names."""

from __future__ import annotations

import msgspec
import numpy as np
import pytest

from optimanode import protocol as p
from optimanode.worker.embedplan import EmbedWork, max_inputs, take, unit


def work(*lengths: int, name: str = "r") -> EmbedWork:
    return EmbedWork(job=name, tokens=[[7] * n for n in lengths], normalize=True)


def picked(plan: list[tuple[EmbedWork, int]]) -> list[tuple[str, int]]:
    return [(w.job, i) for w, i in plan]


def test_inputs_of_one_request_share_a_decode_while_they_fit_the_batch() -> None:
    w = work(100, 200, 150, 100)
    assert picked(take([w], 512, 256)) == [("r", 0), ("r", 1), ("r", 2)]
    assert w.next == 3
    assert picked(take([w], 512, 256)) == [("r", 3)]
    assert take([w], 512, 256) == []


def test_inputs_of_several_requests_share_a_decode_first_come_first_served() -> None:
    a, b, c = work(10, 10, name="a"), work(20, name="b"), work(30, 5, name="c")
    assert picked(take([a, b, c], 512, 256)) == [("a", 0), ("a", 1), ("b", 0), ("c", 0), ("c", 1)]


def test_a_decode_holds_at_most_n_seq_max_inputs() -> None:
    a, b = work(*[1] * 5, name="a"), work(1, 1, name="b")
    assert picked(take([a, b], 512, 4)) == [("a", 0), ("a", 1), ("a", 2), ("a", 3)]
    assert picked(take([a, b], 512, 4)) == [("a", 4), ("b", 0), ("b", 1)]


def test_the_decode_stops_at_the_first_input_that_does_not_fit_rather_than_skipping_ahead() -> None:
    a, b = work(300, 300, name="a"), work(10, name="b")
    assert picked(take([a, b], 512, 256)) == [("a", 0)]
    assert picked(take([a, b], 512, 256)) == [("a", 1), ("b", 0)]


def test_an_input_of_exactly_the_batch_goes_alone() -> None:
    a, b = work(512, name="a"), work(1, name="b")
    assert picked(take([a, b], 512, 256)) == [("a", 0)]
    assert picked(take([a, b], 512, 256)) == [("b", 0)]


def test_a_request_is_complete_once_every_input_has_a_vector_and_counts_its_tokens() -> None:
    w = work(3, 4)
    assert w.prompt_tokens == 7 and not w.complete
    w.vectors[0] = np.zeros(2, dtype=np.float32)
    assert not w.complete
    w.vectors[1] = np.ones(2, dtype=np.float32)
    assert w.complete


def test_unit_scales_to_length_one_and_leaves_a_zero_vector_alone() -> None:
    v = unit(np.array([3.0, 4.0], dtype=np.float32))
    assert v.tolist() == pytest.approx([0.6, 0.8])
    assert unit(np.zeros(3, dtype=np.float32)).tolist() == [0.0, 0.0, 0.0]


def test_max_inputs_keeps_a_reply_of_full_vectors_inside_a_frame() -> None:
    assert max_inputs(576) == p.EMBED_INPUTS_MAX  # SmolLM2: 256 vectors are ~1.3 MB
    assert 1 <= max_inputs(16384) < p.EMBED_INPUTS_MAX
    assert max_inputs(1 << 22) == 1  # never 0: one input always goes (its reply may still be too big)
    # The bound holds for the real encoder: a Done of that many vectors fits the frame.
    for limit in (p.MAX_FRAME, 1 << 20):
        n = max_inputs(16384, frame_limit=limit)
        done = p.Done(id="x" * 128, finish_reason="stop", usage=p.Usage(prompt_tokens=1 << 30, completion_tokens=0),
                      timings=p.Timings(ttft_s=1.0, tokens_per_s=0.0, total_s=1.0),
                      embeddings=[[-1.2345678901234567e-30] * 16384] * n)
        assert len(msgspec.msgpack.encode(done)) <= limit


@pytest.mark.parametrize(("declared", "pooling"), [
    (None, "mean"), (0, "mean"), (1, "mean"), (2, "cls"), (3, "last"), (4, "rank"), (99, "mean"), ("2", "mean"),
])
def test_the_pooling_in_force_for_a_files_pooling_type(declared: object, pooling: str) -> None:
    assert p.pooling_in_force(declared) == pooling


@pytest.mark.parametrize(("declared", "pooling"), [(None, "mean"), (0, "mean"), (2, "cls"), (3, "last"), (4, "rank")])
def test_the_header_reader_names_the_pooling_a_gguf_declares(tmp_path, declared: int | None, pooling: str) -> None:
    import gguf
    import gguf_files as g

    from optimanode.executors import gguf as reader

    path = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    g._meta(w, "Pooled", 2048, False, 0, None)
    if declared is not None:
        w.add_pooling_type(gguf.PoolingType(declared))
    for i, (name, shape) in enumerate(g.TENSORS.items()):
        w.add_tensor(name, np.full(shape, i + 1, dtype=np.float32))
    g._finish(w)
    assert reader.read_header(path).pooling == pooling
