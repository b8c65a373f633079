// Delivery of alert events to webhook endpoints: one `alert-delivery` job drains one endpoint's
// deliveries of one order key (an organization) in event order. Per delivery: claim the key's head
// under a lease (committed before the call, so no connection or lock is held across it), POST the
// stored body signed for this attempt, settle. A failure throws: pg-boss retries the job with
// exponential backoff and dead-letters it after WEBHOOK_RETRY_LIMIT retries, and the head delivery
// becomes `dead`, holding the key's later deliveries (order per organization) until it is redriven.
import { type Kysely, sql } from 'kysely';
import type { JobWithMetadata, PgBoss } from 'pg-boss';
import type { Config } from '../config.js';
import type { DB } from '../db/schema.js';
import { notFound } from '../http/errors.js';
import type { Logger } from '../log.js';
import type { QueuePayload } from '../metering/queues.js';
import { type DeliveryKey, enqueueAlertDeliveries, writeAlertEvents } from './events.js';
import { SIGNATURE_HEADER, signatureHeader } from './signature.js';

export interface AlertDeliveryDeps {
  db: Kysely<DB>;
  boss: PgBoss;
  config: Pick<Config, 'WEBHOOK_TIMEOUT_MS'>;
  log: Logger;
  /** The HTTP call (tests may wrap it); Node's fetch by default. */
  fetch?: typeof fetch;
}

interface Claimed {
  id: string;
  attempts: number;
  event_id: string;
  body: string;
  url: string;
  secret: string;
}

/** What one attempt came to. */
export interface AttemptOutcome {
  deliveryId: string;
  eventId: string;
  ok: boolean;
  status: number | null;
  error: string | null;
}

/**
 * The lease of an attempt in flight: never shorter than the call (its timeout), plus half of it and a
 * second for the claim's commit and the settle.
 */
export const leaseMs = (config: Pick<Config, 'WEBHOOK_TIMEOUT_MS'>) =>
  Math.ceil(config.WEBHOOK_TIMEOUT_MS * 1.5) + 1000;

/**
 * Claims the key's head delivery for one attempt: the oldest event not yet delivered, when it is
 * pending and no live lease holds it (a dead head holds the key: nothing is claimed). The head is
 * locked while it is chosen, so two workers never claim the same attempt; the lease, committed with
 * the attempt count, keeps the next claim off it while the call is in flight.
 */
async function claimHead(db: Kysely<DB>, key: DeliveryKey, lease: number): Promise<Claimed | undefined> {
  const result = await sql<Claimed>`
    WITH head AS (
      SELECT d.id, d.status, d.leased_until FROM webhook_deliveries d
       WHERE d.endpoint_id = ${key.endpointId} AND d.order_key = ${key.orderKey}
         AND d.status IN ('pending', 'dead')
       ORDER BY d.event_seq LIMIT 1
       FOR UPDATE
    )
    UPDATE webhook_deliveries d
       SET attempts = d.attempts + 1, last_attempt_at = now(),
           leased_until = now() + make_interval(secs => ${lease / 1000})
      FROM head, alert_events e, webhook_endpoints w
     WHERE d.id = head.id AND head.status = 'pending'
       AND (head.leased_until IS NULL OR head.leased_until < now())
       AND e.seq = d.event_seq AND w.id = d.endpoint_id AND w.deleted_at IS NULL
    RETURNING d.id::text, d.attempts, e.id AS event_id, e.payload::text AS body, w.url, w.secret`.execute(db);
  return result.rows[0];
}

async function settle(
  db: Kysely<DB>,
  claimed: Claimed,
  outcome: { ok: boolean; status: number | null; error: string | null; durationMs: number; dead: boolean },
): Promise<void> {
  const status = outcome.ok ? 'delivered' : outcome.dead ? 'dead' : 'pending';
  await sql`
    WITH attempt AS (
      INSERT INTO webhook_attempts (delivery_id, attempt, http_status, error, duration_ms)
      VALUES (${claimed.id}, ${claimed.attempts}, ${outcome.status}, ${outcome.error}, ${outcome.durationMs})
      ON CONFLICT (delivery_id, attempt) DO NOTHING
    )
    UPDATE webhook_deliveries
       SET status = ${status}, leased_until = NULL, last_status = ${outcome.status},
           last_error = ${outcome.error}, delivered_at = ${outcome.ok ? sql`now()` : sql`NULL`}
     WHERE id = ${claimed.id} AND attempts = ${claimed.attempts} AND status = 'pending'`.execute(db);
}

