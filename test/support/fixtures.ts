// The kit's fixtures for tests, bench and chaos: organizations with an API key (billable or not) and
// sensors, written through the same data functions the admin API uses, plus small request helpers.
import { randomBytes } from 'node:crypto';
import type { Kysely } from 'kysely';
import {
  createOrganization as createOrganizationRow,
  linkSubscription,
} from '../../src/admin/organizations.js';
import type { CliIo } from '../../src/cli/io.js';
import type { DB, SubscriptionStatus } from '../../src/db/schema.js';

export interface OrganizationFixture {
  organizationId: string;
  /** The whole API key, for `Authorization: Bearer`. */
  apiKey: string;
  apiKeyId: string;
  /** The Stripe customer linked to its subscription. */
  customerId: string;
}

/**
 * An organization with one API key and a subscription linked to a Stripe customer. Billable by
 * default (status `active`); `billable: false` gives status `canceled` (a customer, not billed);
 * `status` overrides both.
 */
export async function createOrganization(
  db: Kysely<DB>,
  options: {
    billable?: boolean;
    customerId?: string;
    status?: SubscriptionStatus;
    name?: string;
    /** false: no subscription row at all (never a Stripe customer), as the benchmarks' free tier. */
    subscription?: boolean;
  } = {},
): Promise<OrganizationFixture> {
  const { organization, apiKey } = await db
    .transaction()
    .execute((trx) => createOrganizationRow(trx, { name: options.name ?? 'Test organization' }));
  const customerId = options.customerId ?? `cus_test${randomBytes(6).toString('hex')}`;
  const status = options.status ?? (options.billable === false ? 'canceled' : 'active');
  if (options.subscription !== false) {
    await linkSubscription(db, organization.id, { stripeCustomerId: customerId, status }, new Date());
  }
  return { organizationId: organization.id, apiKey: apiKey.key, apiKeyId: apiKey.id, customerId };
}

/** An organization's or a customer's outbox rows, oldest first. */
export function outboxRowsOf(db: Kysely<DB>, of: { organizationId: string } | { customerId: string }) {
  const [column, value] =
    'organizationId' in of
      ? (['organization_id', of.organizationId] as const)
      : (['stripe_customer_id', of.customerId] as const);
  return db.selectFrom('meter_outbox').selectAll().where(column, '=', value).orderBy('id').execute();
}

/** `count` sensors of the organization (active unless told otherwise); returns their ids in order. */
export async function createSensors(
  db: Kysely<DB>,
  organizationId: string,
  count = 1,
  options: { active?: boolean } = {},
): Promise<string[]> {
  const rows = await db
    .insertInto('sensors')
    .values(
      Array.from({ length: count }, (_, i) => ({
        organization_id: organizationId,
        name: `sensor ${i + 1}`,
        active: options.active ?? true,
      })),
    )
    .returning('id')
    .execute();
  return rows.map((r) => r.id);
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
