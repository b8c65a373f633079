// The operator dashboard at /admin: the overview page, server-rendered with hono/jsx (no front-end
// build), plain forms for retry and redrive, so it works without JavaScript and on a phone. Its
// parts: the shell (dashboard-page.tsx), formatters (dashboard-format.ts), cards and charts
// (dashboard-charts.tsx), tables (dashboard-tables.tsx); its routes (dashboard-routes.tsx).
import type { Context as HonoContext } from 'hono';
import { z } from 'zod';
import { listMeterErrorReports } from '../billing/meter-error-reports.js';
import { listPoisonEvents } from '../billing/poison.js';
import type { Context } from '../context-type.js';
import { pgInstant } from '../db/input-types.js';
import type { AppEnv } from '../http/types.js';
import { AlertsPanel } from './alerts-panel.js';
import { BacklogChart, Card, DeliveryChart } from './dashboard-charts.js';
import { fmtAge, fmtNum, fmtTime } from './dashboard-format.js';
import { Page } from './dashboard-page.js';
import { FailedTable, MeterErrorsTable, PoisonTable, ReconciliationTable } from './dashboard-tables.js';
import { DestinationsPanel } from './destinations-panel.js';
import { listOutbox, pipelineOverview } from './outbox.js';
import { reconcile } from './reconcile.js';
import { ReconciliationPanel } from './reconciliation-panel.js';
import { StripeAccountPanel } from './stripe-account-panel.js';

export type DashboardDeps = Pick<
  Context,
  'db' | 'boss' | 'stripe' | 'metronome' | 'config' | 'clock' | 'log' | 'distributed'
>;

export const periodQuery = z.object({
  from: pgInstant('from')
    .or(z.iso.datetime({ local: true }))
    .optional(),
  to: pgInstant('to')
    .or(z.iso.datetime({ local: true }))
    .optional(),
  stripe: z.literal('1').optional(),
  flash: z.string().max(200).optional(),
  error: z.string().max(200).optional(),
});

/** datetime-local inputs carry no zone: the dashboard shows and reads UTC throughout. */
function parseInstant(v: string | undefined): Date | undefined {
  if (!v) return undefined;
  const d = new Date(/[zZ]|[+-]\d\d:?\d\d$/.test(v) ? v : `${v}Z`);
  return Number.isNaN(d.getTime()) ? undefined : d;
}

