// The operator dashboard at /admin: server-rendered hono/jsx components (no front-end build, no
// external assets, one stylesheet in dashboard-style.ts), plain forms for login, retry and redrive,
// so it works without JavaScript and on a phone.
import type { Context as HonoContext } from 'hono';
import { raw } from 'hono/html';
import type { Child } from 'hono/jsx';
import { z } from 'zod';
import { listMeterErrorReports, type MeterErrorReport } from '../billing/meter-error-reports.js';
import { listPoisonEvents, type PoisonEvent } from '../billing/poison.js';
import type { Context } from '../context-type.js';
import { pgInstant } from '../db/input-types.js';
import { AppError } from '../http/errors.js';
import { documentedRoutes, type RouteDoc } from '../http/openapi.js';
import type { AppEnv, HttpModule } from '../http/types.js';
import { crossSite, endSession, startSession, tokenMatches } from './auth.js';
import { DASHBOARD_CSS } from './dashboard-style.js';
import {
  listOutbox,
  type OutboxRowView,
  type PipelineOverview,
  pipelineOverview,
  redriveAndReopen,
  retryFailed,
} from './outbox.js';
import { type ReconciliationReport, reconcile } from './reconcile.js';

type DashboardDeps = Pick<Context, 'db' | 'boss' | 'stripe' | 'config' | 'clock' | 'log'>;

/** Every dashboard page: the document shell with the one stylesheet. */
export function Page(props: { title: string; children: Child }) {
  return (
    <>
      {raw('<!doctype html>')}
      <html lang="en">
        <head>
          <meta charset="utf-8" />
          <meta name="viewport" content="width=device-width, initial-scale=1" />
          <meta name="robots" content="noindex" />
          <title>{props.title}</title>
          <style>{raw(DASHBOARD_CSS)}</style>
        </head>
        <body>{props.children}</body>
      </html>
    </>
  );
}

export function LoginPage(props: { error?: string }) {
  return (
    <Page title="meterbox admin: sign in">
      <main>
        <section class="login">
          <h1>meterbox admin</h1>
          {props.error ? (
            <p class="flash error" role="alert">
              {props.error}
            </p>
          ) : null}
          <form method="post" action="/admin/login">
            <label for="token">Admin token</label>
            <input
              id="token"
              name="token"
              type="password"
              autocomplete="current-password"
              required
              autofocus
            />
            <button type="submit">Sign in</button>
          </form>
          <p class="muted">
            The token is ADMIN_TOKEN. It is kept as a signed, HttpOnly session cookie for 12 hours.
          </p>
        </section>
      </main>
    </Page>
  );
}

const fmtTime = (d: Date | string | null): string =>
  d === null ? '—' : `${(typeof d === 'string' ? d : d.toISOString()).slice(0, 16).replace('T', ' ')}Z`;
const fmtNum = (n: number | null | undefined): string =>
  n === null || n === undefined ? '—' : n.toLocaleString('en-US');

function fmtAge(seconds: number | null): string {
  if (seconds === null) return 'none';
  if (seconds < 90) return `${Math.round(seconds)} s`;
  if (seconds < 5400) return `${Math.round(seconds / 60)} min`;
  if (seconds < 172_800) return `${(seconds / 3600).toFixed(1)} h`;
  return `${(seconds / 86_400).toFixed(1)} d`;
}

function fmtMs(ms: number): string {
  return ms < 1000 ? `${Math.round(ms)} ms` : `${(ms / 1000).toFixed(1)} s`;
}

function Card(props: { label: string; value: string; testId: string; bad?: boolean }) {
  return (
    <div class={props.bad ? 'card bad' : 'card'}>
      <div class="label">{props.label}</div>
      <div class="value" data-testid={props.testId}>
        {props.value}
      </div>
    </div>
  );
}

function Axis() {
  return (
    <div class="axis">
      <span>−60 min</span>
      <span>−30 min</span>
      <span>now</span>
    </div>
  );
}

/**
 * Bars only inside the SVG, stretched to the box (preserveAspectRatio none); labels are HTML so
 * text keeps its size on any screen width.
 */
function Bars(props: {
  heights: number[];
  max: number;
  fill: string;
  titles: string[];
  label: string;
  testId: string;
}) {
  const width = props.heights.length * 10;
  const height = 100;
  return (
    <svg
      viewBox={`0 0 ${width} ${height}`}
      preserveAspectRatio="none"
      role="img"
      aria-label={props.label}
      data-testid={props.testId}
    >
      <line x1="0" y1={height} x2={width} y2={height} stroke="#d9dee7" vector-effect="non-scaling-stroke" />
      {props.heights.map((value, i) => {
        const h = value === 0 ? 0 : Math.max(2, (height * value) / props.max);
        return (
          <rect x={i * 10 + 1} y={(height - h).toFixed(1)} width="8" height={h.toFixed(1)} fill={props.fill}>
            <title>{props.titles[i]}</title>
          </rect>
        );
      })}
    </svg>
  );
}

