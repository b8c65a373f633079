// Several real API and worker processes on one database, driven by HTTP load: what the topology
// tests (PgBouncer, SIGTERM during load) share. The lease queries live here, in one place, so a
// change of the lease table (the delivery engine's) is one edit.
import { type Kysely, sql } from 'kysely';
import type { DB } from '../../src/db/schema.js';
import { authHeaders, createOrganization, createSensors, type OrganizationFixture } from './fixtures.js';
import { freePort } from './net.js';
import type { RunningProcess } from './processes.js';

type Env = Record<string, string | undefined>;
type StartProcess = (name: string, extra?: Env) => RunningProcess;

/** Settings that make a loaded run settle in seconds (retries, sweep and leases on short clocks). */
export const FAST_DELIVERY_ENV = {
  DELIVERY_RETRY_DELAY_SECONDS: '1',
  DELIVERY_RETRY_DELAY_MAX_SECONDS: '2',
  DELIVERY_RETRY_LIMIT: '1000',
  DELIVERY_POLL_INTERVAL_SECONDS: '0.5',
  DELIVERY_LEASE_SECONDS: '5',
  SWEEP_INTERVAL_SECONDS: '1',
  SWEEP_STALE_SECONDS: '2',
} as const;

export interface ApiProcess {
  process: RunningProcess;
  url: string;
}

/** Starts an API process on a free port; resolves once it listens. */
export async function startApi(startProcess: StartProcess, extra: Env = {}): Promise<ApiProcess> {
  const port = await freePort();
  // info: the "listening" line is what says it is up.
  const server = startProcess('server', { ...extra, PORT: String(port), LOG_LEVEL: 'info' });
  await server.waitForOutput('meterbox API listening', 90_000);
  return { process: server, url: `http://127.0.0.1:${port}` };
}

/** Starts a worker process; resolves once it has started. */
export async function startWorkerProcess(
  startProcess: StartProcess,
  extra: Env = {},
): Promise<RunningProcess> {
  const worker = startProcess('worker', { ...extra, LOG_LEVEL: 'info' });
  await worker.waitForOutput('worker started', 90_000);
  return worker;
}

export interface LoadOrganization extends OrganizationFixture {
  sensorIds: string[];
}

/** Billable organizations with sensors, each a customer the emulator knows. */
export async function loadOrganizations(
  db: Kysely<DB>,
  emulator: { createCustomer(customer: { id: string }): unknown },
  count: number,
  sensors = 3,
): Promise<LoadOrganization[]> {
  const orgs: LoadOrganization[] = [];
  for (let i = 0; i < count; i++) {
    const org = await createOrganization(db);
    emulator.createCustomer({ id: org.customerId });
    orgs.push({ ...org, sensorIds: await createSensors(db, org.organizationId, sensors) });
  }
  return orgs;
}

export interface LoadResult {
  requests: number;
  readingsSent: number;
  /** Answers by HTTP status. */
  statuses: Record<number, number>;
  /** Requests that got no HTTP answer (connection refused or reset), by target. */
  networkErrors: number;
  /** Each request's latency in ms (answered ones). */
  latenciesMs: number[];
  /** What went wrong, a line per failed request (network error or 5xx), at most 20: for messages. */
  failures: string[];
  /**
   * Every request in order of its start: when it started (ms since the load began), how long it
   * took, its status (0: no HTTP answer) and its Retry-After header.
   */
  timeline: { at: number; ms: number; status: number; retryAfter: string | null }[];
}

/**
 * Posts readings from `concurrency` loops until `until()` says stop, round-robin over the
 * organizations and over the API URLs `targets()` gives at the time (so a stopped process can be
 * taken out). Every reading has its own (sensor, recordedAt), so each one is stored and billed.
 */
