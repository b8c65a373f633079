// Ingestion on a distributed (Citus) database: the requests of ONE shard group written with router
// statements only, each of which Citus sends whole to that group's node (EXPLAIN: Task Count 1, no
// distributed subplan; test/citus/ingest-routing.citus.ts). The single-node statement (single-node.ts
// storeGroup) is one INSERT ... SELECT from its input, which Citus never routes: it computes the input on
// the coordinator and copies the rows to the shards, and a group of several organizations was one
// transaction over their shard groups (a two-phase commit, a party to distributed deadlocks).
//
// Here a transaction touches one shard group (plus pg-boss's job rows, local on the coordinator):
//   1. a look-up of the readings' sensors, joined to the input (router: the sensors of the group's
//      organizations), which also gives each reading's instant as Postgres reads it;
//   2. the billing rows in force (reference tables, read on the coordinator's copy) and their outbox
//      ids (the sequence, on the coordinator);
//   3. the readings, a multi-row VALUES insert in (sensor, instant) order (router);
//   4. the outbox rows of the organizations that stored something new (router);
//   5. the organizations' threshold counts and their crossings' events (reference tables: a transaction
//      that counts into a threshold also writes on every node, like any reference-table write);
//   6. the delivery hand-off (pg-boss, on the coordinator), as on one node.
// The answers and the contract are storeGroup's (readings.ts, the part both share; the cases both pass:
// test/ingest/contract.ts): a request with an unknown or inactive sensor stores nothing and gets its
// problems; one outbox row per billable organization and destination in force, its value the rows that
// organization inserted, each stored reading naming the billing one.
import { type RawBuilder, sql, type Transaction } from 'kysely';
import type { PgBoss } from 'pg-boss';
import { countShardGroupThresholds } from '../alerts/thresholds.js';
import type { DB, Destination } from '../db/schema.js';
import { DESTINATION, ROLE } from '../metering/destinations.js';
import { enqueueDeliveries } from '../metering/outbox.js';
import { answerInsert } from './idempotency.js';
import {
  billingInForce,
  type GroupRequest,
  groupOutcomes,
  keyedRequests,
  problemsByRequest,
  readingColumns,
  type StoreReadingsOutcome,
  traceparentsByOrganization,
  usageKey,
} from './readings.js';

/** Most readings one insert statement carries (six parameters each, under Postgres's 65,535). */
const ROWS_PER_INSERT = 5_000;

interface LookRow {
  req: number;
  n: number;
  sensor: string;
  /** The instant as microseconds since the epoch, as Postgres reads it (text: beyond 2^53). */
  at: string;
  active: boolean | null;
}

interface BillingRow {
  org: string;
  destination: Destination;
  role: string;
  stripe_customer_id: string;
}

/**
 * Writes `requests`, all of organizations in one shard group, in the caller's transaction with router
 * statements (see the file's head). Returns one outcome per request, in order.
 */