/** Rows delivered per minute over the last hour as an inline SVG bar chart. */
function DeliveryChart(props: { buckets: PipelineOverview['deliveredPerMinute'] }) {
  const buckets = props.buckets;
  const total = buckets.reduce((s, b) => s + b.rows, 0);
  const max = Math.max(0, ...buckets.map((b) => b.rows));
  return (
    <div class="chart">
      <div class="axis">
        <span>{total === 0 ? 'no deliveries in the last hour' : `peak ${max} rows/min`}</span>
        <span>{total} rows</span>
      </div>
      <Bars
        heights={buckets.map((b) => b.rows)}
        max={max}
        fill="#2e6bd9"
        titles={buckets.map((b) => `${fmtTime(b.minute)}: ${b.rows} rows, value ${b.value}`)}
        label={`Outbox rows delivered per minute over the last hour: ${total} in total, peak ${max} per minute`}
        testId="delivery-chart"
      />
      <Axis />
    </div>
  );
}

/** Backlog per minute as bars, the minute's delivery lag (average / max) in each bar's tooltip. */
function BacklogChart(props: { buckets: PipelineOverview['backlogPerMinute'] }) {
  const buckets = props.buckets;
  const max = Math.max(0, ...buckets.map((b) => b.backlog));
  const lags = buckets.flatMap((b) => (b.maxLagMs === null ? [] : [b.maxLagMs]));
  const maxLag = lags.length ? Math.max(...lags) : null;
  const last = buckets.at(-1);
  const title = (b: (typeof buckets)[number]) =>
    `${fmtTime(b.minute)}: backlog ${b.backlog} rows; ${
      b.avgLagMs === null ? 'no deliveries' : `lag avg ${fmtMs(b.avgLagMs)}, max ${fmtMs(b.maxLagMs ?? 0)}`
    }`;
  return (
    <div class="chart">
      <div class="axis">
        <span data-testid="backlog-now">
          backlog now {last?.backlog ?? 0} rows (peak {max})
        </span>
        <span data-testid="lag-max">
          {maxLag === null ? 'no deliveries in the last hour' : `max delivery lag ${fmtMs(maxLag)}`}
        </span>
      </div>
      <Bars
        heights={buckets.map((b) => b.backlog)}
        max={max}
        fill="#b54708"
        titles={buckets.map(title)}
        label={`Undelivered outbox rows at each minute of the last hour: peak ${max}`}
        testId="backlog-chart"
      />
      <Axis />
    </div>
  );
}

function FailedTable(props: { rows: OutboxRowView[]; names: ReadonlyMap<string, string> }) {
  if (props.rows.length === 0) {
    return (
      <p class="muted" data-testid="no-failed">
        No failed rows.
      </p>
    );
  }
  return (
    <>
      <form method="post" action="/admin/ui/retry" class="row">
        <input type="hidden" name="all" value="1" />
        <button type="submit" class="secondary">
          Retry all failed
        </button>
      </form>
      <div class="scroll">
        <table class="stack" data-testid="failed-table">
          <thead>
            <tr>
              <th>Row</th>
              <th>Organization</th>
              <th>Meter</th>
              <th class="num">Value</th>
              <th class="num">Attempts</th>
              <th>Last error</th>
              <th>Updated</th>
              <th></th>
            </tr>
          </thead>
          <tbody>
            {props.rows.map((r) => (
              <tr data-row-id={r.id}>
                <td data-label="Row">{r.id}</td>
                <td data-label="Organization" title={r.organizationId}>
                  {props.names.get(r.organizationId) ?? `${r.organizationId.slice(0, 8)}…`}
                </td>
                <td data-label="Meter">{r.meter}</td>
                <td class="num" data-label="Value">
                  {r.value}
                </td>
                <td class="num" data-label="Attempts">
                  {r.attempts}
                </td>
                <td class="wrap" data-label="Last error">
                  {r.lastError ?? ''}
                </td>
                <td data-label="Updated">{fmtTime(r.updatedAt)}</td>
                <td class="action">
                  <form method="post" action="/admin/ui/retry" class="inline">
                    <input type="hidden" name="id" value={r.id} />
                    <button type="submit" aria-label={`Retry row ${r.id}`}>
                      Retry
                    </button>
                  </form>
                </td>
              </tr>
            ))}
          </tbody>
        </table>
      </div>
    </>
  );
}

