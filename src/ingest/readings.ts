// Ingestion's contract, the part both writers share (single-node.ts storeGroup on one node, routed.ts
// storeShardGroup on Citus): what a group of requests is, and how what their statements found becomes each
// request's answer. The contract itself, as cases both writers pass: test/ingest/contract.ts.
import { type RawBuilder, sql } from 'kysely';
import { concatArrays, ELEMENT, float8Array, timestamptzArray, uuidArray } from '../db/binary-arrays.js';
import { BILLABLE_STATUSES, type Destination } from '../db/schema.js';
import {
  billableAt,
  DESTINATION,
  destinationCustomer,
  destinationsJoin,
  inForceAt,
  ROLE,
} from '../metering/destinations.js';
import { type KeyRef, keyRef } from '../metering/rules/keys.js';
import type { KeyedAnswer } from './idempotency.js';
import { commonInstantMs, type Reading, type ReadingsResult, type ReadingsWire } from './schemas.js';

export interface SensorProblem {
  index: number;
  message: string;
}

/** One request's readings, validated, of the organization that sent them. */
export interface GroupRequest {
  organizationId: string;
  readings: readonly Reading[];
  /**
   * The request's trace context (W3C traceparent) while tracing records, else absent: stored on the
   * organization's outbox row (the first request's of a group), so the delivery span joins its trace.
   */
  traceparent?: string | null;
  /**
   * A request with an Idempotency-Key: its answer, stored by the statement that stores its readings
   * (one node, one statement: single-node.ts; Citus, its part's transaction: routed.ts storeKeyedShardGroup).
   * A writer that cannot store it leaves the request unwritten.
   */
  answer?: KeyedAnswer;
  /**
   * The readings' columns as the group statement sends them, encoded while they were validated
   * (parseReadingsFast); absent for a few readings or a body the schema read: readingArrays encodes those.
   */
  wire?: ReadingsWire;
}

export type KeyedRequests = ReturnType<typeof keyedRequests>;

/**
 * A group's keyed requests, one per key (GroupCommitter), and the expiry their answers are read by: both
 * writers look their keys up and store their answers by it (single-node.ts, routed.ts).
 */
export function keyedRequests(requests: readonly GroupRequest[]) {
  const keyed = [...requests.entries()].flatMap(([req, r]) =>
    r.answer ? [{ req, r, answer: r.answer }] : [],
  );
  const keys = new Set(keyed.map(({ r, answer }) => `${r.organizationId} ${answer.key}`));
  if (keys.size !== keyed.length) throw new Error('two requests of one group with the same Idempotency-Key');
  // The earliest request's expiry: an answer live for any of them is live (a request for which it had
  // expired is answered as taken, and its route's look-up, by its own expiry, finds it expired).
  const notBefore = new Date(Math.min(...keyed.map(({ answer }) => answer.notBefore.getTime())));
  return { keyed, notBefore };
}

/** The first traceparent of each organization's requests, in request order (group statements). */
export function traceparentsByOrganization(requests: readonly GroupRequest[]): Map<string, string> {
  const traced = new Map<string, string>();
  for (const r of requests) {
    if (r.traceparent && !traced.has(r.organizationId)) traced.set(r.organizationId, r.traceparent);
  }
  return traced;
}

/**
 * A group's readings as columns (one entry per reading, requests in order), the shape the group's
 * statements take as arrays: `req` is the request's index, `offsets[i]` where request i's readings start.
 */
export function readingColumns(requests: readonly GroupRequest[]) {
  const columns = {
    req: [] as number[],
    org: [] as string[],
    sensor: [] as string[],
    recordedAt: [] as string[],
    temperature: [] as number[],
    offsets: [] as number[],
  };
  requests.forEach((r, i) => {
    columns.offsets.push(columns.req.length);
    for (const reading of r.readings) {
      columns.req.push(i);
      columns.org.push(r.organizationId);
      columns.sensor.push(reading.sensorId);
      columns.recordedAt.push(reading.recordedAt);
      columns.temperature.push(reading.temperatureC);
    }
  });
  return columns;
}

/**
 * An element of a Postgres array literal: as it is when it needs no quotes (ids, instants and numbers as
 * validated readings have them), else quoted and escaped as node-postgres quotes array elements.
 */
