-- Counters as createThreshold makes them.
INSERT INTO alert_usage_counters (organization_id, event_name, period_start, period_end, valid_from, valid_until, usage)
SELECT o.id, 'temperature_readings', s.period_start, s.period_end, s.valid_from, s.valid_until, 0
  FROM organizations o CROSS JOIN LATERAL meterbox_threshold_period_span(o.id, now()) s
ON CONFLICT (organization_id, event_name) DO UPDATE SET period_start = excluded.period_start,
  period_end = excluded.period_end, valid_from = excluded.valid_from, valid_until = excluded.valid_until;
VACUUM ANALYZE;
