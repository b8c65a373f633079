// The dashboard's routes under /admin: the overview page (dashboard.tsx), sign-in and sign-out, and
// the forms that retry failed rows and redrive the dead-letter queue (each answering 303 to /admin).
import type { Context as HonoContext } from 'hono';
import { AppError } from '../http/errors.js';
import { documentedRoutes, type RouteDoc } from '../http/openapi.js';
import type { AppEnv, HttpModule } from '../http/types.js';
import { crossSite, endSession, startSession, tokenMatches } from './auth.js';
import { type DashboardDeps, dashboard, periodQuery } from './dashboard.js';
import { LoginPage } from './dashboard-page.js';
import {
  cutOver,
  DestinationChangeError,
  prepareDestination,
  setDestination,
  startParallel,
} from './destinations.js';
import { redriveAndReopen, redriveDepsOf, retryFailed } from './outbox.js';

/** The flash line of a redrive: what was resent, reconciled, and what was refused and why. */
function redriveMessage(result: {
  retried: number;
  refused: { identifier: string }[];
  reconciled: { delivered: unknown[]; reissued: unknown[]; ambiguous: { reason: string }[] } | null;
}): string {
  const parts = [
    result.retried === 0
      ? 'No failed row was resent.'
      : `Retried ${result.retried} row${result.retried === 1 ? '' : 's'}; delivery queued.`,
  ];
  if (result.reconciled) {
    const r = result.reconciled;
    parts.push(
      `Reconciled: ${r.delivered.length} group(s) found at the destination and marked delivered, ${r.reissued.length} missing and resent under a new identifier, ${r.ambiguous.length} left failed${r.ambiguous[0] ? ` (${r.ambiguous[0].reason})` : ''}.`,
    );
  }
  if (result.refused.length > 0) {
    parts.push(
      `${result.refused.length} group(s) refused: their identifiers are past the destination's dedupe window and a resend could bill twice. Use "Reconcile old groups, then retry all failed" to compare them with the destination first.`,
    );
  }
  return parts.join(' ');
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
    FORM_DOC(
      '/admin/ui/retry',
      'Retry one failed row or all of them; groups past their identifier window are refused and listed, or with reconcile=1 compared with the destination first',
      'id, or all=1; reconcile=1',
    ),
    async (c) => {
      const form = await c.req.parseBody();
      const id = typeof form.id === 'string' && /^\d{1,19}$/.test(form.id) ? form.id : undefined;
      if (!id && form.all !== '1') return back(c, 'Nothing to retry.', 'error');
      const reconcile = form.reconcile === '1';
      const result = await retryFailed(
        ctx.db,
        ctx.boss,
        { ...(id ? { ids: [id] } : { all: true }), reconcile },
        undefined,
        reconcile ? await redriveDepsOf(ctx) : undefined,
      );
      ctx.log.info(
        { retried: result.retried, jobs: result.jobs, refused: result.refused.length, id: id ?? 'all' },
        'admin: failed outbox rows retried from the dashboard',
      );
      return back(c, redriveMessage(result), result.refused.length > 0 ? 'error' : 'flash');
    },
  );

  routes.route(
    FORM_DOC('/admin/ui/redrive', 'Redrive the dead-letter queue', 'reconcile=1 (optional)'),
    async (c) => {
      const form = await c.req.parseBody();
      const reconcile = form.reconcile === '1';
      const result = await redriveAndReopen(ctx.db, ctx.boss, 1000, {
        reconcile,
        ...(reconcile ? { deps: await redriveDepsOf(ctx) } : {}),
      });
      ctx.log.info(
        { moved: result.moved, retried: result.retried, refused: result.refused.length },
        'admin: dead-letter queue redriven from the dashboard',
      );
      return back(
        c,
        `Redrove ${result.moved} job${result.moved === 1 ? '' : 's'}. ${redriveMessage(result)}`,
        result.refused.length > 0 ? 'error' : 'flash',
      );
    },
  );

  routes.route(
    FORM_DOC(
      '/admin/ui/destinations',
      "Change an organization's destinations at the next hour boundary",
      'organization, action (set, start-parallel or cut-over), destination (stripe or metronome)',
    ),
    async (c) => {
      const form = await c.req.parseBody();
      const organization = typeof form.organization === 'string' ? form.organization.trim() : '';
      const action = form.action;
      const destination =
        form.destination === 'stripe' || form.destination === 'metronome' ? form.destination : undefined;
      if (!/^[0-9a-f-]{36}$/i.test(organization)) return back(c, 'An organization id is needed.', 'error');
      const now = ctx.clock.now();
      try {
        let message: string;
        if (action === 'cut-over') {
          const cut = await cutOver(ctx.db, organization, { now });
          message = `Cut-over at ${cut.at.toISOString()}: usage before it bills ${cut.from}, from it ${cut.to}.`;
        } else if ((action === 'set' || action === 'start-parallel') && destination) {
          await prepareDestination(ctx, organization, destination);
          const change =
            action === 'set'
              ? await setDestination(ctx.db, organization, destination, { now })
              : await startParallel(ctx.db, organization, destination, { now });
          message = change.unchanged
            ? 'Nothing to change.'
            : action === 'set'
              ? `Bills to ${destination} alone from ${change.at.toISOString()}.`
              : `Also sends its usage to ${destination} (shadow) from ${change.at.toISOString()}.`;
        } else {
          return back(c, 'Unknown change.', 'error');
        }
        ctx.log.info({ organization, action, destination }, 'admin: destination change from the dashboard');
        return back(c, message);
      } catch (err) {
        if (err instanceof DestinationChangeError) return back(c, err.message, 'error');
        throw err;
      }
    },
  );

  return routes;
}
