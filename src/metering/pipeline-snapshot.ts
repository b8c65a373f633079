// The delivery pipeline's state for the metrics gauges (src/observability/metrics.ts), read from
// Postgres at scrape time so every process (API or worker) reports the same delivery state.
import { type Kysely, sql } from 'kysely';
import type { DB } from '../db/schema.js';
import type { PipelineSnapshot } from '../observability/metrics.js';
import { effectiveRate } from './budget.js';

/**
 * The pipeline state in ONE statement, whatever the number of organizations. Only unfinished rows
 * are counted (pending rows by meter_outbox_pending, the others by meter_outbox_unsent: partial indexes): delivered rows grow without bound, so
 * they are reported as a one-hour window and as worker counters, never as a full count per scrape.
 */
export async function readPipelineSnapshot(
  db: Kysely<DB>,
  now: Date,
  options: { maxCallsPerSecond?: number } = {},
): Promise<PipelineSnapshot> {
  const since = new Date(now.getTime() - 3_600_000);
  const result = await sql<{
    kind: 'unfinished' | 'delivered' | 'dead' | 'pass' | 'budget';
    status: string | null;
    meter: string | null;
    n: string;
    oldest: Date | null;
  }>`
    -- v2 rows Stripe accepted and is still validating are reported as status "validating": not
    -- delivered yet, but not unbilled backlog either (nothing is left to send).
    SELECT 'unfinished' AS kind,
           CASE WHEN status = 'pending' AND accepted_at IS NOT NULL THEN 'validating' ELSE status END AS status,
           event_name AS meter, count(*)::bigint AS n,
           min(created_at) FILTER (WHERE status = 'pending' AND accepted_at IS NULL) AS oldest
      -- Pending rows and the rest apart (each by an index of its own; migrations/0084).
      FROM meter_outbox WHERE status = 'pending' OR status NOT IN ('delivered', 'pending') GROUP BY 2, event_name
    UNION ALL
    SELECT 'delivered', 'delivered', event_name, count(*)::bigint, NULL
      FROM meter_outbox WHERE status = 'delivered' AND delivered_at >= ${since} GROUP BY event_name
    UNION ALL
    SELECT 'dead', NULL, NULL,
           coalesce((SELECT queued_count FROM pgboss.queue WHERE name = 'meter-delivery-dead'), 0)::bigint, NULL
    UNION ALL
    SELECT 'pass', NULL, NULL, coalesce(round(max(extract(epoch FROM clock_timestamp()
             - greatest(k.oldest, coalesce(p.next_call_at, k.oldest)))) * 1000), 0)::bigint, NULL
      FROM (SELECT organization_id, stripe_customer_id, event_name, destination, min(created_at) AS oldest
              FROM meter_outbox WHERE status = 'pending' AND accepted_at IS NULL GROUP BY 1, 2, 3, 4) k
      -- A key's row is its organization's (co-located with its outbox rows on Citus).
      LEFT JOIN meter_delivery_keys p USING (organization_id, stripe_customer_id, event_name, destination)
    UNION ALL
    SELECT 'budget', ${effectiveRate(options.maxCallsPerSecond ?? 0)}::text, NULL, calls, NULL
      FROM meter_call_budget WHERE id = 1
  `.execute(db);
  const snapshot: PipelineSnapshot = {
    rows: [],
    oldestPendingSeconds: 0,
    deliveredLastHour: [],
    deadLetterQueued: 0,
    budget: { rate: 0, calls: 0 },
    passSeconds: 0,
  };
  // Pass time ('pass' above): for each customer+meter with pending rows, how long it has waited while
  // eligible, i.e. since the later of its oldest pending row's commit and the moment its pacing let it
  // call again (meter_delivery_keys.next_call_at); the longest of these. Every pending key is served
  // once per pass over the pending keys, so this is how long a full pass takes.
  let oldest: Date | undefined;
  for (const row of result.rows) {
    const count = Number(row.n);
    if (row.kind === 'unfinished') {
      snapshot.rows.push({ status: row.status ?? '', meter: row.meter ?? '', count });
      if (row.oldest && (!oldest || row.oldest < oldest)) oldest = row.oldest;
    } else if (row.kind === 'pass') {
      snapshot.passSeconds = Math.max(0, count / 1000);
    } else if (row.kind === 'budget') {
      snapshot.budget = { rate: Number(row.status ?? 0), calls: count };
    } else if (row.kind === 'delivered') {
      snapshot.deliveredLastHour.push({ meter: row.meter ?? '', count });
    } else {
      snapshot.deadLetterQueued = count;
    }
  }
  if (oldest) snapshot.oldestPendingSeconds = Math.max(0, (now.getTime() - oldest.getTime()) / 1000);
  return snapshot;
}
