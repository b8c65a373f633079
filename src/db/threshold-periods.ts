// The threshold counters keep the billing period they count in while its inputs stay as they were
// (migrations/0082, alert_usage_counters): a write that changes one of those inputs (a subscription's
// current_period_end, an organization's destinations, its billing anchor) ends that in its own
// transaction, so the organization's next ingestion computes its period again. Here, below billing,
// metering and alerts, because each of them writes such an input.
import { sql, type Transaction } from 'kysely';
import type { DB } from './schema.js';

/**
 * Makes the organization's threshold period be computed again at its next count (empties the span of
 * time its counter trusts the period it holds). The count itself is kept; a period with a different
 * start restarts it, as it always did. Nothing for an organization without a counter.
 */
export async function forgetThresholdPeriod(trx: Transaction<DB>, organizationId: string): Promise<void> {
  await sql`
    UPDATE alert_usage_counters SET valid_until = valid_from
     WHERE organization_id = ${organizationId} AND valid_until > valid_from`.execute(trx);
}
