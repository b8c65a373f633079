// Ingestion on one node: a group of requests (group-commit.ts) written in ONE statement, in autocommit
// with the new keys' jobs queued by the statement itself (storeGroupAtOnce), or in a transaction with
// the hand-off after it (storeGroup). The contract holds per transaction: one meter_outbox row per
// billable organization and destination in force (organization_destinations, read in the same
// statement), its value the rows that organization inserted, each of those readings naming the billing
// one (outbox_id; the others mirror it), and the delivery hand-off once per transaction and delivery key
// (readings.ts; its cases: test/ingest/contract.ts). A distributed database takes routed.ts's router
// statements instead.
import { type Kysely, sql, type Transaction } from 'kysely';
import type { PgBoss } from 'pg-boss';
import {
  type Crossing,
  crossingOf,
  thresholdCountCall,
  thresholdProbeCte,
  writeCrossings,
} from '../alerts/thresholds.js';
import { sqlState } from '../db/errors.js';
import { PREPARED } from '../db/prepared.js';
import type { DB, Destination } from '../db/schema.js';
import { enqueueDeliveries, lockQueuedDeliveriesAt } from '../metering/outbox.js';
import type { KeyRef } from '../metering/rules/keys.js';
import { answerInsert, type KeyedAnswer } from './idempotency.js';
import { queueMissingJobsCtes, REGROUP_STATE, regroupGuard } from './queued-in-statement.js';
import {
  billingInForce,
  type GroupRequest,
  groupOutcomes,
  type KeyedRequests,
  keyedRequests,
  type ProblemRow,
  problemsByRequest,
  readingArrays,
  type StoreReadingsOutcome,
  traceparentsByOrganization,
  usageKey,
} from './readings.js';

interface GroupRow {
  kind: 'r' | 'p' | 'c' | 'h' | 'x' | 'g' | 't';
  req: number | null;
  inserted: number | null;
  n: number | null;
  active: boolean | null;
  customer: string | null;
  destination: Destination | null;
  org: string | null;
}

/**
 * Writes a group of validated requests in the caller's transaction with one statement, then hands
 * the new outbox rows to delivery (once per delivery key). The statement also share-locks the keys'
 * already queued delivery jobs (lockQueuedDeliveries), so in the steady state, where every key has
 * one, a group is BEGIN, one statement and COMMIT. With INGEST_GROUP_ONE_STATEMENT=on the group committer first
 * tries storeGroupAtOnce (one statement, no transaction of its own) and comes here when that one refused. Rows are inserted in (sensor, instant)
 * order whatever request they came from, so concurrent groups take row locks in one order and cannot
 * deadlock; within a group the earliest request wins a reading sent twice. One node: Citus routes no
 * INSERT ... SELECT, and a distributed database takes storeShardGroup's router statements (routed.ts)
 * once per shard group instead.
 */
export async function storeGroup(
  trx: Transaction<DB>,
  boss: PgBoss,
  requests: readonly GroupRequest[],
  now: Date,
): Promise<StoreReadingsOutcome[]> {
  // Its statement stores no answer: a keyed request here would be written and its key left free.
  if (requests.some((r) => r.answer)) throw new Error('storeGroup writes no keyed request');
  const { statement, offsets } = groupStatement(requests, now, false);
  const found = readRows((await statement.execute(trx)).rows);
  await enqueueDeliveries(trx, boss, found.customers, found.held);
  if (found.crossings.length > 0) await writeCrossings(trx, boss, found.crossings, now);
  return groupOutcomes(requests, problemsByRequest(found.problemRows, offsets), found.inserted);
}

/**
 * storeGroup as ONE statement in autocommit, its own transaction: the statement also inserts the new
 * keys' delivery jobs (queued-in-statement.ts) and the answers of the group's keyed requests, so a group
 * is one round trip where storeGroup's is four (BEGIN, the statement, pg-boss's insert, COMMIT). A keyed
 * request whose key holds a live answer stores nothing: its outcome is null (the caller replays that
 * answer). When the group needs more than one statement (a new key's job refused by a concurrent one, a
 * threshold crossed, an answer for one of its keys committed while it ran) it fails with REGROUP_STATE
 * and stores nothing: the caller writes it with storeGroup in a transaction.
 */
export async function storeGroupAtOnce(
  db: Kysely<DB>,
  requests: readonly GroupRequest[],
  now: Date,
): Promise<{ outcomes: (StoreReadingsOutcome | null)[]; queued: number }> {
  const { statement, offsets } = groupStatement(requests, now, true);
  const found = readRows((await statement.execute(db)).rows);
  const outcomes = groupOutcomes(requests, problemsByRequest(found.problemRows, offsets), found.inserted);
  return { outcomes: outcomes.map((o, req) => (found.taken.has(req) ? null : o)), queued: found.queued };
}

