"""The executor state table, as data, and the machine that enforces it.

Theory of operation: an executor's *state* is what is observed about its model and worker; what
the operator wants (enabled or not, settings) is *desired* state and lives beside it, not in it.
The reconciler compares the two and fires triggers; the supervisor fires the triggers that come
from the worker (ready, crash, stopped). Every trigger that fires is journaled as a Transition
event, so the journal replays to the same state.

Everything that decides which transition is legal lives in ``TRANSITIONS`` below: the one
authority. The state and trigger names are the protocol's ``State`` and ``Trigger`` literals
(journal events and the Gateway link carry them; a test keeps them equal to this table), the
``transitions`` Machine of each executor is built from the table, and ``allowed`` reads a map
compiled from it once. A trigger not allowed from the current state raises IllegalTransition and
changes nothing (``ignore_invalid_triggers`` is off; we translate its MachineError). The named
sets of states the rest of the node asks about (``LIVE``, ``LOADING``, ``SERVING``) are defined
here, once.

States::

    discovered   registered, valid, not wanted running
    enabled      wanted running, not started yet
    waiting      wanted running, but its memory estimate does not fit in what is free
    starting     worker spawned, loading the model
    running      worker loaded and serving
    stopping     worker told to stop (disable, file changed, shutdown)
    crashed      worker died or stopped answering; waiting out the backoff
    restarting   a new worker spawned after a crash, loading
    failed       crash budget spent; stays until re-enabled or the file changes
    invalid      the file cannot be used (unparseable, truncated, vocabulary-only, ...)
    missing      the file is gone
"""

from __future__ import annotations

import typing
from typing import Final

from transitions import Machine, MachineError

from optimanode.errors import IllegalTransition
from optimanode.protocol import State, Trigger

STATES: Final[tuple[State, ...]] = typing.get_args(State)

# States in which a worker process may exist.
LIVE: Final[frozenset[State]] = frozenset({"starting", "running", "restarting", "stopping"})
# A worker is loading its model (its memory is spoken for but not yet allocated).
LOADING: Final[frozenset[State]] = frozenset({"starting", "restarting"})
# A worker is loading or serving: what a stop, a crash or a settings change applies to.
SERVING: Final[frozenset[State]] = frozenset({"starting", "running", "restarting"})

# (trigger, sources, destination). The only place the rules live.
TRANSITIONS: Final[tuple[tuple[Trigger, tuple[State, ...], State], ...]] = (
    ("enable", ("discovered", "failed"), "enabled"),
    ("disable", ("enabled", "waiting", "crashed", "failed"), "discovered"),
    ("hold", ("enabled",), "waiting"),            # memory estimate does not fit
    ("start", ("enabled", "waiting"), "starting"),
    ("ready", tuple(LOADING), "running"),
    ("crash", tuple(SERVING), "crashed"),
    ("restart", ("crashed",), "restarting"),
    ("give_up", ("crashed",), "failed"),
    ("stop", tuple(SERVING), "stopping"),
    ("stopped", ("stopping",), "discovered"),
    ("invalidate", ("discovered", "enabled", "waiting", "crashed", "failed", "missing"), "invalid"),
    ("vanish", ("discovered", "enabled", "waiting", "crashed", "failed", "invalid"), "missing"),
    ("rediscover", ("invalid", "missing", "failed"), "discovered"),
    # The node restarted: no worker survived it, so a live state is stale.
    ("recover", tuple(SERVING), "enabled"),
    ("recover", ("stopping",), "discovered"),
)

TRIGGERS: Final[tuple[Trigger, ...]] = typing.get_args(Trigger)

# (state, trigger) → destination, compiled once from the table.
_NEXT: Final[dict[tuple[str, str], State]] = {(src, t): dst for t, sources, dst in TRANSITIONS for src in sources}


def allowed(state: str, trigger: str) -> State | None:
    """Where ``trigger`` leads from ``state``, or None when it is illegal (pure)."""
    return _NEXT.get((state, trigger))


class Lifecycle:
    """One executor's state, enforced by a ``transitions`` Machine built from TRANSITIONS."""

    def __init__(self, executor_id: str, state: State = "discovered") -> None:
        if state not in STATES:
            raise ValueError(f"unknown state {state!r}")
        self.executor_id = executor_id
        self.state: State = state
        self._machine = Machine(
            model=self, states=list(STATES), initial=state, auto_transitions=False,
            ignore_invalid_triggers=False, model_attribute="state",
        )
        for trigger, sources, dst in TRANSITIONS:
            self._machine.add_transition(trigger, list(sources), dst)

    def fire(self, trigger: Trigger) -> tuple[State, State]:
        """Apply ``trigger``; return (source, destination) or raise IllegalTransition unchanged."""
        src = self.state
        if trigger not in TRIGGERS:
            raise IllegalTransition(self.executor_id, trigger, src)
        try:
            ok = self.trigger(trigger)  # type: ignore[attr-defined]
        except MachineError:
            raise IllegalTransition(self.executor_id, trigger, src) from None
        if not ok:  # pragma: no cover - no conditions are used; kept so a future one cannot pass silently
            raise IllegalTransition(self.executor_id, trigger, src)
        return src, self.state