export async function driveLoad(options: {
  orgs: readonly LoadOrganization[];
  targets: () => readonly string[];
  until: () => boolean;
  concurrency: number;
  readingsPerRequest: number;
}): Promise<LoadResult> {
  const result: LoadResult = {
    requests: 0,
    readingsSent: 0,
    statuses: {},
    networkErrors: 0,
    latenciesMs: [],
    failures: [],
    timeline: [],
  };
  const failed = (line: string) => {
    if (result.failures.length < 20) result.failures.push(line);
  };
  const base = Date.now();
  const begun = performance.now();
  let seq = 0;
  const loop = async (lane: number) => {
    for (let i = lane; !options.until(); i += options.concurrency) {
      const org = options.orgs[i % options.orgs.length]!;
      const targets = options.targets();
      const target = targets[i % targets.length]!;
      const readings = Array.from({ length: options.readingsPerRequest }, (_, r) => ({
        sensorId: org.sensorIds[r % org.sensorIds.length]!,
        // Unique per request and reading: milliseconds back from the start.
        recordedAt: new Date(base - ++seq).toISOString(),
        temperatureC: 4.2,
      }));
      const started = performance.now();
      try {
        const res = await fetch(`${target}/v1/readings`, {
          method: 'POST',
          headers: authHeaders(org.apiKey),
          body: JSON.stringify({ readings }),
        });
        const text = await res.text();
        if (res.status >= 500) failed(`${target}: ${res.status} ${text.slice(0, 200)}`);
        result.latenciesMs.push(performance.now() - started);
        result.timeline.push({
          at: started - begun,
          ms: performance.now() - started,
          status: res.status,
          retryAfter: res.headers.get('retry-after'),
        });
        result.statuses[res.status] = (result.statuses[res.status] ?? 0) + 1;
        if (res.status === 201) result.readingsSent += readings.length;
      } catch (err) {
        result.networkErrors++;
        result.timeline.push({
          at: started - begun,
          ms: performance.now() - started,
          status: 0,
          retryAfter: null,
        });
        const cause = err instanceof Error ? err.cause : undefined;
        failed(
          `${target}: no answer after ${Math.round(performance.now() - started)} ms: ${String(err)}` +
            (cause instanceof Error ? ` (${cause.message})` : ''),
        );
      }
      result.requests++;
    }
  };
  await Promise.all(Array.from({ length: options.concurrency }, (_, lane) => loop(lane)));
  return result;
}

/**
 * A failure message for the load's expectations: what each failed request got, and the warnings
 * and errors the API processes logged (their reason for a 5xx is there, not in the answer).
 */
export function loadFailures(result: LoadResult, apis: readonly ApiProcess[]): string {
  const logged = apis.flatMap((api) =>
    api.process.output
      .split('\n')
      .filter((line) => /"level":(40|50|60)/.test(line))
      .slice(-10)
      .map((line) => `${api.url} logged: ${line.slice(0, 600)}`),
  );
  return [...result.failures, ...logged].join('\n');
}

/**
 * The longest stretch during which every request that started failed (no answer or 5xx): from the
 * first such request's start to the end of the last one before a request succeeded again (ms).
 */
export function longestFailureWindow(timeline: LoadResult['timeline']): number {
  const ordered = [...timeline].sort((a, b) => a.at - b.at);
  let longest = 0;
  let from: number | undefined;
  let to = 0;
  for (const r of ordered) {
    if (r.status === 0 || r.status >= 500) {
      from ??= r.at;
      to = Math.max(to, r.at + r.ms);
      longest = Math.max(longest, to - from);
    } else from = undefined;
  }
  return Math.round(longest);
}

function percentile(values: number[], p: number): number {
  if (values.length === 0) return 0;
  const sorted = [...values].sort((a, b) => a - b);
  return Math.round(sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))]!);
}

/** What the requests that started within [from, to) (ms since the load began) saw. */
export function loadPhase(timeline: LoadResult['timeline'], from: number, to: number) {
  const within = timeline.filter((r) => r.at >= from && r.at < to);
  const statuses: Record<number, number> = {};
  for (const r of within) statuses[r.status] = (statuses[r.status] ?? 0) + 1;
  const ms = within.map((r) => r.ms);
  return {
    ms: Math.round(to - from),
    requests: within.length,
    statuses,
    p50: percentile(ms, 50),
    p99: percentile(ms, 99),
    max: percentile(ms, 100),
    failureWindowMs: longestFailureWindow(within),
  };
}

/**
 * How often a process logged `msg` (every warning and error when not given), by the logged error's
 * message: what a retried failure was, for a test's printout.
 */
export function loggedErrors(output: string, msg?: string): Record<string, number> {
  const counts: Record<string, number> = {};
  for (const line of output.split('\n')) {
    if (!line.startsWith('{') || (msg !== undefined && !line.includes(msg))) continue;
    try {
      const entry = JSON.parse(line) as { level?: number; msg?: string; err?: { message?: string } };
      if (msg === undefined ? (entry.level ?? 0) < 40 : entry.msg !== msg) continue;
      const message =
        `${msg === undefined ? `${entry.msg}: ` : ''}${entry.err?.message ?? '(no error)'}`.slice(0, 200);
      counts[message] = (counts[message] ?? 0) + 1;
    } catch {
      // not a log line
    }
  }
  return counts;
}