function arrayElement(value: string): string {
  return PLAIN_ELEMENT.test(value) && (value.length !== 4 || value.toUpperCase() !== 'NULL')
    ? value
    : `"${value.replace(/\\/g, '\\\\').replace(/"/g, '\\"')}"`;
}
const PLAIN_ELEMENT = /^[0-9A-Za-z:.+-]+$/;

/** A Postgres array literal of `values`, each element as arrayElement writes it, in one pass. */
function arrayLiteral(values: Iterable<string | number>): string {
  let text = '';
  let first = true;
  for (const value of values) {
    text += (first ? '' : ',') + arrayElement(String(value));
    first = false;
  }
  return `{${text}}`;
}

/** `text` of every reading of `requests`, in order: a column's values as text. */
function* readingTexts(requests: readonly GroupRequest[], text: (reading: Reading) => string) {
  for (const r of requests) for (const reading of r.readings) yield text(reading);
}

/**
 * readingColumns as the group statement's parameters, the organization once per request rather than
 * once per reading and no request index per reading. The readings' columns go in Postgres's binary
 * array format (db/binary-arrays.ts) when every value of the column has an exact one (canonical ids,
 * instants in toISOString's form, finite numbers: what the fast parse accepts), else as array literals
 * (text parameters cast to arrays by the statement) built in one pass without node-postgres's
 * per-element quoting and escaping. A request whose readings the fast parse read brings its columns
 * encoded (`wire`): the group's arrays are then their elements joined. For a batch of 500 readings the
 * literals' parsing was most of what the statement paid beyond a plain insert, and the quoting and 500
 * copies of the organization id the API's largest cost after JSON (docs/benchmarks.md). `starts[i]` is
 * the ordinal (from 1) of request i's first reading: a reading's request is
 * `width_bucket(ordinal, starts) - 1`, its organization `orgs[request + 1]`.
 */
export function readingArrays(requests: readonly GroupRequest[]) {
  let orgs = '';
  let starts = '';
  const offsets: number[] = [];
  let n = 0;
  for (const r of requests) {
    offsets.push(n);
    orgs += (orgs === '' ? '' : ',') + arrayElement(r.organizationId);
    starts += (starts === '' ? '' : ',') + String(n + 1);
    n += r.readings.length;
  }
  return {
    starts: `{${starts}}`,
    orgs: `{${orgs}}`,
    ...(requests.some((r) => r.wire) ? joinedColumns(requests) : encodedColumns(requests)),
    offsets,
  };
}

/** The readings' columns of requests none of which brought them encoded: binary when exact, else literals. */
function encodedColumns(requests: readonly GroupRequest[]) {
  const sensors: string[] = [];
  const instants: number[] = [];
  const temperatures: number[] = [];
  for (const r of requests) {
    for (const reading of r.readings) {
      sensors.push(reading.sensorId);
      instants.push(commonInstantMs(reading.recordedAt));
      temperatures.push(reading.temperatureC);
    }
  }
  return {
    sensor: uuidArray(sensors) ?? arrayLiteral(sensors),
    recordedAt: timestamptzArray(instants) ?? arrayLiteral(readingTexts(requests, (x) => x.recordedAt)),
    temperature: float8Array(temperatures) ?? arrayLiteral(temperatures),
  };
}

/** The columns of a group where some requests brought theirs encoded: each request's part, joined. */
function joinedColumns(requests: readonly GroupRequest[]) {
  return {
    sensor: column(
      requests,
      'sensor',
      (rs) => uuidArray(rs.map((x) => x.sensorId)),
      (x) => x.sensorId,
    ),
    recordedAt: column(
      requests,
      'recordedAt',
      (rs) => timestamptzArray(rs.map((x) => commonInstantMs(x.recordedAt))),
      (x) => x.recordedAt,
    ),
    temperature: column(
      requests,
      'temperature',
      (rs) => float8Array(rs.map((x) => x.temperatureC)),
      (x) => String(x.temperatureC),
    ),
  };
}

/**
 * One column of the group's readings: each request's part (its `wire`, else encoded here) joined, or
 * the whole column as an array literal when one part has no exact binary form.
 */
