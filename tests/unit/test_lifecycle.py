"""The executor state table: every legal trigger moves as the table says, every illegal one raises and changes nothing."""

import pytest

from optimanode.errors import IllegalTransition
from optimanode.executors.lifecycle import STATES, TRANSITIONS, TRIGGERS, Lifecycle, allowed


def legal_pairs():
    return [(trigger, src, dst) for trigger, sources, dst in TRANSITIONS for src in sources]


@pytest.mark.parametrize("trigger,src,dst", legal_pairs())
def test_each_legal_trigger_moves_to_its_destination(trigger, src, dst):
    life = Lifecycle("m", src)
    assert life.fire(trigger) == (src, dst)
    assert life.state == dst


ILLEGAL = [(s, t) for s in STATES for t in TRIGGERS if allowed(s, t) is None]


@pytest.mark.parametrize("state,trigger", ILLEGAL)
def test_every_illegal_trigger_raises_and_leaves_the_state_untouched(state, trigger):
    life = Lifecycle("m", state)
    with pytest.raises(IllegalTransition) as info:
        life.fire(trigger)
    assert life.state == state
    assert info.value.trigger == trigger and info.value.state == state


def test_an_unknown_trigger_raises_illegal_transition():
    life = Lifecycle("m", "running")
    with pytest.raises(IllegalTransition):
        life.fire("explode")
    assert life.state == "running"


def test_the_table_is_deterministic_one_destination_per_state_and_trigger():
    seen = {}
    for trigger, src, dst in legal_pairs():
        assert seen.setdefault((trigger, src), dst) == dst


def test_every_state_is_reachable_from_discovered():
    reach, frontier = {"discovered"}, ["discovered"]
    while frontier:
        s = frontier.pop()
        for trigger in TRIGGERS:
            d = allowed(s, trigger)
            if d and d not in reach:
                reach.add(d)
                frontier.append(d)
    assert reach == set(STATES)


def test_the_happy_path_and_the_crash_path_of_the_design_card():
    life = Lifecycle("m")
    for trigger in ("enable", "start", "ready", "crash", "restart", "ready"):
        life.fire(trigger)
    assert life.state == "running"


def test_an_unknown_initial_state_is_refused():
    with pytest.raises(ValueError):
        Lifecycle("m", "flying")


def test_the_table_uses_exactly_the_protocols_states_and_triggers():
    import typing

    from optimanode.executors.lifecycle import LIVE, LOADING, SERVING, STATES, TRIGGERS, TRANSITIONS
    from optimanode.protocol import ExecutorStatus, State, Transition, Trigger

    in_table = {s for _, sources, dst in TRANSITIONS for s in (*sources, dst)}
    assert in_table == set(STATES) == set(typing.get_args(State))
    assert {t for t, _, _ in TRANSITIONS} == set(TRIGGERS) == set(typing.get_args(Trigger))
    # No (state, trigger) pair leads to two places.
    pairs = [(s, t) for t, sources, _ in TRANSITIONS for s in sources]
    assert len(pairs) == len(set(pairs))
    assert LOADING < SERVING < LIVE
    # The wire refuses a state or trigger the table does not know.
    import msgspec

    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(b'{"trigger":"explode","src":"running","dst":"crashed"}', type=Transition)
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"id": "x", "state": "sleeping", "enabled": True, "info": {"path": "p", "files": [],
                         "size_bytes": 1, "mtime_ns": 1}}, ExecutorStatus)
