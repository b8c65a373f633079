\set a random(1, 10000)
\set b random(1, 10000)
\set c random(1, 10000)
BEGIN;
INSERT INTO bench_writes (org) VALUES ((SELECT id FROM bench_orgs WHERE n = :c));
SELECT id FROM bench_orgs WHERE n = :c;
SELECT count(*) FROM old_count_thresholds(ARRAY[(SELECT id FROM bench_orgs WHERE n = :a)], ARRAY[1], now());
SELECT count(*) FROM meterbox_count_thresholds(ARRAY[(SELECT id FROM bench_orgs WHERE n = :b)], ARRAY[1], now());
COMMIT;