function column(
  requests: readonly GroupRequest[],
  name: keyof ReadingsWire,
  encode: (readings: readonly Reading[]) => Buffer | undefined,
  text: (reading: Reading) => string,
): Buffer | string {
  const parts: Buffer[] = [];
  for (const r of requests) {
    const part = r.wire?.[name] ?? encode(r.readings);
    if (part === undefined) return arrayLiteral(readingTexts(requests, text));
    parts.push(part);
  }
  return concatArrays(COLUMN_ELEMENT[name], parts);
}

const COLUMN_ELEMENT = {
  sensor: ELEMENT.uuid,
  recordedAt: ELEMENT.timestamptz,
  temperature: ELEMENT.float8,
} as const;

/** Either the batch was stored (and billed), or it was refused because of its sensors. */
export type StoreReadingsOutcome =
  | { stored: true; result: ReadingsResult }
  | { stored: false; problems: SensorProblem[] };

/** A reading whose sensor is not an active one of its request's organization: its request and its place in the group (from 1). */
export interface ProblemRow {
  req: number;
  n: number;
  /** The sensor's state: false inactive, null not a sensor of the organization. */
  active: boolean | null;
}

/**
 * Each refused request's problems, by request, in reading order: an inactive sensor, or "unknown" for
 * any other (a sensor of another organization reads "unknown": its existence is never revealed).
 */
export function problemsByRequest(
  rows: Iterable<ProblemRow>,
  offsets: readonly number[],
): Map<number, SensorProblem[]> {
  const problems = new Map<number, SensorProblem[]>();
  for (const row of rows) {
    const list = problems.get(row.req) ?? [];
    list.push({
      index: row.n - 1 - (offsets[row.req] ?? 0),
      message: row.active === false ? 'sensor is inactive' : 'unknown sensor',
    });
    problems.set(row.req, list);
  }
  for (const list of problems.values()) list.sort((a, b) => a.index - b.index);
  return problems;
}

/**
 * Each request's answer: its problems (nothing of it stored), or what it inserted (`inserted`, by request:
 * the readings a request was the first of the group to send and the table did not have) and the rest as
 * duplicates.
 */
export function groupOutcomes(
  requests: readonly GroupRequest[],
  problems: ReadonlyMap<number, SensorProblem[]>,
  inserted: ReadonlyMap<number, number>,
): StoreReadingsOutcome[] {
  return requests.map((r, i): StoreReadingsOutcome => {
    const own = problems.get(i);
    if (own) return { stored: false, problems: own };
    const n = inserted.get(i) ?? 0;
    return { stored: true, result: { inserted: n, duplicates: r.readings.length - n } };
  });
}

/** The delivery key of an outbox row ingestion wrote. */
export function usageKey(organizationId: string, customerId: string, destination: Destination): KeyRef {
  return keyRef({ organizationId, customerId, eventName: 'temperature_readings', destination });
}

/**
 * The rows a group's usage is billed by (SQL): one per billable organization of `organizations` (a query
 * of organization ids, or `{ array }`, an expression of a uuid[] of distinct ids) and destination in force
 * at the usage time `now`, as (org, destination, role, stripe_customer_id) plus the caller's `columns`.
 * The readings name the row of role 'billing'; the rows of other destinations mirror it. The array
 * form looks each organization up by its key; the query's join was planned for ~200 organizations a
 * batch of 500 readings and read every subscription (test/ingest/group-lookups.test.ts); Citus plans
 * the join (no subquery over a reference table's rows).
 */
export function billingInForce(
  organizations: RawBuilder<unknown> | { array: RawBuilder<unknown> },
  now: Date,
  columns = sql``,
) {
  const [from, which] =
    'array' in organizations
      ? [sql``, sql`s.organization_id = ANY(${organizations.array}) AND`]
      : [sql`JOIN (${organizations}) AS o(org) ON o.org = s.organization_id`, sql``];
  return sql`
    SELECT s.organization_id AS org, ${DESTINATION} AS destination, ${ROLE} AS role,
           ${destinationCustomer(DESTINATION, sql`s.stripe_customer_id`, sql`s.organization_id`)} AS stripe_customer_id${columns}
      FROM subscriptions s ${from}
      ${destinationsJoin(sql`s.organization_id`)}
     WHERE ${which} s.status = ANY(${[...BILLABLE_STATUSES]}::text[])
       AND ${billableAt(DESTINATION, sql`s.stripe_customer_id`)} AND ${inForceAt(sql`${now}::timestamptz`)}`;
}
