// The admin surface's HTTP modules, mounted under /admin by createApp: the JSON API and the dashboard.
import type { Context } from '../context-type.js';
import type { HttpModule } from '../http/types.js';
import { correctionDashboardRoutes } from './corrections-dashboard.js';
import { correctionRoutes } from './corrections-routes.js';
import { dashboardRoutes } from './dashboard.js';
import { adminRoutes } from './routes.js';

export function adminModules(
  ctx: Pick<Context, 'db' | 'boss' | 'stripe' | 'config' | 'clock' | 'log'>,
): HttpModule[] {
  return [adminRoutes(ctx), correctionRoutes(ctx), correctionDashboardRoutes(ctx), dashboardRoutes(ctx)];
}
