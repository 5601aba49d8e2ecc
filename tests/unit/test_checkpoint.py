"""Checkpoints: a replay from the newest checkpoint equals a full replay and the projection, and a reopened journal resumes its versions, notes and open requests from one."""

import random
import sqlite3

from optimanode.journal import NODE_STREAM, Journal, replay_views
from optimanode.protocol import (
    Checkpoint,
    DesiredChanged,
    Hashed,
    ModelInfo,
    ModelSettings,
    Registered,
    RequestFinished,
    RequestStarted,
    Transition,
)

STATES = ["discovered", "enabled", "starting", "running", "crashed", "restarting", "failed", "stopping"]


def info(name: str, size: int = 10) -> ModelInfo:
    return ModelInfo(path=f"/m/{name}.gguf", files=[f"/m/{name}.gguf"], size_bytes=size, mtime_ns=5,
                     architecture="llama")


async def random_history(j: Journal, rng: random.Random, n: int, *, checkpoint_every: int) -> None:
    """Every kind of event on four executors, with checkpoints in between."""
    streams = ["a", "b", "c", "d"]
    for s in streams[:3]:
        await j.append(s, Registered(info=info(s)))
    for i in range(n):
        s = rng.choice(streams)
        r = rng.random()
        if r < 0.3:
            await j.append(s, Transition(trigger="crash", src=rng.choice(STATES), dst=rng.choice(STATES),
                                         reason=f"r{i}", safe_mode=rng.choice([None, None, True, False]),
                                         stderr_tail=[f"line {i}"]))
        elif r < 0.45:
            await j.append(s, DesiredChanged(enabled=rng.random() < 0.5,
                                             settings=ModelSettings(n_ctx=rng.choice([None, 512, 4096]))))
        elif r < 0.5:
            await j.append(s, Hashed(sha256=f"{i:064x}", size_bytes=10, mtime_ns=5))
        elif r < 0.55:
            await j.append(s, Registered(info=info(s, size=rng.choice([10, 11]))))
        elif r < 0.8:
            await j.append(s, RequestStarted(request_id=f"q{i}", kind="chat"))
        else:
            await j.append_many([(s, RequestStarted(request_id=f"x{i}", kind="completion")),
                                 (s, RequestFinished(request_id=f"x{i}", outcome="stop", prompt_tokens=3,
                                                     completion_tokens=4, ttft_s=0.1, total_s=0.5))])
        if i % checkpoint_every == checkpoint_every - 1:
            await j.checkpoint()


async def test_replay_from_the_newest_checkpoint_equals_the_full_replay_and_the_projection(tmp_path):
    for seed in range(5):
        path = tmp_path / f"j{seed}.sqlite3"
        j = await Journal.open(path)
        await random_history(j, random.Random(seed), 300, checkpoint_every=37)
        from_checkpoint, full = await j.replay(), await j.replay(full=True)
        assert from_checkpoint == full == j.views()
        db = sqlite3.connect(path)
        assert replay_views(db, path) == replay_views(db, path, full=True) == from_checkpoint
        await j.close()


async def test_a_checkpoint_holds_the_fold_at_its_own_position(tmp_path):
    j = await Journal.open(tmp_path / "j.sqlite3")
    await j.append("a", Registered(info=info("a")))
    await j.append("a", Transition(trigger="enable", src="discovered", dst="enabled", reason="operator"))
    await j.append("a", RequestStarted(request_id="r1", kind="chat"))
    ev = await j.checkpoint()
    assert ev.stream == NODE_STREAM and isinstance(ev.body, Checkpoint)
    (snap,) = ev.body.executors
    assert (snap.id, snap.state, snap.reasons) == ("a", "enabled", {"enabled": "operator"})
    assert ev.body.versions == {"a": 3, NODE_STREAM: 1}
    assert ev.body.open_requests == [("a", "r1")]
    assert (j.checkpoint_seq, j.events_since_checkpoint) == (ev.seq, 0)
    await j.close()
    # The stored row decodes to the same checkpoint.
    j2 = await Journal.open(tmp_path / "j.sqlite3")
    (stored,) = await j2.read(types=["checkpoint"])
    assert stored.body == ev.body
    await j2.close()


async def test_a_reopened_journal_resumes_from_its_checkpoint(tmp_path):
    path = tmp_path / "j.sqlite3"
    j = await Journal.open(path)
    await random_history(j, random.Random(7), 200, checkpoint_every=50)
    await j.append("b", Transition(trigger="crash", src="running", dst="crashed", reason="after", safe_mode=True))
    await j.append("a", RequestStarted(request_id="late", kind="chat"))
    before = (j.views(), j.notes(), j.open_requests(), dict(j._versions), j.last_seq)
    since = j.events_since_checkpoint
    await j.close()
    j = await Journal.open(path)
    assert (j.views(), j.notes(), j.open_requests(), dict(j._versions), j.last_seq) == before
    assert j.events_since_checkpoint == since
    assert ("a", "late") in j.open_requests()
    assert j.notes()["b"].safe_mode is True and j.notes()["b"].safe_reason == "after"
    await j.close()


async def test_versions_continue_after_the_rows_that_held_them_are_deleted(tmp_path):
    """Retention may delete a stream's newest events (old requests); the checkpoint remembers
    their versions, so the next append does not reuse one."""
    path = tmp_path / "j.sqlite3"
    j = await Journal.open(path)
    await j.append("a", Registered(info=info("a")))
    for i in range(5):
        await j.append("a", RequestStarted(request_id=f"r{i}", kind="chat"))
    await j.checkpoint()
    await j.close()
    db = sqlite3.connect(path)
    db.execute("DELETE FROM events WHERE type = 'request_started'")
    db.commit()
    db.close()
    j = await Journal.open(path)
    ev = await j.append("a", DesiredChanged(enabled=True))
    assert ev.version == 7
    await j.close()


async def test_notes_from_a_checkpoint_match_the_notes_of_every_transition(tmp_path):
    path = tmp_path / "j.sqlite3"
    j = await Journal.open(path)
    await random_history(j, random.Random(3), 150, checkpoint_every=20)
    notes_live = j.notes()
    await j.close()
    # A journal with no checkpoint folds every transition; the same notes must come out.
    db = sqlite3.connect(path)
    db.execute("DELETE FROM events WHERE type = 'checkpoint'")
    db.commit()
    db.close()
    j = await Journal.open(path)
    assert j.notes() == notes_live
    await j.close()
