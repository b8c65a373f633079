-- The pg-boss job that holds a customer+meter's backoff (its retry state), recorded when a delivery
-- job returns "retry". A newer job of the key checks that one job by primary key instead of
-- scanning every waiting meter-delivery job for the key's retry (4 ms per job at 1,000 waiting
-- jobs, measured with pg_stat_statements in `npm run bench -- --scale --profile`).
-- next_call_at may now be in the past for rows written only for the marker.
ALTER TABLE meter_delivery_pacing ADD COLUMN retry_job_id uuid;
