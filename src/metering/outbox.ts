// Writing to the meter outbox. Always called inside the caller's transaction, together with the
// business change being billed: the row and its delivery job commit or roll back with it.

import { type RawBuilder, sql, type Transaction } from 'kysely';
import type { PgBoss, SendOptions } from 'pg-boss';
import { fromKysely } from 'pg-boss';
import type { DB, Destination, MeterEventName } from '../db/schema.js';
import { timeOrderedId } from './job-ids.js';
import { insertJobs, MAX_BATCH_KEYS, sendJob } from './queues.js';
import { deliveryKey, destinationOf, type KeyRef } from './rules/keys.js';

export interface OutboxEntry {
  organizationId: string;
  eventName: MeterEventName;
  customerId: string;
  value: number;
  /** The usage time: becomes the meter event's timestamp. */
  occurredAt: Date;
  /** Natural key for reports that must exist at most once (e.g. one org's hourly report). */
  dedupeKey?: string;
  /** Where the row is billed (default 'stripe'). */
  destination?: Destination;
}

/**
 * Inserts one outbox row and queues its delivery job through the same transaction.
 * Returns the row id, or null when a row with the same dedupeKey already exists (nothing queued).
 */
export async function writeOutbox(
  trx: Transaction<DB>,
  boss: PgBoss,
  entry: OutboxEntry,
): Promise<string | null> {
  const inserted = await trx
    .insertInto('meter_outbox')
    .values({
      organization_id: entry.organizationId,
      event_name: entry.eventName,
      stripe_customer_id: entry.customerId,
      value: entry.value,
      occurred_at: entry.occurredAt,
      dedupe_key: entry.dedupeKey ?? null,
      destination: entry.destination ?? 'stripe',
    })
    .onConflict((oc) => oc.columns(['dedupe_key', 'organization_id']).doNothing())
    .returning('id')
    .executeTakeFirst();
  if (!inserted) return null;
  await enqueueDelivery(trx, boss, {
    organizationId: entry.organizationId,
    customerId: entry.customerId,
    eventName: entry.eventName,
    ...(entry.destination ? { destination: entry.destination } : {}),
  });
  return inserted.id;
}

/** The delivery job's singletonKey: one customer and meter at one destination (rules/keys.ts). */
export { deliveryKey } from './rules/keys.js';

/**
 * Send options of a delivery job. The queue's `short` policy keeps at most one *queued* job per
 * singletonKey (a job drains every pending row of its key, so one waiting job covers any number of
 * commits). Readings go first: a worker fetches by priority, so the hourly active_sensors report of
 * thousands of organizations uses the budget readings leave and never stalls them. The job's group is
 * its key: pg-boss indexes the active jobs that have a group (its job_i7, on name and group_id WHERE
 * state = 'active'), the one index of active jobs a `short` queue has, so the lease reaper finds the
 * jobs a dead batch fetched by reading the queue's active jobs, not every job the table holds
 * (reaper-sql.ts orphanedJobs). No worker sets groupConcurrency: a group limits nothing here.
 */
export function deliveryJobOptions(
  customerId: string,
  eventName: MeterEventName,
  destination: Destination = 'stripe',
): SendOptions & { singletonKey: string } {
  const key = deliveryKey(customerId, eventName, destination);
  return {
    singletonKey: key,
    priority: eventName === 'temperature_readings' ? 1 : 0,
    group: { id: key },
  };
}

/** How often a send may find the key's queued job claimed by a worker in between (then it queues anew). */
const MAX_HANDOFF_ATTEMPTS = 5;

/**
 * Queues a delivery of one customer's pending rows of one meter, inside the given transaction.
 * When the key already has a queued job (`short` policy allows one), that job must not start before
 * this transaction commits, or it could drain the key without seeing these rows and leave them to
 * the sweep. So the queued job's row is share-locked until commit: pg-boss fetches with SKIP LOCKED
 * and passes over it meanwhile. The lock is tried first because under steady ingestion a job is
 * almost always queued already: one cheap statement instead of a refused pg-boss insert plus the
 * lock. A job a worker is claiming right now is re-checked after its fetch commits (it is `active`
 * then, so it no longer matches) and a new job is sent.
 */