/**
 * A request with an Idempotency-Key as ONE statement in autocommit: storeGroupAtOnce's statement for a
 * group of one that also stores the request's answer (201 and its counts; nothing when the request is
 * refused), so the answer commits with the readings as in the transaction path, in one round trip
 * instead of four (BEGIN, the statement, the answer's insert, COMMIT). Null when the statement refused and
 * stored nothing: a live answer for the key exists (a concurrent request with the key committed first),
 * a new key's job was refused or a threshold crossed; the caller writes the request in a transaction.
 * (With group commit, keyed requests are written in groups: storeGroupOnOneNode.)
 */
export async function storeKeyedAtOnce(
  db: Kysely<DB>,
  request: GroupRequest,
  now: Date,
  answer: KeyedAnswer,
): Promise<{ outcome: StoreReadingsOutcome; queued: number } | null> {
  try {
    const { outcomes, queued } = await storeGroupAtOnce(db, [{ ...request, answer }], now);
    return outcomes[0] ? { outcome: outcomes[0], queued } : null;
  } catch (err) {
    if (sqlState(err) !== REGROUP_STATE) throw err;
    return null;
  }
}

/** How a group that stored was written: meterbox_ingest_groups_total's `written` (docs/operations.md). */
export type GroupWritten = 'one_statement' | 'regrouped' | 'transaction' | 'routed';

/**
 * A group on one node: with `oneStatement`, ONE statement in autocommit (storeGroupAtOnce, one round
 * trip), or, when the group needs more than one statement (that statement refused to commit alone and
 * stored nothing), storeGroup's transaction; without, storeGroup's transaction. A keyed request is written
 * only by the one statement, which stores its answer: in the transaction its outcome is null, not
 * written (the caller writes it alone, storing its answer or replaying the one stored). `queued`: the
 * delivery jobs the one statement queued, whose workers the caller wakes (delivery-wake.ts); a
 * transaction's insert wakes them itself.
 */
export async function storeGroupOnOneNode(
  db: Kysely<DB>,
  boss: PgBoss,
  group: readonly GroupRequest[],
  now: Date,
  oneStatement: boolean,
): Promise<{ outcomes: (StoreReadingsOutcome | null)[]; written: GroupWritten; queued: number }> {
  const inTransaction = async (written: GroupWritten) => {
    const unkeyed = group.filter((r) => !r.answer);
    const stored =
      unkeyed.length > 0 ? await db.transaction().execute((trx) => storeGroup(trx, boss, unkeyed, now)) : [];
    let next = 0;
    return { outcomes: group.map((r) => (r.answer ? null : stored[next++]!)), written, queued: 0 };
  };
  if (!oneStatement) return inTransaction('transaction');
  try {
    return { ...(await storeGroupAtOnce(db, group, now)), written: 'one_statement' };
  } catch (err) {
    if (sqlState(err) !== REGROUP_STATE) throw err;
    return inTransaction('regrouped');
  }
}

/**
 * The group's statement. `atOnce`: the form that commits alone (storeGroupAtOnce), with the new keys'
 * jobs, the keyed requests' answers, and the guard that refuses what one statement cannot do (among
 * them an answer for one of its keys committed while it ran).
 */
