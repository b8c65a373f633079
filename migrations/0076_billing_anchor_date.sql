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
-- its own, by Citus too; on one node their plans are kept for the session. Three index lookups, each
-- done once (the SQL form repeated its scalar subqueries in each branch of its CASEs).
ALTER TABLE organizations ADD COLUMN billing_anchor_date timestamptz;

CREATE OR REPLACE FUNCTION meterbox_threshold_period(p_org uuid, p_at timestamptz)
RETURNS TABLE (period_start timestamptz, period_end timestamptz)
-- One row: without it the planner takes a set-returning function for 1,000 rows, and the count's
-- statement (0061) took 2.6 ms a call instead of 0.4 (measured; likely a scan of all the thresholds).
LANGUAGE plpgsql STABLE ROWS 1 AS $$
DECLARE
  v_at timestamp := p_at AT TIME ZONE 'UTC';
  v_cpe timestamptz;
  v_anchor timestamp;
  v_months int;
BEGIN
  SELECT s.current_period_end INTO v_cpe FROM subscriptions s WHERE s.organization_id = p_org;
  IF v_cpe > p_at AND v_cpe - interval '1 month' <= p_at AND NOT EXISTS (
       SELECT 1 FROM organization_destinations d
        WHERE d.organization_id = p_org AND d.destination = 'metronome' AND d.role = 'billing'
          AND d.valid_from <= p_at AND (d.valid_until IS NULL OR d.valid_until > p_at)) THEN
    period_start := v_cpe - interval '1 month';
    period_end := v_cpe;
    RETURN NEXT;
    RETURN;
  END IF;
  SELECT o.billing_anchor_date AT TIME ZONE 'UTC' INTO v_anchor FROM organizations o WHERE o.id = p_org;
  IF v_anchor IS NULL THEN
    period_start := date_trunc('month', v_at) AT TIME ZONE 'UTC';
    period_end := (date_trunc('month', v_at) + interval '1 month') AT TIME ZONE 'UTC';
  ELSE
    -- Whole months from the anchor to p_at, in UTC wall time (timestamp + months keeps the anchor's day,
    -- or the month's last day): the month of p_at, or the one before when p_at is earlier in its month
    -- than the anchor's day and time.
    v_months := ((extract(year FROM v_at) - extract(year FROM v_anchor)) * 12
                 + extract(month FROM v_at) - extract(month FROM v_anchor))::int;
    IF v_anchor + make_interval(months => v_months) > v_at THEN
      v_months := v_months - 1;
    END IF;
    period_start := (v_anchor + make_interval(months => v_months)) AT TIME ZONE 'UTC';
    period_end := (v_anchor + make_interval(months => v_months + 1)) AT TIME ZONE 'UTC';
  END IF;
  RETURN NEXT;
END
$$;
