// Alert events: the outbox of outgoing webhooks. An event is written in the transaction that causes
// it (a reading that crosses a threshold, a correction that brings usage back under, a silence pass),
// fanned out to every endpoint subscribed to its type in the same statement, and handed to the
// `alert-delivery` queue through the same transaction. Its id (evt_…) and body never change after.
import { type RawBuilder, sql, type Transaction } from 'kysely';
import { fromKysely, type PgBoss } from 'pg-boss';
import type { DB } from '../db/schema.js';
import { timeOrderedId } from '../metering/job-ids.js';
import { insertJobs } from '../metering/queues.js';

export const ALERT_EVENT_TYPES = [
  'usage.threshold.crossed',
  'usage.threshold.resolved',
  'organization.silent',
  'organization.resumed',
  'sensor.silent',
  'sensor.resumed',
  'webhook.test',
] as const;
export type AlertEventType = (typeof ALERT_EVENT_TYPES)[number];

/** One endpoint's deliveries of one order key: what an `alert-delivery` job drains. */
export interface DeliveryKey {
  endpointId: string;
  orderKey: string;
}

export const alertDeliveryKey = (k: DeliveryKey) => `${k.endpointId}/${k.orderKey}`;

/**
 * CTEs that write the events `source` selects (columns organization_id uuid, type text, data jsonb, in
 * the order they happened) and one delivery per subscribed endpoint, to be placed in a WITH list after
 * `source`'s own CTEs. `alert_fanout` returns (endpoint_id, order_key) per delivery written. `only`
 * restricts the fan-out to one endpoint (a test event goes to the endpoint tested, whatever its types).
 */
export function alertEventCtes(source: RawBuilder<unknown>, now: RawBuilder<unknown>, only?: string) {
  return sql`
    alert_new AS MATERIALIZED (
      SELECT 'evt_' || replace(gen_random_uuid()::text, '-', '') AS id, x.organization_id, x.type, x.data,
             row_number() OVER () AS n
        FROM (${source}) x
    ), alert_written AS (
      INSERT INTO alert_events (id, organization_id, type, payload, created_at)
      SELECT a.id, a.organization_id, a.type,
             jsonb_build_object('id', a.id, 'object', 'event', 'type', a.type,
                                'created', floor(extract(epoch FROM ${now}))::bigint, 'data', a.data),
             ${now}
        FROM alert_new a ORDER BY a.n
      RETURNING seq, id, organization_id, type
    ), alert_fanout AS (
      INSERT INTO webhook_deliveries (event_seq, endpoint_id, order_key)
      SELECT e.seq, w.id, coalesce(e.organization_id::text, e.id)
        FROM alert_written e JOIN webhook_endpoints w ON w.deleted_at IS NULL
         AND ${only === undefined ? sql`(e.type = ANY (w.event_types) OR '*' = ANY (w.event_types))` : sql`w.id = ${only}`}
       ORDER BY e.seq, w.id
      RETURNING endpoint_id, order_key
    )`;
}

/**
 * Writes events and their deliveries in the caller's transaction and queues their delivery through it.
 * Returns the event ids written, in order.
 */
export async function writeAlertEvents(
  trx: Transaction<DB>,
  boss: PgBoss,
  events: readonly { organizationId: string | null; type: AlertEventType; data: Record<string, unknown> }[],
  now: Date,
  only?: string,
): Promise<string[]> {
  if (events.length === 0) return [];
  const rows = await sql<{ kind: 'e' | 'd'; a: string; b: string | null }>`
    WITH src AS (
      SELECT o::uuid AS organization_id, t AS type, d AS data
        FROM unnest(${events.map((e) => e.organizationId)}::text[], ${events.map((e) => e.type)}::text[],
                    ${events.map((e) => JSON.stringify(e.data))}::jsonb[]) WITH ORDINALITY AS x(o, t, d, n)
       ORDER BY n
    ), ${alertEventCtes(sql`SELECT * FROM src`, sql`${now}::timestamptz`, only)}
    SELECT 'e' AS kind, id AS a, NULL AS b FROM alert_written
    UNION ALL
    SELECT DISTINCT 'd', endpoint_id, order_key FROM alert_fanout`.execute(trx);
  const keys = rows.rows.filter((r) => r.kind === 'd').map((r) => ({ endpointId: r.a, orderKey: r.b ?? '' }));
  await enqueueAlertDeliveries(trx, boss, keys);
  return rows.rows.filter((r) => r.kind === 'e').map((r) => r.a);
}

/**
 * Queues one `alert-delivery` job per key, in the caller's transaction, unless the key has one waiting
 * (created, or retrying after a failure: that job will reach these deliveries, behind the ones it is
 * retrying, and its backoff must not be cut short). A waiting job is share-locked until commit: pg-boss
 * fetches with SKIP LOCKED, so it cannot start and drain the key before these deliveries are visible.
 * A job that is active now may finish without seeing them: a new one is queued then.
 */
export async function enqueueAlertDeliveries(
  trx: Transaction<DB>,
  boss: PgBoss,
  keys: readonly DeliveryKey[],
): Promise<void> {
  const unique = [...new Map(keys.map((k) => [alertDeliveryKey(k), k])).entries()].sort(([a], [b]) =>
    a < b ? -1 : 1,
  );
  for (const [singletonKey, key] of unique) {
    for (let attempt = 0; attempt < 5; attempt++) {
      const waiting = await sql`
        SELECT 1 FROM pgboss.job
         WHERE name = 'alert-delivery' AND COALESCE(singleton_key, '') = ${singletonKey}
           AND state IN ('created', 'retry')
         FOR KEY SHARE`.execute(trx);
      if (waiting.rows.length > 0) break;
      const inserted = await insertJobs(
        boss,
        'alert-delivery',
        [{ id: timeOrderedId(), data: key, singletonKey }],
        fromKysely(trx),
      );
      if (inserted.size > 0) break;
    }
  }
}
