// Operator redrive of failed outbox rows, with the identifier-window guard: a group is resent with its
// own identifier only while its destination surely still deduplicates that identifier
// (rules/reconcile.ts redriveVerdict). Older groups are refused and listed; redrive-reconcile.ts settles them
// against the destination's own totals first.
import { type Kysely, sql } from 'kysely';
import type { PgBoss } from 'pg-boss';
import type { DB, Destination, MeterEventName, OutboxKind } from '../db/schema.js';
import { enqueueDeliveryEach } from './outbox.js';
import {
  compareKeys,
  destinationOf,
  type KeyRef,
  keyName,
  keyRef,
  revokedLeaseOwner,
  singletonKeyOf,
} from './rules/keys.js';
import { IDENTIFIER_WINDOW_MS } from './rules/policy.js';
import { redriveVerdict } from './rules/reconcile.js';

/** Which failed rows to put back in the queue; fields combine with AND, none means every failed row. */
export interface FailedRowsFilter {
  organizationId?: string;
  customerId?: string;
  eventName?: MeterEventName;
  destination?: Destination;
  /** Outbox row ids: each brings its whole group (rows sharing its identifier) along. */
  ids?: readonly string[];
}

/** A failed group the redrive refused: its identifier is past the destination's dedupe window. */
export interface RefusedGroup {
  identifier: string;
  destination: Destination;
  customerId: string;
  eventName: MeterEventName;
  kind: OutboxKind;
  rows: number;
  /** When the identifier was committed: the start of the destination's dedupe window. */
  identifiedAt: Date;
  reason: string;
}

export interface RedriveResult {
  /** Rows put back to pending (same identifier). */
  rows: number;
  /** Delivery jobs queued (one per key). */
  keys: number;
  /** Groups left failed because resending them could bill twice. */
  refused: RefusedGroup[];
  /**
   * Rows left failed, for now, because their customer has pending rows in another organization (it
   * was linked to that one since): redriven once that organization's rows are delivered.
   */
  deferred: number;
}

/** What an operator reads next to a refused group: why, and what to do. */
export function refusalReason(destination: Destination, identifiedAt: Date): string {
  const hours = Math.round(IDENTIFIER_WINDOW_MS[destination] / 3_600_000);
  return `identifier committed at ${identifiedAt.toISOString()}, more than ${hours} h ago: ${destination} may no longer deduplicate it, so a resend could bill twice; redrive with --reconcile (reconcile: true) to compare with ${destination}'s own totals first`;
}

/** Failed groups matching `filter`, with when each identifier was committed, on the database clock. */
export async function failedGroups(db: Kysely<DB>, filter: FailedRowsFilter) {
  const rows = await sql<{
    identifier: string;
    destination: Destination;
    organization_id: string;
    customer_id: string;
    event_name: MeterEventName;
    kind: OutboxKind;
    rows: number;
    identified_at: Date;
    db_now: Date;
  }>`
    SELECT identifier, destination, min(organization_id::text) AS organization_id,
           min(stripe_customer_id) AS customer_id,
           min(event_name) AS event_name, min(kind) AS kind, count(*)::int AS rows,
           -- rows grouped before identified_at existed: their creation is the earliest a call was made
           min(coalesce(identified_at, created_at)) AS identified_at, now() AS db_now
      FROM meter_outbox
     WHERE status = 'failed' AND identifier IS NOT NULL
       AND identifier IN (
         SELECT identifier FROM meter_outbox
          WHERE status = 'failed'
            ${filter.organizationId ? sql`AND organization_id = ${filter.organizationId}` : sql``}
            ${filter.customerId ? sql`AND stripe_customer_id = ${filter.customerId}` : sql``}
            ${filter.eventName ? sql`AND event_name = ${filter.eventName}` : sql``}
            ${filter.destination ? sql`AND destination = ${filter.destination}` : sql``}
            ${filter.ids ? sql`AND id = ANY(${filter.ids.length ? [...filter.ids] : ['-1']}::bigint[])` : sql``})
     GROUP BY identifier, destination
     ORDER BY min(created_at), identifier`.execute(db);
  return rows.rows.map((r) => ({
    identifier: r.identifier,
    destination: r.destination,
    organizationId: r.organization_id,
    customerId: r.customer_id,
    eventName: r.event_name,
    kind: r.kind,
    rows: r.rows,
    identifiedAt: new Date(r.identified_at),
    dbNow: new Date(r.db_now),
  }));
}

