// Admin API for usage tokens: read-only GET /v1/usage credentials of one organization, created by the
// operator for their customer's app (shown once), listed and revoked (src/credentials/usage-tokens.ts).
import { z } from 'zod';
import type { Context } from '../context-type.js';
import { createUsageToken, listUsageTokens, revokeUsageToken } from '../credentials/usage-tokens.js';
import { pgText } from '../db/input-types.js';
import { AppError, notFound } from '../http/errors.js';
import { documentedRoutes } from '../http/openapi.js';
import type { HttpModule } from '../http/types.js';
import { parseBody } from '../http/validate.js';

const PREFIX = '/admin/organizations/{id}/usage-tokens';

export const createUsageTokenSchema = z.object({
  name: pgText('name').trim().min(1).max(200).optional(),
  ttlHours: z
    .number({ error: 'ttlHours must be a whole number of hours' })
    .int({ error: 'ttlHours must be a whole number of hours' })
    .min(1, { error: 'ttlHours must be at least 1' })
    .optional()
    .describe('lifetime in hours; default USAGE_TOKEN_DEFAULT_TTL_HOURS, at most USAGE_TOKEN_MAX_TTL_HOURS'),
});

const date = z.iso.datetime();
export const usageTokenSchema = z.object({
  id: z.uuid(),
  organizationId: z.uuid(),
  name: z.string(),
  prefix: z.string().describe('the first characters of the token, to tell tokens apart'),
  createdAt: date,
  expiresAt: date,
  revokedAt: date.nullable(),
});
const createdUsageTokenSchema = usageTokenSchema.extend({
  token: z.string().describe('the usage token (mbu_…); shown only in this response'),
});

const uuid = z.uuid();
function idParam(value: string | undefined, what: string): string {
  const parsed = uuid.safeParse(value);
  if (!parsed.success) throw notFound(what);
  return parsed.data;
}

/** The lifetime a new token gets: the request's, else the default, never past the maximum. */
export function usageTokenTtl(
  config: Pick<Context['config'], 'USAGE_TOKEN_DEFAULT_TTL_HOURS' | 'USAGE_TOKEN_MAX_TTL_HOURS'>,
  requested: number | undefined,
): { ttlHours: number } | { error: string } {
  const max = config.USAGE_TOKEN_MAX_TTL_HOURS;
  if (requested === undefined) return { ttlHours: Math.min(config.USAGE_TOKEN_DEFAULT_TTL_HOURS, max) };
  if (requested > max) return { error: `ttlHours may be at most ${max} (USAGE_TOKEN_MAX_TTL_HOURS)` };
  return { ttlHours: requested };
}

export function usageTokenAdminRoutes(ctx: Pick<Context, 'db' | 'clock' | 'config'>): HttpModule {
  const routes = documentedRoutes('/admin/organizations');

  routes.route(
    {
      method: 'post',
      path: PREFIX,
      summary:
        "Create a read-only usage token for the organization's customer app: GET /v1/usage of this " +
        'organization only, until it expires or is revoked (the token is shown only here)',
      tag: 'admin',
      security: 'admin',
      body: createUsageTokenSchema,
      responses: { 201: { description: 'the new token', schema: createdUsageTokenSchema } },
    },
    async (c) => {
      const id = idParam(c.req.param('id'), 'organization');
      const input = (await c.req.text()).trim() === '' ? {} : await parseBody(c, createUsageTokenSchema);
      const ttl = usageTokenTtl(ctx.config, input.ttlHours);
      if ('error' in ttl) {
        throw new AppError(422, 'validation_failed', 'the request body is invalid', [
          { field: 'ttlHours', message: ttl.error },
        ]);
      }
      const token = await createUsageToken(ctx.db, id, {
        name: input.name,
        ttlHours: ttl.ttlHours,
        now: ctx.clock.now(),
      });
      if (!token) throw notFound('organization');
      return c.json(token, 201);
    },
  );

  routes.route(
    {
      method: 'get',
      path: PREFIX,
      summary:
        "List an organization's usage tokens (prefix only), newest first, expired and revoked ones included",
      tag: 'admin',
      security: 'admin',
      responses: {
        200: { description: 'the tokens', schema: z.object({ tokens: z.array(usageTokenSchema) }) },
      },
    },
    async (c) => {
      const id = idParam(c.req.param('id'), 'organization');
      const org = await ctx.db
        .selectFrom('organizations')
        .select('id')
        .where('id', '=', id)
        .executeTakeFirst();
      if (!org) throw notFound('organization');
      return c.json({ tokens: await listUsageTokens(ctx.db, id) });
    },
  );

  routes.route(
    {
      method: 'delete',
      path: `${PREFIX}/{tokenId}`,
      summary: 'Revoke a usage token (idempotent); GET /v1/usage with it is then 401',
      tag: 'admin',
      security: 'admin',
      responses: { 200: { description: 'the revoked token', schema: usageTokenSchema } },
    },
    async (c) => {
      const id = idParam(c.req.param('id'), 'organization');
      const tokenId = idParam(c.req.param('tokenId'), 'usage token');
      const token = await revokeUsageToken(ctx.db, id, tokenId, ctx.clock.now());
      if (!token) throw notFound('usage token');
      return c.json(token);
    },
  );
  return routes;
}
