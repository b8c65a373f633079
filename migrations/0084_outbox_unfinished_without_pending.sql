-- The claim's per-key look-ups of pending rows must go by key whatever the table's statistics say
-- (issue 43; docs/benchmarks.md, "Statistics from before a backlog"). meter_outbox_unfinished,
-- (status, created_at) WHERE status <> 'delivered', could serve any statement that asks for
-- status = 'pending': its predicate is implied and its first column matches. After the hourly report or
-- an outage's backlog writes thousands of pending rows, the statistics are still those of a table with
-- none pending (autovacuum analyzes once a tenth of the table changed, and a large outbox is mostly
-- delivered rows): every partial index over pending rows looks empty, and the planner took this one
-- for the claim's look-ups, each of which then read every pending row of the platform to find one
-- key's. A claim of 1,000 keys took 11 s instead of 0.05 (the cost bench, --stale-statistics).
--
-- Pending rows are indexed by key already (meter_outbox_pending, _inflight, _correction_pending,
-- _validating). This index keeps what only it served, the rows neither pending nor delivered (failed,
-- expired) by status and age, for the pipeline's counts (src/metering/pipeline-snapshot.ts,
-- src/admin/outbox.ts), which ask for pending rows and these apart; a statement about pending rows can
-- no longer use it.
--
-- Building it scans meter_outbox once under a SHARE lock: ingestion's inserts wait for that scan (about
-- a second per million rows on a cached table), once, at the deploy.
CREATE INDEX meter_outbox_unsent ON meter_outbox (status, created_at) WHERE status NOT IN ('delivered', 'pending');
DROP INDEX meter_outbox_unfinished;
