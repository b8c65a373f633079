// Shared Hono typing for meterbox's HTTP layer.
import type { Hono } from 'hono';
import type { z } from 'zod';
import type { WebhookOutcome } from '../observability/metrics.js';

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

/** Who may call a route, as its OpenAPI entry says. */
export type Security = 'apiKey' | 'apiKeyOrUsageToken' | 'admin' | 'stripeSignature' | 'none';

export interface RouteDoc {
  method: 'get' | 'post' | 'patch' | 'put' | 'delete';
  /** OpenAPI path, e.g. /v1/sensors/{id} */
  path: string;
  summary: string;
  tag: string;
  security: Security;
  body?: z.ZodType;
  query?: z.ZodObject;
  /** Success responses: status → schema (or description only). */
  responses: Record<number, { description: string; schema?: z.ZodType; contentType?: string }>;
}