/** Answers of 500 and above. */
export function serverErrors(result: LoadResult): number {
  return Object.entries(result.statuses)
    .filter(([status]) => Number(status) >= 500)
    .reduce((sum, [, n]) => sum + n, 0);
}

/** True once no outbox row is pending or failed. */
export async function outboxSettled(db: Kysely<DB>): Promise<boolean> {
  const { rows } = await sql<{ n: number }>`
    SELECT count(*)::int AS n FROM meter_outbox WHERE status IN ('pending', 'failed')`.execute(db);
  return rows[0]?.n === 0;
}

// --- delivery leases (src/metering/lease-sql.ts, reaper-sql.ts, table meter_delivery_keys) ----------------------

/** The lease owner id prefix of a worker process (WORKER_INSTANCE_ID is `<pid>-<hex>`, a batch adds `:<n>`). */
export const leaseOwnerPrefix = (pid: number) => `${pid}-`;

/**
 * Leases that are live now (expiry in the future), optionally only those of owners starting with
 * `ownerPrefix`, and leases whose expiry lies further ahead than `lifetimeSeconds` (a lease longer
 * than its lifetime).
 */
export async function leaseCheck(
  db: Kysely<DB>,
  lifetimeSeconds: number,
  ownerPrefix?: string,
): Promise<{ live: number; beyondLifetime: number }> {
  const { rows } = await sql<{ live: number; beyond: number }>`
    SELECT count(*) FILTER (WHERE lease_expires_at > clock_timestamp()
                              AND (${ownerPrefix ?? null}::text IS NULL OR starts_with(lease_owner, ${ownerPrefix ?? ''})))::int AS live,
           count(*) FILTER (WHERE lease_expires_at > clock_timestamp() + make_interval(secs => ${lifetimeSeconds}))::int AS beyond
      FROM meter_delivery_keys`.execute(db);
  return { live: rows[0]?.live ?? 0, beyondLifetime: rows[0]?.beyond ?? 0 };
}

/**
 * What the database holds of the keys of `organizationIds`, for a failure's report: each key row (its
 * lease, pacing, backoff and hold), its outbox rows by status, and every pg-boss job that names it (its
 * own meter-delivery jobs by singleton key, and batch jobs listing its customer), oldest first.
 */
export async function keyHistory(db: Kysely<DB>, organizationIds: readonly string[]): Promise<string> {
  if (organizationIds.length === 0) return '[]';
  const { rows: keys } = await sql<Record<string, unknown>>`
    SELECT k.*, clock_timestamp() AS now,
           (SELECT jsonb_object_agg(s.status || coalesce('/' || s.accepted, ''), s.n) FROM (
              SELECT o.status::text, (o.accepted_at IS NOT NULL)::text AS accepted, count(*) AS n FROM meter_outbox o
               WHERE o.organization_id = k.organization_id AND o.stripe_customer_id = k.stripe_customer_id
                 AND o.event_name = k.event_name AND o.destination = k.destination GROUP BY 1, 2) s) AS outbox
      FROM meter_delivery_keys k WHERE k.organization_id = ANY(${[...organizationIds]}::uuid[])`.execute(db);
  const customers = [...new Set(keys.map((k) => String(k.stripe_customer_id)))];
  const { rows: jobs } = await sql<Record<string, unknown>>`
    SELECT j.name, j.id, j.state, j.singleton_key, j.group_id, j.retry_count, j.created_on, j.start_after,
           j.started_on, j.completed_on, j.output
      FROM pgboss.job j
     WHERE (j.name = 'meter-delivery' AND EXISTS (SELECT 1 FROM unnest(${customers}::text[]) c
                                                  WHERE j.singleton_key LIKE '%' || c))
        OR (j.name = 'meter-delivery-batch' AND EXISTS (
              SELECT 1 FROM jsonb_array_elements(j.data->'keys') e WHERE e->>'customerId' = ANY(${customers}::text[])))
     ORDER BY j.created_on`.execute(db);
  return JSON.stringify({ keys, jobs }, null, 1);
}
