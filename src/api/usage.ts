// GET /v1/usage: the calling organization's usage. Without `window`, the totals answer (readings
// stored against meter usage pending, delivered, failed and expired over a period), as it always was;
// with `window` (and optionally tz, groupBy=sensor), the period cut into windows with stored, voided,
// billed and pending readings each. Callable with the organization's API key or a read-only usage
// token (the operator hands it to their customer's app); rate limited per credential.
import { sql } from 'kysely';
import { z } from 'zod';
import type { Context } from '../context-type.js';
import { usageAuth } from '../http/auth.js';
import { AppError, type ErrorDetail } from '../http/errors.js';
import { documentedRoutes } from '../http/openapi.js';
import { RateLimiter, rateLimitPerCredential } from '../http/rate-limit.js';
import type { HttpModule } from '../http/types.js';
import { parseQuery } from '../http/validate.js';
import {
  type UsageWindow,
  usageQuerySchema,
  usageResponseSchema,
  usageWindowsResponseSchema,
} from '../ingest/schemas.js';
import { TooManyCellsError, usageByWindow, usageForPeriod } from '../ingest/usage.js';

const DAY_MS = 86_400_000;
/** Longest [from, to) per window size: at most ~750 hours, 367 days or 25 months in one answer. */
export const MAX_RANGE_DAYS: Readonly<Record<UsageWindow, number>> = { hour: 31, day: 366, month: 760 };
/** Most (window, sensor) cells in one answer with groupBy=sensor. */
export const MAX_CELLS = 20_000;

function startOfUtcMonth(at: Date): Date {
  return new Date(Date.UTC(at.getUTCFullYear(), at.getUTCMonth(), 1));
}

function invalid(details: ErrorDetail[]): AppError {
  return new AppError(422, 'validation_failed', 'the query string is invalid', details);
}

export function usageRoutes(ctx: Context): HttpModule {
  const routes = documentedRoutes('/v1/usage');
  routes.app.use('*', usageAuth(ctx));
  const perMinute = ctx.config.USAGE_RATE_LIMIT_PER_MINUTE;
  routes.app.use('*', rateLimitPerCredential(perMinute > 0 ? new RateLimiter(perMinute) : undefined));

  // The zones Postgres knows, read once per process (the list changes with a server upgrade only):
  // a name it does not know would otherwise fail inside the statement.
  let zones: Promise<Set<string>> | undefined;
  const knownZones = () => {
    zones ??= sql<{ name: string }>`SELECT name FROM pg_timezone_names`
      .execute(ctx.db)
      .then((r) => new Set(r.rows.map((row) => row.name)))
      .catch((err: unknown) => {
        zones = undefined;
        throw err;
      });
    return zones;
  };

  routes.route(
    {
      method: 'get',
      path: '/v1/usage',
      summary:
        'Usage of the calling organization over [from, to) by ingestion time. Without window: readings ' +
        'stored vs temperature_readings meter usage by status (from defaults to the start of the UTC ' +
        'month of to, to to now). With window=hour|day|month: windows cut in tz (IANA, default UTC; a ' +
        'DST day is 23 or 25 hours), each with stored, voided, billed and pending readings, by sensor ' +
        'with groupBy=sensor (from defaults to the start of the month of to in tz; at most 31 days of ' +
        'hours, 366 of days, 760 of months; not beyond READINGS_RETENTION_DAYS). Accepts the ' +
        "organization's API key or a read-only usage token; rate limited per credential (429).",
      tag: 'ingestion',
      security: 'apiKeyOrUsageToken',
      query: usageQuerySchema,
      responses: {
        200: {
          description: 'usage over the period: the totals answer, or the windowed one with window',
          schema: z.union([usageResponseSchema, usageWindowsResponseSchema]),
        },
      },
    },
    async (c) => {
      const query = parseQuery(c, usageQuerySchema);
      const organizationId = c.get('organizationId');
      // A credential reads its own organization only; naming another is refused, never answered.
      if (query.organizationId !== undefined && query.organizationId !== organizationId) {
        throw new AppError(403, 'forbidden', 'this credential may read its own organization only');
      }
      const now = ctx.clock.now();
      const to = query.to ? new Date(query.to) : now;
      if (query.window === undefined) {
        const from = query.from ? new Date(query.from) : startOfUtcMonth(to);
        if (from >= to) throw invalid([{ field: 'from', message: 'from must be before to' }]);
        return c.json(await usageForPeriod(ctx.db, organizationId, from, to));
      }

      const tz = query.tz ?? 'UTC';
      if (!(await knownZones()).has(tz)) {
        throw invalid([
          { field: 'tz', message: `unknown time zone ${tz}: use an IANA name such as Europe/Berlin` },
        ]);
      }
      let from: Date;
      if (query.from) from = new Date(query.from);
      else {
        const start = await sql<{ start: Date }>`
          SELECT date_trunc('month', ${to}::timestamptz - interval '1 microsecond', ${tz}) AS start`.execute(
          ctx.db,
        );
        from = new Date(start.rows[0]!.start);
      }
      const details: ErrorDetail[] = [];
      if (from >= to) details.push({ field: 'from', message: 'from must be before to' });
      const maxDays = MAX_RANGE_DAYS[query.window];
      if (to.getTime() - from.getTime() > maxDays * DAY_MS) {
        details.push({
          field: 'to',
          message: `with window=${query.window}, [from, to) may span at most ${maxDays} days`,
        });
      }
      const retentionDays = ctx.config.READINGS_RETENTION_DAYS;
      if (from.getTime() < now.getTime() - retentionDays * DAY_MS) {
        details.push({
          field: 'from',
          message: `from is beyond the readings retention (${retentionDays} days); use the totals answer (no window) for older periods`,
        });
      }
      if (details.length > 0) throw invalid(details);
      try {
        return c.json(
          await usageByWindow(ctx.db, organizationId, {
            from,
            to,
            window: query.window,
            tz,
            bySensor: query.groupBy === 'sensor',
            maxCells: MAX_CELLS,
          }),
        );
      } catch (err) {
        if (err instanceof TooManyCellsError) {
          throw invalid([
            {
              field: 'groupBy',
              message: `more than ${MAX_CELLS} (window, sensor) cells: use a shorter range or a larger window`,
            },
          ]);
        }
        throw err;
      }
    },
  );
  return routes;
}
