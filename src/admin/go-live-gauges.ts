// The issue-25 gauges from what the worker wrote to Postgres (stripe_meter_catalog, reconciliation
// drift), so every process's /metrics shows them — the API's too, which has no catalog of its own.
import type { Kysely } from 'kysely';
import type { DB } from '../db/schema.js';
import type { Metrics } from '../observability/metrics.js';
import { applyReconciliationGauges } from './scheduled-reconciliation.js';

export async function applyGoLiveGauges(db: Kysely<DB>, metrics: Metrics): Promise<void> {
  const meters = await db.selectFrom('stripe_meter_catalog').select(['event_name', 'state']).execute();
  // No row yet: no worker has read the account; the gauge stays absent rather than claim either way.
  for (const m of meters)
    metrics.stripeMeterMissing.set({ event_name: m.event_name }, m.state === 'active' ? 0 : 1);
  await applyReconciliationGauges(db, metrics);
}
