-- One usage counter per organization and meter for threshold alerts (issue 45, the cost goal). Before,
-- ingestion counted every request's readings into every threshold row of the organization (two
-- thresholds: two row updates) and computed the organization's period for each request
-- (meterbox_threshold_period, three look-ups). Measured on PostgreSQL 15 (docs/benchmarks.md,
-- "Threshold alerts' cost"), those were most of the ~0.35 ms the count added to a request.
--
-- Now ingestion updates one row, this organization's counter, however many thresholds it has; the
-- thresholds are read, by an index range look-up after that update, only to find a crossing (a
-- threshold whose quantity the request's readings went past), and written only then. The counter
-- keeps the period it counts in and the span of time over which meterbox_threshold_period is known to
-- give that period ([valid_from, valid_until): the period's own bounds, narrowed by every instant at
-- which the rule's inputs change by themselves: the Stripe subscription's period starting or ending, a
-- Metronome billing interval starting or ending). While a request's instant is inside that span the
-- period is not computed again. When one of the rule's stored inputs changes (the subscription's
-- current_period_end, the organization's destinations, its billing anchor), the writer empties the span
-- in its own transaction (src/db/threshold-periods.ts), and the next request computes the period again:
-- exactly what happened before on every request. The rule is unchanged: counted under one row's lock
-- (now the counter's), a crossing is the count going from below a quantity to at least it, written in
-- the transaction that counted it; a period with a different start starts the count again from the
-- readings of the request (re-armed).
--
-- Thresholds on active_sensors (0079) keep their own rows: the hourly report sets them once per
-- organization and hour, not per request.
--
-- alert_thresholds.period_usage is no longer kept by every request: it holds the usage as of the last
-- write of that threshold row (its crossing, a correction, a rollover, a re-count). The usage of the
-- period is the counter's. The column stays for a previous release running beside this one during a
-- deploy (its API processes call meterbox_count_thresholds, which this migration replaces, so they
-- count into the counters too).
CREATE TABLE alert_usage_counters (
  organization_id  uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
  event_name       text NOT NULL CHECK (event_name IN ('temperature_readings')),
  period_start     timestamptz NOT NULL,
  period_end       timestamptz NOT NULL,
  valid_from       timestamptz NOT NULL,
  valid_until      timestamptz NOT NULL,
  usage            bigint NOT NULL,
  PRIMARY KEY (organization_id, event_name),
  CHECK (valid_from <= valid_until)
);

-- The counters of the thresholds as they stand: each organization's usage in the newest period its
-- temperature_readings thresholds were counted in (they share it), valid for nothing yet, so that the
-- first request of each organization computes the period and keeps the count when it is the same one.
INSERT INTO alert_usage_counters (organization_id, event_name, period_start, period_end, valid_from, valid_until, usage)
SELECT DISTINCT ON (t.organization_id) t.organization_id, 'temperature_readings', t.period_start, t.period_end,
       t.period_start, t.period_start, t.period_usage
  FROM alert_thresholds t
 WHERE t.event_name = 'temperature_readings'
 ORDER BY t.organization_id, t.period_start DESC, t.period_usage DESC;

-- The period meterbox_threshold_period gives at p_at, and the span around p_at over which it gives that
-- same period with the inputs as stored now: the period's bounds, narrowed by each instant at which the
-- rule's answer can change without a write (the subscription's period starting or ending; a Metronome
-- billing interval starting or ending). A change of a stored input empties a counter's span instead.
CREATE FUNCTION meterbox_threshold_period_span(p_org uuid, p_at timestamptz)
RETURNS TABLE (period_start timestamptz, period_end timestamptz, valid_from timestamptz, valid_until timestamptz)
LANGUAGE plpgsql STABLE ROWS 1 AS $$
#variable_conflict use_column
DECLARE
  v_cpe timestamptz;
  v_at timestamptz;
  v_bounds timestamptz[];
BEGIN
  SELECT p.period_start, p.period_end INTO period_start, period_end FROM meterbox_threshold_period(p_org, p_at) p;
  valid_from := period_start;
  valid_until := period_end;
  SELECT s.current_period_end INTO v_cpe FROM subscriptions s WHERE s.organization_id = p_org;
  -- Two statements, no UNION over a reference table (Citus plans none).
  SELECT array_agg(d.valid_from) || array_agg(d.valid_until) INTO v_bounds FROM organization_destinations d
   WHERE d.organization_id = p_org AND d.destination = 'metronome' AND d.role = 'billing';
  FOR v_at IN
    SELECT b FROM unnest(ARRAY[v_cpe - interval '1 month', v_cpe] || coalesce(v_bounds, '{}')) AS b WHERE b IS NOT NULL
  LOOP
    IF v_at <= p_at THEN
      valid_from := greatest(valid_from, v_at);
    ELSE
      valid_until := least(valid_until, v_at);
    END IF;
  END LOOP;
  RETURN NEXT;
END
$$;

-- The thresholds of p_org that a count from p_before to p_after crossed (quantity in (before, after]):
-- marked crossed, returned as crossings. The caller holds the organization's counter lock.
CREATE FUNCTION meterbox_threshold_cross(p_org uuid, p_before bigint, p_after bigint, p_start timestamptz,
                                         p_end timestamptz, p_now timestamptz)
RETURNS SETOF text
LANGUAGE plpgsql AS $$
DECLARE
  r record;
BEGIN
  -- Plain statements, no data-modifying CTE: Citus plans each of them (the tables are reference tables).
  FOR r IN
    UPDATE alert_thresholds t
       SET state = 'crossed', crossed_at = p_now, period_usage = p_after, period_start = p_start, period_end = p_end
     WHERE t.organization_id = p_org AND t.event_name = 'temperature_readings'
       AND t.quantity > p_before AND t.quantity <= p_after
    RETURNING t.id, t.quantity
  LOOP
    -- A crossing as the callers read it (src/alerts/thresholds.ts, crossingOf).
    RETURN NEXT json_build_object('id', r.id, 'organization_id', p_org, 'event_name', 'temperature_readings',
                                  'quantity', r.quantity, 'period_usage', p_after, 'period_start', p_start,
                                  'period_end', p_end, 'inserted', p_after - p_before)::text;
  END LOOP;
END
$$;

-- The slow path of one organization: no counter yet, or the request's instant is outside its span.
-- Under the counter's lock: the period computed (meterbox_threshold_period_span); the count kept when the
-- period starts where the counter's did, else started again (a new period: the thresholds re-armed);
-- the request's readings added; every temperature_readings threshold of the organization set to the
-- new count (crossed when at or over its quantity), and those whose quantity the request went past
-- returned as crossings. An organization without a counter starts from what its threshold rows counted
-- in that period (a threshold created by a release before this one), else from zero.
CREATE FUNCTION meterbox_threshold_recount(p_org uuid, p_inserted bigint, p_now timestamptz)
RETURNS SETOF text
LANGUAGE plpgsql AS $$
DECLARE
  c alert_usage_counters%ROWTYPE;
  s record;
  r record;
  v_have boolean;
  v_before bigint;
  v_after bigint;
BEGIN
  LOOP
    SELECT * INTO c FROM alert_usage_counters
     WHERE organization_id = p_org AND event_name = 'temperature_readings' FOR UPDATE;
    v_have := FOUND;
    IF v_have AND c.valid_from <= p_now AND p_now < c.valid_until THEN
      -- Another transaction computed the period while this one waited for the lock: count forward.
      UPDATE alert_usage_counters SET usage = usage + p_inserted
       WHERE organization_id = p_org AND event_name = 'temperature_readings';
      RETURN QUERY SELECT j FROM meterbox_threshold_cross(p_org, c.usage, c.usage + p_inserted, c.period_start,
                                                          c.period_end, p_now) AS j;
      RETURN;
    END IF;
    IF NOT v_have AND NOT EXISTS (SELECT 1 FROM alert_thresholds t
                                   WHERE t.organization_id = p_org AND t.event_name = 'temperature_readings') THEN
      RETURN;
    END IF;
    SELECT * INTO s FROM meterbox_threshold_period_span(p_org, p_now);
    IF v_have THEN
      v_before := CASE WHEN c.period_start = s.period_start THEN c.usage ELSE 0 END;
      v_after := v_before + p_inserted;
      UPDATE alert_usage_counters
         SET period_start = s.period_start, period_end = s.period_end, valid_from = s.valid_from,
             valid_until = s.valid_until, usage = v_after
       WHERE organization_id = p_org AND event_name = 'temperature_readings';
      EXIT;
    END IF;
    -- No counter: create it. A concurrent transaction that created it first makes this one go round
    -- again and wait for its lock.
    v_before := coalesce((SELECT max(t.period_usage) FROM alert_thresholds t
                           WHERE t.organization_id = p_org AND t.event_name = 'temperature_readings'
                             AND t.period_start = s.period_start), 0);
    v_after := v_before + p_inserted;
    INSERT INTO alert_usage_counters (organization_id, event_name, period_start, period_end, valid_from, valid_until,
                                      usage)
    VALUES (p_org, 'temperature_readings', s.period_start, s.period_end, s.valid_from, s.valid_until, v_after)
    ON CONFLICT (organization_id, event_name) DO NOTHING;
    EXIT WHEN FOUND;
  END LOOP;
  FOR r IN
    UPDATE alert_thresholds t
       SET period_start = s.period_start, period_end = s.period_end, period_usage = v_after,
           state = CASE WHEN t.quantity <= v_after THEN 'crossed' ELSE 'armed' END,
           crossed_at = CASE WHEN t.quantity > v_before AND t.quantity <= v_after THEN p_now
                             WHEN t.quantity <= v_before THEN t.crossed_at END
     WHERE t.organization_id = p_org AND t.event_name = 'temperature_readings'
    RETURNING t.id, t.quantity
  LOOP
    IF r.quantity > v_before AND r.quantity <= v_after THEN
      RETURN NEXT json_build_object('id', r.id, 'organization_id', p_org, 'event_name', 'temperature_readings',
                                    'quantity', r.quantity, 'period_usage', v_after, 'period_start', s.period_start,
                                    'period_end', s.period_end, 'inserted', p_inserted)::text;
    END IF;
  END LOOP;
END
$$;

-- Ingestion's count (same signature and answer as 0061/0079, so a previous release's API processes
-- count into the counters too): for each organization of p_orgs, p_inserted readings stored now. The
-- common case is two statements whose plans the session keeps: each organization's counter, when p_now
-- is inside its span, gets the readings added under its row lock (in the order of p_orgs, which the
-- callers sort: concurrent groups lock them in one order); then one index range look-up per organization on the
-- thresholds' (organization, meter, quantity) key says whether a quantity lies in (before, after]. That
-- look-up is a statement of its own, after the locks: its snapshot holds every threshold committed by
-- a transaction that held the counter's lock before (createThreshold takes it), which the update's own
-- snapshot, taken before it waited for the lock, may not. Only at a crossing are thresholds written
-- (meterbox_threshold_cross). An organization whose counter is missing or whose period may have changed
-- takes the slow path (meterbox_threshold_recount). Returns each crossing as JSON text.
CREATE OR REPLACE FUNCTION meterbox_count_thresholds(p_orgs uuid[], p_inserted integer[], p_now timestamptz)
RETURNS SETOF text
LANGUAGE plpgsql
-- As 0061: one plan for the session (with the default, the arrays' unknown sizes kept it re-planning).
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
  r record;
  v_orgs uuid[] := '{}';
  v_before bigint[] := '{}';
  v_after bigint[] := '{}';
  v_start timestamptz[] := '{}';
  v_end timestamptz[] := '{}';
BEGIN
  IF coalesce(cardinality(p_orgs), 0) = 0 THEN
    RETURN;
  END IF;
  FOR r IN
    UPDATE alert_usage_counters c SET usage = c.usage + x.inserted
      FROM unnest(p_orgs, p_inserted) AS x(org, inserted)
     WHERE c.organization_id = x.org AND c.event_name = 'temperature_readings' AND x.inserted > 0
       AND c.valid_from <= p_now AND p_now < c.valid_until
    RETURNING c.organization_id AS org, c.usage, x.inserted, c.period_start, c.period_end
  LOOP
    v_orgs := v_orgs || r.org;
    v_before := v_before || (r.usage - r.inserted);
    v_after := v_after || r.usage;
    v_start := v_start || r.period_start;
    v_end := v_end || r.period_end;
  END LOOP;
  IF cardinality(v_orgs) > 0 THEN
    FOR r IN
      SELECT DISTINCT ON (x.org) x.org, x.before, x.after, x.ps, x.pe
        FROM unnest(v_orgs, v_before, v_after, v_start, v_end) AS x(org, before, after, ps, pe)
        JOIN alert_thresholds t ON t.organization_id = x.org AND t.event_name = 'temperature_readings'
                               AND t.quantity > x.before AND t.quantity <= x.after
       ORDER BY x.org
    LOOP
      RETURN QUERY SELECT j FROM meterbox_threshold_cross(r.org, r.before, r.after, r.ps, r.pe, p_now) AS j;
    END LOOP;
  END IF;
  IF cardinality(v_orgs) < cardinality(p_orgs) THEN
    FOR r IN SELECT u.org, u.inserted FROM unnest(p_orgs, p_inserted) AS u(org, inserted)
              WHERE u.inserted > 0 AND u.org <> ALL (v_orgs) ORDER BY u.org LOOP
      RETURN QUERY SELECT j FROM meterbox_threshold_recount(r.org, r.inserted, p_now) AS j;
    END LOOP;
  END IF;
END
$$;