function MeterErrorsTable(props: { reports: MeterErrorReport[] }) {
  if (props.reports.length === 0) {
    return (
      <p class="muted" data-testid="no-meter-errors">
        No meter error reports.
      </p>
    );
  }
  return (
    <div class="scroll">
      <table class="stack" data-testid="meter-errors-table">
        <thead>
          <tr>
            <th>Received</th>
            <th>Meter</th>
            <th class="num">Errors</th>
            <th>Summary</th>
            <th>Window</th>
          </tr>
        </thead>
        <tbody>
          {props.reports.map((r) => (
            <tr>
              <td data-label="Received">{fmtTime(r.receivedAt)}</td>
              <td data-label="Meter">{r.meterId ?? '—'}</td>
              <td class="num" data-label="Errors">
                {fmtNum(r.errorCount)}
              </td>
              <td class="wrap" data-label="Summary">
                {r.summary ?? 'details not included in the event'}
              </td>
              <td data-label="Window">
                {r.validationStart ? `${fmtTime(r.validationStart)} – ${fmtTime(r.validationEnd)}` : '—'}
              </td>
            </tr>
          ))}
        </tbody>
      </table>
    </div>
  );
}

function PoisonTable(props: { events: PoisonEvent[] }) {
  if (props.events.length === 0) {
    return (
      <p class="muted" data-testid="no-poison">
        No webhook events refused.
      </p>
    );
  }
  return (
    <div class="scroll">
      <table class="stack" data-testid="poison-table">
        <thead>
          <tr>
            <th>Received</th>
            <th>Event</th>
            <th>Type</th>
            <th>Why</th>
            <th class="num">Deliveries</th>
          </tr>
        </thead>
        <tbody>
          {props.events.map((e) => (
            <tr>
              <td data-label="Received">{fmtTime(e.receivedAt)}</td>
              <td data-label="Event">{e.eventId}</td>
              <td data-label="Type">{e.eventType}</td>
              <td class="wrap" data-label="Why">
                {e.errorCode ? `${e.errorCode}: ` : ''}
                {e.error}
              </td>
              <td class="num" data-label="Deliveries">
                {fmtNum(e.deliveries)}
              </td>
            </tr>
          ))}
        </tbody>
      </table>
    </div>
  );
}

function Num(props: { label: string; col: string; value: string; bad?: boolean }) {
  return (
    <td class={props.bad ? 'num drift-cell' : 'num'} data-label={props.label} data-col={props.col}>
      {props.value}
    </td>
  );
}

function ReconciliationTable(props: { report: ReconciliationReport }) {
  const report = props.report;
  const withStripe = report.stripe === 'compared';
  if (report.organizations.length === 0) {
    return (
      <p class="muted" data-testid="no-reconciliation">
        No readings or usage in this period.
      </p>
    );
  }
  return (
    <div class="scroll">
      <table class="stack" data-testid="reconciliation-table">
        <thead>
          <tr>
            <th>Organization</th>
            <th class="num">Stored</th>
            <th class="num">Delivered</th>
            <th class="num">Pending</th>
            <th class="num">Failed</th>
            <th class="num">Expired</th>
            <th class="num">Voided</th>
            <th class="num">Corrected</th>
            <th class="num">Drift</th>
            {withStripe ? (
              <>
                <th class="num">Stripe</th>
                <th class="num">Stripe drift</th>
              </>
            ) : null}
          </tr>
        </thead>
        <tbody>
          {report.organizations.map((o) => (
            <tr class={o.hasDrift ? 'drift' : ''} data-organization-id={o.organizationId}>
              <td class="title">
                {o.organizationName}
                {o.billable ? '' : <span class="muted"> (not billable)</span>}
              </td>
              <Num label="Stored" col="stored" value={fmtNum(o.readingsStored)} />
              <Num label="Delivered" col="delivered" value={fmtNum(o.usage.delivered)} />
              <Num label="Pending" col="pending" value={fmtNum(o.usage.pending)} />
              <Num label="Failed" col="failed" value={fmtNum(o.usage.failed)} />
              <Num label="Expired" col="expired" value={fmtNum(o.usage.expired)} />
              <Num label="Voided" col="voided" value={fmtNum(o.readingsVoided)} />
              <Num
                label="Corrected"
                col="corrected"
                value={fmtNum(
                  o.corrections.delivered +
                    o.corrections.pending +
                    o.corrections.failed +
                    o.corrections.expired,
                )}
              />
              <Num
                label="Drift"
                col="drift"
                value={o.drift === null ? 'not metered' : fmtNum(o.drift)}
                bad={Boolean(o.drift)}
              />
              {withStripe ? (
                <>
                  <td class="num" data-label="Stripe" data-col="stripe">
                    {o.stripe?.error ? <span title={o.stripe.error}>error</span> : fmtNum(o.stripe?.readings)}
                  </td>
                  <Num
                    label="Stripe drift"
                    col="stripe-drift"
                    value={fmtNum(o.stripe?.drift)}
                    bad={Boolean(o.stripe?.drift)}
                  />
                </>
              ) : null}
            </tr>
          ))}
        </tbody>
      </table>
    </div>
  );
}

