// The operator dashboard at /admin: server-rendered HTML (hono/html, no front-end build, no external
// assets), plain forms for login, retry and redrive, so it works without JavaScript and on a phone.
import type { Context as HonoContext } from 'hono';
import { html, raw } from 'hono/html';
import type { HtmlEscapedString } from 'hono/utils/html';
import { z } from 'zod';
import { listMeterErrorReports, type MeterErrorReport } from '../billing/meter-error-reports.js';
import { listPoisonEvents, type PoisonEvent } from '../billing/poison.js';
import type { Context } from '../context.js';
import { pgInstant } from '../db/input-types.js';
import { AppError } from '../http/errors.js';
import { documentedRoutes, type RouteDoc } from '../http/openapi.js';
import type { AppEnv, HttpModule } from '../http/types.js';
import { crossSite, endSession, startSession, tokenMatches } from './auth.js';
import {
  listOutbox,
  type OutboxRowView,
  type PipelineOverview,
  pipelineOverview,
  redriveAndReopen,
  retryFailed,
} from './outbox.js';
import { type ReconciliationReport, reconcile } from './reconcile.js';

type Html = HtmlEscapedString | Promise<HtmlEscapedString>;
type DashboardDeps = Pick<Context, 'db' | 'boss' | 'stripe' | 'config' | 'clock' | 'log'>;

const STYLE = `
:root { color-scheme: light; --bad: #b42318; --bad-bg: #fee4e2; --ok: #067647; --muted: #5d6b82; --line: #d9dee7; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d2433; background: #f6f7f9; }
header { display: flex; flex-wrap: wrap; gap: .5rem; align-items: center; justify-content: space-between; padding: .75rem 1rem; background: #1d2433; color: #fff; }
header h1 { font-size: 1.1rem; margin: 0; }
header form { margin: 0; }
main { max-width: 1100px; margin: 0 auto; padding: 1rem; }
section { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 1rem; margin-bottom: 1rem; }
h2 { font-size: 1.05rem; margin: 0 0 .75rem; }
.cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(140px, 1fr)); gap: .75rem; }
.card { border: 1px solid var(--line); border-radius: 8px; padding: .6rem .75rem; }
.card .label { color: var(--muted); font-size: .8rem; }
.card .value { font-size: 1.5rem; font-weight: 600; font-variant-numeric: tabular-nums; }
.card.bad { border-color: var(--bad); background: var(--bad-bg); }
.scroll { overflow-x: auto; -webkit-overflow-scrolling: touch; }
table { border-collapse: collapse; width: 100%; font-variant-numeric: tabular-nums; }
th, td { text-align: left; padding: .4rem .5rem; border-bottom: 1px solid var(--line); white-space: nowrap; vertical-align: top; }
td.num, th.num { text-align: right; }
td.wrap { white-space: normal; min-width: 12rem; word-break: break-word; }
tr.drift td { background: var(--bad-bg); }
td.drift-cell { color: var(--bad); font-weight: 700; }
.muted { color: var(--muted); }
button, input { font: inherit; }
button { border: 1px solid #1d2433; background: #1d2433; color: #fff; border-radius: 6px; padding: .35rem .8rem; cursor: pointer; min-height: 2.25rem; }
button.secondary { background: #fff; color: #1d2433; }
header button { border-color: #fff; }
input { border: 1px solid var(--line); border-radius: 6px; padding: .35rem .5rem; min-height: 2.25rem; max-width: 100%; }
form.inline { display: inline; margin: 0; }
.row { display: flex; flex-wrap: wrap; gap: .5rem; align-items: end; margin-bottom: .75rem; }
.row label { display: flex; flex-direction: column; font-size: .8rem; color: var(--muted); }
.flash { padding: .6rem .8rem; border-radius: 6px; background: #dcfae6; color: var(--ok); margin-bottom: 1rem; }
.flash.error { background: var(--bad-bg); color: var(--bad); }
.chart { position: relative; }
.chart svg { display: block; width: 100%; height: 140px; }
.chart .axis { display: flex; justify-content: space-between; color: var(--muted); font-size: .8rem; }
.row label.check { flex-direction: row; align-items: center; gap: .35rem; color: inherit; font-size: .9rem; min-height: 2.25rem; }
.login { max-width: 380px; margin: 12vh auto; }
.login input { width: 100%; margin: .5rem 0 1rem; }
@media (max-width: 600px) {
  main { padding: .5rem; }
  /* Tables become one card per row: every value and the Retry button stay on screen. */
  table.stack thead { display: none; }
  table.stack, table.stack tbody, table.stack tr, table.stack td { display: block; width: 100%; }
  table.stack tr { border: 1px solid var(--line); border-radius: 8px; margin-bottom: .6rem; padding: .25rem .5rem; }
  table.stack td { display: flex; justify-content: space-between; gap: 1rem; border: 0; padding: .2rem 0; white-space: normal; text-align: right; }
  table.stack td::before { content: attr(data-label); color: var(--muted); text-align: left; flex-shrink: 0; }
  table.stack td.title { font-weight: 600; justify-content: flex-start; }
  table.stack td.title::before { content: none; }
  table.stack td.action { justify-content: flex-end; }
  table.stack td.wrap { min-width: 0; }
  tr.drift { border-color: var(--bad) !important; }
  section { padding: .75rem; }
  .card .value { font-size: 1.25rem; }
  th, td { padding: .35rem .4rem; font-size: .9rem; }
}
`;