function groupStatement(requests: readonly GroupRequest[], now: Date, atOnce: boolean) {
  // The group's keyed requests, read once for the statement's keyed CTEs and its answers.
  const keyed = atOnce && requests.some((r) => r.answer) ? keyedRequests(requests) : undefined;
  const { starts, orgs, sensor, recordedAt, temperature, offsets } = readingArrays(requests);
  // Trace contexts only while tracing records: without them the statement is the one it always was.
  const traced = traceparentsByOrganization(requests);
  const traceColumn = traced.size > 0 ? sql`, traceparent` : sql``;
  const traceValue =
    traced.size > 0
      ? sql`, (SELECT t.tp FROM unnest(${[...traced.keys()]}::uuid[], ${[...traced.values()]}::text[]) AS t(org, tp)
                WHERE t.org = b.org)`
      : sql``;
  // What each request inserted. When no two requests of the group are one organization's (the common
  // case: a batch alone, single readings of many organizations), a request's count is its
  // organization's (per_org); else the rows stored are matched to the request that sent them first
  // (winners), a sort and a join of every reading of the group.
  const perRequest =
    new Set(requests.map((r) => r.organizationId)).size === requests.length
      ? sql`per_request AS (
      SELECT (o.i - 1)::int AS req, p.inserted
      FROM unnest(${orgs}::uuid[]) WITH ORDINALITY AS o(org, i) JOIN per_org p ON p.org = o.org
    )`
      : sql`winners AS (
      SELECT DISTINCT ON (o.sensor_id, o.recorded_at) o.req, o.sensor_id, o.recorded_at
      FROM ok o ORDER BY o.sensor_id, o.recorded_at, o.req, o.n
    ), per_request AS (
      SELECT w.req, count(*)::int AS inserted
      FROM stored s JOIN winners w ON w.sensor_id = s.sensor_id AND w.recorded_at = s.recorded_at
      GROUP BY w.req
    )`;
  // A prepared statement (src/db/prepared.ts): one of a few fixed texts, whatever the group (arrays, not lists).
  const crossedCall = thresholdCountCall(sql`${now}::timestamptz`);
  const statement = sql<GroupRow>`${sql.raw(PREPARED)}
    WITH input AS MATERIALIZED (
      SELECT q.req, (${orgs}::uuid[])[q.req + 1] AS org, r.sensor_id, r.recorded_at, r.temperature_c, r.n
      FROM unnest(${sensor}::uuid[], ${recordedAt}::timestamptz[], ${temperature}::float8[])
             WITH ORDINALITY AS r(sensor_id, recorded_at, temperature_c, n),
           LATERAL (SELECT width_bucket(r.n, ${starts}::bigint[]) - 1 AS req) q
    ), known AS (
      -- The distinct sensors as one array: index look-ups, where IN (input) was planned for ~500
      -- sensors a batch and hashed the whole table (test/ingest/group-lookups.test.ts). Key-share locked
      -- here, before anything is written: the readings' foreign-key check takes the same lock at the
      -- statement's end, after the group's new delivery jobs are queued, and a correction holding the
      -- sensors FOR UPDATE then queuing the same key's job waited for the group's job while the group
      -- waited for it (a deadlock; test/ingest/one-statement.test.ts). Now the group waits first.
      SELECT s.id, s.organization_id, s.active FROM sensors s
      WHERE s.id = ANY(ARRAY(SELECT DISTINCT sensor_id FROM input))
      FOR KEY SHARE
    ), problems AS (
      -- A sensor of another organization reads "unknown": its existence is never revealed.
      SELECT i.req, i.n, k.active FROM input i
      LEFT JOIN known k ON k.id = i.sensor_id AND k.organization_id = i.org
      WHERE k.active IS NOT TRUE
    ), ${keyed ? keyedCtes(keyed) : sql``}ok AS (
      -- Uncorrelated (NOT IN over a non-null column), which Citus also plans.
      SELECT i.* FROM input i WHERE i.req NOT IN (SELECT p.req FROM problems p)${
        keyed ? sql` AND i.req NOT IN (SELECT t.req FROM taken t)` : sql``
      }
    ), billing AS (
      ${billingInForce({ array: sql`ARRAY(SELECT DISTINCT org FROM ok)` }, now, sql`, nextval(pg_get_serial_sequence('meter_outbox', 'id')) AS outbox_id`)}
    ), named AS (
      -- The row the readings name: the billing destination's; its rows at other destinations mirror it.
      SELECT DISTINCT ON (org) org, outbox_id FROM billing ORDER BY org, role = 'billing' DESC, outbox_id
    ), stored AS (
      INSERT INTO temperature_readings
        (sensor_id, recorded_at, organization_id, temperature_c, ingested_at, outbox_id)
      SELECT o.sensor_id, o.recorded_at, o.org, o.temperature_c, ${now}, b.outbox_id
      FROM ok o LEFT JOIN named b ON b.org = o.org
      ORDER BY o.sensor_id, o.recorded_at, o.req, o.n
      ON CONFLICT (sensor_id, recorded_at, organization_id) DO NOTHING
      RETURNING sensor_id, recorded_at, organization_id
    ), per_org AS (
      SELECT organization_id AS org, count(*)::int AS inserted FROM stored GROUP BY organization_id
    ), ${perRequest}, outbox AS (
      INSERT INTO meter_outbox (id, organization_id, event_name, stripe_customer_id, value, occurred_at,
                                destination, mirrors_outbox_id${traceColumn})
      OVERRIDING SYSTEM VALUE
      SELECT b.outbox_id, b.org, 'temperature_readings', b.stripe_customer_id, p.inserted, ${now},
             b.destination, nullif(n.outbox_id, b.outbox_id)${traceValue}
      FROM per_org p JOIN billing b ON b.org = p.org JOIN named n ON n.org = b.org
      RETURNING organization_id, stripe_customer_id, destination
    ), held AS (
      ${lockQueuedDeliveriesAt('temperature_readings', sql`SELECT stripe_customer_id, destination FROM billing`)}
    ), ${thresholdProbeCte(sql`per_org`)}${
      atOnce ? sql`, crossed AS (SELECT c.j FROM ${crossedCall} AS c), ${queueMissingJobsCtes()}` : sql``
    }${keyed ? sql`, ${answeredCtes(keyed, now)}` : sql``}
    SELECT 'r' AS kind, req, inserted, NULL::int AS n, NULL::boolean AS active, NULL::text AS customer,
           NULL::text AS destination, NULL::uuid AS org
      FROM per_request
    UNION ALL
    SELECT 'p', req, NULL, n::int, active, NULL, NULL, NULL FROM problems
    UNION ALL${
      keyed
        ? sql`
    SELECT 't', req, NULL, NULL, NULL, NULL, NULL, NULL FROM taken
    UNION ALL`
        : sql``
    }
    SELECT 'c', NULL, NULL, NULL, NULL, stripe_customer_id, destination, organization_id FROM outbox
    UNION ALL
    SELECT 'h', NULL, NULL, NULL, NULL, key, NULL, NULL FROM held
    UNION ALL
    -- What the organizations of the group that have thresholds stored, counted into them: their crossings.
    SELECT 'x', NULL, NULL, NULL, NULL, c.j, NULL, NULL FROM ${atOnce ? sql`crossed` : crossedCall} AS c${
      atOnce
        ? sql`
    UNION ALL
    ${regroupGuard(sql`crossed`, keyed ? sql`(SELECT count(*) FROM answered) = (SELECT count(*) FROM answers)` : undefined)}`
        : sql``
    }`;
  return { statement, offsets };
}

