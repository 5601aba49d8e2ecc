"""The drain's pure parts: a model's Admission (order, close and reopen, refusal, resize) and the reconciler's one-at-a-time replacement."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from optimanode.config import Restart
from optimanode.errors import DeadlineExceeded, ModelNotRunning, Overloaded
from optimanode.executors.reconciler import Facts, decide
from optimanode.inference import Admission

GB = 1 << 30
POLICY = Restart()

pytestmark = pytest.mark.timeout(30)


async def enter(adm: Admission, name: str, log: list[str], release: asyncio.Event, **kw) -> None:
    """Take a slot, note the name, hold the slot until ``release``."""
    async with adm.slot("m", **kw):
        log.append(name)
        await release.wait()


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_slots_go_to_waiters_in_arrival_order_and_only_while_open():
    adm = Admission(parallel=1, queue_size=3)
    log: list[str] = []
    gates = {n: asyncio.Event() for n in "abcd"}
    tasks = {n: asyncio.ensure_future(enter(adm, n, log, gates[n])) for n in "abcd"}
    await settle()
    assert log == ["a"] and (adm.running, adm.waiting) == (1, 3)
    adm.close()  # a drain began: the slot that frees goes to nobody
    gates["a"].set()
    await settle()
    assert log == ["a"] and (adm.running, adm.waiting) == (0, 3)
    adm.resize(parallel=2, queue_size=3)  # the new worker's bounds
    await settle()
    assert log == ["a"]
    adm.reopen()  # the new worker runs: the waiters get slots in the order they came
    await settle()
    assert log == ["a", "b", "c"] and (adm.running, adm.waiting) == (2, 1)
    for n in "bcd":
        gates[n].set()
    await asyncio.gather(*tasks.values())
    assert log == ["a", "b", "c", "d"] and (adm.running, adm.waiting) == (0, 0)


async def test_the_queue_bound_holds_while_closed_and_refused_waiters_get_the_error():
    adm = Admission(parallel=1, queue_size=2)
    adm.close()
    log: list[str] = []
    never = asyncio.Event()
    # parallel + queue_size places in all, whether the worker is there to take them or not.
    waiters = [asyncio.ensure_future(enter(adm, n, log, never)) for n in "abc"]
    await settle()
    assert adm.waiting == 3
    with pytest.raises(Overloaded):
        async with asyncio.timeout(5):
            async with adm.slot("m"):
                pass
    assert adm.refuse_waiting(lambda: ModelNotRunning("gone", state="stopping", executor="m")) == 3
    for w in waiters:
        with pytest.raises(ModelNotRunning):
            await w
    assert log == [] and (adm.running, adm.waiting) == (0, 0)


async def test_a_waiter_that_gives_up_leaves_the_queue_and_a_slot_it_was_just_given_passes_on():
    adm = Admission(parallel=1, queue_size=4)
    log: list[str] = []
    hold, free = asyncio.Event(), asyncio.Event()
    first = asyncio.ensure_future(enter(adm, "a", log, hold))
    second = asyncio.ensure_future(enter(adm, "b", log, free))
    third = asyncio.ensure_future(enter(adm, "c", log, free))
    await settle()
    second.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await second
    assert adm.waiting == 1
    hold.set()
    free.set()
    await asyncio.gather(first, third)
    assert log == ["a", "c"] and (adm.running, adm.waiting) == (0, 0)
    # A slot handed to a waiter in the same step as the waiter's cancel is given back, not lost.
    async with adm.slot("m"):
        late = asyncio.ensure_future(enter(adm, "y", log, free))
        await settle()
        assert adm.waiting == 1
    assert adm.running == 1  # leaving the block handed the slot to "y" ...
    late.cancel()  # ... which is cancelled before it ran
    with contextlib.suppress(asyncio.CancelledError):
        await late
    assert log == ["a", "c"] and (adm.running, adm.waiting) == (0, 0)


async def test_a_deadline_while_queued_ends_the_wait_with_deadline_exceeded():
    adm = Admission(parallel=1, queue_size=1)
    adm.close()
    loop = asyncio.get_running_loop()
    with pytest.raises(DeadlineExceeded):
        async with adm.slot("m", deadline_at=loop.time() + 0.05):
            pass
    assert (adm.running, adm.waiting) == (0, 0)


def stops(facts: dict[str, Facts]) -> list[str]:
    return [a.executor_id for a in decide(facts, 0.0, 64 * GB, POLICY).actions if a.trigger == "stop"]


async def test_a_slot_handed_over_as_a_replacement_drain_begins_waits_for_the_new_worker_first_in_line():
    # The race: a running request ends (its slot goes to b) and, in the same loop step, a drain for
    # a replacement closes the admission, before b runs. b must not go to the draining worker.
    adm = Admission(parallel=1, queue_size=3)
    replacing = False
    log: list[str] = []
    gates = {n: asyncio.Event() for n in "abc"}

    async def held(name: str) -> None:
        async with adm.slot("m", hold=lambda: replacing):
            log.append(name)
            await gates[name].wait()

    async def first() -> None:
        nonlocal replacing
        async with adm.slot("m"):
            log.append("a")
            await gates["a"].wait()
        # a's slot went to b (its future is resolved) and, in this same step, before b runs, a
        # drain for a replacement closes the admission (Inference.changed).
        assert adm.running == 1 and adm.waiting == 0
        replacing = True
        adm.close()

    tasks = {"a": asyncio.ensure_future(first())}
    await settle()
    tasks["b"] = asyncio.ensure_future(held("b"))
    await settle()
    assert adm.waiting == 1
    gates["a"].set()
    await settle()
    tasks["c"] = asyncio.ensure_future(held("c"))
    await settle()
    assert log == ["a"] and (adm.running, adm.waiting) == (0, 2)  # b gave the slot back and waits again
    replacing = False
    adm.reopen()  # the new worker runs: b first (it was first in line), then c
    await settle()
    assert log == ["a", "b"]
    gates["b"].set()
    await settle()
    assert log == ["a", "b", "c"]
    gates["c"].set()
    await asyncio.gather(*tasks.values())
    assert (adm.running, adm.waiting) == (0, 0)


def test_stale_workers_are_replaced_one_at_a_time():
    stale = Facts(state="running", enabled=True, stale=True)
    # New model defaults made three stale at once: one stop per decision.
    assert stops({"a": stale, "b": stale, "c": stale}) == ["a"]
    # While a's replacement is under way (stopping, then loading), the others wait their turn.
    for state in ("stopping", "discovered", "enabled", "starting"):
        assert stops({"a": Facts(state=state, enabled=True, replacing=True), "b": stale, "c": stale}) == []
    # a runs again (replacing cleared): b is next.
    assert stops({"a": Facts(state="running", enabled=True), "b": stale, "c": stale}) == ["b"]


def test_a_disable_is_not_held_back_by_a_replacement():
    facts = {"a": Facts(state="stopping", enabled=True, replacing=True),
             "b": Facts(state="running", enabled=False)}
    assert stops(facts) == ["b"]
