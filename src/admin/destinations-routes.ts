// Admin API for an organization's destinations (issue 34): where its usage goes over time, the
// changes (set, start-parallel, cut-over: each at the hour boundary it answers) and the parity report.
import type { Context as HonoContext } from 'hono';
import { z } from 'zod';
import type { Context } from '../context-type.js';
import { DESTINATIONS } from '../db/schema.js';
import { AppError, notFound } from '../http/errors.js';
import { documentedRoutes } from '../http/openapi.js';
import type { AppEnv, HttpModule } from '../http/types.js';
import { parseBody, parseQuery } from '../http/validate.js';
import {
  cutOver,
  DestinationChangeError,
  type IntervalView,
  listIntervals,
  prepareDestination,
  setDestination,
  startParallel,
} from './destinations.js';
import { type ParityReport, parityOf } from './parity.js';
import { type PeriodParityReport, periodParityOf, startPeriodMigration } from './period-migration.js';

type Deps = Pick<Context, 'db' | 'stripe' | 'metronome' | 'config' | 'clock' | 'log'>;

const interval = z.object({
  destination: z.enum(DESTINATIONS),
  role: z.enum(['billing', 'shadow']),
  from: z.string().nullable().describe('usage time the interval starts at (an hour boundary); null: always'),
  until: z.string().nullable().describe('usage time it ends at; null: open'),
});
const intervalsView = z.object({ intervals: z.array(interval) });

const changeBody = z.discriminatedUnion('action', [
  z.object({ action: z.literal('set'), destination: z.enum(DESTINATIONS) }),
  z.object({
    action: z.literal('start-parallel'),
    destination: z.enum(DESTINATIONS),
    cutOver: z
      .enum(['hour', 'period-end'])
      .default('hour')
      .describe(
        "hour: cut over later with action cut-over; period-end: Stripe's runbook, the cut-over stored for the end of the first Stripe billing period the parallel run covers whole (the Metronome customer unbillable until then)",
      ),
  }),
  z.object({ action: z.literal('cut-over') }),
]);
const changeView = z.object({
  at: z.string().describe('the hour boundary (usage time) the change takes effect at'),
  unchanged: z.boolean(),
  intervals: z.array(interval),
  periodMigration: z
    .object({
      subscriptionId: z.string(),
      shadowFrom: z.string(),
      periodStart: z.string().describe('the billing period compared (both destinations invoice it)'),
      periodEnd: z.string(),
      cutOverAt: z.string().describe('usage from this instant bills to the new destination'),
      aligned: z
        .boolean()
        .describe("false: Stripe's period does not end on an hour; the hour boundary before it"),
      metronomeCustomerId: z.string(),
    })
    .optional()
    .describe('start-parallel with cutOver period-end only'),
});

const periodParityView = z.object({
  organizationId: z.string(),
  migration: z.object({
    from: z.enum(DESTINATIONS),
    to: z.enum(DESTINATIONS),
    subscriptionId: z.string(),
    shadowFrom: z.string(),
    periodStart: z.string(),
    periodEnd: z.string(),
    cutOverAt: z.string(),
  }),
  rows: z.array(
    z.object({
      kind: z.enum(['partial', 'compared', 'after']),
      periodStart: z.string(),
      periodEnd: z.string(),
      destination: z.enum(DESTINATIONS),
      role: z.enum(['billing', 'shadow', 'ended']),
      expected: z.number(),
      reported: z.number().nullable(),
      drift: z.number().nullable(),
      invoiceTotal: z.number().nullable().describe('cents, where the API gives one'),
      invoiceStatus: z.string().nullable(),
      billable: z.string().nullable(),
    }),
  ),
  totals: z.object({
    stripe: z.number().nullable(),
    metronome: z.number().nullable(),
    agree: z.boolean().nullable(),
  }),
  exact: z.boolean(),
});

const parityQuery = z.object({ hours: z.coerce.number().int().min(1).max(840).default(24) });
const parityView = z.object({
  organizationId: z.string(),
  from: z.string(),
  to: z.string(),
  exact: z.boolean().describe('every destination matches stored − voided in every hour'),
  rows: z.array(
    z.object({
      hour: z.string(),
      destination: z.enum(DESTINATIONS),
      role: z.enum(['billing', 'shadow']),
      expected: z.number().describe('readings stored in the hour, less those voided'),
      delivered: z.number().describe('what the outbox delivered there for the hour'),
      reported: z.number().nullable().describe("the destination's own usage query; null: not asked"),
      drift: z.number().nullable().describe('reported − expected; 0 exact'),
    }),
  ),
});

const uuid = z.uuid();
function organizationParam(c: HonoContext<AppEnv>): string {
  const parsed = uuid.safeParse(c.req.param('id'));
  if (!parsed.success) throw notFound('organization');
  return parsed.data;
}

const intervalJson = (i: IntervalView) => ({
  destination: i.destination,
  role: i.role,
  from: i.from?.toISOString() ?? null,
  until: i.until?.toISOString() ?? null,
});