export async function dashboard(ctx: DashboardDeps, c: HonoContext<AppEnv>): Promise<Response> {
  const parsed = periodQuery.safeParse(c.req.query());
  const q = parsed.success ? parsed.data : {};
  const now = ctx.clock.now();
  const to = parseInstant(q.to) ?? new Date(Math.ceil(now.getTime() / 60_000) * 60_000);
  let from = parseInstant(q.from) ?? new Date(to.getTime() - 24 * 3_600_000);
  if (from >= to) from = new Date(to.getTime() - 24 * 3_600_000);
  const stripeConfigured =
    ctx.stripe !== undefined &&
    (ctx.config.STRIPE_METER_ID_TEMPERATURE_READINGS ?? ctx.config.STRIPE_METER_ID_ACTIVE_SENSORS) !==
      undefined;
  const [overview, failed, errors, poison, report] = await Promise.all([
    pipelineOverview(ctx.db, ctx.boss, now),
    listOutbox(ctx.db, { status: 'failed', limit: 50 }),
    listMeterErrorReports(ctx.db, { limit: 20 }),
    listPoisonEvents(ctx.db, 20),
    reconcile(ctx, { from, to }, { withStripe: q.stripe === '1' && stripeConfigured }),
  ]);
  const o = overview;
  const orgIds = [...new Set(failed.rows.map((r) => r.organizationId))];
  const names = new Map(
    orgIds.length === 0
      ? []
      : (
          await ctx.db.selectFrom('organizations').select(['id', 'name']).where('id', 'in', orgIds).execute()
        ).map((r) => [r.id, r.name] as const),
  );
  const periodLink = (extra: string) =>
    `/admin?from=${encodeURIComponent(report.from)}&to=${encodeURIComponent(report.to)}${extra}`;
  return c.html(
    <Page title="meterbox · operations">
      <header>
        <h1>meterbox · operations</h1>
        <nav>
          <a href="/admin/ui/corrections">Usage corrections</a>
          <a href="/admin/ui/thresholds">Threshold alerts</a>
          <a href="/docs">API docs</a>
          <form method="post" action="/admin/logout" class="inline">
            <button type="submit" class="secondary">
              Sign out
            </button>
          </form>
        </nav>
      </header>
      <main>
        {q.flash ? (
          <p class="flash" role="status" data-testid="flash">
            {q.flash}
          </p>
        ) : null}
        {q.error ? (
          <p class="flash error" role="alert">
            {q.error}
          </p>
        ) : null}
        <StripeAccountPanel db={ctx.db} />
        <ReconciliationPanel db={ctx.db} />
        <AlertsPanel db={ctx.db} />
        <DestinationsPanel ctx={ctx} />
        <section aria-labelledby="pipeline">
          <h2 id="pipeline">Pipeline</h2>
          <div class="cards">
            <Card label="Pending rows" value={fmtNum(o.counts.pending)} testId="count-pending" />
            <Card
              label="Failed rows"
              value={fmtNum(o.counts.failed)}
              testId="count-failed"
              bad={o.counts.failed > 0}
            />
            <Card
              label="Expired rows"
              value={fmtNum(o.counts.expired)}
              testId="count-expired"
              bad={o.counts.expired > 0}
            />
            <Card label="Delivered (1 h)" value={fmtNum(o.deliveredLastHour)} testId="count-delivered-hour" />
            <Card
              label="Oldest pending"
              value={fmtAge(o.oldestPendingSeconds)}
              testId="oldest-pending"
              bad={(o.oldestPendingSeconds ?? 0) > 600}
            />
            <Card
              label="Dead-lettered jobs"
              value={fmtNum(o.deadLetterJobs)}
              testId="dead-letter-jobs"
              bad={o.deadLetterJobs > 0}
            />
          </div>
          {o.deadLetterJobs > 0 ? (
            <form method="post" action="/admin/ui/redrive" class="row spaced">
              <button type="submit">Redrive dead-letter queue</button>
            </form>
          ) : null}
          <h2 class="sub">Delivered per minute, last hour</h2>
          <DeliveryChart buckets={o.deliveredPerMinute} />
          <h2 class="sub">Backlog and delivery lag, last hour</h2>
          <BacklogChart buckets={o.backlogPerMinute} />
        </section>
        <section aria-labelledby="failed">
          <h2 id="failed">Failed rows</h2>
          <FailedTable rows={failed.rows} names={names} />
        </section>
        <section aria-labelledby="errors">
          <h2 id="errors">Stripe meter error reports</h2>
          <MeterErrorsTable reports={errors.reports} />
        </section>
        <section aria-labelledby="poison">
          <h2 id="poison">Webhook events refused (never applied, acknowledged)</h2>
          <PoisonTable events={poison} />
        </section>
        <section aria-labelledby="reconciliation">
          <h2 id="reconciliation">Reconciliation</h2>
          <form method="get" action="/admin" class="row">
            <label>
              From (UTC)
              <input type="datetime-local" name="from" value={report.from.slice(0, 16)} />
            </label>
            <label>
              To (UTC)
              <input type="datetime-local" name="to" value={report.to.slice(0, 16)} />
            </label>
            {stripeConfigured ? (
              <label class="check">
                <input type="checkbox" name="stripe" value="1" checked={Boolean(q.stripe)} /> Compare with
                Stripe
              </label>
            ) : null}
            <button type="submit" class="secondary">
              Show
            </button>
          </form>
          <p class="muted">
            Readings stored (by ingestion time) against the usage written to the outbox in{' '}
            {fmtTime(report.from)} – {fmtTime(report.to)}. Drift = (stored − voided) − (delivered + pending +
            failed + expired − corrected)
            {report.stripe === 'compared' ? '; Stripe drift = Stripe total − delivered (by event time)' : ''}.{' '}
            {report.hasDrift ? (
              <strong class="drift-cell" data-testid="drift-found">
                Drift found.
              </strong>
            ) : (
              <span data-testid="no-drift">No drift.</span>
            )}
            {stripeConfigured && report.stripe !== 'compared' ? (
              <>
                {' '}
                <a href={periodLink('&stripe=1')}>Compare with Stripe</a>
              </>
            ) : null}
          </p>
          <ReconciliationTable report={report} />
        </section>
      </main>
    </Page>,
  );
}