export async function enqueueDelivery(trx: Transaction<DB>, boss: PgBoss, delivery: KeyRef): Promise<void> {
  const { customerId, eventName } = delivery;
  const destination = destinationOf(delivery);
  const key = deliveryKey(customerId, eventName, destination);
  const options = { ...deliveryJobOptions(customerId, eventName, destination), db: fromKysely(trx) };
  for (let attempt = 0; attempt < MAX_HANDOFF_ATTEMPTS; attempt++) {
    const held = await sql`
      SELECT 1 FROM pgboss.job
      WHERE name = 'meter-delivery' AND COALESCE(singleton_key, '') = ${key}
        AND state = 'created' AND policy = 'short'
      FOR KEY SHARE`.execute(trx);
    if (held.rows.length > 0) return;
    // None queued (or a concurrent writer's is not committed yet: the insert waits for it, is then
    // refused, and the next pass locks that job).
    if (await sendJob(boss, 'meter-delivery', jobPayload(delivery), options)) return;
  }
  // Only reached if workers keep claiming the key's job between two statements; the stranded-row
  // sweep still covers these rows.
}

/**
 * enqueueDelivery for each of several keys in one transaction, in key order (their jobs' names, as every
 * statement that queues delivery jobs inserts them): the jobs a transaction inserts stay uncommitted
 * until it commits, so a loop in another order (by organization, by customer) could wait for another
 * transaction's job of a key while that transaction, queueing in key order, waits for this one's job of
 * a later key (40P01). A key named twice is looked up twice and queued once.
 */
export async function enqueueDeliveryEach(
  trx: Transaction<DB>,
  boss: PgBoss,
  keys: readonly KeyRef[],
): Promise<void> {
  const named = keys.map((k) => ({ k, name: deliveryKey(k.customerId, k.eventName, destinationOf(k)) }));
  named.sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
  for (const { k } of named) await enqueueDelivery(trx, boss, k);
}

/**
 * The hand-off of one ingestion transaction: every delivery key it wrote rows for, once, whatever
 * the number of requests in it, in two statements however many keys: one share-locks the keys'
 * queued jobs (in key order, so concurrent transactions lock in one order), one inserts a job for
 * every key without one (in key order too). A key whose insert was refused because a concurrent
 * transaction queued its job meanwhile goes round again: that job is locked on the next pass, or,
 * if a worker started it in between, a job is inserted for the key again (handOffName says under
 * which name). With thousands of customers nearly every key of a group is new: a send per key (two
 * statements each) made the hand-off, not the readings, the cost of a group.
 *
 * The transaction must not have queued delivery jobs before this call: every statement that queues
 * them inserts in key order, and the transaction's own jobs count as inserted until it commits.
 */
export async function enqueueDeliveries(
  trx: Transaction<DB>,
  boss: PgBoss,
  keys: readonly KeyRef[],
  /** Keys whose queued job the caller's own statement already share-locked (lockQueuedDeliveries). */
  held?: ReadonlySet<string>,
): Promise<void> {
  const unique = new Map(keys.map((k) => [deliveryKey(k.customerId, k.eventName, destinationOf(k)), k]));
  let missing = [...unique.keys()].filter((key) => !held?.has(key)).sort();
  // With the caller's look done in its own statement, the keys left have no queued job: insert first.
  let lockFirst = held === undefined;
  // The greatest key this transaction holds a job of under the key's own name (uncommitted until it commits).
  let last: string | undefined;
  for (let attempt = 0; attempt < MAX_HANDOFF_ATTEMPTS && missing.length > 0; attempt++) {
    const locked = new Set<string>();
    if (lockFirst) {
      const rows = await lockQueuedJobs(sql`SELECT unnest(${missing}::text[])`).execute(trx);
      for (const r of rows.rows) locked.add(r.key);
    }
    lockFirst = true;
    const jobs = missing
      .filter((name) => !locked.has(name))
      .map((name) => {
        const k = unique.get(name)!;
        const id = timeOrderedId();
        return {
          key: name,
          job: {
            id,
            data: jobPayload(k),
            ...deliveryJobOptions(k.customerId, k.eventName, destinationOf(k)),
            singletonKey: handOffName(name, id, last),
          },
        };
      });
    const inserted = await insertJobs(
      boss,
      'meter-delivery',
      jobs.map((j) => j.job),
      fromKysely(trx),
    );
    for (const { key, job } of jobs)
      if (inserted.has(job.id) && job.singletonKey === key && (last === undefined || key > last)) last = key;
    missing = jobs.filter(({ job }) => !inserted.has(job.id)).map(({ key }) => key);
  }
  // Only left over if workers keep claiming these keys' jobs between two statements; the
  // stranded-row sweep still covers their rows.
}

