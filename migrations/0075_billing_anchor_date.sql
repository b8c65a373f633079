-- A configured billing period for organizations whose period meterbox does not hear from Stripe
-- (issue 45: "for Metronome organizations, UTC months unless configured"). billing_anchor_date is the
-- start of one of the organization's monthly periods, as a Metronome contract's usage statement
-- schedule has its billing_anchor_date: every period starts on the anchor's day of month and time of
-- day (the last day of a shorter month), one month long. NULL: UTC months, as before.
--
-- The threshold period (meterbox_threshold_period, the one copy of the rule, which ingestion's count,
-- its rollover and createThreshold use) reads it: the Stripe subscription's current period while that
-- contains the instant and Metronome does not bill the organization then; else the anchored month when
-- an anchor is set; else the UTC month.
--
-- PL/pgSQL now, not SQL: Citus never saw the tables of the SQL function, which Postgres inlined after
-- Citus had planned the call as touching no table of its own, so on a cluster the subqueries read the
-- coordinator's empty shells of the reference tables and every organization counted in UTC months
-- (a Stripe period and a Metronome destination ignored). A PL/pgSQL function's statement is planned on
-- its own, by Citus too; on one node its plan is kept for the session.
ALTER TABLE organizations ADD COLUMN billing_anchor_date timestamptz;

CREATE OR REPLACE FUNCTION meterbox_threshold_period(p_org uuid, p_at timestamptz)
RETURNS TABLE (period_start timestamptz, period_end timestamptz)
LANGUAGE plpgsql STABLE AS $$
BEGIN
  RETURN QUERY
  SELECT CASE WHEN f.stripe THEN f.cpe - interval '1 month'
              WHEN f.anchor IS NOT NULL THEN (f.anchor + make_interval(months => f.n)) AT TIME ZONE 'UTC'
              ELSE f.month_start END,
         CASE WHEN f.stripe THEN f.cpe
              WHEN f.anchor IS NOT NULL THEN (f.anchor + make_interval(months => f.n + 1)) AT TIME ZONE 'UTC'
              ELSE (date_trunc('month', p_at AT TIME ZONE 'UTC') + interval '1 month') AT TIME ZONE 'UTC' END
    FROM (SELECT date_trunc('month', p_at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' AS month_start, c.cpe, a.anchor,
                 -- Whole months from the anchor to p_at, in UTC wall time (timestamp + months keeps the
                 -- anchor's day, or the month's last day): the month of p_at, or the one before when
                 -- p_at is earlier in its month than the anchor's day and time.
                 m.m - CASE WHEN a.anchor + make_interval(months => m.m) > (p_at AT TIME ZONE 'UTC') THEN 1 ELSE 0 END AS n,
                 coalesce(c.cpe > p_at AND c.cpe - interval '1 month' <= p_at, false)
                 AND NOT EXISTS (
                   SELECT 1 FROM organization_destinations d
                    WHERE d.organization_id = p_org AND d.destination = 'metronome' AND d.role = 'billing'
                      AND d.valid_from <= p_at AND (d.valid_until IS NULL OR d.valid_until > p_at)) AS stripe
            FROM (SELECT (SELECT s.current_period_end FROM subscriptions s WHERE s.organization_id = p_org) AS cpe) c
           CROSS JOIN (SELECT (SELECT o.billing_anchor_date AT TIME ZONE 'UTC' FROM organizations o WHERE o.id = p_org)
                              AS anchor) a
           CROSS JOIN LATERAL (
             SELECT ((extract(year FROM p_at AT TIME ZONE 'UTC') - extract(year FROM a.anchor)) * 12
                     + extract(month FROM p_at AT TIME ZONE 'UTC') - extract(month FROM a.anchor))::int AS m) m) f;
END
$$;
