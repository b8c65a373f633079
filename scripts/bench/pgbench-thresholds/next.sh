#!/bin/bash
# The threshold count of 0082 (counter update, then the thresholds' range look-up) against 0083's (the
# counter's update alone while its usage stays under next_quantity), interleaved in every pgbench
# transaction, on a scratch database it creates and drops (README.md). From the repository's root:
#   bash scripts/bench/pgbench-thresholds/next.sh [postgres://postgres@127.0.0.1:5432] [seconds] [rounds]
# Then the same rounds with 0083's triggers disabled: what their column check and WHEN cost the update
# (both counts pay them in the first phase; neither in the second).
set -euo pipefail
U=${1:-postgres://postgres@127.0.0.1:5432}
SECS=${2:-8}
ROUNDS=${3:-6}
H=scripts/bench/pgbench-thresholds
DB=meterbox_pgbench_next
psql -q "$U/postgres" -c "DROP DATABASE IF EXISTS $DB" -c "CREATE DATABASE $DB"
trap 'psql -q "$U/postgres" -c "DROP DATABASE IF EXISTS $DB"' EXIT
psql -q -v ON_ERROR_STOP=1 "$U/$DB" -f $H/setup.sql -f migrations/0061_threshold_count_function.sql \
  -f migrations/0076_billing_anchor_date.sql -f migrations/0079_active_sensor_thresholds.sql \
  -f $H/seed.sql -f migrations/0082_threshold_usage_counters.sql -f $H/seed2.sql \
  -c 'DROP FUNCTION IF EXISTS old_count_thresholds(uuid[], integer[], timestamptz)' \
  -c 'ALTER FUNCTION meterbox_count_thresholds(uuid[], integer[], timestamptz) RENAME TO old_count_thresholds' \
  -c 'BEGIN' -f migrations/0083_threshold_next_quantity.sql -c 'COMMIT' \
  -c 'UPDATE alert_usage_counters SET next_quantity = 1000000000' -c 'VACUUM ANALYZE alert_usage_counters'
echo "load average $(cut -d' ' -f1-3 /proc/loadavg)"
# Server time, no round trips (loop.sql), the triggers on and off in turn.
for r in $(seq 1 "$ROUNDS"); do
  for t in ENABLE DISABLE; do
    psql -q "$U/$DB" -c "ALTER TABLE alert_usage_counters $t TRIGGER USER"
    echo "loop $r triggers ${t}D: $(psql -q "$U/$DB" -f $H/loop.sql 2>&1 | grep -oE 'us per call.*'); load $(cut -d' ' -f1 /proc/loadavg)"
  done
done
psql -q "$U/$DB" -c 'ALTER TABLE alert_usage_counters ENABLE TRIGGER USER'
for phase in triggers no-triggers; do
  [ "$phase" = no-triggers ] && psql -q "$U/$DB" -c 'ALTER TABLE alert_usage_counters DISABLE TRIGGER USER'
  for r in $(seq 1 "$ROUNDS"); do
    for f in ab ba; do
      out=$(pgbench -n -r -c 1 -T "$SECS" -f $H/$f.sql "$U/$DB" 2>/dev/null)
      sel=$(echo "$out" | awk '/SELECT id FROM bench_orgs WHERE n = :c;/ {print $1}')
      old=$(echo "$out" | awk '/old_count_thresholds/ {print $1}')
      new=$(echo "$out" | awk '/meterbox_count_thresholds/ {print $1}')
      echo "$phase round $r $f select $sel 0082 $old 0083 $new (ms); over the select: 0082 $(echo "$old - $sel" | bc) 0083 $(echo "$new - $sel" | bc); load $(cut -d' ' -f1 /proc/loadavg)"
    done
  done
done
