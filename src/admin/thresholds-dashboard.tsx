// The dashboard's threshold alerts page: per organization, its thresholds with their usage in the
// current period and state, a form to add one and one to remove each. Plain HTML forms under the
// dashboard's session (the guard's cookie and cross-site check), through the functions the admin API
// and the CLI call (alerts/thresholds.ts): no second copy of the rules.
import type { Context as HonoContext } from 'hono';
import { z } from 'zod';
import { billingAnchorOf } from '../alerts/billing-anchor.js';
import {
  createThreshold,
  listThresholds,
  removeThreshold,
  type ThresholdInput,
} from '../alerts/threshold-admin.js';
import type { Context } from '../context-type.js';
import { AppError } from '../http/errors.js';
import { documentedRoutes } from '../http/openapi.js';
import type { AppEnv, HttpModule } from '../http/types.js';
import { fmtNum } from './dashboard-format.js';
import { Page } from './dashboard-page.js';

type Deps = Pick<Context, 'db' | 'config' | 'clock' | 'log'>;

const PATH = '/admin/ui/thresholds';

const pageQuery = z.object({
  organization: z.string().max(100).optional(),
  flash: z.string().max(200).optional(),
  error: z.string().max(200).optional(),
});

const isOrganizationId = (v: string) =>
  /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i.test(v);

const field = (form: Record<string, unknown>, name: string): string =>
  typeof form[name] === 'string' ? (form[name] as string).trim() : '';

