// Ingestion's group statement on one node (single-node.ts runs it): what a group of requests is written
// by, as one statement. Its head stores the readings (groupHead for a group; loneHead for a request alone,
// leaner: no request or organization per reading), its tail (groupTail) writes the outbox rows, share-locks
// the keys' queued jobs, counts thresholds and, in the form that commits alone, queues the new keys' jobs
// and stores the keyed requests' answers; then one row per fact the caller reads (GroupRow, readRows).
import { sql } from 'kysely';
import { type Crossing, crossingOf, thresholdCountCall, thresholdProbeCte } from '../alerts/thresholds.js';
import { PREPARED } from '../db/prepared.js';
import type { Destination } from '../db/schema.js';
import { lockQueuedDeliveriesAt } from '../metering/outbox.js';
import type { KeyRef } from '../metering/rules/keys.js';
import { answerInsert } from './idempotency.js';
import { queueMissingJobsCtes, regroupGuard } from './queued-in-statement.js';
import {
  billingInForce,
  type GroupRequest,
  type KeyedRequests,
  keyedRequests,
  type ProblemRow,
  readingArrays,
  traceparentsByOrganization,
  usageKey,
} from './readings.js';

/** One row of a group statement's answer: `kind` says which fact (readRows). */
export interface GroupRow {
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
 * Which statement writes a group: `auto`, the lone request's (loneHead) for a group of one unkeyed
 * request of at least LONE_MIN_READINGS readings, else the group's (groupHead); `group` and `lone`
 * force one (`lone` only for one unkeyed request: test/ingest/lone-statement.test.ts holds the two to
 * the same answers and rows, the group-cost bench measures both).
 */
export type StatementShape = 'auto' | 'group' | 'lone';

/**
 * The fewest readings a request alone is written with loneHead. Measured (group-cost bench, two runs):
 * for a batch of 500 it costs Postgres 0.19-0.31 ms less than the group's (about 0.5 us a reading), for
 * a single reading 0.04 ms more (its own few CTEs over one reading); even at about 80 readings.
 */
export const LONE_MIN_READINGS = 100;

/**
 * The group's statement: its head (what is stored: groupHead, or loneHead for a request alone) and the
 * tail both share (groupTail: the outbox rows, the hand-off, thresholds and the answer rows). `atOnce`:
 * the form that commits alone (storeGroupAtOnce), with the new keys' jobs, the keyed requests' answers,
 * and the guard that refuses what one statement cannot do (among them an answer for one of its keys
 * committed while it ran).
 */
export function groupStatement(
  requests: readonly GroupRequest[],
  now: Date,
  atOnce: boolean,
  shape: StatementShape = 'auto',
) {
  // The group's keyed requests, read once for the statement's keyed CTEs and its answers.
  const keyed = atOnce && requests.some((r) => r.answer) ? keyedRequests(requests) : undefined;
  const alone = requests.length === 1 && !keyed;
  if (shape === 'lone' && !alone)
    throw new Error('the lone statement writes one request without an Idempotency-Key');
  const lone =
    shape === 'lone' || (shape === 'auto' && alone && requests[0]!.readings.length >= LONE_MIN_READINGS);
  const { head, offsets } = lone ? loneHead(requests[0]!, now) : groupHead(requests, now, keyed);
  return {
    statement: sql<GroupRow>`${sql.raw(PREPARED)}${head}${groupTail(requests, now, atOnce, keyed)}`,
    offsets,
  };
}

/**
 * The head of a group's statement, its CTEs up to what each request inserted: `input` (every reading with
 * its request and organization), `known` and `problems` (the sensors), `ok` (the readings of requests not
 * refused), `billing` and `named` (billingInForce), `stored` (the insert), `per_org` and `per_request`.
 */
function groupHead(requests: readonly GroupRequest[], now: Date, keyed: KeyedRequests | undefined) {
  const { starts, orgs, sensor, recordedAt, temperature, offsets } = readingArrays(requests);
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
  const head = sql`
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
      ${billingInForce({ array: sql`ARRAY(SELECT DISTINCT org FROM ok)` }, now, NEXT_OUTBOX_ID)}
    ), ${NAMED}, stored AS (
      INSERT INTO temperature_readings
        (sensor_id, recorded_at, organization_id, temperature_c, ingested_at, outbox_id)
      SELECT o.sensor_id, o.recorded_at, o.org, o.temperature_c, ${now}, b.outbox_id
      FROM ok o LEFT JOIN named b ON b.org = o.org
      ORDER BY o.sensor_id, o.recorded_at, o.req, o.n
      ON CONFLICT (sensor_id, recorded_at, organization_id) DO NOTHING
      RETURNING sensor_id, recorded_at, organization_id
    ), ${PER_ORG}, ${perRequest}`;
  return { head, offsets };
}

/**
 * groupHead for one request without an Idempotency-Key and of LONE_MIN_READINGS readings or more (a
 * batch alone in its group): the same CTEs by name and columns, without what only a group
 * needs. The readings are read straight from the arrays (no `input` materialized with a request and an
 * organization per reading); the sensors are checked once each (`bad`: the distinct sensors that are
 * not active ones of the organization), and `problems` reads the readings only for those (none in the
 * common case: the lateral runs once per bad sensor); the request is stored whole or not at all, so the
 * insert is guarded by NOT EXISTS bad (a one-time filter) and names the one organization's row. For a
 * batch of 500, 3-5% less of Postgres's time than the group's statement (docs/benchmarks.md).
 */
function loneHead(request: GroupRequest, now: Date) {
  const { sensor, recordedAt, temperature } = readingArrays([request]);
  const head = sql`
    WITH p AS (
      SELECT ${sensor}::uuid[] AS sensors, ${recordedAt}::timestamptz[] AS instants,
             ${temperature}::float8[] AS temperatures, ${request.organizationId}::uuid AS org
    ), ids AS MATERIALIZED (
      SELECT DISTINCT u.id FROM p, unnest(p.sensors) AS u(id)
    ), known AS (
      -- Locked as groupHead locks them, and for the same reason (a correction's deadlock).
      SELECT s.id, s.organization_id, s.active FROM sensors s
      WHERE s.id = ANY(ARRAY(SELECT id FROM ids))
      FOR KEY SHARE
    ), bad AS (
      -- A sensor of another organization reads "unknown": its existence is never revealed.
      SELECT d.id, k.active FROM ids d
      LEFT JOIN known k ON k.id = d.id AND k.organization_id = (SELECT org FROM p)
      WHERE k.active IS NOT TRUE
    ), problems AS (
      SELECT 0 AS req, r.n, b.active FROM bad b
      CROSS JOIN LATERAL (SELECT u.n FROM p, unnest(p.sensors) WITH ORDINALITY AS u(id, n) WHERE u.id = b.id) r
    ), billing AS (
      ${billingInForce({ array: sql`ARRAY(SELECT org FROM p WHERE NOT EXISTS (SELECT 1 FROM bad))` }, now, NEXT_OUTBOX_ID)}
    ), ${NAMED}, stored AS (
      INSERT INTO temperature_readings
        (sensor_id, recorded_at, organization_id, temperature_c, ingested_at, outbox_id)
      SELECT r.sensor_id, r.recorded_at, p.org, r.temperature_c, ${now}, (SELECT n.outbox_id FROM named n)
      FROM p, unnest(p.sensors, p.instants, p.temperatures) WITH ORDINALITY AS r(sensor_id, recorded_at, temperature_c, n)
      WHERE NOT EXISTS (SELECT 1 FROM bad)
      ORDER BY r.sensor_id, r.recorded_at, r.n
      ON CONFLICT (sensor_id, recorded_at, organization_id) DO NOTHING
      RETURNING organization_id
    ), ${PER_ORG}, per_request AS (
      SELECT 0 AS req, inserted FROM per_org
    )`;
  return { head, offsets: [0] };
}

/** billing's outbox id: a new meter_outbox id per row, taken before the insert so the readings can name it. */
const NEXT_OUTBOX_ID = sql`, nextval(pg_get_serial_sequence('meter_outbox', 'id')) AS outbox_id`;

/** The row the readings name: the billing destination's; its rows at other destinations mirror it. */
const NAMED = sql`named AS (
      SELECT DISTINCT ON (org) org, outbox_id FROM billing ORDER BY org, role = 'billing' DESC, outbox_id
    )`;

/** What each organization inserted (from `stored`). */
const PER_ORG = sql`per_org AS (
      SELECT organization_id AS org, count(*)::int AS inserted FROM stored GROUP BY organization_id
    )`;

/**
 * The tail both heads share, after their CTEs (billing, named, per_org, per_request, problems, and
 * taken when keyed): `outbox` (one row per billable organization that inserted and destination in
 * force), `held` (the keys' queued jobs, share-locked), the threshold probe and count, with `atOnce` the
 * new keys' jobs (queued-in-statement.ts), and with `keyed` the answers; then the answer rows (GroupRow).
 */
function groupTail(
  requests: readonly GroupRequest[],
  now: Date,
  atOnce: boolean,
  keyed: KeyedRequests | undefined,
) {
  // Trace contexts only while tracing records: without them the statement is the one it always was.
  const traced = traceparentsByOrganization(requests);
  const traceColumn = traced.size > 0 ? sql`, traceparent` : sql``;
  const traceValue =
    traced.size > 0
      ? sql`, (SELECT t.tp FROM unnest(${[...traced.keys()]}::uuid[], ${[...traced.values()]}::text[]) AS t(org, tp)
                WHERE t.org = b.org)`
      : sql``;
  const crossedCall = thresholdCountCall(sql`${now}::timestamptz`);
  // A group of two requests or more may name its idle keys in one batch job (queued-in-statement.ts); a
  // request alone keeps the statement without that part (its keys, one or two, get jobs of their own).
  const batchIdle = requests.length >= 2;
  return sql`, outbox AS (
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
      atOnce
        ? sql`, crossed AS (SELECT c.j FROM ${crossedCall} AS c), ${queueMissingJobsCtes(batchIdle)}`
        : sql``
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
    ${regroupGuard(sql`crossed`, batchIdle, keyed ? sql`(SELECT count(*) FROM answered) = (SELECT count(*) FROM answers)` : undefined)}`
        : sql``
    }`;
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
export function readRows(rows: readonly GroupRow[]) {
  const inserted = new Map<number, number>();
  const problemRows: ProblemRow[] = [];
  const customers: KeyRef[] = [];
  const held = new Set<string>();
  const crossings: Crossing[] = [];
  const taken = new Set<number>();
  const queued = { jobs: 0, batchJobs: 0 };
  for (const row of rows) {
    if (row.kind === 'r' && row.req !== null) inserted.set(row.req, row.inserted ?? 0);
    else if (row.kind === 'p' && row.req !== null && row.n !== null)
      problemRows.push({ req: row.req, n: row.n, active: row.active });
    else if (row.kind === 'c' && row.customer && row.org)
      customers.push(usageKey(row.org, row.customer, row.destination ?? 'stripe'));
    else if (row.kind === 'h' && row.customer) held.add(row.customer);
    else if (row.kind === 'x' && row.customer) crossings.push(crossingOf(row.customer));
    else if (row.kind === 'g') {
      queued.jobs = row.inserted ?? 0;
      queued.batchJobs = row.n ?? 0;
    } else if (row.kind === 't' && row.req !== null) taken.add(row.req);
  }
  return { inserted, problemRows, customers, held, crossings, queued, taken };
}
