-- request_hours written as requests come (optimanode/request_hours.py, docs/journal.md
-- "request_hours"): the journal adds each request event to its hour in memory and writes the hours
-- with a group commit about every 5 s, with 'hours_through_seq', the last seq they include.
-- Retention then only deletes. 'hours_from_seq': the first seq written that way. A journal from
-- before this migration keeps its request events so far outside the table (retention folds them
-- before deleting them, as before); a new one starts at 1.
INSERT OR IGNORE INTO journal_meta (key, value) SELECT 'hours_from_seq', COALESCE(MAX(seq), 0) + 1 FROM events;
INSERT OR IGNORE INTO journal_meta (key, value) SELECT 'hours_through_seq', COALESCE(MAX(seq), 0) FROM events;
