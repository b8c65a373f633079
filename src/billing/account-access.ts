// Stripe Connect: a connected account's access, from its webhooks (Connect endpoint). When an account
// deauthorizes the platform (`account.application.deauthorized`), its deliveries are held at once,
// before any call finds the refusal; when it authorizes it again (`account.application.authorized`),
// the hold ends and its waiting keys' jobs start now. The hold is the account's destination_health row
// (migration 0074; the worker's side: metering/destination-health.ts): down, access_refused_since set.
// Stripe does not order its events: an older (de)authorization event never overrides a newer one.
import { sql, type Transaction } from 'kysely';
import type { DB } from '../db/schema.js';

/** A held account's first probe comes this long after the hold (metering's FIRST_ACCESS_PROBE_MS). */
const FIRST_PROBE_SECONDS = 5;

/**
 * Holds the account's deliveries. Only for an account meterbox bills customers on (another has no row
 * of ours); returns whether it applied (false: not ours, or a newer event was applied).
 */
export async function holdAccountAccess(
  trx: Transaction<DB>,
  account: string,
  eventCreated: Date,
  message: string,
): Promise<boolean> {
  if (!(await billsOn(trx, account))) return false;
  // A plain VALUES upsert: on Citus a router statement on the single-shard destination_health, which
  // an INSERT ... SELECT from the reference table is not. Its DO UPDATE takes the time from `excluded`
  // (Citus allows only immutable functions there).
  const { rows } = await sql<{ account: string }>`
    INSERT INTO destination_health AS h (destination, account, state, down_since, next_probe_at,
                                         access_refused_since, access_refused_message, access_event_created,
                                         outages, updated_at)
    VALUES ('stripe', ${account}, 'down', clock_timestamp(),
            clock_timestamp() + make_interval(secs => ${FIRST_PROBE_SECONDS}),
            clock_timestamp(), ${message}, ${eventCreated}, 1, clock_timestamp())
    ON CONFLICT (destination, account) DO UPDATE
       SET state = 'down',
           down_since = coalesce(h.down_since, excluded.down_since),
           next_probe_at = CASE WHEN h.access_refused_since IS NULL THEN excluded.next_probe_at ELSE h.next_probe_at END,
           probes = CASE WHEN h.access_refused_since IS NULL THEN 0 ELSE h.probes END,
           access_refused_since = coalesce(h.access_refused_since, excluded.access_refused_since),
           access_refused_message = excluded.access_refused_message,
           access_event_created = excluded.access_event_created,
           outages = h.outages + CASE WHEN h.state = 'up' THEN 1 ELSE 0 END,
           updated_at = excluded.updated_at
     WHERE h.access_event_created IS NULL OR h.access_event_created <= excluded.access_event_created
    RETURNING h.account`.execute(trx);
  return rows.length > 0;
}

/** Whether meterbox bills a customer on the account (stripe_customer_accounts: a reference table on Citus). */
async function billsOn(trx: Transaction<DB>, account: string): Promise<boolean> {
  const { rows } = await sql<{ ours: boolean }>`
    SELECT EXISTS (SELECT 1 FROM stripe_customer_accounts WHERE stripe_account = ${account}) AS ours`.execute(
    trx,
  );
  return rows[0]?.ours === true;
}

/**
 * Ends the account's hold (an outage of it that is not an access refusal stays, for its probe to
 * end) and, if it was held, wakes its waiting keys: their retry_at cleared and their queued jobs
 * started now (each waiting key has one: the batch that told it to wait queued it). Returns how many
 * keys were woken, or null when not applied (not ours, or a newer event was applied).
 */
