"""Prefix-aware routing: prompt texts, chained block hashes, the per-node index and NodePool's decisions."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given
from hypothesis import strategies as st

from optimanode import routing
from optimanode.client import NodePool
from optimanode.protocol import ChatMessage, ChatRequest, CompletionRequest, EmbedRequest, ExecutorMetrics, SamplingParams
from optimanode.routing import Candidate, PrefixIndex, block_hashes, choose, prompt_text
from unit.test_client import connected, report

SYSTEM = "You are the assistant of a hardware shop. " * 20  # ~860 characters: 3 whole blocks


def chat(*turns: str) -> ChatRequest:
    roles = ["user", "assistant"]
    return ChatRequest(messages=[ChatMessage(role="system", content=SYSTEM)]
                       + [ChatMessage(role=roles[i % 2], content=t) for i, t in enumerate(turns)])


# -- texts and hashes -----------------------------------------------------------------------------------


def test_a_next_turns_text_starts_with_the_text_of_the_turn_before() -> None:
    first, second = chat("When do you open?"), chat("When do you open?", "At eight.", "And on Sunday?")
    assert prompt_text(second).startswith(prompt_text(first))
    assert prompt_text(CompletionRequest(prompt="abc")) == "abc"
    assert prompt_text(EmbedRequest(input=["abc"])) == ""
    # Content cannot fake a message boundary: the same characters split otherwise give another text.
    one = ChatRequest(messages=[ChatMessage(role="user", content='a"}\n{"role":"user","content":"b')])
    two = ChatRequest(messages=[ChatMessage(role="user", content="a"), ChatMessage(role="user", content="b")])
    assert prompt_text(one) != prompt_text(two)
    # Tools come first (templates render them before the messages) and are part of the prefix.
    tools = ChatRequest(messages=first.messages, tools=[{"type": "function", "function": {"name": "f"}}])
    assert not prompt_text(tools).startswith(prompt_text(first)[:10])


@given(st.text(min_size=0, max_size=900), st.text(min_size=0, max_size=600))
def test_chained_block_hashes_are_shared_exactly_as_far_as_the_whole_blocks_are(a: str, b: str) -> None:
    ha, hab = block_hashes(a, 64), block_hashes(a + b, 64)
    assert len(ha) == len(a) // 64 and len(hab) == len(a + b) // 64
    assert hab[:len(ha)] == ha  # a prefix's hashes are the start of the longer text's


def test_a_different_first_block_changes_every_hash_after_it() -> None:
    text = SYSTEM + "Question one?" * 40
    other = "X" + text[1:]
    assert not set(block_hashes(text)) & set(block_hashes(other))
    assert block_hashes("x" * 255) == []  # a partial block is left out


# -- one node's index -----------------------------------------------------------------------------------


def test_the_index_matches_the_longest_prefix_and_keeps_shared_prefixes_longest() -> None:
    idx = PrefixIndex(entries=8)
    conv = block_hashes(SYSTEM + "conversation one " * 40)  # 3 shared blocks + 2-3 of its own
    idx.record(conv)
    assert idx.matched(conv) == len(conv)
    assert idx.matched(block_hashes(SYSTEM + "another one " * 40)) == 3  # the system prompt's blocks
    assert idx.matched(block_hashes("unrelated " * 100)) == 0
    # Past its bound the least recently used go first: another conversation's own blocks push out
    # this one's, and the system prompt (touched last on every record) stays.
    for i in range(3):
        idx.record(block_hashes(SYSTEM + f"conversation {i + 2} " * 40))
    assert len(idx) == 8
    assert idx.matched(block_hashes(SYSTEM + "x" * 300)) == 3
    assert idx.matched(conv) < len(conv)


# -- the decision ---------------------------------------------------------------------------------------


def test_choose_sends_to_the_longest_prefix_unless_that_node_is_too_busy() -> None:
    # Candidates come best-loaded first.
    idle, holder = Candidate(key=0, matched=3, load=0.25), Candidate(key=1, matched=9, load=0.75)
    assert choose([idle, holder]) == (1, "prefix")  # 3 of 4 slots: still under the limit
    full = Candidate(key=1, matched=9, load=1.0)
    assert choose([idle, full]) == (0, "load_over_prefix")  # its 4th slot while the other is idle
    # Everyone busy: a little more load is worth keeping the conversation's K/V.
    assert choose([Candidate(key=0, matched=3, load=2.0), Candidate(key=1, matched=9, load=2.25)]) == (1, "prefix")
    assert choose([Candidate(key=0, matched=3, load=1.0), Candidate(key=1, matched=9, load=1.75)]) == \
        (0, "load_over_prefix")
    # Nobody holds anything, or everyone holds the same: load decides.
    assert choose([Candidate(key=0, matched=0, load=0.25), Candidate(key=1, matched=0, load=0.5)]) == (0, "no_prefix")
    assert choose([Candidate(key=0, matched=3, load=0.25), Candidate(key=1, matched=3, load=0.5)]) == (0, "prefix")
    # The limits are the caller's.
    assert choose([idle, holder], busy_limit=0.5, load_slack=0.25) == (0, "load_over_prefix")


# -- NodePool -------------------------------------------------------------------------------------------


def slots(free: int, queue: int = 0, parallel: int = 4) -> ExecutorMetrics:
    return ExecutorMetrics(id="m", state="running", parallel=parallel, free_slots=free, queue_depth=queue)


@pytest.fixture
async def two_nodes():
    pairs = [await connected(f"n{i}") for i in range(2)]
    clients = [c for c, _ in pairs]
    yield clients
    for _, node in pairs:
        node.end.close(1000, "")
    async with asyncio.timeout(10):
        for c in clients:
            await c._conn.wait_closed()


def fresh_reports(clients, *loads: ExecutorMetrics) -> None:
    """A new metrics report from each node (what was sent before it is counted in it)."""
    for c, em in zip(clients, loads):
        c.latest_metrics = report(em)
        c.metrics_seq += 1


async def test_the_pool_keeps_each_conversation_on_the_node_that_served_its_last_turn(two_nodes) -> None:
    pool = NodePool(two_nodes)
    fresh_reports(two_nodes, slots(4), slots(4))
    history = {c: chat(f"Conversation {c}: " + "tell me about hinges. " * 12) for c in range(4)}
    first = {c: pool.pick("m", request=history[c]).node_id for c in range(4)}
    # The first goes by load; the next ones to the node that holds the shared system prompt (its
    # ~200 tokens are worth evaluating once), until that node would pass 80 % of its slots while
    # the other is idle.
    assert list(first.values()) == ["n0", "n0", "n0", "n1"]
    assert (pool.stats.no_prefix, pool.stats.prefix, pool.stats.load_over_prefix) == (1, 2, 1)
    # Now both hold the system prompt: a new conversation goes by load.
    fresh_reports(two_nodes, slots(1), slots(3))
    assert pool.pick("m", request=chat("A new conversation. " * 20)).node_id == "n1"
    for turn in range(3):
        for c in range(4):
            fresh_reports(two_nodes, slots(2), slots(2))
            msgs = history[c].messages + [ChatMessage(role="assistant", content=f"Reply {turn}."),
                                         ChatMessage(role="user", content=f"Follow-up {turn} " * 5)]
            history[c] = ChatRequest(messages=msgs)
            assert pool.pick("m", request=history[c]).node_id == first[c]
    assert pool.stats.requests == 17 and pool.stats.prefix == 2 + 1 + 12


async def test_load_wins_over_the_prefix_when_its_node_is_full_and_the_other_idle(two_nodes) -> None:
    pool = NodePool(two_nodes)
    fresh_reports(two_nodes, slots(4), slots(4))
    conv = chat("A long question about ladders. " * 20)
    holder = pool.pick("m", request=conv)
    other = next(c for c in two_nodes if c is not holder)
    # With two free slots of four the holder keeps it (3 of 4 in use is under the limit).
    for c, em in ((holder, slots(2)), (other, slots(4))):
        c.latest_metrics, c.metrics_seq = report(em), c.metrics_seq + 1
    assert pool.pick("m", request=conv) is holder
    # With one free slot, 4 of 4 would be past 80 % while the other is idle: the idle node takes it.
    for c, em in ((holder, slots(1)), (other, slots(4))):
        c.latest_metrics, c.metrics_seq = report(em), c.metrics_seq + 1
    assert pool.pick("m", request=conv) is other
    assert pool.stats.load_over_prefix == 1 and pool.stats.prefix == 1


async def test_prefix_routing_off_or_without_reports_is_the_load_order(two_nodes) -> None:
    conv = chat("Question. " * 60)
    pool = NodePool(two_nodes, prefix_routing=False)
    fresh_reports(two_nodes, slots(4), slots(4))
    picks = [pool.pick("m", request=conv).node_id for _ in range(4)]
    assert sorted(picks) == ["n0", "n0", "n1", "n1"]  # spread by pending requests, no stickiness
    assert pool.stats.no_prefix == 4
    # Embed requests have no prefix: load alone, whatever was sent before.
    pool = NodePool(two_nodes)
    fresh_reports(two_nodes, slots(4), slots(4))
    assert pool.pick("m", request=EmbedRequest(input=["x" * 1000])) is not None
    assert pool.stats.no_prefix == 1
    # The index survives a reconnect: it is keyed by node id.
    assert pool.index(two_nodes[0]) is pool.index(two_nodes[0])
    assert routing.RoutingStats().requests == 0


async def test_a_request_that_ended_after_a_stale_report_no_longer_counts_against_its_node(two_nodes) -> None:
    pool = NodePool(two_nodes)
    fresh_reports(two_nodes, slots(1, parallel=1), slots(1, parallel=1))
    conv = chat("A question about paint. " * 20)
    holder = pool.pick("m", request=conv)
    seq = holder.metrics_seq
    # A report taken while that request ran (its one slot in use); the next one is late.
    fresh_reports(two_nodes, *(slots(0 if c is holder else 1, parallel=1) for c in two_nodes))
    assert pool.ranked("m")[0] is not holder  # full, the other idle
    pool._finished(holder, seq)  # the first request's stream ended (NodePool.infer does this)
    assert pool.pick("m", request=conv) is holder  # its slot counts as free again: the prefix wins
    assert pool.stats.prefix == 1
    # One sent since the latest report that ended is no longer pending either.
    seq = holder.metrics_seq
    assert pool._pending(holder) == 1
    pool._finished(holder, seq)
    assert pool._pending(holder) == 0


async def test_a_request_that_would_queue_on_its_node_waits_in_the_pool_and_goes_where_a_slot_frees(two_nodes) -> None:
    pool = NodePool(two_nodes)
    fresh_reports(two_nodes, slots(1, parallel=1), slots(1, parallel=1))
    conv = chat("A question about gutters. " * 20)
    holder = pool.pick("m", request=conv)
    seq = holder.metrics_seq
    other = next(c for c in two_nodes if c is not holder)
    # Both nodes full (the holder runs this conversation's last turn, the other something else).
    fresh_reports(two_nodes, *(slots(0, parallel=1) for _ in two_nodes))
    nxt = asyncio.ensure_future(pool._placed("m", [], conv))
    await asyncio.sleep(0.25)  # more than HOLD_POLL_S: it looked again and still waits
    assert not nxt.done() and pool.stats.held == 1 and pool.holding == 1
    pool._finished(holder, seq)  # the holder's request ended: the held one is decided again at once
    async with asyncio.timeout(1):
        placed, held = await nxt
    assert placed is holder and held > 0.2 and pool.holding == 0
    # Held again, and this time the other node frees first (its report): past 80 % on the holder
    # while the other is idle, so the other takes it instead of it queueing behind the holder.
    fresh_reports(two_nodes, *(slots(0, parallel=1) for _ in two_nodes))
    nxt = asyncio.ensure_future(pool._placed("m", [], conv))
    await asyncio.sleep(0.05)
    assert not nxt.done()
    fresh_reports([other], slots(1, parallel=1))
    async with asyncio.timeout(1):
        placed, _ = await nxt
    assert placed is other and pool.stats.held == 2 and pool.stats.load_over_prefix == 1


async def test_the_pool_holds_no_more_than_the_nodes_slots_nor_past_hold_s_nor_with_one_node(two_nodes) -> None:
    pool = NodePool(two_nodes, hold_s=0.3)
    fresh_reports(two_nodes, *(slots(0, queue=2, parallel=1) for _ in two_nodes))
    reqs = [chat(f"Request {i}. " * 40) for i in range(3)]
    waiting = [asyncio.ensure_future(pool._placed("m", [], r)) for r in reqs]
    await asyncio.sleep(0.05)
    # Two slots in all: two wait in the pool, the third goes to a node's queue at once.
    assert [w.done() for w in waiting] == [False, False, True] and pool.holding == 2
    async with asyncio.timeout(2):
        out = await asyncio.gather(*waiting[:2])
    assert all(held >= 0.3 for _, held in out) and pool.holding == 0  # hold_s passed: sent anyway
    # A request's own deadline bounds its wait in the pool too.
    short = CompletionRequest(prompt="Quick. " * 60, params=SamplingParams(deadline_s=0.1))
    async with asyncio.timeout(2):
        _, held = await pool._placed("m", [], short, short.params.deadline_s)
    assert 0.1 <= held < 0.3
    # One node alone: its own queue is the only place to wait.
    single = NodePool(two_nodes[:1])
    fresh_reports(two_nodes[:1], slots(0, queue=3, parallel=1))
    async with asyncio.timeout(1):
        placed, held = await single._placed("m", [], reqs[0])
    assert placed is two_nodes[0] and held < 0.05 and single.stats.held == 0


async def test_held_requests_are_sent_in_the_order_they_came(two_nodes) -> None:
    pool = NodePool(two_nodes)
    fresh_reports(two_nodes, slots(2, parallel=2), slots(2, parallel=2))
    conv = chat("A question about fences. " * 20)
    holder = pool.pick("m", request=conv)  # the conversation's prefix is on the holder now
    # Both nodes full; three next turns of conversations held by the holder, one after another.
    fresh_reports(two_nodes, *(slots(0, parallel=2) for _ in two_nodes))
    seq = holder.metrics_seq
    order: list[int] = []

    async def turn(i: int) -> None:
        await pool._placed("m", [], conv)
        order.append(i)

    tasks = []
    for i in range(3):
        tasks.append(asyncio.ensure_future(turn(i)))
        await asyncio.sleep(0.15)  # past a poll between arrivals: each looked again on its own before
    assert order == [] and pool.holding == 3
    for k in range(3):  # the holder's slots free one at a time: a request counted in its report ends
        pool._finished(holder, seq - 1)
        for _ in range(3):
            await asyncio.sleep(0)
        assert order == list(range(k + 1))  # the freed slot went to the oldest held request, and to it alone
        fresh_reports([holder], slots(0, parallel=2))  # which now runs there
        seq = holder.metrics_seq
    async with asyncio.timeout(2):
        await asyncio.gather(*tasks)
    assert order == [0, 1, 2] and pool.holding == 0
