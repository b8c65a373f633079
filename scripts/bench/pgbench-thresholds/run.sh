#!/bin/bash
# The threshold count before (migrations 0061/0076/0079) and after (0082), interleaved in every pgbench
# transaction, on a scratch database it creates and drops (README.md). From the repository's root:
#   bash scripts/bench/pgbench-thresholds/run.sh [postgres://postgres@127.0.0.1:5432] [seconds] [rounds]
set -euo pipefail
U=${1:-postgres://postgres@127.0.0.1:5432}
SECS=${2:-8}
ROUNDS=${3:-6}
H=scripts/bench/pgbench-thresholds
DB=meterbox_pgbench_thresholds
psql -q "$U/postgres" -c "DROP DATABASE IF EXISTS $DB" -c "CREATE DATABASE $DB"
trap 'psql -q "$U/postgres" -c "DROP DATABASE IF EXISTS $DB"' EXIT
psql -q -v ON_ERROR_STOP=1 "$U/$DB" -f $H/setup.sql -f migrations/0061_threshold_count_function.sql \
  -f migrations/0076_billing_anchor_date.sql -f migrations/0079_active_sensor_thresholds.sql \
  -c 'ALTER FUNCTION meterbox_count_thresholds(uuid[], integer[], timestamptz) RENAME TO old_count_thresholds' \
  -f $H/seed.sql -f migrations/0082_threshold_usage_counters.sql -f $H/seed2.sql
echo "load average $(cut -d' ' -f1-3 /proc/loadavg)"
for r in $(seq 1 "$ROUNDS"); do
  for f in ab ba; do
    out=$(pgbench -n -r -c 1 -T "$SECS" -f $H/$f.sql "$U/$DB" 2>/dev/null)
    sel=$(echo "$out" | awk '/SELECT id FROM bench_orgs WHERE n = :c;/ {print $1}')
    old=$(echo "$out" | awk '/old_count_thresholds/ {print $1}')
    new=$(echo "$out" | awk '/meterbox_count_thresholds/ {print $1}')
    echo "round $r $f select $sel old $old new $new (ms); over the select: old $(echo "$old - $sel" | bc) new $(echo "$new - $sel" | bc); load $(cut -d' ' -f1 /proc/loadavg)"
  done
done
