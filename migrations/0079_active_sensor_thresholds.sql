-- Threshold alerts on the active_sensors meter too (issue 45: "per organization and meter").
--
-- active_sensors is a gauge: the hourly report (and a sensor's activation or deactivation) sends the
-- organization's count, and the destination bills the period's last value (the meter's formula is
-- `last`). Its usage in the period is therefore the newest count reported in it, not a sum: a report
-- sets period_usage, usage_at keeps the time of the count it holds (a report older than that one is not
-- applied), a count that rises to the quantity crosses, and one that falls back under it resolves.
-- src/alerts/sensor-thresholds.ts applies the reports in the report's transaction.
ALTER TABLE alert_thresholds DROP CONSTRAINT alert_thresholds_event_name_check;
ALTER TABLE alert_thresholds ADD CONSTRAINT alert_thresholds_event_name_check
  CHECK (event_name IN ('temperature_readings', 'active_sensors'));
ALTER TABLE alert_thresholds ADD COLUMN usage_at timestamptz;

-- Ingestion's count (0061) counts stored readings into temperature_readings thresholds only; before,
-- every threshold of the organization was one, so it needed no filter.
CREATE OR REPLACE FUNCTION meterbox_count_thresholds(p_orgs uuid[], p_inserted integer[], p_now timestamptz)
RETURNS SETOF text
LANGUAGE plpgsql
-- As 0061: one plan for the session (CREATE OR REPLACE resets what it does not repeat).
SET plan_cache_mode = force_generic_plan
AS $$
BEGIN
  IF coalesce(cardinality(p_orgs), 0) = 0 THEN
    RETURN;
  END IF;
  RETURN QUERY
  WITH per_org AS (
    SELECT x.org, x.inserted FROM unnest(p_orgs, p_inserted) AS x(org, inserted) WHERE x.inserted > 0
  ), thr_locked AS MATERIALIZED (
    SELECT t.id, p.inserted, per.period_start AS start, per.period_end AS "end"
      FROM per_org p JOIN alert_thresholds t ON t.organization_id = p.org AND t.event_name = 'temperature_readings'
      CROSS JOIN LATERAL meterbox_threshold_period(p.org, p_now) per
     ORDER BY t.id
       FOR UPDATE OF t
  ), thr_counted AS (
    UPDATE alert_thresholds t
       SET period_usage = CASE WHEN t.period_start = l.start THEN t.period_usage ELSE 0 END + l.inserted,
           period_start = l.start, period_end = l."end",
           state = CASE WHEN CASE WHEN t.period_start = l.start THEN t.period_usage ELSE 0 END + l.inserted >= t.quantity
                        THEN 'crossed' ELSE 'armed' END,
           crossed_at = CASE WHEN CASE WHEN t.period_start = l.start THEN t.period_usage ELSE 0 END < t.quantity
                              AND CASE WHEN t.period_start = l.start THEN t.period_usage ELSE 0 END + l.inserted >= t.quantity
                             THEN p_now ELSE t.crossed_at END
      FROM thr_locked l
     WHERE t.id = l.id
    RETURNING t.id, t.organization_id, t.event_name, t.quantity, t.period_usage, t.period_start, t.period_end,
              l.inserted
  )
  SELECT row_to_json(c)::text FROM thr_counted c
   WHERE c.period_usage >= c.quantity AND c.period_usage - c.inserted < c.quantity;
END
$$;
