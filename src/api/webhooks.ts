// POST /webhooks/stripe: verifies Stripe's signature on the raw body, then records and applies the
// event in one transaction. 2xx only once the effect is committed; 5xx makes Stripe retry.
import { z } from 'zod';
import type { EventHandlers } from '../billing/handlers.js';
import { assertEventDate, isPoison, recordPoison } from '../billing/poison.js';
import { processStripeEvent } from '../billing/process.js';
import { completeThinEvent } from '../billing/thin-events.js';
import { verifyStripeWebhook, WebhookRejectedError } from '../billing/verify.js';
import { hostTimers } from '../clock.js';
import type { Context } from '../context-type.js';
import { isDatabaseUnavailable, sqlState } from '../db/errors.js';
import { type ReplicationGuard, replicationGuard } from '../db/replication.js';
import { AppError } from '../http/errors.js';
import { documentedRoutes } from '../http/openapi.js';
import type { HttpModule } from '../http/types.js';
import type { WebhookOutcome } from '../observability/metrics.js';

const received = z.object({
  received: z.literal(true),
  /** true when this event id was already applied: nothing changed. */
  duplicate: z.boolean(),
  /** true when the event can never be applied (data Postgres refuses): recorded for the operator, not retried. */
  poison: z.boolean().optional(),
});

export interface WebhookRouteOptions {
  /** Replaces the event handlers (tests inject failures here). */
  handlers?: EventHandlers;
  /** Replaces the wait for the standbys before the 200 (tests inject one that finds a standby behind). */
  replication?: ReplicationGuard;
}

