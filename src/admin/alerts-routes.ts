// Admin API for alerts (issue 45): webhook endpoints (the secret is in the creation's answer only),
// a signed test event, deliveries with their attempts and the redrive of dead ones, and an
// organization's usage thresholds and the billing anchor of their period.
import { z } from 'zod';
import {
  billingAnchorBody,
  billingAnchorOf,
  billingAnchorView,
  setBillingAnchor,
} from '../alerts/billing-anchor.js';
import { listDeliveries, redriveDeliveries, sendTestEvent } from '../alerts/delivery.js';
import {
  createEndpoint,
  endpointBody,
  endpointView,
  listEndpoints,
  removeEndpoint,
} from '../alerts/endpoints.js';
import { sensorSilenceAlertsOn, setSensorSilenceAlerts } from '../alerts/silence.js';
import {
  createThreshold,
  listThresholds,
  removeThreshold,
  thresholdBody,
  thresholdView,
} from '../alerts/threshold-admin.js';
import type { Context } from '../context-type.js';
import { notFound } from '../http/errors.js';
import { documentedRoutes } from '../http/openapi.js';
import type { HttpModule } from '../http/types.js';
import { parseBody, parseQuery } from '../http/validate.js';

type Deps = Pick<Context, 'db' | 'boss' | 'config' | 'clock' | 'log'>;

const uuid = z.uuid();
function organizationParam(value: string | undefined): string {
  const parsed = uuid.safeParse(value);
  if (!parsed.success) throw notFound('organization');
  return parsed.data;
}

const deliveryView = z.object({
  id: z.string(),
  eventId: z.string().describe('evt_…: the same on every attempt (the receiver deduplicates on it)'),
  type: z.string(),
  organizationId: z.string().nullable(),
  endpointId: z.string(),
  status: z.enum(['pending', 'delivered', 'dead', 'cancelled']),
  attempts: z.number().int(),
  lastStatus: z.number().int().nullable().describe("the receiver's HTTP status at the last attempt"),
  lastError: z.string().nullable(),
  createdAt: z.string(),
  lastAttemptAt: z.string().nullable(),
  deliveredAt: z.string().nullable(),
});

const deliveriesQuery = z.object({
  endpointId: z.string().optional(),
  organizationId: z.uuid().optional(),
  status: z.enum(['pending', 'delivered', 'dead', 'cancelled']).optional(),
  limit: z.coerce.number().int().min(1).max(500).default(100),
});

