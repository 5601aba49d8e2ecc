"""Where a prompt's cached prefix comes from (optimanode/worker/prefix.py), with llama.cpp's calls recorded.

``Prefixes`` calls llama.cpp as attributes of the ``llama_cpp`` module; these tests replace the ones
it uses with recorders, so the decisions (copy, restore, save, nothing) are checked without a model.
The real calls are exercised by tests/model/test_prompt_cache.py.
"""

from __future__ import annotations

from typing import Any

import llama_cpp
import pytest

from optimanode.worker.prefix import SAVE_MIN_TOKENS, Prefixes
from optimanode.worker.progress import Progress
from optimanode.worker.slots import _Slot

WINDOW = 2048
SYSTEM = list(range(100, 100 + 300))  # a shared system prompt of 300 tokens


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, ...]]:
    made: list[tuple[Any, ...]] = []

    def rec(name: str, result: Any) -> Any:
        def f(*args: Any) -> Any:
            made.append((name, *args[1:]))  # without the context / memory handle
            return result
        return f

    monkeypatch.setattr(llama_cpp, "llama_model_is_recurrent", lambda model: False)
    monkeypatch.setattr(llama_cpp, "llama_model_is_hybrid", lambda model: False)
    monkeypatch.setattr(llama_cpp, "llama_model_n_swa", lambda model: 0)
    monkeypatch.setattr(llama_cpp, "llama_memory_seq_cp", rec("seq_cp", None))
    monkeypatch.setattr(llama_cpp, "llama_memory_seq_rm", rec("seq_rm", True))
    monkeypatch.setattr(llama_cpp, "llama_state_seq_get_size", rec("get_size", 4096))
    monkeypatch.setattr(llama_cpp, "llama_state_seq_get_data", rec("get_data", 4096))
    monkeypatch.setattr(llama_cpp, "llama_state_seq_set_data", rec("set_data", 4096))
    return made


def prefixes(slots: list[_Slot], cache_bytes: int = 0) -> tuple[Prefixes, Progress]:
    progress = Progress()
    return Prefixes(None, None, None, slots, WINDOW, cache_bytes, progress), progress


def names(calls: list[tuple[Any, ...]]) -> list[str]:
    return [c[0] for c in calls]


def test_a_prompt_looked_at_again_copies_the_prefix_another_slot_evaluated_meanwhile(calls: list) -> None:
    first, second = _Slot(seq=0, cached=SYSTEM + [1, 2, 3]), _Slot(seq=1)
    pre, _ = prefixes([first, second])
    prompt = SYSTEM + [7, 8, 9]
    # What admission saw: nothing cached anywhere yet (the first slot had not evaluated its prompt).
    n, how = pre.prepare(second, 0, prompt, again=True)
    assert (n, how) == (len(SYSTEM), "copy")
    assert ("seq_cp", 0, 1, -1, -1) in calls
    assert second.cached == SYSTEM
    assert pre.stats.slot_copies == 1 and pre.stats.tokens_served == len(SYSTEM)


def test_looked_at_again_its_own_prefix_is_not_saved_and_only_what_it_adds_counts(calls: list) -> None:
    own = SYSTEM[:SAVE_MIN_TOKENS + 8]  # what admission kept from the slot's earlier cells
    first, second = _Slot(seq=0, cached=SYSTEM + [1]), _Slot(seq=1, cached=list(own))
    pre, _ = prefixes([first, second], cache_bytes=64 << 20)
    pre.stats.tokens_served = len(own)  # admission counted its own prefix already
    n, how = pre.prepare(second, len(own), SYSTEM + [5, 6], again=True)
    assert (n, how) == (len(SYSTEM), "copy")
    # Its cells are a prefix of what the copy brings: saving them would store a worse copy.
    assert "get_data" not in names(calls)
    assert pre.stats.saves == 0 and pre.stats.tokens_served == len(SYSTEM)
    assert pre.stats.misses == 0
    # At admission (again=False) the same cells would be saved before the copy replaced them.
    third = _Slot(seq=2, cached=list(own))
    pre.slots.append(third)
    pre.prepare(third, 0, SYSTEM + [5, 6])
    assert "get_data" in names(calls) and pre.stats.saves == 1


def test_a_stream_a_sequence_move_writes_is_neither_saved_nor_restored_into_before_the_next_decode(
        calls: list) -> None:
    src, dst = _Slot(seq=0, cached=[1, 2, 3]), _Slot(seq=1, cached=[4, 5, 6])
    pre, progress = prefixes([src, dst], cache_bytes=64 << 20)
    assert pre.cache is not None
    prompt = SYSTEM + [9]
    assert pre.cache.put(SYSTEM + [8], bytes(4096))
    # The engine moved a running sequence into dst's hole: the buffer copy runs at the next decode.
    pre.moved(src, dst)
    dst.cached = list(src.cached)
    pre.before_overwrite(dst)
    n, how = pre.prepare(dst, 0, prompt, again=True)
    assert "get_data" not in names(calls) and "set_data" not in names(calls)
    assert how != "host" and pre.stats.hits == 0
    # After a decode the copy is done: the host cache may restore into it.
    progress.stepped()
    n, how = pre.prepare(dst, 0, prompt, again=True)
    assert (n, how) == (len(SYSTEM), "host") and "set_data" in names(calls) and pre.stats.hits == 1