export function webhookRoutes(
  ctx: Pick<Context, 'config' | 'db' | 'log' | 'clock' | 'stripe'>,
  options: WebhookRouteOptions = {},
): HttpModule {
  const log = ctx.log.child({ component: 'webhooks' });
  const routes = documentedRoutes('/webhooks');
  // Stripe never sends an answered event again, so a 200 must not precede the standbys' copy of its
  // effect: with an asynchronous standby a promotion would lose a committed meter error report (its
  // rows stay delivered while Stripe dropped their event: billed less than stored) and nothing would
  // bring it back. The same wait, and bound, as a claim's (DELIVERY_REPLICA_WAIT_MS).
  const replication =
    options.replication ??
    replicationGuard(ctx.db, {
      maxWaitMs: ctx.config.DELIVERY_REPLICA_WAIT_MS,
      timers: hostTimers,
      log,
    });

  /**
   * Throws a 503 with Retry-After (Stripe sends the event again) while a connected standby lacks what
   * this request committed; returns once every one has it, or none is connected.
   */
  const untilOnStandbys = async (event: { id: string; type: string }): Promise<void> => {
    if (await replication.confirm()) return;
    log.warn(
      { eventId: event.id, type: event.type },
      'webhook event committed, but a standby lacks it: answered 503 so that Stripe sends it again (a promotion now would lose it)',
    );
    throw new AppError(
      503,
      'unavailable',
      'the event is recorded but not yet on every standby; Stripe will retry it',
      [],
      { 'Retry-After': '5' },
    );
  };

  const receive =
    (endpoint: 'platform' | 'connect') => async (c: Parameters<Parameters<typeof routes.route>[1]>[0]) => {
      // Each outcome is recorded here, where it is decided; the metrics middleware counts it.
      const decided = (outcome: WebhookOutcome, type = 'unverified') => c.set('webhook', { type, outcome });
      // Until a decision below replaces it: whatever throws unforeseen is a failed delivery.
      decided('failed');
      const [secret, setting] =
        endpoint === 'connect'
          ? [ctx.config.STRIPE_CONNECT_WEBHOOK_SECRET, 'STRIPE_CONNECT_WEBHOOK_SECRET']
          : [ctx.config.STRIPE_WEBHOOK_SECRET, 'STRIPE_WEBHOOK_SECRET'];
      if (!secret) {
        decided('not_configured');
        throw new AppError(503, 'not_configured', `Stripe webhooks are not configured (${setting})`);
      }
      // The signature covers the exact bytes Stripe sent: read them once, verify, only then parse.
      const rawBody = await c.req.text();
      let event: ReturnType<typeof verifyStripeWebhook>;
      try {
        event = verifyStripeWebhook(
          rawBody,
          c.req.header('stripe-signature'),
          secret,
          ctx.clock.now().getTime(),
        );
      } catch (err) {
        if (err instanceof WebhookRejectedError) {
          decided('invalid_signature');
          log.info({ reason: err.reason }, 'webhook rejected');
          throw new AppError(400, 'bad_request', err.message);
        }
        throw err;
      }
      // A Connect endpoint receives connected accounts' events, each naming its account; a
      // platform event arriving there (a misconfigured endpoint) is not applied as one.
      if (endpoint === 'connect' && !event.account) {
        decided('invalid_signature');
        throw new AppError(
          400,
          'bad_request',
          'a Connect webhook event names its connected account (account)',
        );
      }
      // Only a verified event names a label value, and a bounded one.
      const type = event.type.length <= 100 ? event.type : 'unknown';
      try {
        assertEventDate(event);
        // A thin event's data comes from Stripe, fetched before the event's transaction opens.
        event = await completeThinEvent(ctx.stripe, event);
        const result = await processStripeEvent(ctx.db, event, {
          log,
          clock: ctx.clock,
          ...(options.handlers ? { handlers: options.handlers } : {}),
        });
        // A duplicate too: the first delivery's commit may be on the primary alone (its 200 was lost).
        await untilOnStandbys(event);
        decided(result.duplicate ? 'duplicate' : 'processed', type);
        return c.json({ received: true, duplicate: result.duplicate } as const, 200);
      } catch (err) {
        decided('failed', type);
        // The standbys' wait above decided it already (the event is committed: nothing to roll back).
        if (err instanceof AppError) throw err;
        if (isPoison(err)) {
          // Retrying cannot help: keep it for the operator and stop Stripe's three days of resends.
          await recordPoison(ctx.db, event, err);
          // The poison record is all the operator will ever have of this event: a 200 before the
          // standbys have it, then a promotion, and the event is gone with nothing to list or replay.
          await untilOnStandbys(event);
          log.error(
            { eventId: event.id, type: event.type, sqlState: sqlState(err) },
            'webhook event can never be applied; recorded as poison and acknowledged',
          );
          decided('processed', type);
          return c.json({ received: true, duplicate: false, poison: true } as const, 200);
        }
        log.error({ err, eventId: event.id, type: event.type }, 'webhook event failed; rolled back');
        if (isDatabaseUnavailable(err)) throw err;
        throw new AppError(500, 'internal', 'the event could not be processed; Stripe will retry it');
      }
    };

  routes.route(
    {
      method: 'post',
      path: '/webhooks/stripe',
      summary:
        'Stripe webhook receiver. The Stripe-Signature header is verified on the raw body (300 s ' +
        'tolerance); the event id and its effect commit in one transaction, so a redelivery, even a ' +
        'concurrent one, changes nothing. 400: missing/invalid/stale signature or not an event; ' +
        '503: STRIPE_WEBHOOK_SECRET not configured, or the event is committed but a streaming standby ' +
        'does not have it yet (Stripe retries; a resend is a duplicate); 500: processing failed and was rolled back ' +
        '(Stripe retries). An event whose data Postgres can never store (a NUL character, a value out of ' +
        'range) is recorded as poison (GET /admin/webhooks/poison) and answered 200 with poison: true, after ' +
        'the same wait for the standbys (503 until they have the record). ' +
        'Events meterbox does not act on, and checkouts naming no known ' +
        'organization, are recorded and acknowledged with 200.',
      tag: 'billing',
      security: 'stripeSignature',
      responses: { 200: { description: 'event recorded (or already recorded)', schema: received } },
    },
    receive('platform'),
  );

  routes.route(
    {
      method: 'post',
      path: '/webhooks/stripe/connect',
      summary:
        'Stripe Connect webhook receiver: events of connected accounts (each names its `account`), ' +
        'signed with the Connect endpoint’s own secret (STRIPE_CONNECT_WEBHOOK_SECRET; unset: 503). ' +
        'Verified and applied exactly once like POST /webhooks/stripe; an event changes only ' +
        'organizations whose Stripe customer is on that account. 400 also for an event naming no account.',
      tag: 'billing',
      security: 'stripeSignature',
      responses: { 200: { description: 'event recorded (or already recorded)', schema: received } },
    },
    receive('connect'),
  );

  return routes;
}
