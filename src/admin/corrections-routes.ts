// Admin API for usage corrections: POST voids an organization's readings over [from, to) and queues
// the credit for what had been billed (?dryRun=true only shows what it would void); GET lists them.
import { z } from 'zod';
import type { Context } from '../context-type.js';
import { notFound } from '../http/errors.js';
import { documentedRoutes } from '../http/openapi.js';
import type { HttpModule } from '../http/types.js';
import { parseBody, parseQuery } from '../http/validate.js';
import {
  correctionBody,
  correctionPreview,
  correctionQuery,
  correctionView,
  createCorrection,
  listCorrections,
  previewCorrection,
} from './corrections.js';

type Deps = Pick<Context, 'db' | 'boss' | 'config' | 'clock' | 'log'>;

const PATH = '/admin/organizations/{id}/usage-corrections';

const uuid = z.uuid();
function organizationParam(value: string | undefined): string {
  const parsed = uuid.safeParse(value);
  if (!parsed.success) throw notFound('organization');
  return parsed.data;
}

export function correctionRoutes(ctx: Deps): HttpModule {
  const routes = documentedRoutes('/admin');
  const retentionDays = ctx.config.READINGS_RETENTION_DAYS;

  routes.route(
    {
      method: 'post',
      path: PATH,
      summary:
        "Void the organization's readings with recorded_at in [from, to) (one sensor or all) and credit what had been billed for them; dryRun=true shows what would be voided and changes nothing",
      tag: 'admin',
      security: 'admin',
      query: correctionQuery,
      body: correctionBody,
      responses: {
        201: { description: 'the correction', schema: z.object({ correction: correctionView }) },
        200: {
          description: 'dry run: what would be voided',
          schema: z.object({ preview: correctionPreview }),
        },
      },
    },
    async (c) => {
      const organizationId = organizationParam(c.req.param('id'));
      const query = parseQuery(c, correctionQuery);
      const input = await parseBody(c, correctionBody);
      const now = ctx.clock.now();
      if (query.dryRun === 'true') {
        return c.json({
          preview: await previewCorrection(ctx.db, organizationId, input, { now, retentionDays }),
        });
      }
      const correction = await ctx.db
        .transaction()
        .execute((trx) => createCorrection(trx, ctx.boss, organizationId, input, { now, retentionDays }));
      ctx.log.info(
        {
          organizationId,
          correctionId: correction.id,
          readingsVoided: correction.readingsVoided,
          billedReadingsVoided: correction.billedReadingsVoided,
        },
        'admin: usage correction recorded',
      );
      return c.json({ correction }, 201);
    },
  );

  routes.route(
    {
      method: 'get',
      path: PATH,
      summary: "The organization's usage corrections, newest first, with the delivery state of their credits",
      tag: 'admin',
      security: 'admin',
      responses: {
        200: { description: 'corrections', schema: z.object({ corrections: z.array(correctionView) }) },
      },
    },
    async (c) => {
      const organizationId = organizationParam(c.req.param('id'));
      const org = await ctx.db
        .selectFrom('organizations')
        .select('id')
        .where('id', '=', organizationId)
        .executeTakeFirst();
      if (!org) throw notFound('organization');
      return c.json({ corrections: await listCorrections(ctx.db, organizationId) });
    },
  );

  return routes;
}