/**
 * Operator redrive: failed groups within their destination's identifier window become pending again,
 * with the same identifier, and their keys get a delivery job, in one transaction. A group Stripe or
 * Metronome had in fact recorded then answers "duplicate" and becomes delivered, so nothing is billed
 * twice. Groups past the window are refused, untouched, and returned with the reason: resending one
 * after the destination forgot its identifier would bill it again if it had landed (a correction:
 * credit it again). The matching jobs in meter-delivery-dead stay there as the record of the failure;
 * pg-boss's redrive() alone would not help, since a delivery job only drains `pending` rows.
 *
 * A customer has pending rows in one organization at a time (a delivery key's job is named without
 * its organization, rules/keys.ts): failed rows of a customer that another organization now has pending
 * rows for (the customer was linked to it since) stay failed and are counted as `deferred`; redriven
 * once that organization's rows are delivered.
 */
export async function retryFailedRows(
  db: Kysely<DB>,
  boss: PgBoss,
  filter: FailedRowsFilter = {},
): Promise<RedriveResult> {
  return db.transaction().execute(async (trx) => {
    const groups = await failedGroups(trx, filter);
    const refused: RefusedGroup[] = [];
    const resend: typeof groups = [];
    for (const g of groups) {
      // The database's clock, as identified_at was written by it: one clock for both ends.
      const verdict = redriveVerdict(g, g.dbNow, { identifierWindowMs: IDENTIFIER_WINDOW_MS[g.destination] });
      if (verdict === 'resend') {
        resend.push(g);
        continue;
      }
      const { dbNow: _now, organizationId: _org, ...group } = g;
      refused.push({ ...group, reason: refusalReason(g.destination, g.identifiedAt) });
    }
    if (resend.length === 0) return { rows: 0, keys: 0, refused, deferred: 0 };
    // Which organization may hold each customer's pending rows: the one that holds them now, else
    // the first of those asking (by id); the others' groups wait. One read (every shard on Citus:
    // an operator's action, not a hot path), then the update of the allowed groups.
    const asked = [...resend].sort((a, b) => compareKeys(keyOfGroup(a), keyOfGroup(b)));
    const holders = new Map<string, string>();
    const pending = await trx
      .selectFrom('meter_outbox')
      .select(['organization_id', 'stripe_customer_id', 'event_name', 'destination'])
      .distinct()
      .where('status', '=', 'pending')
      .where('stripe_customer_id', 'in', [...new Set(asked.map((g) => g.customerId))])
      .execute();
    for (const key of [...pending.map(keyOf), ...asked.map(keyOfGroup)]) {
      const customer = singletonKeyOf(key);
      if (!holders.has(customer)) holders.set(customer, key.organizationId);
    }
    const allowed = asked.filter((g) => holders.get(singletonKeyOf(keyOfGroup(g))) === g.organizationId);
    const deferred = asked.filter((g) => !allowed.includes(g)).reduce((n, g) => n + g.rows, 0);
    if (allowed.length === 0) return { rows: 0, keys: 0, refused, deferred };
    // Before any row is reset: a batch still holding a group's key may have called with the group's
    // identifier, and its settle applies its answer to the key's pending rows of that identifier, which
    // the reset rows would be (a v2 'accepted' on a group Stripe then dropped: never resent).
    await takeKeysFromBatches(trx, allowed.map(keyOfGroup));
    const reset = await trx
      .updateTable('meter_outbox')
      .set({
        status: 'pending',
        // A v2 acceptance that a report then failed is void: the group is sent again.
        accepted_at: null,
        // A redriven group gets its full DELIVERY_RETRY_LIMIT again (its last error keeps the history).
        attempts: 0,
        last_error: sql`'retry requested after: ' || coalesce(last_error, '')`,
        updated_at: sql`now()`,
      })
      .where('status', '=', 'failed')
      .where(
        'identifier',
        'in',
        allowed.map((g) => g.identifier),
      )
      .returning(['organization_id', 'stripe_customer_id', 'event_name', 'destination'])
      .execute();
    const keys = new Map<string, KeyRef>();
    for (const r of reset) {
      const key = keyOf(r);
      keys.set(keyName(key), key);
    }
    await enqueueDeliveryEach(trx, boss, [...keys.values()].sort(compareKeys));
    return { rows: reset.length, keys: keys.size, refused, deferred };
  });
}