export async function storeShardGroup(
  trx: Transaction<DB>,
  boss: PgBoss,
  requests: readonly GroupRequest[],
  now: Date,
): Promise<StoreReadingsOutcome[]> {
  // It stores no answer: a keyed request here would be written and its key left free.
  if (requests.some((r) => r.answer)) throw new Error('storeShardGroup writes no keyed request');
  const { req, org, sensor, recordedAt, temperature, offsets } = readingColumns(requests);
  const orgs = [...new Set(org)].sort();
  // 1. Every reading with its sensor's state (null: not a sensor of the request's organization, which
  // reads "unknown": its existence is never revealed) and its instant as Postgres compares it. Run on
  // the shard group's node, it also makes the transaction's commit there wait for the disk whatever that
  // server's synchronous_commit: a shard move catches up only to WAL already written, so an asynchronous
  // commit just before its switch was lost with the old placement after its requests were answered
  // (docs/architecture.md, "Commits that may be lost"; test/citus/move-commits.citus.ts).
  const look = await sql<LookRow>`
    SELECT i.req, i.n::int AS n, i.sensor_id::text AS sensor,
           ${micros(sql`i.recorded_at`)} AS at, s.active
      FROM unnest(${req}::int[], ${org}::uuid[], ${sensor}::uuid[], ${recordedAt}::timestamptz[])
           WITH ORDINALITY AS i(req, org, sensor_id, recorded_at, n)
      LEFT JOIN (SELECT * FROM sensors WHERE organization_id = ANY(${orgs}::uuid[])) s
        ON s.organization_id = i.org AND s.id = i.sensor_id
     CROSS JOIN (SELECT set_config('synchronous_commit', 'on', true) AS durable) c
     ORDER BY i.n`.execute(trx);

  const problems = problemsByRequest(
    look.rows.filter((row) => row.active !== true),
    offsets,
  );
  // The readings of requests without a problem, in (sensor, instant) order whatever request they came
  // from: concurrent writers take the unique index's locks in one order. Within equal keys the earliest
  // request (then position) comes first, and wins a reading sent twice.
  const ok = look.rows
    .filter((row) => !problems.has(row.req))
    .sort((a, b) => compare(a.sensor, b.sensor) || compareMicros(a.at, b.at) || a.req - b.req || a.n - b.n);
  const winner = new Map<string, number>();
  for (const row of ok) {
    const key = `${row.sensor}|${row.at}`;
    if (!winner.has(key)) winner.set(key, row.req);
  }

  // 2. One row per billable organization and destination in force now, each with its outbox id; the
  // readings name the billing destination's (the others mirror it).
  const okOrgs = [...new Set(ok.map((row) => org[row.n - 1]!))].sort();
  const billing =
    okOrgs.length === 0
      ? []
      : (
          await sql<BillingRow>`
            ${billingInForce(sql`SELECT unnest(${okOrgs}::uuid[])`, now)}
             ORDER BY s.organization_id, ${ROLE} = 'billing' DESC, ${DESTINATION}`.execute(trx)
        ).rows;
  const ids =
    billing.length === 0
      ? []
      : (
          await sql<{ id: string }>`
            SELECT nextval(pg_get_serial_sequence('meter_outbox', 'id'))::text AS id
              FROM generate_series(1, ${billing.length}::int)`.execute(trx)
        ).rows.map((r) => r.id);
  const outboxRows = billing.map((b, i) => ({ ...b, id: ids[i]! }));
  const named = new Map<string, string>();
  for (const b of outboxRows) if (!named.has(b.org)) named.set(b.org, b.id);

  // 3. The readings.
  const inserted = new Map<number, number>();
  const insertedByOrg = new Map<string, number>();
  for (let start = 0; start < ok.length; start += ROWS_PER_INSERT) {
    const rows = ok.slice(start, start + ROWS_PER_INSERT);
    const stored = await trx
      .insertInto('temperature_readings')
      .values(
        rows.map((row) => {
          const i = row.n - 1;
          const organizationId = org[i]!;
          return {
            sensor_id: sensor[i]!,
            recorded_at: recordedAt[i]!,
            organization_id: organizationId,
            temperature_c: temperature[i]!,
            ingested_at: now,
            outbox_id: named.get(organizationId) ?? null,
          };
        }),
      )
      .onConflict((oc) => oc.columns(['sensor_id', 'recorded_at', 'organization_id']).doNothing())
      .returning([
        sql<string>`sensor_id::text`.as('sensor'),
        micros(sql`recorded_at`).as('at'),
        'organization_id',
      ])
      .execute();
    for (const row of stored) {
      const owner = winner.get(`${row.sensor}|${row.at}`);
      if (owner !== undefined) inserted.set(owner, (inserted.get(owner) ?? 0) + 1);
      insertedByOrg.set(row.organization_id, (insertedByOrg.get(row.organization_id) ?? 0) + 1);
    }
  }

  // 4. The outbox rows of the organizations that stored something new.
  const billed = outboxRows.filter((b) => (insertedByOrg.get(b.org) ?? 0) > 0);
  if (billed.length > 0) {
    const traced = traceparentsByOrganization(requests);
    const values = billed.map((b) => {
      const mirrors = named.get(b.org) === b.id ? null : (named.get(b.org) ?? null);
      return sql`(${b.id}::bigint, ${b.org}::uuid, 'temperature_readings', ${b.stripe_customer_id},
                  ${insertedByOrg.get(b.org) ?? 0}, ${now}::timestamptz, ${b.destination}, ${mirrors}::bigint
                  ${traced.size > 0 ? sql`, ${traced.get(b.org) ?? null}::text` : sql``})`;
    });
    await sql`
      INSERT INTO meter_outbox (id, organization_id, event_name, stripe_customer_id, value, occurred_at,
                                destination, mirrors_outbox_id${traced.size > 0 ? sql`, traceparent` : sql``})
      OVERRIDING SYSTEM VALUE
      VALUES ${sql.join(values)}`.execute(trx);
  }

  // 5. What the organizations stored, counted into their thresholds in this transaction, under the
  // threshold rows' locks, and their crossings' events (alerts/thresholds.ts).
  if (insertedByOrg.size > 0) await countShardGroupThresholds(trx, boss, insertedByOrg, now);

  // 6. The hand-off: the queued job's lock runs in its own statement on Citus (a row lock on the local
  // pgboss.job inside a distributed statement came back as a corrupt intermediate result).
  await enqueueDeliveries(
    trx,
    boss,
    billed.map((b) => usageKey(b.org, b.stripe_customer_id, b.destination)),
  );
  return groupOutcomes(requests, problems, inserted);
}