/**
 * Queues the delivery of many keys inside the given transaction as meter-delivery-batch jobs, each
 * naming up to MAX_BATCH_KEYS of them (in key order), in one statement: a job row for a batch of keys
 * instead of one for each (queues.ts). The jobs start only after the transaction commits, so their
 * drain sees its rows. A key may have a meter-delivery job queued besides (a change of its sensors):
 * either drains its rows, and the key's lease keeps them to one batch at a time. The jobs have no
 * singleton key, so their insert waits on no other transaction's (handOffName's deadlock cannot arise).
 */
export async function enqueueBatchDeliveries(
  trx: Transaction<DB>,
  boss: PgBoss,
  keys: readonly KeyRef[],
): Promise<number> {
  const unique = [...new Map(keys.map((k) => [deliveryKey(k.customerId, k.eventName, destinationOf(k)), k]))]
    .sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0))
    .map(([, k]) => jobPayload(k));
  const jobs: { id: string; data: { keys: ReturnType<typeof jobPayload>[] } }[] = [];
  for (let i = 0; i < unique.length; i += MAX_BATCH_KEYS) {
    jobs.push({ id: timeOrderedId(), data: { keys: unique.slice(i, i + MAX_BATCH_KEYS) } });
  }
  return (await insertJobs(boss, 'meter-delivery-batch', jobs, fromKysely(trx))).size;
}

/**
 * The name a hand-off inserts key `key`'s job under: the key's own, unless the transaction already
 * holds a job of a key after it (`last`, inserted by an earlier pass and uncommitted until the commit).
 * Inserting `key` under its own name then would insert out of key order: the insert waits for any
 * other transaction's uncommitted job of `key` (the queue's unique index of queued jobs), and that
 * transaction, which queued `key` before `last` as every statement does, may be waiting for this
 * one's `last`: a deadlock (40P01), one of two or three pg-boss job inserts, that failed reaper
 * passes and delivery batches on a slow database (test/metering/handoff-deadlock.test.ts). So such a
 * key's job gets a name of its own, `key#handoff:<job id>`, which no other job has and no insert
 * waits on: a delivery job of the key like any other (a job's key is its payload), queued, so it
 * starts only after this transaction commits and drains its rows. The key's next hand-off does not
 * see it and queues the key's job as usual; a job that finds nothing pending completes.
 */
function handOffName(key: string, jobId: string, last: string | undefined): string {
  return last !== undefined && key < last ? `${key}${HANDOFF_SUFFIX}${jobId}` : key;
}

/** handOffName's suffix, followed by the job's id. */
const HANDOFF_SUFFIX = '#handoff:';

/**
 * Share-locks the queued (not yet started) delivery jobs whose keys `keys` yields (one text column),
 * in key order, and returns their keys. Such a job cannot start before the locking transaction
 * commits, so its drain will see that transaction's rows.
 */
function lockQueuedJobs(keys: RawBuilder<unknown>) {
  // One look-up per key in pg-boss's index of queued singleton jobs (job_common_i1, on name and
  // COALESCE(singleton_key, '')), keys in order, by migration 0086's function. As `IN (keys)` (or
  // `= ANY(ARRAY(keys))`) the planner, with statistics that did not yet count the queued jobs, read
  // every queued delivery job's entry and compared it with each key: 9.7 ms of a group's 11 at ~600
  // queued jobs, growing with the queue (test/ingest/queued-jobs-lookup.test.ts; 20k queued: 5.6 ms
  // against 0.07 a look-up per key). Written in the statement itself, the look-up was frozen into the
  // prepared group statement's generic plan, made while the job table was a page: the same read of every
  // queued job, until an analyze. The function's own plan takes the index whatever the statistics.
  return sql<{ key: string }>`
    SELECT l.key FROM meterbox_lock_queued_jobs(ARRAY(${keys})) AS l(key)`;
}

/**
 * The first pass of enqueueDeliveries as a query to embed in the caller's own statement (a CTE), so
 * a small ingestion transaction saves a round trip: it share-locks the queued delivery jobs of
 * `eventName` for the customers `customers` yields (one text column) and returns their keys. Pass
 * those keys to enqueueDeliveries as `held`.
 */