/**
 * `keyed`: the group's keyed requests; `taken`, those whose key holds a live answer (a retry, or a
 * concurrent request with the key that committed first): nothing of them is stored (`ok` leaves them
 * out) and the caller replays that answer.
 */
function keyedCtes({ keyed, notBefore }: KeyedRequests) {
  return sql`keyed AS (
      SELECT * FROM unnest(${keyed.map((k) => k.req)}::int[], ${keyed.map((k) => k.r.organizationId)}::uuid[],
                           ${keyed.map((k) => k.answer.key)}::text[], ${keyed.map((k) => k.answer.requestHash)}::text[],
                           ${keyed.map((k) => k.r.readings.length)}::int[]) AS a(req, org, key, hash, readings)
    ), taken AS (
      SELECT k.req FROM keyed k
       WHERE EXISTS (SELECT 1 FROM idempotency_keys i
                      WHERE i.organization_id = k.org AND i.key = k.key AND i.created_at >= ${notBefore}::timestamptz)
    ), `;
}

/**
 * `answers`: the answer of each keyed request of the group that is neither taken nor refused (a refused
 * request stores nothing, its answer neither), its counts the request's own (per_request: inserted, the
 * rest duplicates, as groupOutcomes answers); `answered`, their insert (idempotency.ts answerInsert: an
 * expired answer for a key is replaced, a live one kept). The guard refuses the statement when any was
 * kept: an answer committed after the statement's snapshot (`taken` did not see it). One request per key
 * in a group: an upsert cannot touch one row twice.
 */
function answeredCtes({ notBefore }: KeyedRequests, now: Date) {
  // In key order, as concurrent groups then take the keys' index entries: two groups with the same two
  // keys (two clients' retries) wait on each other in one order, not in a cycle.
  const rows = sql`SELECT org, key, hash, 201, body, ${now}::timestamptz FROM answers ORDER BY org, key`;
  return sql`answers AS (
      SELECT a.org, a.key, a.hash,
             jsonb_build_object('inserted', coalesce(p.inserted, 0), 'duplicates', a.readings - coalesce(p.inserted, 0)) AS body
        FROM keyed a LEFT JOIN per_request p ON p.req = a.req
       WHERE a.req NOT IN (SELECT q.req FROM problems q) AND a.req NOT IN (SELECT t.req FROM taken t)
    ), answered AS (${answerInsert(rows, notBefore)})`;
}

/** What a group statement's rows say, by kind (GroupRow). */
function readRows(rows: readonly GroupRow[]) {
  const inserted = new Map<number, number>();
  const problemRows: ProblemRow[] = [];
  const customers: KeyRef[] = [];
  const held = new Set<string>();
  const crossings: Crossing[] = [];
  const taken = new Set<number>();
  let queued = 0;
  for (const row of rows) {
    if (row.kind === 'r' && row.req !== null) inserted.set(row.req, row.inserted ?? 0);
    else if (row.kind === 'p' && row.req !== null && row.n !== null)
      problemRows.push({ req: row.req, n: row.n, active: row.active });
    else if (row.kind === 'c' && row.customer && row.org)
      customers.push(usageKey(row.org, row.customer, row.destination ?? 'stripe'));
    else if (row.kind === 'h' && row.customer) held.add(row.customer);
    else if (row.kind === 'x' && row.customer) crossings.push(crossingOf(row.customer));
    else if (row.kind === 'g') queued = row.inserted ?? 0;
    else if (row.kind === 't' && row.req !== null) taken.add(row.req);
  }
  return { inserted, problemRows, customers, held, crossings, queued, taken };
}
