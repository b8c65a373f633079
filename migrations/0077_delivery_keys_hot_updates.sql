-- The key rows' updates HOT (issue 43, docs/benchmarks.md "What a delivered event costs"). The claim
-- sets a key's lease (lease_owner, lease_expires_at, leased_at), the settle clears it and paces the
-- key (next_call_at, retry_at), a renewal moves lease_expires_at: two or more updates of the row per
-- delivered event. The partial index on live leases, (lease_expires_at) WHERE lease_owner IS NOT NULL,
-- named the columns each of them changes, so none could be a heap-only tuple update: every one wrote
-- a new entry into the primary key (432 WAL bytes an event measured) and the index, and left dead
-- entries for vacuum. Its one reader is the lease reaper (every 2 s a worker: expired leases whose
-- batch died), which now reads the table instead: a sequential scan of the key rows (one row per
-- customer, meter and destination), measured in the same benchmark.
--
-- Free space on each page (fillfactor 40) so that the new version of every row of a page fits beside
-- the old one, as HOT needs: a claim of 1,000 keys updates whole pages of key rows in one transaction,
-- and the old versions cannot be pruned until it commits; a leased row is larger than a free one (its
-- owner and expiry): at 50, 340 of a 400-key claim's updates were HOT (a first form of
-- test/metering/key-row-hot.test.ts, which holds 40).
-- It applies to pages written from now on: an existing table's full pages gain HOT
-- updates as its rows move off them (a non-HOT update writes the new version where there is room).
DROP INDEX meter_delivery_keys_leased;
ALTER TABLE meter_delivery_keys SET (fillfactor = 40);
