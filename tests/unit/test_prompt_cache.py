"""The worker's host prompt cache as pure logic: the LRU, its byte bound, the longest-prefix lookup."""

from __future__ import annotations

from optimanode import protocol as p
from optimanode.worker.progress import Progress
from optimanode.worker.prompt_cache import KEY_BYTES_PER_TOKEN, PromptCache, prompt_cache_bytes


def blob(n: int) -> bytes:
    return bytes(n)


def test_lookup_finds_the_entry_sharing_the_longest_prefix_within_the_limit() -> None:
    c = PromptCache(1 << 20)
    assert c.put([1, 2, 3, 4], blob(100))
    assert c.put([1, 2, 9, 9, 9], blob(100))
    assert c.put([7, 8], blob(100))
    e, n = c.lookup([1, 2, 3, 4, 5, 6], limit=5)
    assert e is not None and e.tokens == [1, 2, 3, 4] and n == 4
    # A partial match is usable (the tail is dropped after the restore).
    e, n = c.lookup([1, 2, 9, 0], limit=3)
    assert e is not None and e.tokens == [1, 2, 9, 9, 9] and n == 3
    # The limit (the last prompt token is always evaluated) caps the length.
    e, n = c.lookup([1, 2, 3, 4], limit=3)
    assert e is not None and n == 3
    assert c.lookup([5, 5], limit=1) == (None, 0)
    assert c.lookup([1], limit=0) == (None, 0)


def test_the_bytes_held_never_exceed_the_cap_and_the_least_recently_used_go_first() -> None:
    cap = 1000
    c = PromptCache(cap)
    for i in range(10):
        assert c.put([i, i, i], blob(300))
        assert c.bytes <= cap
    size = 300 + 3 * KEY_BYTES_PER_TOKEN
    assert len(c) == cap // size == 3 and c.bytes == 3 * size
    assert c.stats.evictions == 7 and c.stats.saves == 10 and c.stats.entries == 3
    assert [e.tokens[0] for e in c.entries()] == [7, 8, 9]
    # Using an entry makes it the most recent: the next eviction takes another.
    e, n = c.lookup([7, 7, 7, 1], limit=3)
    assert e is not None and n == 3
    c.taken(e, n)
    assert c.stats.hits == 1
    c.put([42, 42, 42], blob(300))
    assert [e.tokens[0] for e in c.entries()] == [9, 7, 42]


def test_an_entry_larger_than_the_cap_is_refused_and_nothing_is_evicted_for_it() -> None:
    c = PromptCache(1000)
    assert c.put([1], blob(500))
    assert not c.put([2], blob(1000))
    assert len(c) == 1 and c.stats.evictions == 0 and c.bytes == 500 + KEY_BYTES_PER_TOKEN
    assert not PromptCache(0).put([1], blob(1))


def test_a_longer_entry_replaces_its_prefix_and_a_prefix_of_an_entry_is_not_stored() -> None:
    c = PromptCache(10_000)
    assert c.put([1, 2, 3], blob(100))
    assert c.put([1, 2, 3, 4, 5], blob(150))  # extends the first: replaces it
    assert [e.tokens for e in c.entries()] == [[1, 2, 3, 4, 5]]
    assert c.bytes == 150 + 5 * KEY_BYTES_PER_TOKEN and c.stats.evictions == 0
    assert not c.put([1, 2, 3], blob(100))  # already covered
    assert not c.put([1, 2, 3, 4, 5], blob(150))
    assert len(c) == 1
    assert not c.put([], blob(10))


def test_on_a_sliding_window_model_an_entry_is_cut_back_only_where_the_window_kept_its_cells() -> None:
    c = PromptCache(1 << 20, n_swa=4)
    long = list(range(10))  # llama.cpp saved only positions 6..9 of the SWA layers
    assert c.put(long, blob(10))
    assert c.entries()[0].min_pos == 6
    assert c.usable(c.entries()[0], 10) and c.usable(c.entries()[0], 9)
    assert not c.usable(c.entries()[0], 8)
    assert c.lookup(long + [99], limit=10)[1] == 10
    assert c.lookup(long[:8] + [99, 99], limit=9) == (None, 0)
    short = [50, 51, 52]  # within one window: every cell was saved
    c.put(short, blob(10))
    assert c.lookup([50, 51, 0], limit=2)[1] == 2


def test_remove_and_misses() -> None:
    c = PromptCache(1000)
    c.put([1, 2], blob(10))
    e, _ = c.lookup([1, 2, 3], limit=2)
    assert e is not None
    c.remove(e)
    assert len(c) == 0 and c.bytes == 0 and c.stats.entries == 0
    c.missed()
    assert c.stats.misses == 1


def test_the_auto_cap_is_an_eighth_of_available_ram_at_most_8_gib() -> None:
    assert prompt_cache_bytes(0) == 0
    assert prompt_cache_bytes(256) == 256 << 20
    assert prompt_cache_bytes(-1, available=8 << 30) == 1 << 30
    assert prompt_cache_bytes(-1, available=512 << 30) == 8192 << 20


