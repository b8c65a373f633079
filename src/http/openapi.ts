// The OpenAPI document is generated from the same zod schemas that validate requests: each route is
// registered together with its description (documentedRoutes), so its path is written once.
import type { Context as HonoContext } from 'hono';
import { Hono } from 'hono';
import { z } from 'zod';
import type { AppEnv, HttpModule, RouteDoc, Security } from './types.js';

export type { RouteDoc, Security } from './types.js';

export const errorSchema = z.object({
  error: z.object({
    code: z.string(),
    message: z.string(),
    details: z.array(
      z.object({ index: z.number().int().optional(), field: z.string().optional(), message: z.string() }),
    ),
  }),
});

function jsonSchema(schema: z.ZodType, io: 'input' | 'output'): Record<string, unknown> {
  return z.toJSONSchema(schema, { io, unrepresentable: 'any', target: 'openapi-3.0' }) as Record<
    string,
    unknown
  >;
}

const SECURITY_SCHEMES = {
  apiKey: { type: 'http', scheme: 'bearer', description: 'Organization API key' },
  admin: { type: 'http', scheme: 'bearer', description: 'ADMIN_TOKEN' },
  stripeSignature: { type: 'apiKey', in: 'header', name: 'Stripe-Signature' },
  usageToken: {
    type: 'http',
    scheme: 'bearer',
    description: 'Read-only usage token of one organization (mbu_…, GET /v1/usage only)',
  },
} as const;

function securityOf(security: Security): unknown[] {
  if (security === 'none') return [];
  if (security === 'apiKeyOrUsageToken') return [{ apiKey: [] }, { usageToken: [] }];
  return [{ [security]: [] }];
}

export function buildOpenApi(routes: readonly RouteDoc[], version: string): Record<string, unknown> {
  const paths: Record<string, Record<string, unknown>> = {};
  for (const route of routes) {
    const responses: Record<string, unknown> = {};
    for (const [status, response] of Object.entries(route.responses)) {
      responses[status] = {
        description: response.description,
        ...(response.schema
          ? {
              content: {
                [response.contentType ?? 'application/json']: {
                  schema: jsonSchema(response.schema, 'output'),
                },
              },
            }
          : {}),
      };
    }
    responses.default = {
      description: 'Error',
      content: { 'application/json': { schema: jsonSchema(errorSchema, 'output') } },
    };
    const parameters: unknown[] = [];
    for (const match of route.path.matchAll(/\{(\w+)\}/g)) {
      parameters.push({ name: match[1], in: 'path', required: true, schema: { type: 'string' } });
    }
    if (route.query) {
      for (const [name, schema] of Object.entries(route.query.shape)) {
        parameters.push({
          name,
          in: 'query',
          required: !(schema as z.ZodType).safeParse(undefined).success,
          schema: jsonSchema(schema as z.ZodType, 'input'),
        });
      }
    }
    paths[route.path] ??= {};
    paths[route.path]![route.method] = {
      summary: route.summary,
      tags: [route.tag],
      security: securityOf(route.security),
      ...(parameters.length ? { parameters } : {}),
      ...(route.body
        ? {
            requestBody: {
              required: true,
              content: { 'application/json': { schema: jsonSchema(route.body, 'input') } },
            },
          }
        : {}),
      responses,
    };
  }
  return {
    openapi: '3.0.3',
    info: {
      title: 'meterbox',
      version,
      description:
        'Sensor readings ingestion billed through Stripe Billing Meters via a transactional outbox.',
    },
    components: { securitySchemes: SECURITY_SCHEMES },
    paths,
  };
}

export type RouteHandler = (c: HonoContext<AppEnv>) => Response | Promise<Response>;

export interface DocumentedRoutes extends HttpModule {
  /** Registers the handler at doc.path (OpenAPI syntax, full path) and records doc for the document. */
  route(doc: RouteDoc, handler: RouteHandler): void;
}

/** Hono's path for an OpenAPI path under `prefix`: `/v1/sensors/{id}` under `/v1/sensors` is `/:id`. */
export function honoPath(prefix: string, path: string): string {
  const base = prefix === '/' ? '' : prefix;
  if (path !== base && !path.startsWith(`${base}/`)) {
    throw new Error(`route ${path} is outside its module's prefix ${prefix}`);
  }
  return path.slice(base.length).replace(/\{(\w+)\}/g, ':$1') || '/';
}

/**
 * A module's sub-app whose routes carry their OpenAPI description: the one place a path is written.
 * Middleware for the whole module goes on `app` with app.use, as before.
 */
export function documentedRoutes(prefix: string): DocumentedRoutes {
  const app = new Hono<AppEnv>();
  const docs: RouteDoc[] = [];
  return {
    prefix,
    app,
    docs,
    route(doc, handler) {
      app.on(doc.method.toUpperCase(), honoPath(prefix, doc.path), handler);
      docs.push(doc);
    },
  };
}