export function alertRoutes(ctx: Deps): HttpModule {
  const routes = documentedRoutes('/admin');

  routes.route(
    {
      method: 'post',
      path: '/admin/webhooks/endpoints',
      summary:
        'Add a webhook endpoint for alert events; the answer holds its signing secret, shown this once',
      tag: 'admin',
      security: 'admin',
      body: endpointBody,
      responses: {
        201: {
          description: 'the endpoint and its secret',
          schema: z.object({ endpoint: endpointView, secret: z.string().describe('whsec_…; shown once') }),
        },
      },
    },
    async (c) => {
      const input = await parseBody(c, endpointBody);
      const created = await createEndpoint(ctx.db, input);
      ctx.log.info(
        { endpointId: created.endpoint.id, url: created.endpoint.url },
        'admin: webhook endpoint added',
      );
      return c.json(created, 201);
    },
  );

  routes.route(
    {
      method: 'get',
      path: '/admin/webhooks/endpoints',
      summary: 'The webhook endpoints, with their pending and dead deliveries (never their secrets)',
      tag: 'admin',
      security: 'admin',
      responses: {
        200: { description: 'endpoints', schema: z.object({ endpoints: z.array(endpointView) }) },
      },
    },
    async (c) => c.json({ endpoints: await listEndpoints(ctx.db) }),
  );

  routes.route(
    {
      method: 'delete',
      path: '/admin/webhooks/endpoints/{id}',
      summary: 'Remove a webhook endpoint; its undelivered deliveries are cancelled',
      tag: 'admin',
      security: 'admin',
      responses: { 200: { description: 'removed', schema: z.object({ removed: z.string() }) } },
    },
    async (c) => {
      const id = c.req.param('id') ?? '';
      await removeEndpoint(ctx.db, id);
      return c.json({ removed: id });
    },
  );

  routes.route(
    {
      method: 'post',
      path: '/admin/webhooks/endpoints/{id}/test',
      summary:
        'Send a signed webhook.test event to the endpoint now (one attempt; if it fails the worker retries it)',
      tag: 'admin',
      security: 'admin',
      responses: {
        200: {
          description: 'the event and its first attempt',
          schema: z.object({
            eventId: z.string(),
            delivered: z.boolean(),
            status: z.number().int().nullable(),
            error: z.string().nullable(),
          }),
        },
      },
    },
    async (c) => {
      const id = c.req.param('id') ?? '';
      const { eventId, attempt } = await sendTestEvent(ctx, id, ctx.clock.now());
      return c.json({
        eventId,
        delivered: attempt?.ok ?? false,
        status: attempt?.status ?? null,
        error: attempt?.error ?? null,
      });
    },
  );

  routes.route(
    {
      method: 'get',
      path: '/admin/webhooks/deliveries',
      summary: 'Webhook deliveries, newest first, with their attempts and last outcome',
      tag: 'admin',
      security: 'admin',
      query: deliveriesQuery,
      responses: {
        200: { description: 'deliveries', schema: z.object({ deliveries: z.array(deliveryView) }) },
      },
    },
    async (c) => {
      const q = parseQuery(c, deliveriesQuery);
      return c.json({ deliveries: await listDeliveries(ctx.db, q) });
    },
  );

  const redriveBody = z.object({ endpointId: z.string().optional() });
  routes.route(
    {
      method: 'post',
      path: '/admin/webhooks/deliveries/redrive',
      summary:
        'Put dead webhook deliveries (of one endpoint, or all) back to pending; each is resent with its event id, in order',
      tag: 'admin',
      security: 'admin',
      body: redriveBody,
      responses: { 200: { description: 'redriven', schema: z.object({ redriven: z.number().int() }) } },
    },
    async (c) => {
      const input = await parseBody(c, redriveBody);
      const redriven = await redriveDeliveries(ctx.db, ctx.boss, input);
      ctx.log.info({ redriven, endpointId: input.endpointId }, 'admin: webhook deliveries redriven');
      return c.json({ redriven });
    },
  );

  const thresholdsPath = '/admin/organizations/{id}/alert-thresholds';
  routes.route(
    {
      method: 'post',
      path: thresholdsPath,
      summary:
        "Add a usage threshold: usage.threshold.crossed is sent when the organization's usage in its current billing period reaches the quantity",
      tag: 'admin',
      security: 'admin',
      body: thresholdBody,
      responses: { 201: { description: 'the threshold', schema: z.object({ threshold: thresholdView }) } },
    },
    async (c) => {
      const organizationId = organizationParam(c.req.param('id'));
      const input = await parseBody(c, thresholdBody);
      const threshold = await createThreshold(ctx.db, organizationId, input, ctx.clock.now());
      return c.json({ threshold }, 201);
    },
  );

  routes.route(
    {
      method: 'get',
      path: thresholdsPath,
      summary: "The organization's usage thresholds with their usage and state in the current period",
      tag: 'admin',
      security: 'admin',
      responses: {
        200: { description: 'thresholds', schema: z.object({ thresholds: z.array(thresholdView) }) },
      },
    },
    async (c) => {
      const organizationId = organizationParam(c.req.param('id'));
      return c.json({ thresholds: await listThresholds(ctx.db, organizationId, ctx.clock.now()) });
    },
  );

  routes.route(
    {
      method: 'delete',
      path: `${thresholdsPath}/{thresholdId}`,
      summary: 'Remove a usage threshold',
      tag: 'admin',
      security: 'admin',
      responses: { 200: { description: 'removed', schema: z.object({ removed: z.string() }) } },
    },
    async (c) => {
      const organizationId = organizationParam(c.req.param('id'));
      const thresholdId = c.req.param('thresholdId') ?? '';
      await removeThreshold(ctx.db, organizationId, thresholdId);
      return c.json({ removed: thresholdId });
    },
  );

  const billingAnchorPath = '/admin/organizations/{id}/billing-anchor';
  routes.route(
    {
      method: 'put',
      path: billingAnchorPath,
      summary:
        'Set (or, with null, clear) the billing anchor of an organization whose period Stripe does not give (Metronome bills it, or no subscription): its thresholds count in monthly periods from it instead of UTC months, and are re-counted into the period it gives now',
      tag: 'admin',
      security: 'admin',
      body: billingAnchorBody,
      responses: { 200: { description: 'the anchor and the period now', schema: billingAnchorView } },
    },
    async (c) => {
      const organizationId = organizationParam(c.req.param('id'));
      const { billingAnchorDate } = await parseBody(c, billingAnchorBody);
      const anchor = billingAnchorDate === null ? null : new Date(billingAnchorDate);
      const view = await setBillingAnchor(ctx.db, organizationId, anchor, ctx.clock.now());
      ctx.log.info(
        { organizationId, billingAnchorDate: view.billingAnchorDate },
        'admin: billing anchor set',
      );
      return c.json(view);
    },
  );
  routes.route(
    {
      method: 'get',
      path: billingAnchorPath,
      summary: "An organization's billing anchor (null: UTC months) and its threshold period now",
      tag: 'admin',
      security: 'admin',
      responses: { 200: { description: 'the anchor and the period now', schema: billingAnchorView } },
    },
    async (c) => {
      const organizationId = organizationParam(c.req.param('id'));
      return c.json(await billingAnchorOf(ctx.db, organizationId, ctx.clock.now()));
    },
  );

  const sensorSilencePath = '/admin/organizations/{id}/sensor-silence-alerts';
  const sensorSilenceView = z.object({
    organizationId: z.string(),
    enabled: z.boolean().describe('sensor.silent and sensor.resumed are sent for its active sensors'),
  });
  const sensorSilenceBody = z.object({
    enabled: z.boolean().describe('true: per-sensor silence alerts on for the organization; false: off'),
  });
  routes.route(
    {
      method: 'put',
      path: sensorSilencePath,
      summary:
        'Turn per-sensor silence alerts on or off for an organization (off by default: a large fleet would flood the endpoint)',
      tag: 'admin',
      security: 'admin',
      body: sensorSilenceBody,
      responses: { 200: { description: 'the setting', schema: sensorSilenceView } },
    },
    async (c) => {
      const organizationId = organizationParam(c.req.param('id'));
      const { enabled } = await parseBody(c, sensorSilenceBody);
      if (!(await setSensorSilenceAlerts(ctx.db, organizationId, enabled))) throw notFound('organization');
      ctx.log.info({ organizationId, enabled }, 'admin: sensor silence alerts set');
      return c.json({ organizationId, enabled });
    },
  );
  routes.route(
    {
      method: 'get',
      path: sensorSilencePath,
      summary: 'Whether per-sensor silence alerts are on for an organization',
      tag: 'admin',
      security: 'admin',
      responses: { 200: { description: 'the setting', schema: sensorSilenceView } },
    },
    async (c) => {
      const organizationId = organizationParam(c.req.param('id'));
      return c.json({ organizationId, enabled: await sensorSilenceAlertsOn(ctx.db, organizationId) });
    },
  );

  return routes;
}