export function thresholdDashboardRoutes(ctx: Deps): HttpModule {
  const routes = documentedRoutes('/admin');
  const back = (c: HonoContext<AppEnv>, organization: string, message: string, kind: 'flash' | 'error') =>
    c.redirect(
      `${PATH}?${new URLSearchParams({ ...(organization ? { organization } : {}), [kind]: message.slice(0, 200) })}`,
      303,
    );
  /** The API's answers to a refused change (unknown organization or threshold, a duplicate, a bad quantity). */
  const refused = (err: unknown) =>
    err instanceof AppError && (err.status === 404 || err.status === 409 || err.status === 422);
  const explain = (err: AppError) =>
    [err.message, ...err.details.map((d) => `${d.field ? `${d.field}: ` : ''}${d.message}`)].join('; ');

  routes.route(
    {
      method: 'get',
      path: PATH,
      summary:
        "Dashboard (HTML): an organization's usage thresholds (query organization) with their usage in the current period and state, and the forms to add and remove them",
      tag: 'admin dashboard',
      security: 'admin',
      query: pageQuery,
      responses: { 200: { description: 'HTML page', contentType: 'text/html' } },
    },
    async (c) => {
      const parsed = pageQuery.safeParse(c.req.query());
      const q = parsed.success ? parsed.data : {};
      const organization = (q.organization ?? '').trim();
      let error = q.error;
      let org: { id: string; name: string } | undefined;
      if (organization && !isOrganizationId(organization)) error = 'That is not an organization id.';
      else if (organization) {
        org = await ctx.db
          .selectFrom('organizations')
          .select(['id', 'name'])
          .where('id', '=', organization)
          .executeTakeFirst();
        if (!org) error = 'No such organization.';
      }
      const now = ctx.clock.now();
      const [thresholds, anchor] = org
        ? await Promise.all([listThresholds(ctx.db, org.id, now), billingAnchorOf(ctx.db, org.id, now)])
        : [[], undefined];
      return c.html(
        <Page title="meterbox · threshold alerts">
          <header>
            <h1>meterbox · threshold alerts</h1>
            <nav>
              <a href="/admin">Back to the dashboard</a>
            </nav>
          </header>
          <main>
            {q.flash ? (
              <p class="flash" role="status" data-testid="flash">
                {q.flash}
              </p>
            ) : null}
            {error ? (
              <p class="flash error" role="alert" data-testid="threshold-error">
                {error}
              </p>
            ) : null}
            <section aria-labelledby="pick">
              <h2 id="pick">Organization</h2>
              <form method="get" action={PATH} class="row">
                <label>
                  Organization id
                  <input name="organization" required value={organization} />
                </label>
                <button type="submit" class="secondary">
                  Show
                </button>
              </form>
            </section>
            {org ? (
              <section aria-labelledby="thresholds" data-testid="thresholds">
                <h2 id="thresholds">
                  Thresholds of {org.name} <code>{org.id}</code>
                </h2>
                {anchor ? (
                  <p data-testid="threshold-period">
                    Period now: {anchor.period.start} – {anchor.period.end} (the Stripe subscription's period
                    while it holds; else{' '}
                    {anchor.billingAnchorDate
                      ? `monthly from the billing anchor ${anchor.billingAnchorDate}`
                      : 'UTC months: no billing anchor'}
                    , set with meterbox thresholds period --anchor).
                  </p>
                ) : null}
                <p class="muted">
                  Usage is the organization's stored readings in its current billing period, voided ones
                  excluded. Reaching a quantity sends usage.threshold.crossed once; a correction bringing
                  usage back under sends usage.threshold.resolved; the next period re-arms it.
                </p>
                {thresholds.length === 0 ? (
                  <p data-testid="no-thresholds">No threshold.</p>
                ) : (
                  <div class="scroll">
                    <table data-testid="threshold-table">
                      <thead>
                        <tr>
                          <th>Threshold</th>
                          <th>Meter</th>
                          <th class="num">Quantity</th>
                          <th class="num">Usage this period</th>
                          <th>State</th>
                          <th>Period (UTC)</th>
                          <th>Crossed at</th>
                          <th />
                        </tr>
                      </thead>
                      <tbody>
                        {thresholds.map((t) => (
                          <tr data-threshold={t.id} data-state={t.state}>
                            <td>{t.id}</td>
                            <td>{t.meter}</td>
                            <td class="num">{fmtNum(t.quantity)}</td>
                            <td class="num">{fmtNum(t.usage)}</td>
                            <td>{t.state}</td>
                            <td>
                              {t.periodStart} – {t.periodEnd}
                            </td>
                            <td>{t.crossedAt ?? '—'}</td>
                            <td>
                              <form method="post" action={`${PATH}/remove`} class="inline">
                                <input type="hidden" name="organization" value={org.id} />
                                <input type="hidden" name="id" value={t.id} />
                                <button type="submit" class="secondary">
                                  Remove
                                </button>
                              </form>
                            </td>
                          </tr>
                        ))}
                      </tbody>
                    </table>
                  </div>
                )}
                <form method="post" action={PATH} class="row spaced" data-testid="add-threshold">
                  <input type="hidden" name="organization" value={org.id} />
                  <label>
                    Meter
                    <select name="meter">
                      <option value="temperature_readings">
                        temperature_readings (readings this period)
                      </option>
                      <option value="active_sensors">
                        active_sensors (the last count reported this period)
                      </option>
                    </select>
                  </label>
                  <label>
                    Quantity
                    <input name="quantity" type="number" min="1" step="1" required />
                  </label>
                  <button type="submit">Add threshold</button>
                </form>
              </section>
            ) : null}
          </main>
        </Page>,
      );
    },
  );

  routes.route(
    {
      method: 'post',
      path: PATH,
      summary: `Add a usage threshold (HTML form, application/x-www-form-urlencoded: organization, quantity, meter); answers 303 to ${PATH}`,
      tag: 'admin dashboard',
      security: 'admin',
      responses: { 303: { description: 'redirect to the thresholds page' } },
    },
    async (c) => {
      const form = await c.req.parseBody();
      const organization = field(form, 'organization');
      if (!isOrganizationId(organization)) return back(c, '', 'An organization id is needed.', 'error');
      try {
        const meter = field(form, 'meter');
        const t = await createThreshold(
          ctx.db,
          organization,
          { quantity: field(form, 'quantity'), ...(meter ? { meter } : {}) } as ThresholdInput,
          ctx.clock.now(),
        );
        ctx.log.info(
          { organizationId: organization, thresholdId: t.id, quantity: t.quantity },
          'admin: threshold added from the dashboard',
        );
        return back(
          c,
          organization,
          `Threshold ${t.id} of ${t.quantity} on ${t.meter} added: usage so far ${t.usage}, ${t.state}.`,
          'flash',
        );
      } catch (err) {
        if (refused(err)) return back(c, organization, explain(err as AppError), 'error');
        throw err;
      }
    },
  );

  routes.route(
    {
      method: 'post',
      path: `${PATH}/remove`,
      summary: `Remove a usage threshold (HTML form, application/x-www-form-urlencoded: organization, id); answers 303 to ${PATH}`,
      tag: 'admin dashboard',
      security: 'admin',
      responses: { 303: { description: 'redirect to the thresholds page' } },
    },
    async (c) => {
      const form = await c.req.parseBody();
      const organization = field(form, 'organization');
      const id = field(form, 'id');
      if (!isOrganizationId(organization)) return back(c, '', 'An organization id is needed.', 'error');
      try {
        await removeThreshold(ctx.db, organization, id);
        ctx.log.info(
          { organizationId: organization, thresholdId: id },
          'admin: threshold removed from the dashboard',
        );
        return back(c, organization, `Threshold ${id} removed.`, 'flash');
      } catch (err) {
        if (refused(err)) return back(c, organization, (err as AppError).message, 'error');
        throw err;
      }
    },
  );

  return routes;
}
