// The admin surface as one HTTP module under /admin: the JSON API, the organizations API the CLI
// calls, and the dashboard, all behind one guard mounted once here.
import type { Context as HonoContext } from 'hono';
import { Hono } from 'hono';
import type { Context } from '../context-type.js';
import type { AppEnv, HttpModule } from '../http/types.js';
import { alertRoutes } from './alerts-routes.js';
import { adminGuard } from './auth.js';
import { correctionDashboardRoutes } from './corrections-dashboard.js';
import { correctionRoutes } from './corrections-routes.js';
import { LoginPage } from './dashboard-page.js';
import { dashboardRoutes } from './dashboard-routes.js';
import { destinationRoutes } from './destinations-routes.js';
import { organizationAdminRoutes } from './organizations-routes.js';
import { adminRoutes } from './routes.js';
import { thresholdDashboardRoutes } from './thresholds-dashboard.js';
import { usageTokenAdminRoutes } from './usage-tokens-routes.js';

export const ADMIN_PREFIX = '/admin';

/**
 * What a browser gets without credentials: the correction pages send it back to the dashboard,
 * the dashboard's pages and forms show the sign-in form; the JSON API gets the guard's 401.
 */
function refuseBrowser(c: HonoContext<AppEnv>): Response | Promise<Response> | undefined {
  const path = c.req.path;
  if (path === '/admin/ui/corrections' || path.startsWith('/admin/ui/corrections/')) {
    return c.redirect('/admin', 303);
  }
  if (path === '/admin' || path.startsWith('/admin/ui/')) return c.html(LoginPage({}), 401);
  return undefined;
}

export function adminModule(
  ctx: Pick<Context, 'db' | 'boss' | 'stripe' | 'metronome' | 'config' | 'clock' | 'log' | 'distributed'>,
): HttpModule {
  const app = new Hono<AppEnv>();
  app.use('*', adminGuard(ctx, refuseBrowser));
  const parts = [
    adminRoutes(ctx),
    alertRoutes(ctx),
    correctionRoutes(ctx),
    correctionDashboardRoutes(ctx),
    dashboardRoutes(ctx),
    thresholdDashboardRoutes(ctx),
    organizationAdminRoutes(ctx),
    destinationRoutes(ctx),
    usageTokenAdminRoutes(ctx),
  ];
  for (const part of parts) {
    if (!part.prefix.startsWith(ADMIN_PREFIX)) throw new Error(`admin module outside /admin: ${part.prefix}`);
    app.route(part.prefix.slice(ADMIN_PREFIX.length) || '/', part.app);
  }
  return { prefix: ADMIN_PREFIX, app, docs: parts.flatMap((p) => p.docs) };
}
