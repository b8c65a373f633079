// Webhook endpoints as Stripe serves them: create (the signing secret is in that answer only),
// list, retrieve, delete; and v2 event destinations (thin events such as the meter error reports):
// create (the signing secret only when asked with include), list, delete.
import { StripeApiError } from '../errors.js';
import { parseForm } from '../form.js';
import { type App, json, requirePermission } from '../http.js';
import type { Runtime } from '../runtime.js';
import { type EventDestination, stripeId, type WebhookEndpoint } from '../state.js';
import { WEBHOOK_API_VERSION } from '../webhooks.js';
import { paginate } from './meters.js';

const withoutSecret = ({ secret: _secret, ...rest }: WebhookEndpoint) => rest;

export function registerWebhookEndpointRoutes(app: App, rt: Runtime): void {
  const find = (id: string): WebhookEndpoint => {
    const endpoint = rt.state.webhookEndpoints.get(id);
    if (!endpoint) {
      throw new StripeApiError(
        404,
        'invalid_request_error',
        `No such webhook endpoint: '${id}'`,
        'resource_missing',
        'id',
      );
    }
    return endpoint;
  };

  app.post('/v1/webhook_endpoints', async (c) => {
    const auth = requirePermission(c, rt.restrictedKeys, 'rak_webhook_write');
    const form = parseForm(await c.req.text());
    const url = typeof form.url === 'string' ? form.url : '';
    if (!url) {
      throw new StripeApiError(
        400,
        'invalid_request_error',
        'Missing required param: url.',
        'parameter_missing',
        'url',
      );
    }
    try {
      new URL(url);
    } catch {
      throw new StripeApiError(
        400,
        'invalid_request_error',
        'Invalid URL: must be an absolute URL.',
        'url_invalid',
        'url',
      );
    }
    const events = typeof form.enabled_events === 'object' ? Object.values(form.enabled_events) : [];
    const enabled = events.filter((e): e is string => typeof e === 'string' && e !== '');
    if (enabled.length === 0) {
      throw new StripeApiError(
        400,
        'invalid_request_error',
        'Missing required param: enabled_events.',
        'parameter_missing',
        'enabled_events',
      );
    }
    // Thin events (v1.billing.meter.…) are for event destinations; Stripe refuses them here.
    const thin = enabled.find((e) => /^v\d+\./.test(e));
    if (thin) {
      throw new StripeApiError(
        400,
        'invalid_request_error',
        `Invalid enabled_events: ${thin} is a thin event; subscribe an event destination to it (POST /v2/core/event_destinations).`,
        'parameter_invalid',
        'enabled_events',
      );
    }
    const endpoint: WebhookEndpoint = {
      id: stripeId('we', 24),
      object: 'webhook_endpoint',
      application: null,
      url,
      enabled_events: enabled,
      secret: stripeId('whsec', 32),
      status: 'enabled',
      description: typeof form.description === 'string' ? form.description : null,
      metadata: {},
      api_version: typeof form.api_version === 'string' ? form.api_version : WEBHOOK_API_VERSION,
      created: Math.floor(rt.clock() / 1000),
      livemode: auth.livemode,
    };
    rt.state.webhookEndpoints.set(endpoint.id, endpoint);
    rt.changed();
    rt.log('info', 'webhook endpoint created', { id: endpoint.id, url });
    return json(c, 200, endpoint);
  });

  app.get('/v1/webhook_endpoints', (c) => {
    requirePermission(c, rt.restrictedKeys, 'rak_webhook_read');
    const query = parseForm(new URL(c.req.url).search.slice(1));
    const page = paginate([...rt.state.webhookEndpoints.values()], query);
    return json(c, 200, {
      object: 'list',
      data: page.data.map(withoutSecret),
      has_more: page.has_more,
      url: '/v1/webhook_endpoints',
    });
  });

  app.get('/v1/webhook_endpoints/:id', (c) => {
    requirePermission(c, rt.restrictedKeys, 'rak_webhook_read');
    return json(c, 200, withoutSecret(find(c.req.param('id'))));
  });

  app.delete('/v1/webhook_endpoints/:id', (c) => {
    requirePermission(c, rt.restrictedKeys, 'rak_webhook_write');
    const endpoint = find(c.req.param('id'));
    rt.state.webhookEndpoints.delete(endpoint.id);
    rt.changed();
    return json(c, 200, { id: endpoint.id, object: 'webhook_endpoint', deleted: true });
  });
}