/**
 * An answer for one of a part's keys committed after the part looked its keys up (a concurrent request
 * with the key, in another group or alone): the part's transaction is rolled back and the part written
 * again (GroupCommitter), its look-up then finding that key taken (the route replays that answer).
 */
export class AnswerCommittedMeanwhile extends Error {}

/**
 * storeShardGroup for a part that may hold requests with an Idempotency-Key (one per key: the committer
 * never groups two), in the caller's transaction: a keyed request whose key holds a live answer (a
 * retry, or a concurrent request that committed first) stores nothing, its outcome null (the caller
 * replays that answer); the others are written with the part, and each stored one's answer (201 and
 * its own counts) is inserted in the same transaction, in key order as on one node. Throws
 * AnswerCommittedMeanwhile when one of those answers met a live one. Both statements are router
 * statements of the part's shard group (idempotency_keys is distributed with the organizations).
 */
export async function storeKeyedShardGroup(
  trx: Transaction<DB>,
  boss: PgBoss,
  requests: readonly GroupRequest[],
  now: Date,
): Promise<(StoreReadingsOutcome | null)[]> {
  const { keyed, notBefore } = keyedRequests(requests);
  const live =
    keyed.length === 0
      ? []
      : (
          await sql<{ org: string; key: string }>`
            SELECT organization_id::text AS org, key FROM idempotency_keys
             WHERE organization_id = ANY(${[...new Set(keyed.map((k) => k.r.organizationId))]}::uuid[])
               AND key = ANY(${[...new Set(keyed.map((k) => k.answer.key))]}::text[])
               AND created_at >= ${notBefore}::timestamptz`.execute(trx)
        ).rows;
  const answered = new Set(live.map((row) => `${row.org} ${row.key}`));
  const taken = new Set(
    keyed.filter((k) => answered.has(`${k.r.organizationId} ${k.answer.key}`)).map((k) => k.req),
  );
  const written = requests.flatMap((r, i) => (taken.has(i) ? [] : [{ i, r }]));
  // (A part of retries only has nothing to write.)
  const outcomes =
    written.length === 0
      ? []
      : await storeShardGroup(
          trx,
          boss,
          written.map(({ r }) => ({ ...r, answer: undefined })),
          now,
        );
  const byRequest = new Map(written.map(({ i }, n) => [i, outcomes[n]!]));
  const answers = keyed
    .flatMap((k) => {
      const outcome = byRequest.get(k.req);
      return outcome?.stored
        ? [{ org: k.r.organizationId, key: k.answer.key, hash: k.answer.requestHash, body: outcome.result }]
        : [];
    })
    .sort((a, b) => compare(a.org, b.org) || compare(a.key, b.key));
  if (answers.length > 0) {
    const rows = answers.map(
      (a) =>
        sql`(${a.org}::uuid, ${a.key}::text, ${a.hash}::text, 201, ${JSON.stringify(a.body)}::jsonb, ${now}::timestamptz)`,
    );
    const stored = await sql`${answerInsert(sql`VALUES ${sql.join(rows)}`, notBefore)}`.execute(trx);
    if (stored.rows.length !== answers.length) throw new AnswerCommittedMeanwhile();
  }
  return requests.map((_, i) => byRequest.get(i) ?? null);
}

/**
 * An instant as microseconds since the epoch, in decimal text: with immutable functions only, which
 * Citus requires in a RETURNING clause (extract over a timestamptz is only stable).
 */
const micros = (at: RawBuilder<unknown>) =>
  sql<string>`(extract(epoch FROM (${at}) AT TIME ZONE 'UTC') * 1000000)::bigint::text`;

const compare = (a: string, b: string) => (a < b ? -1 : a > b ? 1 : 0);

/** Microsecond instants as decimal text (negative before 1970), compared as numbers. */
const compareMicros = (a: string, b: string) => {
  const x = BigInt(a);
  const y = BigInt(b);
  return x < y ? -1 : x > y ? 1 : 0;
};
