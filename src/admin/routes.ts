// The admin JSON API under /admin: outbox inspection and retry, dead-letter redrive, meter error
// reports, reconciliation. Guarded as a whole by adminGuard (index.ts).
import { z } from 'zod';
import { listMeterErrorReports } from '../billing/meter-error-reports.js';
import { listPoisonEvents } from '../billing/poison.js';
import type { Context } from '../context-type.js';
import { bigintId } from '../db/input-types.js';
import { AppError } from '../http/errors.js';
import { documentedRoutes } from '../http/openapi.js';
import type { HttpModule } from '../http/types.js';
import { parseBody, parseQuery } from '../http/validate.js';
import {
  deadLetterPreview,
  listOutbox,
  outboxListQuery,
  outboxPage,
  pipelineOverview,
  redriveAndReopen,
  redriveDepsOf,
  redriveReport,
  retryFailed,
  retrySelection,
} from './outbox.js';
import { reconcile, reconcileQuery, reconciliationReport } from './reconcile.js';

const retryResult = z.object({
  retried: z.number().int().describe('failed rows put back to pending'),
  jobs: z.number().int().describe('delivery jobs queued (one per customer and meter)'),
  ...redriveReport,
});

const deadLetterView = z.object({
  total: z.number().int(),
  destinations: z.array(z.object({ name: z.string(), count: z.number().int() })),
  unroutable: z.number().int(),
});

const redriveBody = z.object({
  limit: z.number().int().min(1).max(10_000).default(1000),
  /** Settle groups past their identifier window against the destination's own totals first. */
  reconcile: z.boolean().default(false),
});
const redriveResult = z.object({
  moved: z.number().int().describe('dead-lettered jobs moved back to meter-delivery'),
  retried: z.number().int().describe('failed rows of those customers and meters put back to pending'),
  ...redriveReport,
});

const poisonQuery = z.object({ limit: z.coerce.number().int().min(1).max(500).default(100) });
const poisonList = z.object({
  events: z.array(
    z.object({
      eventId: z.string(),
      eventType: z.string(),
      errorCode: z.string().nullable(),
      error: z.string(),
      payload: z.string(),
      receivedAt: z.string(),
      deliveries: z.number().int(),
    }),
  ),
});
const meterErrorsQuery = z.object({
  limit: z.coerce.number().int().min(1).max(500).default(50),
  before: bigintId('must be the nextBefore of a previous page').optional(),
});
const meterErrorsPage = z.object({
  reports: z.array(
    z.object({
      id: z.string(),
      eventId: z.string(),
      meterId: z.string().nullable(),
      livemode: z.boolean(),
      stripeCreated: z.string(),
      summary: z.string().nullable(),
      errorCount: z.number().int().nullable(),
      errorTypes: z.array(z.unknown()).nullable(),
      validationStart: z.string().nullable(),
      validationEnd: z.string().nullable(),
      receivedAt: z.string(),
    }),
  ),
  nextBefore: z.string().nullable(),
});

const overview = z.object({
  counts: z.object({ pending: z.number(), failed: z.number(), expired: z.number() }),
  deliveredLastHour: z.number(),
  oldestPendingAt: z.string().nullable(),
  oldestPendingSeconds: z.number().nullable(),
  deliveredPerMinute: z.array(z.object({ minute: z.string(), rows: z.number(), value: z.number() })),
  deadLetterJobs: z.number(),
});

type AdminDeps = Pick<
  Context,
  'db' | 'boss' | 'stripe' | 'metronome' | 'config' | 'clock' | 'log' | 'distributed'
>;

