// Shared Hono typing for meterbox's HTTP layer.
import type { Hono } from 'hono';
import type { RouteDoc } from './openapi.js';

export interface AppVariables {
  /** Set by API-key auth: the calling organization. */
  organizationId: string;
  requestId: string;
}

export interface AppEnv {
  Variables: AppVariables;
}

/** One resource's sub-app, mounted with app.route(prefix, app), and its OpenAPI entries. */
export interface HttpModule {
  prefix: string;
  app: Hono<AppEnv>;
  docs: RouteDoc[];
}
