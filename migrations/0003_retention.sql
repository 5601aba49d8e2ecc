-- Retention (optimanode/retention.py, docs/journal.md "Retention").
-- Small facts about the journal itself. 'base_seq': the checkpoint the kept state history starts
-- from (absent or 0: nothing has been deleted); a full replay starts there.
CREATE TABLE journal_meta (
    key    TEXT PRIMARY KEY,
    value  TEXT NOT NULL
);

-- Request events past their retention, folded per model per hour before they are deleted. Each
-- fold adds to the row of its hour in the transaction that deletes the events it folded, so a row
-- is always exactly the sum of what was deleted for it.
CREATE TABLE request_hours (
    stream             TEXT    NOT NULL,  -- executor id
    hour               INTEGER NOT NULL,  -- unix time of the hour's start (UTC)
    started            INTEGER NOT NULL,  -- request_started events folded
    requests           INTEGER NOT NULL,  -- request_finished events folded
    outcomes           TEXT    NOT NULL,  -- JSON {outcome: count} over those requests
    prompt_tokens      INTEGER NOT NULL,
    completion_tokens  INTEGER NOT NULL,
    ttft_count         INTEGER NOT NULL,  -- requests with a ttft_s
    ttft_sum_s         REAL    NOT NULL,
    ttft_hist          TEXT    NOT NULL,  -- JSON {bucket: count}, log buckets (retention.py)
    total_count        INTEGER NOT NULL,
    total_sum_s        REAL    NOT NULL,
    total_hist         TEXT    NOT NULL,
    first_seq          INTEGER NOT NULL,  -- the lowest and highest seq folded into this row
    last_seq           INTEGER NOT NULL,
    PRIMARY KEY (stream, hour)
);
