// Shared Hono typing for meterbox's HTTP layer.
import type { Hono } from 'hono';
import type { WebhookOutcome } from '../observability/metrics.js';
import type { RouteDoc } from './openapi.js';

export interface AppVariables {
  /** Set by API-key auth: the calling organization. */
  organizationId: string;
  /** Set by auth with the organization: which credential called (`key:<id>`, `usage-token:<id>`). */
  credential?: string;
  requestId: string;
  /**
   * Set by the webhook handler where it decides the outcome (src/api/webhooks.ts); the metrics
   * middleware counts it. `type` is the event's type once the signature passed, else `unverified`.
   */
  webhook?: { type: string; outcome: WebhookOutcome };
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