/**
 * Takes each key from the batch holding it, if any, before the redrive resets its rows: the lease gets
 * an owner no batch has (revokedLeaseOwner), so the batch's settle, renewals and correction switch,
 * which all require its own `lease_owner`, are refused from then on, as after a reaped lease, and it
 * applies nothing to the reset rows; they stay pending with their identifiers and the key's next batch
 * resends them (the destination de-duplicates what the batch's call did deliver). The lease itself, and
 * its end, stay: the batch's calls are bounded by it, so no other batch calls for the key before the
 * lease ends or the reaper frees it, one call in flight per customer and meter, as ever. A settle that
 * holds the key first finds the reported rows failed and leaves them; this statement waits for it and
 * then finds the key free. Key rows are locked in key order, as claims and settles lock them; one
 * statement per organization (on Citus a router query, which is where Citus takes row locks); no clock.
 * Returns how many leases were taken.
 */
export async function takeKeysFromBatches(trx: Kysely<DB>, keys: readonly KeyRef[]): Promise<number> {
  const sorted = [...new Map(keys.map((k) => [keyName(k), keyRef(k)])).values()].sort(compareKeys);
  const revoked = revokedLeaseOwner('');
  let taken = 0;
  for (const organizationId of [...new Set(sorted.map((k) => k.organizationId))]) {
    const own = sorted.filter((k) => k.organizationId === organizationId);
    // Held by a batch, not revoked already (a second redrive leaves such a lease as it is).
    const held = (d: string) =>
      sql`${sql.ref(`${d}.lease_owner`)} IS NOT NULL AND ${sql.ref(`${d}.lease_owner`)} NOT LIKE ${`${revoked}%`}`;
    const result = await sql<{ n: number }>`
      WITH l AS (SELECT organization_id, stripe_customer_id, event_name, destination FROM meter_delivery_keys
                  WHERE organization_id = ${organizationId}::uuid AND ${held('meter_delivery_keys')}
                    AND (stripe_customer_id, event_name, destination) IN (
                      SELECT * FROM unnest(${own.map((k) => k.customerId)}::text[],
                                           ${own.map((k) => k.eventName)}::text[],
                                           ${own.map((k) => destinationOf(k))}::text[]))
                  ORDER BY 1, 2, 3, 4 FOR UPDATE),
      u AS (UPDATE meter_delivery_keys d SET lease_owner = ${revoked}::text || d.lease_owner
              FROM l
             WHERE d.organization_id = ${organizationId}::uuid AND d.stripe_customer_id = l.stripe_customer_id
               AND d.event_name = l.event_name AND d.destination = l.destination AND ${held('d')}
            RETURNING 1)
      SELECT count(*)::int AS n FROM u`.execute(trx);
    taken += result.rows[0]?.n ?? 0;
  }
  return taken;
}

const keyOfGroup = (g: {
  organizationId: string;
  customerId: string;
  eventName: MeterEventName;
  destination: Destination;
}): KeyRef =>
  keyRef({
    organizationId: g.organizationId,
    customerId: g.customerId,
    eventName: g.eventName,
    destination: g.destination,
  });

const keyOf = (r: {
  organization_id: string;
  stripe_customer_id: string;
  event_name: MeterEventName;
  destination: Destination;
}): KeyRef =>
  keyRef({
    organizationId: r.organization_id,
    customerId: r.stripe_customer_id,
    eventName: r.event_name,
    destination: r.destination,
  });
