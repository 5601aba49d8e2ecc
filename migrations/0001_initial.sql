-- The event journal. One row per event; `seq` orders the whole journal, (stream, version)
-- orders one executor's history and makes a conflicting append fail instead of interleaving.
CREATE TABLE events (
    seq      INTEGER PRIMARY KEY,
    ts       REAL    NOT NULL,            -- unix time, seconds
    stream   TEXT    NOT NULL,            -- executor id, or 'node' for node-wide events
    version  INTEGER NOT NULL,            -- 1, 2, ... within the stream
    type     TEXT    NOT NULL,            -- the event's tag (optimanode/protocol.py EventBody)
    data     TEXT    NOT NULL,            -- the event body, JSON
    UNIQUE (stream, version)
);
CREATE INDEX events_ts ON events (ts);
CREATE INDEX events_type ON events (type, seq);

-- Projection of the events per executor, updated in the same transaction as each append.
-- It is a cache: replaying `events` gives the same rows (tests check it).
CREATE TABLE executors (
    id        TEXT    PRIMARY KEY,
    path      TEXT    NOT NULL,
    state     TEXT    NOT NULL,
    enabled   INTEGER NOT NULL,
    settings  TEXT    NOT NULL,           -- JSON ModelSettings
    info      TEXT    NOT NULL,           -- JSON ModelInfo
    last_seq  INTEGER NOT NULL
);