/** One signed POST of a delivery's stored body. */
async function post(
  deps: AlertDeliveryDeps,
  claimed: Claimed,
): Promise<{ ok: boolean; status: number | null; error: string | null }> {
  const timestamp = Math.floor(Date.now() / 1000);
  try {
    const res = await (deps.fetch ?? fetch)(claimed.url, {
      method: 'POST',
      redirect: 'manual',
      signal: AbortSignal.timeout(deps.config.WEBHOOK_TIMEOUT_MS),
      headers: {
        'content-type': 'application/json',
        'user-agent': 'meterbox-webhooks/1',
        'meterbox-event-id': claimed.event_id,
        [SIGNATURE_HEADER]: signatureHeader(claimed.secret, claimed.body, timestamp),
      },
      body: claimed.body,
    });
    // The receiver's body is not needed; reading it frees the connection.
    await res.arrayBuffer().catch(() => undefined);
    if (res.status >= 200 && res.status < 300) return { ok: true, status: res.status, error: null };
    return { ok: false, status: res.status, error: `HTTP ${res.status}` };
  } catch (err) {
    const cause = (err as { cause?: { code?: string; message?: string } }).cause;
    const message = cause?.code ?? cause?.message ?? (err instanceof Error ? err.message : String(err));
    return { ok: false, status: null, error: message.slice(0, 500) };
  }
}

/**
 * Delivers the key's deliveries in order until it is drained, another worker holds its head, or an
 * attempt fails. `lastChance`: this job has no retry left, so a failing head becomes dead.
 * Returns the attempts made; the last one failed when its `ok` is false.
 */
export async function deliverKey(
  deps: AlertDeliveryDeps,
  key: DeliveryKey,
  options: { lastChance: boolean; maxDeliveries?: number },
): Promise<AttemptOutcome[]> {
  const outcomes: AttemptOutcome[] = [];
  const lease = leaseMs(deps.config);
  for (let n = 0; n < (options.maxDeliveries ?? 1000); n++) {
    const claimed = await claimHead(deps.db, key, lease);
    if (!claimed) break;
    const started = performance.now();
    const result = await post(deps, claimed);
    const durationMs = Math.round(performance.now() - started);
    await settle(deps.db, claimed, { ...result, durationMs, dead: !result.ok && options.lastChance });
    outcomes.push({ deliveryId: claimed.id, eventId: claimed.event_id, ...result });
    if (!result.ok) {
      deps.log.warn(
        {
          endpointId: key.endpointId,
          orderKey: key.orderKey,
          eventId: claimed.event_id,
          attempt: claimed.attempts,
          error: result.error,
          dead: options.lastChance,
        },
        options.lastChance
          ? 'webhook delivery dead-lettered'
          : 'webhook delivery failed; retried with backoff',
      );
      break;
    }
  }
  return outcomes;
}

export class WebhookAttemptFailed extends Error {
  constructor(readonly outcome: AttemptOutcome) {
    super(`webhook delivery ${outcome.deliveryId} (${outcome.eventId}) failed: ${outcome.error}`);
    this.name = 'WebhookAttemptFailed';
  }
}

/** The `alert-delivery` handler: a failed attempt fails the job, so pg-boss retries it with backoff. */
export async function runAlertDeliveryJob(
  deps: AlertDeliveryDeps,
  job: JobWithMetadata<QueuePayload<'alert-delivery'>>,
): Promise<void> {
  const outcomes = await deliverKey(deps, job.data, { lastChance: job.retryCount >= job.retryLimit });
  const last = outcomes.at(-1);
  if (last && !last.ok) throw new WebhookAttemptFailed(last);
}

/**
 * Queues a job for every key whose head is pending, unleased (or its lease expired), with no job
 * waiting and none active for longer than a lease: deliveries whose job was lost (a worker killed
 * during the call, a redrive) are sent again, with their event ids unchanged.
 */
export async function sweepAlertDeliveries(
  db: Kysely<DB>,
  boss: PgBoss,
  config: Pick<Config, 'WEBHOOK_TIMEOUT_MS'>,
): Promise<number> {
  const lease = leaseMs(config) / 1000;
  const stranded = await sql<{ endpoint_id: string; order_key: string }>`
    SELECT DISTINCT d.endpoint_id, d.order_key
      FROM webhook_deliveries d JOIN webhook_endpoints w ON w.id = d.endpoint_id AND w.deleted_at IS NULL
     WHERE d.status = 'pending' AND (d.leased_until IS NULL OR d.leased_until < now())
       AND NOT EXISTS (
         SELECT 1 FROM pgboss.job j
          WHERE j.name = 'alert-delivery' AND j.singleton_key = d.endpoint_id || '/' || d.order_key
            AND (j.state IN ('created', 'retry')
                 OR (j.state = 'active' AND j.started_on > now() - make_interval(secs => ${lease}))))
     LIMIT 1000`.execute(db);
  if (stranded.rows.length === 0) return 0;
  await db.transaction().execute((trx) =>
    enqueueAlertDeliveries(
      trx,
      boss,
      stranded.rows.map((r) => ({ endpointId: r.endpoint_id, orderKey: r.order_key })),
    ),
  );
  return stranded.rows.length;
}