export function lockQueuedDeliveries(eventName: MeterEventName, customers: RawBuilder<unknown>) {
  // deliveryKey(customer, eventName), in SQL.
  return lockQueuedJobs(
    sql`SELECT ${deliveryKey('', eventName)}::text || c.customer FROM (${customers}) AS c(customer)`,
  );
}

/**
 * lockQueuedDeliveries for keys of any destination: `keys` yields (customer, destination) rows of
 * `eventName`; the keys' names are deliveryKey's, computed in SQL.
 */
export function lockQueuedDeliveriesAt(eventName: MeterEventName, keys: RawBuilder<unknown>) {
  return lockQueuedJobs(
    sql`SELECT ${deliveryKeySql(eventName, sql`c.customer`, sql`c.destination`)}
          FROM (${keys}) AS c(customer, destination)`,
  );
}

/** deliveryKey(customer, eventName, destination) in SQL, over text expressions. */
export function deliveryKeySql(
  eventName: MeterEventName,
  customer: RawBuilder<unknown>,
  destination: RawBuilder<unknown>,
) {
  return sql`CASE WHEN ${destination} = 'stripe' THEN ${deliveryKey('', eventName)}::text || ${customer}
                  ELSE ${destination} || ':' || ${deliveryKey('', eventName)}::text || ${customer} END`;
}

/**
 * A key's job payload: its organization (so the job's claim and settle route to the organization's
 * shard group on Citus); a Stripe key's carries no destination, as every job did before destinations.
 */
function jobPayload(k: KeyRef): {
  organizationId: string;
  customerId: string;
  eventName: MeterEventName;
  destination?: Destination;
} {
  const destination = destinationOf(k);
  const base = { organizationId: k.organizationId, customerId: k.customerId, eventName: k.eventName };
  return destination === 'stripe' ? base : { ...base, destination };
}

/** Queues a delivery job outside any transaction (follow-ups, sweep), optionally after a delay. */
export async function queueDelivery(
  boss: PgBoss,
  key: KeyRef,
  startAfterSeconds?: number,
): Promise<string | null> {
  return sendJob(boss, 'meter-delivery', jobPayload(key), {
    ...deliveryJobOptions(key.customerId, key.eventName, destinationOf(key)),
    ...(startAfterSeconds ? { startAfter: startAfterSeconds } : {}),
  });
}

/**
 * Queues delivery jobs for many keys outside any transaction, each after its own delay, in ONE
 * statement (a key that already has a queued job keeps that one: the queue's `short` policy).
 */
export async function queueDeliveries(
  boss: PgBoss,
  keys: readonly (KeyRef & { afterMs?: number; wake?: boolean })[],
): Promise<number> {
  const singletonKey = (k: KeyRef & { wake?: boolean }) =>
    deliveryKey(k.customerId, k.eventName, destinationOf(k)) + (k.wake ? WAKE_SUFFIX : '');
  const unique = new Map(keys.map((k) => [singletonKey(k), k]));
  // In key order, as enqueueDeliveries inserts: two statements inserting the same new keys in different
  // orders each waited on the other's insert (deadlock, 40P01: the reaper's and the sweep's against a
  // batch's follow-ups, 3-31 failed batches and reaper passes per run on a database at a quarter core).
  const jobs = [...unique.entries()]
    .sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0))
    .map(([name, k]) => ({
      id: timeOrderedId(),
      data: jobPayload(k),
      ...deliveryJobOptions(k.customerId, k.eventName, destinationOf(k)),
      singletonKey: name,
      // A delay, which pg-boss adds to the database's clock: a date from this host's clock would start a
      // worker 20 minutes ahead's follow-ups 20 minutes late.
      ...(k.afterMs ? { startAfter: k.afterMs / 1000 } : {}),
    }));
  return (await insertJobs(boss, 'meter-delivery', jobs)).size;
}

/**
 * The singletonKey suffix of a key's wake-up: a job deferred until something the key waits for (a v2
 * original's validation window, up to DELIVERY_V2_VALIDATION_SECONDS) is its own queued job, so it
 * never stands for the key's delivery job. Under the key's own name, ingestion and the sweep took it
 * for the job that drains the key (one queued job per name), and new readings of a free key waited
 * for the wake-up, 15 minutes by default.
 */
const WAKE_SUFFIX = '#wake';
