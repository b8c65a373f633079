// /v1/sensors: register, list and (de)activate the calling organization's sensors. Another
// organization's sensor is a 404, never visible.
import { z } from 'zod';
import type { Context } from '../context-type.js';
import { apiKeyAuth } from '../http/auth.js';
import { AppError, notFound } from '../http/errors.js';
import { documentedRoutes } from '../http/openapi.js';
import type { HttpModule } from '../http/types.js';
import { parseBody, parseQuery } from '../http/validate.js';
import {
  createSensorSchema,
  listSensorsQuerySchema,
  sensorListSchema,
  sensorSchema,
  updateSensorSchema,
} from '../ingest/schemas.js';
import { createSensor, listSensors, UnknownCursorError, updateSensor } from '../ingest/sensors.js';

const sensorId = z.uuid();

export function sensorsRoutes(ctx: Context): HttpModule {
  const routes = documentedRoutes('/v1/sensors');
  routes.app.use('*', apiKeyAuth(ctx));

  routes.route(
    {
      method: 'post',
      path: '/v1/sensors',
      summary: 'Register a sensor (active unless "active": false)',
      tag: 'sensors',
      security: 'apiKey',
      body: createSensorSchema,
      responses: { 201: { description: 'the new sensor', schema: sensorSchema } },
    },
    async (c) => {
      const input = await parseBody(c, createSensorSchema);
      const sensor = await ctx.db
        .transaction()
        .execute((trx) => createSensor(trx, ctx.boss, ctx.clock, c.get('organizationId'), input));
      return c.json(sensor, 201);
    },
  );

  routes.route(
    {
      method: 'get',
      path: '/v1/sensors',
      summary: "List the organization's sensors in creation order, one page at a time",
      tag: 'sensors',
      security: 'apiKey',
      query: listSensorsQuerySchema,
      responses: { 200: { description: 'one page of sensors', schema: sensorListSchema } },
    },
    async (c) => {
      const query = parseQuery(c, listSensorsQuerySchema);
      try {
        const page = await listSensors(ctx.db, c.get('organizationId'), {
          limit: query.limit,
          cursor: query.cursor,
          active: query.active === undefined ? undefined : query.active === 'true',
        });
        return c.json(page);
      } catch (err) {
        if (err instanceof UnknownCursorError) {
          throw new AppError(422, 'validation_failed', 'the query string is invalid', [
            { field: 'cursor', message: 'cursor must be a nextCursor from a previous page' },
          ]);
        }
        throw err;
      }
    },
  );

  routes.route(
    {
      method: 'patch',
      path: '/v1/sensors/{id}',
      summary: 'Activate, deactivate ({"active": false}) or rename a sensor',
      tag: 'sensors',
      security: 'apiKey',
      body: updateSensorSchema,
      responses: { 200: { description: 'the updated sensor', schema: sensorSchema } },
    },
    async (c) => {
      // A malformed id names no sensor: 404, like another organization's sensor.
      const parsedId = sensorId.safeParse(c.req.param('id'));
      if (!parsedId.success) throw notFound('sensor');
      const id = parsedId.data;
      const patch = await parseBody(c, updateSensorSchema);
      const sensor = await ctx.db
        .transaction()
        .execute((trx) => updateSensor(trx, ctx.boss, ctx.clock, c.get('organizationId'), id, patch));
      if (!sensor) throw notFound('sensor');
      return c.json(sensor);
    },
  );

  return routes;
}