/** Dead deliveries (of one endpoint, or all) back to pending, and their keys queued again. */
export async function redriveDeliveries(
  db: Kysely<DB>,
  boss: PgBoss,
  options: { endpointId?: string } = {},
): Promise<number> {
  return db.transaction().execute(async (trx) => {
    const rows = await sql<{ endpoint_id: string; order_key: string }>`
      UPDATE webhook_deliveries SET status = 'pending', leased_until = NULL
       WHERE status = 'dead' ${options.endpointId ? sql`AND endpoint_id = ${options.endpointId}` : sql``}
      RETURNING endpoint_id, order_key`.execute(trx);
    await enqueueAlertDeliveries(
      trx,
      boss,
      rows.rows.map((r) => ({ endpointId: r.endpoint_id, orderKey: r.order_key })),
    );
    return rows.rows.length;
  });
}

export interface DeliveryView {
  id: string;
  eventId: string;
  type: string;
  organizationId: string | null;
  endpointId: string;
  status: string;
  attempts: number;
  lastStatus: number | null;
  lastError: string | null;
  createdAt: string;
  lastAttemptAt: string | null;
  deliveredAt: string | null;
}

/** The newest deliveries (of one endpoint or organization), with their attempt counts and last outcome. */
export async function listDeliveries(
  db: Kysely<DB>,
  options: { endpointId?: string; organizationId?: string; status?: string; limit?: number } = {},
): Promise<DeliveryView[]> {
  const rows = await sql<{
    id: string;
    event_id: string;
    type: string;
    organization_id: string | null;
    endpoint_id: string;
    status: string;
    attempts: number;
    last_status: number | null;
    last_error: string | null;
    created_at: Date;
    last_attempt_at: Date | null;
    delivered_at: Date | null;
  }>`
    SELECT d.id::text, e.id AS event_id, e.type, e.organization_id, d.endpoint_id, d.status, d.attempts,
           d.last_status, d.last_error, d.created_at, d.last_attempt_at, d.delivered_at
      FROM webhook_deliveries d JOIN alert_events e ON e.seq = d.event_seq
     WHERE true
       ${options.endpointId ? sql`AND d.endpoint_id = ${options.endpointId}` : sql``}
       ${options.organizationId ? sql`AND e.organization_id = ${options.organizationId}` : sql``}
       ${options.status ? sql`AND d.status = ${options.status}` : sql``}
     ORDER BY d.id DESC LIMIT ${options.limit ?? 100}`.execute(db);
  const iso = (d: Date | null) => (d ? new Date(d).toISOString() : null);
  return rows.rows.map((r) => ({
    id: r.id,
    eventId: r.event_id,
    type: r.type,
    organizationId: r.organization_id,
    endpointId: r.endpoint_id,
    status: r.status,
    attempts: r.attempts,
    lastStatus: r.last_status,
    lastError: r.last_error,
    createdAt: new Date(r.created_at).toISOString(),
    lastAttemptAt: iso(r.last_attempt_at),
    deliveredAt: iso(r.delivered_at),
  }));
}

/**
 * `meterbox webhooks test`: a signed `webhook.test` event to one endpoint, through the outbox like any
 * other (listed with its attempts; a failed attempt is retried by the worker), attempted once at once.
 */
export async function sendTestEvent(
  deps: AlertDeliveryDeps,
  endpointId: string,
  now: Date,
): Promise<{ eventId: string; attempt: AttemptOutcome | undefined }> {
  const [eventId] = await deps.db.transaction().execute(async (trx) => {
    const exists =
      await sql`SELECT 1 FROM webhook_endpoints WHERE id = ${endpointId} AND deleted_at IS NULL`.execute(trx);
    if (exists.rows.length === 0) return [];
    return writeAlertEvents(
      trx,
      deps.boss,
      [
        {
          organizationId: null,
          type: 'webhook.test',
          data: { message: 'a test event from meterbox', endpoint_id: endpointId },
        },
      ],
      now,
      endpointId,
    );
  });
  if (!eventId) throw notFound('webhook endpoint');
  const [attempt] = await deliverKey(
    deps,
    { endpointId, orderKey: eventId },
    { lastChance: false, maxDeliveries: 1 },
  );
  return { eventId, attempt };
}
