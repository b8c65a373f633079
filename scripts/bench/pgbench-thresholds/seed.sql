INSERT INTO organizations (name) SELECT 'org ' || g FROM generate_series(1, 10000) g;
INSERT INTO bench_orgs SELECT row_number() OVER (ORDER BY id), id FROM organizations;
INSERT INTO subscriptions (organization_id, stripe_customer_id) SELECT id, 'cus_' || n FROM bench_orgs;
-- Two thresholds each, never reached.
INSERT INTO alert_thresholds (organization_id, event_name, quantity, period_start, period_end)
SELECT o.id, 'temperature_readings', q, p.period_start, p.period_end
  FROM organizations o CROSS JOIN LATERAL meterbox_threshold_period(o.id, now()) p,
       (VALUES (1000000000), (2000000000)) AS v(q);