const periodParityJson = (r: PeriodParityReport) => ({
  organizationId: r.organizationId,
  migration: {
    ...r.migration,
    shadowFrom: r.migration.shadowFrom.toISOString(),
    periodStart: r.migration.periodStart.toISOString(),
    periodEnd: r.migration.periodEnd.toISOString(),
    cutOverAt: r.migration.cutOverAt.toISOString(),
  },
  rows: r.rows.map((row) => ({
    ...row,
    periodStart: row.periodStart.toISOString(),
    periodEnd: row.periodEnd.toISOString(),
  })),
  totals: r.totals,
  exact: r.exact,
});

export const parityJson = (r: ParityReport) => ({
  organizationId: r.organizationId,
  from: r.from.toISOString(),
  to: r.to.toISOString(),
  exact: r.exact,
  rows: r.rows.map((row) => ({ ...row, hour: row.hour.toISOString() })),
});

/** The hours up to the end of the current one: what the parity report covers. */
export function parityPeriod(now: Date, hours: number): { from: Date; to: Date } {
  const to = new Date(Math.ceil((now.getTime() + 1) / 3_600_000) * 3_600_000);
  return { from: new Date(to.getTime() - hours * 3_600_000), to };
}

export function destinationRoutes(ctx: Deps): HttpModule {
  const routes = documentedRoutes('/admin');

  routes.route(
    {
      method: 'get',
      path: '/admin/organizations/{id}/destinations',
      summary: "Where the organization's usage goes, as intervals of usage time (billing and shadow)",
      tag: 'admin',
      security: 'admin',
      responses: { 200: { description: 'intervals', schema: intervalsView } },
    },
    async (c) => c.json({ intervals: (await listIntervals(ctx.db, organizationParam(c))).map(intervalJson) }),
  );

  routes.route(
    {
      method: 'post',
      path: '/admin/organizations/{id}/destinations',
      summary:
        'Change where the usage goes, at the next hour boundary: set (one destination alone), start-parallel (a second one in shadow), cut-over (the shadow becomes the billing one)',
      tag: 'admin',
      security: 'admin',
      body: changeBody,
      responses: { 200: { description: 'the change', schema: changeView } },
    },
    async (c) => {
      const organizationId = organizationParam(c);
      const body = await parseBody(c, changeBody);
      const now = ctx.clock.now();
      try {
        if (body.action === 'start-parallel' && body.cutOver === 'period-end') {
          const started = await startPeriodMigration(ctx, organizationId, body.destination);
          const { change } = started;
          ctx.log.info(
            { organizationId, ...body, at: change.at, cutOverAt: change.plan.cutOverAt },
            'admin: period-boundary migration',
          );
          return c.json({
            at: change.at.toISOString(),
            unchanged: change.unchanged === true,
            intervals: change.intervals.map(intervalJson),
            periodMigration: {
              subscriptionId: started.period.subscriptionId,
              shadowFrom: change.plan.shadowFrom.toISOString(),
              periodStart: change.plan.periodStart.toISOString(),
              periodEnd: change.plan.periodEnd.toISOString(),
              cutOverAt: change.plan.cutOverAt.toISOString(),
              aligned: change.plan.aligned,
              metronomeCustomerId: started.metronomeCustomer.id,
            },
          });
        }
        if (body.action !== 'cut-over') await prepareDestination(ctx, organizationId, body.destination);
        const change =
          body.action === 'set'
            ? await setDestination(ctx.db, organizationId, body.destination, { now })
            : body.action === 'start-parallel'
              ? await startParallel(ctx.db, organizationId, body.destination, { now })
              : await cutOver(ctx.db, organizationId, { now });
        ctx.log.info({ organizationId, ...body, at: change.at }, 'admin: destination change');
        return c.json({
          at: change.at.toISOString(),
          unchanged: change.unchanged === true,
          intervals: change.intervals.map(intervalJson),
        });
      } catch (err) {
        if (err instanceof DestinationChangeError) throw new AppError(409, 'conflict', err.message);
        throw err;
      }
    },
  );

  routes.route(
    {
      method: 'get',
      path: '/admin/organizations/{id}/parity',
      summary:
        "Parity per hour and destination: readings stored − voided against each destination's own usage query (Stripe's hourly meter event summaries, Metronome's POST /v1/usage by hour)",
      tag: 'admin',
      security: 'admin',
      query: parityQuery,
      responses: { 200: { description: 'the report', schema: parityView } },
    },
    async (c) => {
      const { hours } = parseQuery(c, parityQuery);
      const report = await parityOf(ctx, organizationParam(c), parityPeriod(ctx.clock.now(), hours));
      return c.json(parityJson(report));
    },
  );

  routes.route(
    {
      method: 'get',
      path: '/admin/organizations/{id}/period-parity',
      summary:
        "A period-boundary migration's parity per billing period: usage per destination against its own usage query, and both invoice totals for the period compared (`destinations parity --period`)",
      tag: 'admin',
      security: 'admin',
      responses: {
        200: { description: 'the report', schema: periodParityView },
        409: { description: 'the organization has no period-boundary migration' },
      },
    },
    async (c) => {
      try {
        return c.json(periodParityJson(await periodParityOf(ctx, organizationParam(c))));
      } catch (err) {
        if (err instanceof DestinationChangeError) throw new AppError(409, 'conflict', err.message);
        throw err;
      }
    },
  );

  return routes;
}