export function adminRoutes(ctx: AdminDeps): HttpModule {
  const routes = documentedRoutes('/admin');

  routes.route(
    {
      method: 'get',
      path: '/admin/overview',
      summary:
        'Pipeline overview: unfinished rows by status, oldest pending, deliveries per minute (last hour)',
      tag: 'admin',
      security: 'admin',
      responses: { 200: { description: 'overview', schema: overview } },
    },
    async (c) => {
      const o = await pipelineOverview(ctx.db, ctx.boss, ctx.clock.now());
      return c.json({
        ...o,
        oldestPendingAt: o.oldestPendingAt?.toISOString() ?? null,
        deliveredPerMinute: o.deliveredPerMinute.map((b) => ({ ...b, minute: b.minute.toISOString() })),
      });
    },
  );

  routes.route(
    {
      method: 'get',
      path: '/admin/outbox',
      summary: 'List outbox rows, newest first, filtered by status, organization, meter and created_at range',
      tag: 'admin',
      security: 'admin',
      query: outboxListQuery,
      responses: { 200: { description: 'one page', schema: outboxPage } },
    },
    async (c) => c.json(await listOutbox(ctx.db, parseQuery(c, outboxListQuery))),
  );

  routes.route(
    {
      method: 'post',
      path: '/admin/outbox/retry',
      summary:
        "Put failed rows back to pending and queue their delivery (by ids, organization, meter, or all). Groups past their destination's identifier window are refused and listed; with reconcile: true they are first compared with the destination's own totals (present: delivered; missing: resent under a new identifier; ambiguous: left failed)",
      tag: 'admin',
      security: 'admin',
      body: retrySelection,
      responses: { 200: { description: 'rows retried', schema: retryResult } },
    },
    async (c) => {
      const selection = await parseBody(c, retrySelection);
      const deps = selection.reconcile ? await redriveDepsOf(ctx) : undefined;
      const result = await retryFailed(ctx.db, ctx.boss, selection, undefined, deps);
      ctx.log.info({ ...result, selection }, 'admin: failed outbox rows retried');
      return c.json(result);
    },
  );

  routes.route(
    {
      method: 'get',
      path: '/admin/dead-letter',
      summary: 'Preview the meter-delivery dead-letter queue (what a redrive would move)',
      tag: 'admin',
      security: 'admin',
      responses: { 200: { description: 'preview', schema: deadLetterView } },
    },
    async (c) => c.json(await deadLetterPreview(ctx.boss)),
  );

  routes.route(
    {
      method: 'post',
      path: '/admin/dead-letter/redrive',
      summary:
        'Move dead-lettered delivery jobs back and put their failed rows back to pending (groups past their identifier window: refused and listed, or reconciled first with reconcile: true)',
      tag: 'admin',
      security: 'admin',
      body: redriveBody,
      responses: { 200: { description: 'redriven', schema: redriveResult } },
    },
    async (c) => {
      const { limit, reconcile } = await parseBody(c, redriveBody);
      const result = await redriveAndReopen(ctx.db, ctx.boss, limit, {
        reconcile,
        ...(reconcile ? { deps: await redriveDepsOf(ctx) } : {}),
      });
      ctx.log.info(result, 'admin: dead-letter queue redriven');
      return c.json(result);
    },
  );

  routes.route(
    {
      method: 'get',
      path: '/admin/meter-errors',
      summary: "Stripe's meter error reports (events rejected after a 200), newest first",
      tag: 'admin',
      security: 'admin',
      query: meterErrorsQuery,
      responses: { 200: { description: 'one page', schema: meterErrorsPage } },
    },
    async (c) => {
      const query = parseQuery(c, meterErrorsQuery);
      const page = await listMeterErrorReports(ctx.db, query);
      return c.json({
        nextBefore: page.nextBefore,
        reports: page.reports.map((r) => ({
          ...r,
          stripeCreated: r.stripeCreated.toISOString(),
          validationStart: r.validationStart?.toISOString() ?? null,
          validationEnd: r.validationEnd?.toISOString() ?? null,
          receivedAt: r.receivedAt.toISOString(),
        })),
      });
    },
  );

  routes.route(
    {
      method: 'get',
      path: '/admin/webhooks/poison',
      summary:
        'Webhook events that can never be applied (data Postgres refuses), recorded and acknowledged so ' +
        'Stripe stops resending them; newest first',
      tag: 'admin',
      security: 'admin',
      query: poisonQuery,
      responses: { 200: { description: 'poison events', schema: poisonList } },
    },
    async (c) => {
      const { limit } = parseQuery(c, poisonQuery);
      const events = await listPoisonEvents(ctx.db, limit);
      return c.json({ events: events.map((e) => ({ ...e, receivedAt: e.receivedAt.toISOString() })) });
    },
  );

  routes.route(
    {
      method: 'get',
      path: '/admin/reconciliation',
      summary:
        "Per organization: readings stored vs usage delivered/pending/failed/expired and the drift; Stripe's own totals with stripe=true",
      tag: 'admin',
      security: 'admin',
      query: reconcileQuery,
      responses: { 200: { description: 'report', schema: reconciliationReport } },
    },
    async (c) => {
      const query = parseQuery(c, reconcileQuery);
      if (query.stripe && !ctx.stripe) {
        throw new AppError(
          503,
          'not_configured',
          'STRIPE_SECRET_KEY is not configured: Stripe totals unavailable',
        );
      }
      const report = await reconcile(ctx, query, {
        organizationId: query.organizationId,
        withStripe: query.stripe,
      });
      return c.json(report);
    },
  );

  return routes;
}
