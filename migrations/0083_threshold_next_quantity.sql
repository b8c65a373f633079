-- The counter remembers the next quantity (issue 45, the cost goal). Since 0082 ingestion's count was
-- two statements for an organization with thresholds: its counter's update, then an index range look-up
-- of its thresholds for a crossing. Now the counter also keeps next_quantity, a quantity at or below the
-- smallest threshold quantity above its usage (0: not known), so the common case is the counter's update
-- alone: a request whose new usage stays under next_quantity crossed nothing and reads no threshold. A
-- usage at or over it takes the look-up, under the counter's lock as before (crossings written then), and
-- the look-up sets next_quantity again from the thresholds above the new usage.
--
-- The rule the column keeps: next_quantity <= the smallest quantity of the organization's
-- temperature_readings thresholds above usage. Too low costs one look-up; too high would miss a crossing.
-- It can only become too high when a threshold appears (or moves) below it, when the usage goes down,
-- or when the period changes; each of those writes the counter in a way the two triggers below see, in
-- every release that has the counters (0082's included, which runs beside this one during a deploy):
--   * a threshold is created or counted again only after recountReadings (src/alerts/threshold-admin.ts)
--     writes the counter's period and span (UPDATE OF them, or an INSERT, whose next_quantity is 0);
--     so does a change of the period's inputs (forgetThresholdPeriod) and the slow path of the count;
--   * a correction lowers usage (lowerThresholdUsage): UPDATE OF usage with a smaller value.
-- Either way the row's next_quantity becomes 0 in the same write, so the next count looks the thresholds
-- up again. Ingestion's own update names neither the period's columns nor a lower usage: the triggers
-- cost it a column check and one comparison (WHEN), no function call.
ALTER TABLE alert_usage_counters ADD COLUMN next_quantity bigint NOT NULL DEFAULT 0;

CREATE FUNCTION meterbox_counter_forget_next() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  NEW.next_quantity := 0;
  RETURN NEW;
END
$$;

-- Triggers that only set a column of their own row: the same on every placement of a Citus reference
-- table (Citus still calls them unsafe, as api_keys' trigger of 0010; src/db/citus.ts).
SET LOCAL citus.enable_unsafe_triggers = on;

CREATE TRIGGER alert_usage_counters_period BEFORE UPDATE OF period_start, period_end, valid_from, valid_until
  ON alert_usage_counters FOR EACH ROW EXECUTE FUNCTION meterbox_counter_forget_next();
CREATE TRIGGER alert_usage_counters_lowered BEFORE UPDATE OF usage ON alert_usage_counters
  FOR EACH ROW WHEN (NEW.usage < OLD.usage) EXECUTE FUNCTION meterbox_counter_forget_next();

-- Ingestion's count, as 0082's (same signature and answer) with the look-up only where next_quantity
-- says a threshold may have been reached. Each counter is updated and locked first, in the order of
-- p_orgs (sorted by the callers), the whole UPDATE before the loop reads its rows; the look-up and its
-- writes (meterbox_threshold_cross) are statements of their own after it, whose snapshot holds every
-- threshold committed by a transaction that held the counter's lock before; next_quantity read from the
-- row this update locked is that of the newest version (a transaction that created a threshold set it
-- to 0 before it committed, under the same lock).
CREATE OR REPLACE FUNCTION meterbox_count_thresholds(p_orgs uuid[], p_inserted integer[], p_now timestamptz)
RETURNS SETOF text
LANGUAGE plpgsql
-- As 0061: one plan for the session (with the default, the arrays' unknown sizes kept it re-planning).
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
  r record;
  v_counted uuid[] := '{}';
BEGIN
  IF coalesce(cardinality(p_orgs), 0) = 0 THEN
    RETURN;
  END IF;
  FOR r IN
    UPDATE alert_usage_counters c SET usage = c.usage + x.inserted
      FROM unnest(p_orgs, p_inserted) AS x(org, inserted)
     WHERE c.organization_id = x.org AND c.event_name = 'temperature_readings' AND x.inserted > 0
       AND c.valid_from <= p_now AND p_now < c.valid_until
    RETURNING c.organization_id AS org, c.usage, x.inserted, c.next_quantity, c.period_start, c.period_end
  LOOP
    v_counted := v_counted || r.org;
    IF r.usage >= r.next_quantity THEN
      RETURN QUERY SELECT j FROM meterbox_threshold_cross(r.org, r.usage - r.inserted, r.usage, r.period_start,
                                                          r.period_end, p_now) AS j;
      -- Names only next_quantity: neither trigger fires.
      UPDATE alert_usage_counters
         SET next_quantity = coalesce((SELECT min(t.quantity) FROM alert_thresholds t
                                        WHERE t.organization_id = r.org AND t.event_name = 'temperature_readings'
                                          AND t.quantity > r.usage), 9223372036854775807)
       WHERE organization_id = r.org AND event_name = 'temperature_readings';
    END IF;
  END LOOP;
  IF cardinality(v_counted) < cardinality(p_orgs) THEN
    FOR r IN SELECT u.org, u.inserted FROM unnest(p_orgs, p_inserted) AS u(org, inserted)
              WHERE u.inserted > 0 AND u.org <> ALL (v_counted) ORDER BY u.org LOOP
      RETURN QUERY SELECT j FROM meterbox_threshold_recount(r.org, r.inserted, p_now) AS j;
    END LOOP;
  END IF;
END
$$;
