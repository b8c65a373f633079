// The kit's fixtures for tests and chaos: organizations with an API key and sensors (shared with the
// benchmarks: scripts/lib/fixtures.ts), outbox rows, plus small request helpers.
import { type Kysely, sql } from 'kysely';
import { expect } from 'vitest';
import type { CliIo } from '../../src/cli/io.js';
import type { DB } from '../../src/db/schema.js';

export { createOrganization, createSensors, type OrganizationFixture } from '../../scripts/lib/fixtures.js';

/** An organization's or a customer's outbox rows, oldest first. */
export function outboxRowsOf(db: Kysely<DB>, of: { organizationId: string } | { customerId: string }) {
  const [column, value] =
    'organizationId' in of
      ? (['organization_id', of.organizationId] as const)
      : (['stripe_customer_id', of.customerId] as const);
  return db.selectFrom('meter_outbox').selectAll().where(column, '=', value).orderBy('id').execute();
}

/**
 * The queued delivery jobs naming an organization's keys of `eventName`, one entry a job a key, in key
 * order: its own meter-delivery jobs and the meter-delivery-batch jobs that list it (a one-statement
 * group's idle keys, src/ingest/queued-in-statement.ts). `data` is the key's payload as the job holds it.
 */
export async function queuedDeliveries(
  db: Kysely<DB>,
  organizationId: string,
  eventName = 'temperature_readings',
): Promise<{ key: string; data: Record<string, string> }[]> {
  const { rows } = await sql<{ key: string; data: Record<string, string> }>`
    SELECT concat_ws(':', k->>'destination', k->>'eventName', k->>'customerId') AS key, k AS data
      FROM pgboss.job j
     CROSS JOIN LATERAL (SELECT j.data WHERE j.name = 'meter-delivery'
                         UNION ALL
                         SELECT e FROM jsonb_array_elements(CASE WHEN j.name = 'meter-delivery-batch'
                                                                 THEN j.data->'keys' END) e) AS x(k)
     WHERE j.name IN ('meter-delivery', 'meter-delivery-batch') AND j.state IN ('created', 'retry')
       AND k->>'organizationId' = ${organizationId} AND k->>'eventName' = ${eventName}
     ORDER BY 1`.execute(db);
  return rows;
}

/** Headers for a JSON request with an API key (or admin token). */
export function authHeaders(token: string, extra: Record<string, string> = {}): Record<string, string> {
  return { authorization: `Bearer ${token}`, 'content-type': 'application/json', ...extra };
}

/** A reading for POST /v1/readings, recorded `secondsAgo` before `now`. */
export function reading(
  sensorId: string,
  secondsAgo: number,
  temperatureC = 4.2,
  now = new Date(),
): { sensorId: string; recordedAt: string; temperatureC: number } {
  return { sensorId, recordedAt: new Date(now.getTime() - secondsAgo * 1000).toISOString(), temperatureC };
}

/** Anything with Hono's `request` (an app built by createApp). */
interface Requester {
  request(path: string, init?: RequestInit): Response | Promise<Response>;
}

/**
 * One POST /v1/readings of `count` readings of `sensorId` at 5 °C, recorded at `base` + (`startAt` + i)
 * seconds; expects 201 and returns its answer.
 */
export async function postReadingsAt(
  app: Requester,
  apiKey: string,
  sensorId: string,
  count: number,
  base: Date,
  startAt = 0,
): Promise<{ inserted: number; duplicates: number }> {
  const readings = Array.from({ length: count }, (_, i) => ({
    sensorId,
    recordedAt: new Date(base.getTime() + (startAt + i) * 1000).toISOString(),
    temperatureC: 5,
  }));
  const res = await app.request('/v1/readings', {
    method: 'POST',
    headers: authHeaders(apiKey),
    body: JSON.stringify({ readings }),
  });
  expect(res.status).toBe(201);
  return (await res.json()) as { inserted: number; duplicates: number };
}

/**
 * Signs in to the dashboard with the admin token; the session cookie to send (`name=value`).
 * Expects the sign-in to succeed (303 to the dashboard).
 */
export async function signIn(app: Requester, token: string): Promise<string> {
  const res = await app.request('/admin/login', {
    method: 'POST',
    headers: { 'content-type': 'application/x-www-form-urlencoded' },
    body: new URLSearchParams({ token }).toString(),
  });
  if (res.status !== 303) throw new Error(`sign-in answered ${res.status}, expected 303`);
  return (res.headers.get('set-cookie') ?? '').split(';')[0]!;
}

/** A CLI io that keeps what a command prints: stdout lines and stderr (a terminal when `tty`). */
export function memoryIo(tty = false): CliIo & { stdout: string; stderr: string } {
  const io = {
    stdout: '',
    stderr: '',
    out: (text: string) => {
      io.stdout += `${text}\n`;
    },
    err: {
      isTTY: tty,
      columns: 80,
      write: (chunk: string) => {
        io.stderr += chunk;
        return true;
      },
    },
  };
  return io;
}
