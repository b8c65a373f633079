-- v2's settle of an accepted group a heap-only (HOT) update (issue 43, docs/benchmarks.md "The hourly
-- report's outbox updates"). The settle of a group Stripe's v2 stream accepted sets accepted_at (the row
-- stays pending until DELIVERY_V2_VALIDATION_SECONDS have passed: validation-window.ts promoteValidated) and
-- changes no other indexed column. meter_outbox_validating, (accepted_at) WHERE status = 'pending' AND
-- accepted_at IS NOT NULL, named it, so the update wrote an entry into every index of the table (eight
-- for a pending row with an identifier). Its one reader is promoteValidated's look for rows accepted
-- before the window's start; accepted_at is never earlier than the group's identifier
-- (identified_at, or created_at on rows identified before that column: the claim commits the
-- identifier before the call), so an index of the rows in flight by that instant holds every row due
-- and, besides them, only the rows identified before the window's start and not yet accepted. Neither
-- column changes when a group is accepted.
--
-- Free space on each page (fillfactor 60): a HOT update needs room for the new version on the
-- version's own page. Inserts and the new versions of non-HOT updates (the claim's) fill a page to
-- 60%, leaving room for the accept's version of most of its rows. Delivered rows stay on pages filled
-- to that share: the outbox takes up to 1/0.6 of the space on pages written from now on (an existing
-- table's pages are not rewritten).
--
-- Building the index scans meter_outbox once under a SHARE lock: ingestion's inserts wait for that
-- scan (about a second per million rows on a cached table), once, at the deploy.
--
-- The predicate names the indexed instant (never null: created_at is NOT NULL) so that only a statement
-- comparing that instant can use the index. Without it, the index's predicate was the in-flight index's
-- (status and identifier only): with statistics from before a backlog (every pending index looks empty)
-- the claim's per-key look-up of a key's rows in flight chose this index, which has no key columns, and
-- read every row in flight for each key (test/metering/claim-plan.test.ts).
CREATE INDEX meter_outbox_identified_pending ON meter_outbox ((coalesce(identified_at, created_at)))
  WHERE status = 'pending' AND identifier IS NOT NULL AND coalesce(identified_at, created_at) IS NOT NULL;
DROP INDEX meter_outbox_validating;
ALTER TABLE meter_outbox SET (fillfactor = 60);
