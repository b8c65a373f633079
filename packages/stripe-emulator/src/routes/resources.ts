// The Stripe resources meterbox reads besides meter events: billing meters, their event summaries
// (what Stripe's totals say), and customers.
import { StripeApiError } from '../errors.js';
import { replay } from '../fault-answers.js';
import { parseForm } from '../form.js';
import { type App, json, requireSecretKey } from '../http.js';
import type { Runtime } from '../runtime.js';
import type { MeterDefinition } from '../state.js';
import { summarize } from '../summaries.js';

const meterObject = (m: MeterDefinition, livemode: boolean) => ({
  id: m.id,
  object: 'billing.meter',
  created: 1_700_000_000,
  customer_mapping: { event_payload_key: 'stripe_customer_id', type: 'by_id' },
  default_aggregation: { formula: m.formula },
  display_name: m.display_name,
  event_name: m.event_name,
  event_time_window: null,
  livemode,
  status: 'active',
  status_transitions: { deactivated_at: null },
  updated: 1_700_000_000,
  value_settings: { event_payload_key: 'value' },
});

export function registerResourceRoutes(app: App, rt: Runtime): void {
  const findMeter = (id: string) => {
    const meter = rt.state.meters.get(id);
    if (!meter) {
      throw new StripeApiError(
        404,
        'invalid_request_error',
        `No such billing meter: '${id}'`,
        'resource_missing',
        'id',
      );
    }
    return meter;
  };

  app.get('/v1/billing/meters', (c) => {
    const auth = requireSecretKey(c);
    return json(c, 200, {
      object: 'list',
      data: [...rt.state.meters.values()].map((m) => meterObject(m, auth.livemode)),
      has_more: false,
      url: '/v1/billing/meters',
    });
  });

  app.get('/v1/billing/meters/:id', (c) => {
    const auth = requireSecretKey(c);
    return json(c, 200, meterObject(findMeter(c.req.param('id')), auth.livemode));
  });

  app.get('/v1/billing/meters/:id/event_summaries', (c) => {
    const auth = requireSecretKey(c);
    const meter = findMeter(c.req.param('id'));
    const query = parseForm(new URL(c.req.url).search.slice(1));
    const page = summarize(rt.state.events, meter, query, auth.livemode);
    return json(c, 200, { ...page, url: `/v1/billing/meters/${meter.id}/event_summaries` });
  });

  app.post('/v1/customers', async (c) => {
    const auth = requireSecretKey(c);
    const raw = await c.req.text();
    const idem = rt.idempotency.begin(
      auth.key,
      c.req.header('idempotency-key'),
      'POST /v1/customers',
      raw,
      rt.clock(),
    );
    if (idem.kind === 'replay') return replay(rt, c, idem.response);
    const form = parseForm(raw);
    const str = (v: unknown) => (typeof v === 'string' && v !== '' ? v : undefined);
    const metadata: Record<string, string> = {};
    if (typeof form.metadata === 'object') {
      for (const [k, v] of Object.entries(form.metadata)) if (typeof v === 'string') metadata[k] = v;
    }
    const customer = rt.createCustomer(
      { email: str(form.email), name: str(form.name), description: str(form.description), metadata },
      auth.livemode,
    );
    if (idem.kind === 'new') idem.save({ status: 200, body: customer, headers: {} });
    return json(c, 200, customer);
  });

  app.get('/v1/customers/:id', (c) => {
    requireSecretKey(c);
    const id = c.req.param('id');
    const customer = rt.state.customers.get(id);
    if (!customer) {
      throw new StripeApiError(
        404,
        'invalid_request_error',
        `No such customer: '${id}'`,
        'resource_missing',
        'id',
      );
    }
    return json(c, 200, customer);
  });
}
