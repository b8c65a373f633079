// Webhook endpoints: the operator's receivers of alert events, per event type, each with a secret
// shown once at creation (the admin API and `meterbox webhooks add|list|remove`).
import { randomBytes } from 'node:crypto';
import { type Kysely, sql } from 'kysely';
import { z } from 'zod';
import type { DB } from '../db/schema.js';
import { AppError, notFound } from '../http/errors.js';
import { ALERT_EVENT_TYPES } from './events.js';
import { newEndpointSecret } from './signature.js';

const LOCAL_HOSTS = new Set(['localhost', '127.0.0.1', '[::1]', '::1']);

/** HTTPS, or plain HTTP to this machine only (development and tests). */
export function endpointUrlProblem(value: string): string | undefined {
  let url: URL;
  try {
    url = new URL(value);
  } catch {
    return 'must be an absolute URL';
  }
  if (url.username || url.password) return 'must not carry credentials';
  if (url.protocol === 'https:') return undefined;
  if (url.protocol === 'http:' && LOCAL_HOSTS.has(url.hostname)) return undefined;
  return 'must be https:// (http:// only to localhost)';
}

export const endpointBody = z.object({
  url: z
    .string()
    .max(2048)
    .superRefine((v, c) => {
      const problem = endpointUrlProblem(v);
      if (problem) c.addIssue({ code: 'custom', message: problem });
    })
    .describe('the receiver: https://…, or http://localhost… for development'),
  eventTypes: z
    .array(z.enum([...ALERT_EVENT_TYPES.filter((t) => t !== 'webhook.test'), '*']))
    .min(1)
    .default(['*'])
    .describe('alert types it receives; "*" for every type'),
  description: z.string().max(500).optional(),
});
export type EndpointInput = z.input<typeof endpointBody>;

export const endpointView = z.object({
  id: z.string(),
  url: z.string(),
  eventTypes: z.array(z.string()),
  description: z.string().nullable(),
  createdAt: z.string(),
  pending: z.number().int().describe('deliveries not yet delivered'),
  dead: z.number().int().describe('deliveries that ran out of retries (redrive to resend them)'),
});
export type EndpointView = z.infer<typeof endpointView>;

interface EndpointRow {
  id: string;
  url: string;
  event_types: string[];
  description: string | null;
  created_at: Date;
  pending: number;
  dead: number;
}

const toView = (r: EndpointRow): EndpointView => ({
  id: r.id,
  url: r.url,
  eventTypes: r.event_types,
  description: r.description,
  createdAt: new Date(r.created_at).toISOString(),
  pending: r.pending,
  dead: r.dead,
});

/** Creates an endpoint; the secret is returned here and never again. */
export async function createEndpoint(
  db: Kysely<DB>,
  input: EndpointInput,
): Promise<{ endpoint: EndpointView; secret: string }> {
  const parsed = endpointBody.safeParse(input);
  if (!parsed.success)
    throw new AppError(422, 'validation_failed', 'invalid webhook endpoint', [
      ...parsed.error.issues.map((i) => ({ field: i.path.join('.'), message: i.message })),
    ]);
  const id = `we_${randomBytes(12).toString('hex')}`;
  const secret = newEndpointSecret();
  const types = [...new Set(parsed.data.eventTypes)];
  await sql`INSERT INTO webhook_endpoints (id, url, secret, event_types, description)
            VALUES (${id}, ${parsed.data.url}, ${secret}, ${types}::text[], ${parsed.data.description ?? null})`.execute(
    db,
  );
  const [endpoint] = await listEndpoints(db, id);
  if (!endpoint) throw new Error('createEndpoint: the endpoint vanished');
  return { endpoint, secret };
}

export async function listEndpoints(db: Kysely<DB>, id?: string): Promise<EndpointView[]> {
  const rows = await sql<EndpointRow>`
    SELECT w.id, w.url, w.event_types, w.description, w.created_at,
           (SELECT count(*)::int FROM webhook_deliveries d WHERE d.endpoint_id = w.id AND d.status = 'pending') AS pending,
           (SELECT count(*)::int FROM webhook_deliveries d WHERE d.endpoint_id = w.id AND d.status = 'dead') AS dead
      FROM webhook_endpoints w
     WHERE w.deleted_at IS NULL ${id ? sql`AND w.id = ${id}` : sql``}
     ORDER BY w.created_at, w.id`.execute(db);
  return rows.rows.map(toView);
}

/** Removes an endpoint: nothing more is sent to it; its undelivered deliveries are cancelled. */
export async function removeEndpoint(db: Kysely<DB>, id: string): Promise<void> {
  await db.transaction().execute(async (trx) => {
    const removed = await sql`UPDATE webhook_endpoints SET deleted_at = now()
                               WHERE id = ${id} AND deleted_at IS NULL RETURNING id`.execute(trx);
    if (removed.rows.length === 0) throw notFound('webhook endpoint');
    await sql`UPDATE webhook_deliveries SET status = 'cancelled', leased_until = NULL
               WHERE endpoint_id = ${id} AND status IN ('pending', 'dead')`.execute(trx);
  });
}
