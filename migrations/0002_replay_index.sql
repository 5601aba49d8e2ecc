-- Replay (every start) folds only the events that change an executor's view, in seq order. This
-- partial index holds exactly those rows, already in seq order, so replay walks it instead of
-- reading the (type, seq) index of every type and sorting the result: 1.95 s -> see
-- docs/benchmarks.md "Journal replay". It costs one small index entry per state event and
-- nothing for the request events that make up most of a journal.
-- The WHERE clause must stay identical to the one in Journal.replay (optimanode/journal.py):
-- SQLite uses a partial index only for a query whose WHERE implies the index's.
CREATE INDEX events_state ON events (seq)
    WHERE stream != 'node' AND type IN ('registered', 'transition', 'desired', 'hashed');
