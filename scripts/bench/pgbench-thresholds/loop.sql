-- The count's server time without round trips (next.sh): in one session, 3,000 rounds of 0082's count, 0083's
-- count and a plain one-row UPDATE of a counter, each for a random organization, timed with clock_timestamp().
DO $$
DECLARE t0 timestamptz; o uuid; k int; s_old float8 := 0; s_new float8 := 0; s_none float8 := 0; cnt int := 3000;
BEGIN
  FOR i IN 1..cnt LOOP
    k := 1 + floor(random() * 10000)::int; o := (SELECT id FROM bench_orgs WHERE n = k);
    t0 := clock_timestamp(); PERFORM count(*) FROM old_count_thresholds(ARRAY[o], ARRAY[1], now()); s_old := s_old + extract(epoch FROM clock_timestamp() - t0);
    k := 1 + floor(random() * 10000)::int; o := (SELECT id FROM bench_orgs WHERE n = k);
    t0 := clock_timestamp(); PERFORM count(*) FROM meterbox_count_thresholds(ARRAY[o], ARRAY[1], now()); s_new := s_new + extract(epoch FROM clock_timestamp() - t0);
    k := 1 + floor(random() * 10000)::int; o := (SELECT id FROM bench_orgs WHERE n = k);
    t0 := clock_timestamp(); UPDATE alert_usage_counters SET usage = usage + 1 WHERE organization_id = o AND event_name = 'temperature_readings'; s_none := s_none + extract(epoch FROM clock_timestamp() - t0);
  END LOOP;
  RAISE NOTICE 'us per call: 0082 % 0083 % plain update %', round((s_old/cnt*1e6)::numeric,1), round((s_new/cnt*1e6)::numeric,1), round((s_none/cnt*1e6)::numeric,1);
END $$;
