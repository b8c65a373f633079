#!/usr/bin/env bash
# `bash scripts/test-loop.sh [RUNS] [--load]`: runs `npm test` RUNS times in a row (default 10) and
# prints one line a run (exit code, seconds, load average, the vitest totals), stopping at nothing, so
# a flaky test shows up as a failed run among passing ones. With --load, the delivery simulation runs
# beside the suite the whole time (at nice 10), so the machine is loaded as a shared CI machine is.
# Each run's whole output is kept in test-results/loop-run-<n>.log.
set -uo pipefail
cd "$(dirname "$0")/.."
runs=10
load=false
for arg in "$@"; do
  case "$arg" in
    --load) load=true ;;
    *) runs=$arg ;;
  esac
done
node_bin=$(node scripts/with-node.mjs --print-bin)
[ -n "$node_bin" ] && export PATH="$node_bin:$PATH"
mkdir -p test-results
burner=
if $load; then
  # A process group of its own (setsid), so the exit trap stops this loop's simulation and nothing
  # else: not a simulation someone else runs on the same machine (no pkill by name).
  setsid bash -c 'while true; do nice -n 10 npx tsx scripts/sim/cli.ts --seeds 2000 --from "$RANDOM" --small >/dev/null 2>&1; done' &
  burner=$!
  trap 'kill -- -"$burner" 2>/dev/null' EXIT
fi
passed=0
for i in $(seq 1 "$runs"); do
  started=$SECONDS
  npm test >"test-results/loop-run-$i.log" 2>&1
  rc=$?
  [ "$rc" = 0 ] && passed=$((passed + 1))
  totals=$(grep -a -E 'Test Files|Tests ' "test-results/loop-run-$i.log" | sed 's/\x1b\[[0-9;]*m//g' | tr -s ' ' | paste -sd ';' -)
  echo "run $i: exit $rc in $((SECONDS - started)) s, load average $(cut -d' ' -f1-3 /proc/loadavg);$totals"
done
echo "$passed of $runs runs passed"
[ "$passed" = "$runs" ]