const v2Error = (status: 400 | 404, message: string, code: string) =>
  new StripeApiError(status, 'invalid_request_error', message, code);

export function registerEventDestinationRoutes(app: App, rt: Runtime): void {
  const view = (d: EventDestination, include: readonly string[]) => ({
    id: d.id,
    object: d.object,
    name: d.name,
    type: d.type,
    event_payload: d.event_payload,
    enabled_events: d.enabled_events,
    status: d.status,
    created: d.created,
    livemode: d.livemode,
    webhook_endpoint: {
      ...(include.includes('webhook_endpoint.url') ? { url: d.url } : {}),
      ...(include.includes('webhook_endpoint.signing_secret') ? { signing_secret: d.signing_secret } : {}),
    },
  });

  app.post('/v2/core/event_destinations', async (c) => {
    const auth = requirePermission(c, rt.restrictedKeys, 'rak_webhook_write');
    let body: Record<string, unknown>;
    try {
      body = JSON.parse(await c.req.text()) as Record<string, unknown>;
    } catch {
      throw v2Error(400, 'The request body is not valid JSON.', 'invalid_fields');
    }
    const endpoint = body.webhook_endpoint as { url?: unknown } | undefined;
    const events = Array.isArray(body.enabled_events)
      ? body.enabled_events.filter((e): e is string => typeof e === 'string')
      : [];
    if (body.type !== 'webhook_endpoint' || typeof endpoint?.url !== 'string' || events.length === 0) {
      throw v2Error(
        400,
        'type webhook_endpoint, webhook_endpoint.url and enabled_events are required.',
        'invalid_fields',
      );
    }
    if (body.event_payload !== 'thin' && body.event_payload !== 'snapshot') {
      throw v2Error(400, 'event_payload must be thin or snapshot.', 'invalid_fields');
    }
    const destination: EventDestination = {
      id: stripeId('ed', 24),
      object: 'v2.core.event_destination',
      name: typeof body.name === 'string' ? body.name : 'destination',
      type: 'webhook_endpoint',
      event_payload: body.event_payload,
      enabled_events: events,
      status: 'enabled',
      url: endpoint.url,
      signing_secret: stripeId('whsec', 32),
      created: new Date(rt.clock()).toISOString(),
      livemode: auth.livemode,
    };
    rt.state.eventDestinations.set(destination.id, destination);
    rt.changed();
    const include = Array.isArray(body.include)
      ? body.include.filter((i): i is string => typeof i === 'string')
      : [];
    return json(c, 200, view(destination, include));
  });

  app.get('/v2/core/event_destinations', (c) => {
    requirePermission(c, rt.restrictedKeys, 'rak_webhook_read');
    const url = new URL(c.req.url);
    // However the client encodes the list (include, include[], include[0]…).
    const include = [...url.searchParams.entries()]
      .filter(([k]) => k.startsWith('include'))
      .map(([, v]) => v);
    return json(c, 200, {
      data: [...rt.state.eventDestinations.values()].map((d) => view(d, include)),
      next_page_url: null,
      previous_page_url: null,
    });
  });

  app.delete('/v2/core/event_destinations/:id', (c) => {
    requirePermission(c, rt.restrictedKeys, 'rak_webhook_write');
    const id = c.req.param('id');
    if (!rt.state.eventDestinations.delete(id))
      throw v2Error(404, `No such event destination: '${id}'`, 'resource_missing');
    rt.changed();
    return json(c, 200, { id, object: 'v2.core.event_destination', deleted: true });
  });
}
