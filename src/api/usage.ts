// GET /v1/usage: the calling organization's readings stored against meter usage pending,
// delivered, failed and expired over a period.
import type { Context } from '../context-type.js';
import { apiKeyAuth } from '../http/auth.js';
import { AppError } from '../http/errors.js';
import { documentedRoutes } from '../http/openapi.js';
import type { HttpModule } from '../http/types.js';
import { parseQuery } from '../http/validate.js';
import { usageQuerySchema, usageResponseSchema } from '../ingest/schemas.js';
import { usageForPeriod } from '../ingest/usage.js';

function startOfUtcMonth(at: Date): Date {
  return new Date(Date.UTC(at.getUTCFullYear(), at.getUTCMonth(), 1));
}

export function usageRoutes(ctx: Context): HttpModule {
  const routes = documentedRoutes('/v1/usage');
  routes.app.use('*', apiKeyAuth(ctx));

  routes.route(
    {
      method: 'get',
      path: '/v1/usage',
      summary:
        'Readings stored vs temperature_readings meter usage by status over [from, to) (both by ' +
        'ingestion time; from defaults to the start of the UTC month of to, to to now)',
      tag: 'ingestion',
      security: 'apiKey',
      query: usageQuerySchema,
      responses: { 200: { description: 'usage over the period', schema: usageResponseSchema } },
    },
    async (c) => {
      const query = parseQuery(c, usageQuerySchema);
      const to = query.to ? new Date(query.to) : ctx.clock.now();
      const from = query.from ? new Date(query.from) : startOfUtcMonth(to);
      if (from >= to) {
        throw new AppError(422, 'validation_failed', 'the query string is invalid', [
          { field: 'from', message: 'from must be before to' },
        ]);
      }
      return c.json(await usageForPeriod(ctx.db, c.get('organizationId'), from, to));
    },
  );
  return routes;
}
