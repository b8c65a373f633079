-- The share-lock of the keys' queued delivery jobs (src/metering/outbox.ts lockQueuedJobs) with a plan
-- that reads pg-boss's index of queued singleton jobs whatever the job table's statistics said when it
-- was made. Inside ingestion's group statement, which the request path prepares once a connection
-- (src/db/prepared.ts), Postgres keeps one generic plan for the connection's life after five calls. Made
-- while pg-boss's job table held a page of jobs (a new deployment, the first minute of load), that plan
-- read the whole table for each key (a sequential scan, or every queued delivery job through the primary
-- key) where the index finds the key's one; as the queue grew to thousands of keys the group statement
-- went from ~2 to ~16 ms on CPU and single-reading requests fell to a third (p99 ~150 ms: the ingest
-- bench's "slow mode", docs/benchmarks.md), until an analyze of the job table invalidated the plan
-- (autovacuum's, a minute or more later, or never where it is off).
--
-- Here the look-up is a function with its own plan: one generic plan a session (force_generic_plan: the
-- default re-planned it on every call, ~0.15 ms), made with sequential and bitmap scans off, so the plan
-- is the index's whatever size the statistics give the table: job_common_i1, unique on (name,
-- COALESCE(singleton_key, '')), answers an equality on both columns with one row. One case is left: if
-- the statistics say the job table holds other queues' jobs and no delivery jobs at all, the primary key
-- (name, id) looks as cheap and can be chosen, as before, until an analyze counts the delivery jobs.
--
-- Keys are looked up and locked in key order, one LATERAL look-up each (a join of the keys was planned
-- as one pass over every queued job). The jobs' table is pg-boss's (schema pgboss), created by pg-boss
-- at start-up: PL/pgSQL resolves it when the function first runs, not here.
CREATE FUNCTION meterbox_lock_queued_jobs(p_keys text[])
RETURNS SETOF text
LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan
SET enable_seqscan = off
SET enable_bitmapscan = off
AS $$
BEGIN
  RETURN QUERY
    SELECT l.key
      FROM (SELECT DISTINCT k.key FROM unnest(p_keys) AS k(key) ORDER BY 1) AS k
     CROSS JOIN LATERAL (
       SELECT j.singleton_key AS key FROM pgboss.job j
        WHERE j.name = 'meter-delivery' AND COALESCE(j.singleton_key, '') = k.key
          AND j.state = 'created' AND j.policy = 'short'
        FOR KEY SHARE OF j) AS l
     ORDER BY l.key;
END
$$;