const periodQuery = z.object({
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

async function dashboard(ctx: DashboardDeps, c: HonoContext<AppEnv>): Promise<Response> {
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

const FORM_DOC = (path: string, summary: string, fields: string): RouteDoc => ({
  method: 'post',
  path,
  summary: `${summary} (HTML form, application/x-www-form-urlencoded: ${fields}); answers 303 to /admin`,
  tag: 'admin dashboard',
  security: 'admin',
  responses: { 303: { description: 'redirect to the dashboard' } },
});

export function dashboardRoutes(ctx: DashboardDeps): HttpModule {
  const routes = documentedRoutes('/admin');
  const back = (c: HonoContext<AppEnv>, message: string, kind: 'flash' | 'error' = 'flash') =>
    c.redirect(`/admin?${kind}=${encodeURIComponent(message)}`, 303);

  routes.route(
    {
      method: 'get',
      path: '/admin',
      summary:
        'Operator dashboard (HTML): pipeline overview, delivery chart, failed rows with Retry, meter errors, reconciliation. Shows the sign-in form without a session',
      tag: 'admin dashboard',
      security: 'admin',
      query: periodQuery,
      responses: { 200: { description: 'HTML page', contentType: 'text/html' } },
    },
    (c) => dashboard(ctx, c),
  );

  // adminGuard answers 404 on every admin route while ADMIN_TOKEN is unset: here it is set.
  routes.route(
    FORM_DOC(
      '/admin/login',
      'Sign in with the admin token; sets an HttpOnly SameSite=Strict session cookie',
      'token',
    ),
    async (c) => {
      const form = await c.req.parseBody();
      const token = typeof form.token === 'string' ? form.token : '';
      if (!token || !tokenMatches(ctx.config.ADMIN_TOKEN!, token)) {
        ctx.log.info({ ip: c.req.header('x-forwarded-for') }, 'admin: dashboard sign-in refused');
        return c.html(<LoginPage error="That token is not valid." />, 401);
      }
      startSession(c, ctx.config.ADMIN_TOKEN!, ctx.clock.now());
      return c.redirect('/admin', 303);
    },
  );

  routes.route(FORM_DOC('/admin/logout', 'Sign out (clears the session cookie)', 'none'), (c) => {
    // Like every other admin form: a foreign Origin cannot sign the operator out (logout CSRF).
    if (crossSite(c)) throw new AppError(403, 'forbidden', 'cross-site request refused');
    endSession(c);
    return c.redirect('/admin', 303);
  });

  routes.route(
    FORM_DOC('/admin/ui/retry', 'Retry one failed row or all of them', 'id, or all=1'),
    async (c) => {
      const form = await c.req.parseBody();
      const id = typeof form.id === 'string' && /^\d{1,19}$/.test(form.id) ? form.id : undefined;
      if (!id && form.all !== '1') return back(c, 'Nothing to retry.', 'error');
      const result = await retryFailed(ctx.db, ctx.boss, id ? { ids: [id] } : { all: true });
      ctx.log.info({ ...result, id: id ?? 'all' }, 'admin: failed outbox rows retried from the dashboard');
      return back(
        c,
        result.retried === 0
          ? 'No failed row matched (already retried?).'
          : `Retried ${result.retried} row${result.retried === 1 ? '' : 's'}; delivery queued.`,
      );
    },
  );

  routes.route(FORM_DOC('/admin/ui/redrive', 'Redrive the dead-letter queue', 'none'), async (c) => {
    const result = await redriveAndReopen(ctx.db, ctx.boss, 1000);
    ctx.log.info(result, 'admin: dead-letter queue redriven from the dashboard');
    return back(
      c,
      `Redrove ${result.moved} job${result.moved === 1 ? '' : 's'}, reopened ${result.retried} failed row${result.retried === 1 ? '' : 's'}.`,
    );
  });

  return routes;
}
