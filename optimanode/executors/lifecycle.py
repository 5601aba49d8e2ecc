"""The executor state table, as data, and the machine that enforces it.

Theory of operation: an executor's *state* is what is observed about its model and worker; what
the operator wants (enabled or not, settings) is *desired* state and lives beside it, not in it.
The reconciler compares the two and fires triggers; the supervisor fires the triggers that come
from the worker (ready, crash, stopped). Every trigger that fires is journaled as a Transition
event, so the journal replays to the same state.

Everything that decides which transition is legal lives in ``TRANSITIONS`` below. A trigger not
allowed from the current state raises IllegalTransition and changes nothing (``transitions`` is
used with ``ignore_invalid_triggers`` off; we translate its MachineError).

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

from typing import Final

from transitions import Machine, MachineError

from optimanode.errors import IllegalTransition

STATES: Final = ("discovered", "enabled", "waiting", "starting", "running", "stopping", "crashed",
                 "restarting", "failed", "invalid", "missing")

# States in which a worker process may exist.
LIVE: Final = frozenset({"starting", "running", "restarting", "stopping"})
# States from which the file can be dropped or re-read without stopping anything first.
IDLE: Final = frozenset({"discovered", "enabled", "waiting", "crashed", "failed", "invalid", "missing"})

# (trigger, sources, destination). The only place the rules live.
TRANSITIONS: Final[tuple[tuple[str, tuple[str, ...], str], ...]] = (
    ("enable", ("discovered", "failed"), "enabled"),
    ("disable", ("enabled", "waiting", "crashed", "failed"), "discovered"),
    ("hold", ("enabled",), "waiting"),            # memory estimate does not fit
    ("start", ("enabled", "waiting"), "starting"),
    ("ready", ("starting", "restarting"), "running"),
    ("crash", ("starting", "running", "restarting"), "crashed"),
    ("restart", ("crashed",), "restarting"),
    ("give_up", ("crashed",), "failed"),
    ("stop", ("starting", "running", "restarting"), "stopping"),
    ("stopped", ("stopping",), "discovered"),
    ("invalidate", ("discovered", "enabled", "waiting", "crashed", "failed", "missing"), "invalid"),
    ("vanish", ("discovered", "enabled", "waiting", "crashed", "failed", "invalid"), "missing"),
    ("rediscover", ("invalid", "missing", "failed"), "discovered"),
    # The node restarted: no worker survived it, so a live state is stale.
    ("recover", ("starting", "running", "restarting"), "enabled"),
    ("recover", ("stopping",), "discovered"),
)

TRIGGERS: Final = tuple(dict.fromkeys(t for t, _, _ in TRANSITIONS))


def allowed(state: str, trigger: str) -> str | None:
    """Where ``trigger`` leads from ``state``, or None when it is illegal (pure)."""
    for t, sources, dst in TRANSITIONS:
        if t == trigger and state in sources:
            return dst
    return None


class Lifecycle:
    """One executor's state, enforced by a ``transitions`` Machine built from TRANSITIONS."""

    def __init__(self, executor_id: str, state: str = "discovered") -> None:
        if state not in STATES:
            raise ValueError(f"unknown state {state!r}")
        self.executor_id = executor_id
        self.state: str = state
        self._machine = Machine(
            model=self, states=list(STATES), initial=state, auto_transitions=False,
            ignore_invalid_triggers=False, model_attribute="state",
        )
        for trigger, sources, dst in TRANSITIONS:
            self._machine.add_transition(trigger, list(sources), dst)

    def fire(self, trigger: str) -> tuple[str, str]:
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

    def can(self, trigger: str) -> bool:
        return allowed(self.state, trigger) is not None
