-- optimanode: no-transaction
-- Space freed by retention goes back to the file system (PRAGMA incremental_vacuum, run by
-- retention after it deletes). auto_vacuum can only change on an existing file through a VACUUM,
-- which cannot run inside a transaction: this file runs outside one (the runner's marker on the
-- first line). Both statements are idempotent, so a node that dies between them and the record
-- runs them again. On a large journal from an older node, the VACUUM rewrites the whole file once
-- (it needs as much free disk space as the file takes).
PRAGMA auto_vacuum = INCREMENTAL;
VACUUM;