export function page(title: string, body: Html): Html {
  return html`<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="robots" content="noindex">
<title>${title}</title>
<style>${raw(STYLE)}</style>
</head>
<body>${body}</body>
</html>`;
}

export function loginPage(error?: string): Html {
  return page(
    'meterbox admin: sign in',
    html`<main><section class="login">
<h1>meterbox admin</h1>
${error ? html`<p class="flash error" role="alert">${error}</p>` : ''}
<form method="post" action="/admin/login">
<label for="token">Admin token</label>
<input id="token" name="token" type="password" autocomplete="current-password" required autofocus>
<button type="submit">Sign in</button>
</form>
<p class="muted">The token is ADMIN_TOKEN. It is kept as a signed, HttpOnly session cookie for 12 hours.</p>
</section></main>`,
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

function card(label: string, value: string, testId: string, bad = false): Html {
  return html`<div class="card${bad ? ' bad' : ''}"><div class="label">${label}</div><div class="value" data-testid="${testId}">${value}</div></div>`;
}

/** Rows delivered per minute over the last hour as an inline SVG bar chart. */
function deliveryChart(buckets: PipelineOverview['deliveredPerMinute']): Html {
  // Bars only inside the SVG, stretched to the box (preserveAspectRatio none); labels are HTML so
  // text keeps its size on any screen width.
  const width = buckets.length * 10;
  const height = 100;
  const total = buckets.reduce((s, b) => s + b.rows, 0);
  const max = Math.max(0, ...buckets.map((b) => b.rows));
  const bars = buckets.map((b, i) => {
    const h = b.rows === 0 ? 0 : Math.max(2, (height * b.rows) / max);
    return html`<rect x="${i * 10 + 1}" y="${(height - h).toFixed(1)}" width="8" height="${h.toFixed(1)}" fill="#2e6bd9"><title>${fmtTime(b.minute)}: ${b.rows} rows, value ${b.value}</title></rect>`;
  });
  return html`<div class="chart">
<div class="axis"><span>${total === 0 ? 'no deliveries in the last hour' : `peak ${max} rows/min`}</span><span>${total} rows</span></div>
<svg viewBox="0 0 ${width} ${height}" preserveAspectRatio="none" role="img" aria-label="Outbox rows delivered per minute over the last hour: ${total} in total, peak ${max} per minute" data-testid="delivery-chart">
<line x1="0" y1="${height}" x2="${width}" y2="${height}" stroke="#d9dee7" vector-effect="non-scaling-stroke"/>
${bars}
</svg>
<div class="axis"><span>−60 min</span><span>−30 min</span><span>now</span></div>
</div>`;
}

/** Backlog per minute as bars, the minute's delivery lag (average / max) in each bar's tooltip. */
function backlogChart(buckets: PipelineOverview['backlogPerMinute']): Html {
  const width = buckets.length * 10;
  const height = 100;
  const max = Math.max(0, ...buckets.map((b) => b.backlog));
  const lags = buckets.flatMap((b) => (b.maxLagMs === null ? [] : [b.maxLagMs]));
  const maxLag = lags.length ? Math.max(...lags) : null;
  const last = buckets.at(-1);
  const bars = buckets.map((b, i) => {
    const h = b.backlog === 0 ? 0 : Math.max(2, (height * b.backlog) / max);
    const lag =
      b.avgLagMs === null ? 'no deliveries' : `lag avg ${fmtMs(b.avgLagMs)}, max ${fmtMs(b.maxLagMs ?? 0)}`;
    return html`<rect x="${i * 10 + 1}" y="${(height - h).toFixed(1)}" width="8" height="${h.toFixed(1)}" fill="#b54708"><title>${fmtTime(b.minute)}: backlog ${b.backlog} rows; ${lag}</title></rect>`;
  });
  return html`<div class="chart">
<div class="axis"><span data-testid="backlog-now">backlog now ${last?.backlog ?? 0} rows (peak ${max})</span><span data-testid="lag-max">${maxLag === null ? 'no deliveries in the last hour' : `max delivery lag ${fmtMs(maxLag)}`}</span></div>
<svg viewBox="0 0 ${width} ${height}" preserveAspectRatio="none" role="img" aria-label="Undelivered outbox rows at each minute of the last hour: peak ${max}" data-testid="backlog-chart">
<line x1="0" y1="${height}" x2="${width}" y2="${height}" stroke="#d9dee7" vector-effect="non-scaling-stroke"/>
${bars}
</svg>
<div class="axis"><span>−60 min</span><span>−30 min</span><span>now</span></div>
</div>`;
}

function fmtMs(ms: number): string {
  return ms < 1000 ? `${Math.round(ms)} ms` : `${(ms / 1000).toFixed(1)} s`;
}

function failedTable(rows: OutboxRowView[], names: ReadonlyMap<string, string>): Html {
  if (rows.length === 0) return html`<p class="muted" data-testid="no-failed">No failed rows.</p>`;
  return html`<form method="post" action="/admin/ui/retry" class="row"><input type="hidden" name="all" value="1"><button type="submit" class="secondary">Retry all failed</button></form>
<div class="scroll"><table class="stack" data-testid="failed-table">
<thead><tr><th>Row</th><th>Organization</th><th>Meter</th><th class="num">Value</th><th class="num">Attempts</th><th>Last error</th><th>Updated</th><th></th></tr></thead>
<tbody>${rows.map(
    (r) => html`<tr data-row-id="${r.id}">
<td data-label="Row">${r.id}</td><td data-label="Organization" title="${r.organizationId}">${names.get(r.organizationId) ?? `${r.organizationId.slice(0, 8)}…`}</td><td data-label="Meter">${r.meter}</td>
<td class="num" data-label="Value">${r.value}</td><td class="num" data-label="Attempts">${r.attempts}</td><td class="wrap" data-label="Last error">${r.lastError ?? ''}</td><td data-label="Updated">${fmtTime(r.updatedAt)}</td>
<td class="action"><form method="post" action="/admin/ui/retry" class="inline"><input type="hidden" name="id" value="${r.id}"><button type="submit" aria-label="Retry row ${r.id}">Retry</button></form></td>
</tr>`,
  )}</tbody></table></div>`;
}

function meterErrorsTable(reports: MeterErrorReport[]): Html {
  if (reports.length === 0)
    return html`<p class="muted" data-testid="no-meter-errors">No meter error reports.</p>`;
  return html`<div class="scroll"><table class="stack" data-testid="meter-errors-table">
<thead><tr><th>Received</th><th>Meter</th><th class="num">Errors</th><th>Summary</th><th>Window</th></tr></thead>
<tbody>${reports.map(
    (
      r,
    ) => html`<tr><td data-label="Received">${fmtTime(r.receivedAt)}</td><td data-label="Meter">${r.meterId ?? '—'}</td><td class="num" data-label="Errors">${fmtNum(r.errorCount)}</td>
<td class="wrap" data-label="Summary">${r.summary ?? 'details not included in the event'}</td><td data-label="Window">${r.validationStart ? `${fmtTime(r.validationStart)} – ${fmtTime(r.validationEnd)}` : '—'}</td></tr>`,
  )}</tbody></table></div>`;
}

function poisonTable(events: PoisonEvent[]): Html {
  if (events.length === 0)
    return html`<p class="muted" data-testid="no-poison">No webhook events refused.</p>`;
  return html`<div class="scroll"><table class="stack" data-testid="poison-table">
<thead><tr><th>Received</th><th>Event</th><th>Type</th><th>Why</th><th class="num">Deliveries</th></tr></thead>
<tbody>${events.map(
    (
      e,
    ) => html`<tr><td data-label="Received">${fmtTime(e.receivedAt)}</td><td data-label="Event">${e.eventId}</td><td data-label="Type">${e.eventType}</td>
<td class="wrap" data-label="Why">${e.errorCode ? `${e.errorCode}: ` : ''}${e.error}</td><td class="num" data-label="Deliveries">${fmtNum(e.deliveries)}</td></tr>`,
  )}</tbody></table></div>`;
}

function reconciliationTable(report: ReconciliationReport): Html {
  const withStripe = report.stripe === 'compared';
  if (report.organizations.length === 0) {
    return html`<p class="muted" data-testid="no-reconciliation">No readings or usage in this period.</p>`;
  }
  return html`<div class="scroll"><table class="stack" data-testid="reconciliation-table">
<thead><tr><th>Organization</th><th class="num">Stored</th><th class="num">Delivered</th><th class="num">Pending</th><th class="num">Failed</th><th class="num">Expired</th><th class="num">Voided</th><th class="num">Corrected</th><th class="num">Drift</th>${
    withStripe ? html`<th class="num">Stripe</th><th class="num">Stripe drift</th>` : ''
  }</tr></thead>
<tbody>${report.organizations.map(
    (o) => html`<tr class="${o.hasDrift ? 'drift' : ''}" data-organization-id="${o.organizationId}">
<td class="title">${o.organizationName}${o.billable ? '' : html` <span class="muted">(not billable)</span>`}</td>
<td class="num" data-label="Stored" data-col="stored">${fmtNum(o.readingsStored)}</td>
<td class="num" data-label="Delivered" data-col="delivered">${fmtNum(o.usage.delivered)}</td>
<td class="num" data-label="Pending" data-col="pending">${fmtNum(o.usage.pending)}</td>
<td class="num" data-label="Failed" data-col="failed">${fmtNum(o.usage.failed)}</td>
<td class="num" data-label="Expired" data-col="expired">${fmtNum(o.usage.expired)}</td>
<td class="num" data-label="Voided" data-col="voided">${fmtNum(o.readingsVoided)}</td>
<td class="num" data-label="Corrected" data-col="corrected">${fmtNum(o.corrections.delivered + o.corrections.pending + o.corrections.failed + o.corrections.expired)}</td>
<td class="num${o.drift ? ' drift-cell' : ''}" data-label="Drift" data-col="drift">${o.drift === null ? 'not metered' : fmtNum(o.drift)}</td>
${
  withStripe
    ? html`<td class="num" data-label="Stripe" data-col="stripe">${o.stripe?.error ? html`<span title="${o.stripe.error}">error</span>` : fmtNum(o.stripe?.readings)}</td>
<td class="num${o.stripe?.drift ? ' drift-cell' : ''}" data-label="Stripe drift" data-col="stripe-drift">${fmtNum(o.stripe?.drift)}</td>`
    : ''
}
</tr>`,
  )}</tbody></table></div>`;
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
  const body = html`<header><h1>meterbox · operations</h1>
<nav><a href="/admin/ui/corrections" style="color:#fff;margin-right:.75rem">Usage corrections</a><a href="/docs" style="color:#fff;margin-right:.75rem">API docs</a><form method="post" action="/admin/logout" class="inline"><button type="submit" class="secondary">Sign out</button></form></nav></header>
<main>
${q.flash ? html`<p class="flash" role="status" data-testid="flash">${q.flash}</p>` : ''}
${q.error ? html`<p class="flash error" role="alert">${q.error}</p>` : ''}
<section aria-labelledby="pipeline"><h2 id="pipeline">Pipeline</h2>
<div class="cards">
${card('Pending rows', fmtNum(o.counts.pending), 'count-pending')}
${card('Failed rows', fmtNum(o.counts.failed), 'count-failed', o.counts.failed > 0)}
${card('Expired rows', fmtNum(o.counts.expired), 'count-expired', o.counts.expired > 0)}
${card('Delivered (1 h)', fmtNum(o.deliveredLastHour), 'count-delivered-hour')}
${card('Oldest pending', fmtAge(o.oldestPendingSeconds), 'oldest-pending', (o.oldestPendingSeconds ?? 0) > 600)}
${card('Dead-lettered jobs', fmtNum(o.deadLetterJobs), 'dead-letter-jobs', o.deadLetterJobs > 0)}
</div>
${
  o.deadLetterJobs > 0
    ? html`<form method="post" action="/admin/ui/redrive" class="row" style="margin-top:.75rem"><button type="submit">Redrive dead-letter queue</button></form>`
    : ''
}
<h2 style="margin-top:1rem">Delivered per minute, last hour</h2>
${deliveryChart(o.deliveredPerMinute)}
<h2 style="margin-top:1rem">Backlog and delivery lag, last hour</h2>
${backlogChart(o.backlogPerMinute)}
</section>
<section aria-labelledby="failed"><h2 id="failed">Failed rows</h2>${failedTable(failed.rows, names)}</section>
<section aria-labelledby="errors"><h2 id="errors">Stripe meter error reports</h2>${meterErrorsTable(errors.reports)}</section>
<section aria-labelledby="poison"><h2 id="poison">Webhook events refused (never applied, acknowledged)</h2>${poisonTable(poison)}</section>
<section aria-labelledby="reconciliation"><h2 id="reconciliation">Reconciliation</h2>
<form method="get" action="/admin" class="row">
<label>From (UTC)<input type="datetime-local" name="from" value="${report.from.slice(0, 16)}"></label>
<label>To (UTC)<input type="datetime-local" name="to" value="${report.to.slice(0, 16)}"></label>
${stripeConfigured ? html`<label class="check"><input type="checkbox" name="stripe" value="1"${q.stripe ? raw(' checked') : ''}> Compare with Stripe</label>` : ''}
<button type="submit" class="secondary">Show</button>
</form>
<p class="muted">Readings stored (by ingestion time) against the usage written to the outbox in ${fmtTime(report.from)} – ${fmtTime(report.to)}. Drift = (stored − voided) − (delivered + pending + failed + expired − corrected)${report.stripe === 'compared' ? '; Stripe drift = Stripe total − delivered (by event time)' : ''}.
${report.hasDrift ? html`<strong class="drift-cell" data-testid="drift-found">Drift found.</strong>` : html`<span data-testid="no-drift">No drift.</span>`}
${stripeConfigured && report.stripe !== 'compared' ? html` <a href="${periodLink('&stripe=1')}">Compare with Stripe</a>` : ''}</p>
${reconciliationTable(report)}
</section>
</main>`;
  return c.html(page('meterbox · operations', body));
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
        return c.html(loginPage('That token is not valid.'), 401);
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
