// The dashboard's routes under /admin: the overview page (dashboard.tsx), sign-in and sign-out, and
// the forms that retry failed rows and redrive the dead-letter queue (each answering 303 to /admin).
import type { Context as HonoContext } from 'hono';
import { AppError } from '../http/errors.js';
import { documentedRoutes, type RouteDoc } from '../http/openapi.js';
import type { AppEnv, HttpModule } from '../http/types.js';
import { crossSite, endSession, startSession, tokenMatches } from './auth.js';
import { type DashboardDeps, dashboard, periodQuery } from './dashboard.js';
import { LoginPage } from './dashboard-page.js';
import { redriveAndReopen, retryFailed } from './outbox.js';

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