def test_the_counters_ride_on_each_pong_and_reach_the_metrics_report_and_the_scrape() -> None:
    from unit.test_openmetrics import one, scrape, status

    from optimanode import protocol as p
    from optimanode.metrics import Sampler
    from optimanode.openmetrics import Snapshot
    from optimanode.testing import FakeNvml
    from optimanode.worker.progress import Progress

    progress = Progress()
    assert progress.pong(1, 0, None).prompt_cache is None  # no engine yet (loading)
    c = PromptCache(1000)
    progress.cache = c.stats
    c.put([1, 2, 3], blob(100))
    c.stats.tokens_served += 40
    pong = progress.pong(2, 1, None)
    assert pong.prompt_cache == p.PromptCacheReport(tokens_served=40, saves=1, bytes=112, cap_bytes=1000, entries=1)
    assert p.decode_from_worker(p.frame(pong)[4:]) == pong
    statuses = [status("llm", state="running", enabled=True, prompt_cache=pong.prompt_cache),
                status("idle", state="enabled", enabled=True)]
    sampler = Sampler(lambda: statuses, node_id="n", nvml=FakeNvml([]))
    try:
        report = sampler.sample()
    finally:
        sampler.close()
    assert [e.prompt_cache for e in report.executors] == [pong.prompt_cache, None]
    m = scrape(Snapshot(report=report, statuses=statuses, crashes={}, crash_budget=5, journal_bytes=None,
                        journal_wal_bytes=None))
    assert one(m, "optimanode_model_prompt_cache_tokens_served_total", model="llm") == 40
    assert one(m, "optimanode_model_prompt_cache_bytes", model="llm") == 112
    assert one(m, "optimanode_model_prompt_cache_cap_bytes", model="llm") == 1000
    assert len(m["optimanode_model_prompt_cache_bytes"]) == 1


def test_usage_leaves_cached_tokens_out_of_the_frame_when_zero() -> None:
    import msgspec

    from optimanode import protocol as p

    assert msgspec.json.encode(p.Usage(prompt_tokens=5, completion_tokens=2)) == \
        b'{"prompt_tokens":5,"completion_tokens":2}'
    u = p.Usage(prompt_tokens=5, completion_tokens=2, cached_tokens=4)
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(u), type=p.Usage) == u


class Machine:
    """Available RAM as the cache sees it: what the rest of the machine leaves, less the cache."""

    def __init__(self, free: int) -> None:
        self.free = free
        self.cache: PromptCache | None = None

    def available(self) -> int:
        assert self.cache is not None
        return self.free - self.cache.bytes


def test_with_a_ram_floor_a_new_entry_takes_the_least_recently_used_ones_place_or_is_not_stored() -> None:
    m = Machine(free=10_000)
    c = m.cache = PromptCache(1 << 20, available=m.available)
    size = 1000 + 2 * KEY_BYTES_PER_TOKEN
    for i in range(4):
        assert c.make_room(size)  # no floor yet: only the cap bounds it
        assert c.put([i, i], blob(1000))
    c.keep_free = 6_500  # 10,000 - 4 entries leaves ~5,968: below the floor even before a fifth
    assert c.make_room(size)
    # Two went, least recently used first: 10,000 - 2 entries - the new one >= 6,500.
    assert [e.tokens[0] for e in c.entries()] == [2, 3] and c.stats.pressure_evictions == 2
    assert c.put([4, 4], blob(1000))
    assert m.available() >= c.keep_free
    # The machine got tighter (another model loaded): nothing the cache can drop makes room.
    m.free = 3_000
    c.keep_free = 3_000
    assert not c.make_room(size)
    assert len(c) == 0 and c.stats.pressure_evictions == 2 + 3 + 1  # 3 dropped, and the new one refused
    c.keep_free = 0
    assert c.make_room(size)  # no floor: the cap alone decides


def test_relieve_gives_back_what_the_machine_is_short_of_least_recently_used_first() -> None:
    m = Machine(free=10_000)
    c = m.cache = PromptCache(1 << 20, available=m.available)
    for i in range(5):
        assert c.put([i, i], blob(1000))
    c.lookup([0, 0, 1], limit=2)
    c.taken(c.entries()[0], 2)  # entry 0 used: the most recent now
    assert c.relieve() == 0  # no floor
    c.keep_free = 7_000  # 10,000 - 5 entries = ~4,960: short by ~2,040, three entries' worth
    assert c.relieve() == 3
    assert [e.tokens[0] for e in c.entries()] == [4, 0] and m.available() >= 7_000
    assert c.relieve() == 0  # nothing short any more
    assert c.stats.pressure_evictions == 3 and c.stats.evictions == 0 and c.stats.bytes == c.bytes


def test_a_pings_floor_reaches_the_cache_and_its_count_rides_on_the_pong() -> None:
    m = Machine(free=4_000)
    c = m.cache = PromptCache(1 << 20, available=m.available, stats=None)
    progress = Progress()
    progress.cache, progress.prompt_cache = c.stats, c
    for i in range(3):
        assert c.put([i, i], blob(1000))
    # As the worker's reader thread does with a Ping: the floor applies now and to later entries.
    progress.keep_free(p.Ping(seq=1, keep_free_bytes=2_500).keep_free_bytes)
    assert c.keep_free == 2_500 and len(c) == 1 and m.available() >= 2_500
    assert c.stats.pressure_evictions == 2
    assert c.make_room(1008) and len(c) == 0  # the next entry takes the last one's place
    pong = progress.pong(1, 0, None)
    assert pong.prompt_cache is not None and pong.prompt_cache.pressure_evictions == 3
    assert pong.prompt_cache.entries == 0 and pong.prompt_cache.bytes == 0