export async function endAccountAccessHold(
  trx: Transaction<DB>,
  account: string,
  eventCreated: Date,
): Promise<number | null> {
  if (!(await billsOn(trx, account))) return null;
  // The row as it was, locked (a router statement on Citus), then a VALUES upsert: on Citus neither
  // an INSERT ... SELECT nor a RETURNING that reads a CTE is a router statement.
  const { rows: before } = await sql<{ held: boolean }>`
    SELECT access_refused_since IS NOT NULL AS held FROM destination_health
     WHERE destination = 'stripe' AND account = ${account} FOR UPDATE`.execute(trx);
  const { rows } = await sql<{ account: string }>`
    INSERT INTO destination_health AS h (destination, account, access_event_created, updated_at)
    VALUES ('stripe', ${account}, ${eventCreated}, clock_timestamp())
    ON CONFLICT (destination, account) DO UPDATE
       SET state = CASE WHEN h.access_refused_since IS NULL THEN h.state ELSE 'up' END,
           down_since = CASE WHEN h.access_refused_since IS NULL THEN h.down_since END,
           next_probe_at = CASE WHEN h.access_refused_since IS NULL THEN h.next_probe_at END,
           probes = CASE WHEN h.access_refused_since IS NULL THEN h.probes ELSE 0 END,
           failures = CASE WHEN h.access_refused_since IS NULL THEN h.failures ELSE 0 END,
           failing_keys = CASE WHEN h.access_refused_since IS NULL THEN h.failing_keys ELSE '{}' END,
           access_refused_since = NULL, access_refused_message = NULL,
           access_event_created = excluded.access_event_created, updated_at = excluded.updated_at
     WHERE h.access_event_created IS NULL OR h.access_event_created <= excluded.access_event_created
    RETURNING h.account`.execute(trx);
  if (rows.length === 0) return null;
  if (before[0]?.held !== true) return 0;
  // The account's waiting keys, read without a lock (every shard on Citus), then woken one
  // organization at a time: each statement a router statement on Citus, locking that organization's
  // key rows in key order as every statement that locks several keys does (the claim, the settle),
  // organizations in order too: no deadlock.
  const { rows: on } = await sql<{ customer: string }>`
    SELECT stripe_customer_id AS customer FROM stripe_customer_accounts WHERE stripe_account = ${account}`.execute(
    trx,
  );
  const customers = on.map((r) => r.customer);
  const { rows: waiting } = await sql<{ organization_id: string }>`
    SELECT DISTINCT organization_id FROM meter_delivery_keys
     WHERE destination = 'stripe' AND retry_at > now() AND stripe_customer_id = ANY(${customers}::text[])
     ORDER BY 1`.execute(trx);
  const woken: { customer: string; event_name: string }[] = [];
  for (const { organization_id } of waiting) {
    const { rows: keys } = await sql<{ customer: string; event_name: string }>`
      WITH w AS (
        SELECT organization_id, stripe_customer_id, event_name, destination FROM meter_delivery_keys
         WHERE organization_id = ${organization_id} AND destination = 'stripe' AND retry_at > now()
           AND stripe_customer_id = ANY(${customers}::text[])
         ORDER BY 1, 2, 3, 4
           FOR UPDATE)
      UPDATE meter_delivery_keys d SET retry_at = NULL
        FROM w
       WHERE d.organization_id = ${organization_id} AND d.organization_id = w.organization_id
         AND d.stripe_customer_id = w.stripe_customer_id AND d.event_name = w.event_name
         AND d.destination = w.destination
      RETURNING d.stripe_customer_id AS customer, d.event_name`.execute(trx);
    woken.push(...keys);
  }
  if (woken.length === 0) return 0;
  // Their jobs (named by customer and meter in their data) start now rather than at the wait's end.
  await sql`
    WITH j AS (
      SELECT id FROM pgboss.job
       WHERE name = 'meter-delivery' AND state IN ('created', 'retry') AND start_after > now()
         AND coalesce(data->>'destination', 'stripe') = 'stripe'
         AND (data->>'customerId', data->>'eventName') IN (
               SELECT * FROM unnest(${woken.map((k) => k.customer)}::text[], ${woken.map((k) => k.event_name)}::text[]))
       ORDER BY singleton_key
         FOR NO KEY UPDATE)
    UPDATE pgboss.job SET start_after = now() FROM j
     WHERE pgboss.job.name = 'meter-delivery' AND pgboss.job.id = j.id`.execute(trx);
  return woken.length;
}
