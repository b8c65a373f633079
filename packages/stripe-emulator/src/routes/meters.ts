// Billing meters as Stripe serves them: create, list (status filter, cursor pagination), retrieve,
// deactivate, reactivate, and each meter's event summaries (what Stripe's totals say). Meters are an
// account's own (Stripe-Account: a connected account's). One active meter per event name and account; a deactivated meter keeps its event name, and events sent to it are
// accepted and then reported as `archived_meter`.
import { StripeApiError } from '../errors.js';
import { replay } from '../fault-answers.js';
import { type FormObject, parseForm } from '../form.js';
import { type App, connectedAccount, json, requirePermission } from '../http.js';
import type { Runtime } from '../runtime.js';
import { type Formula, type Meter, stripeId } from '../state.js';
import { summarize } from '../summaries.js';

const FORMULAS: readonly Formula[] = ['sum', 'last', 'count'];

export const meterObject = (m: Meter, livemode: boolean) => ({
  id: m.id,
  object: 'billing.meter',
  created: m.created,
  customer_mapping: { event_payload_key: m.customer_payload_key, type: 'by_id' },
  default_aggregation: { formula: m.formula },
  display_name: m.display_name,
  event_name: m.event_name,
  event_time_window: null,
  livemode,
  status: m.status,
  status_transitions: { deactivated_at: m.deactivated_at },
  updated: m.updated,
  value_settings: { event_payload_key: m.value_payload_key },
});

const invalid = (message: string, param: string, code = 'parameter_invalid') =>
  new StripeApiError(400, 'invalid_request_error', message, code, param);

const text = (form: FormObject, name: string): string | undefined => {
  const v = form[name];
  return typeof v === 'string' && v !== '' ? v : undefined;
};
const nested = (form: FormObject, name: string, key: string): string | undefined => {
  const v = form[name];
  return typeof v === 'object' ? text(v, key) : undefined;
};

/** Stripe's list parameters: limit 1-100 (default 10), starting_after / ending_before an id of the list. */
export function paginate<T extends { id: string }>(
  all: readonly T[],
  query: FormObject,
): { data: T[]; has_more: boolean } {
  const rawLimit = text(query, 'limit');
  const limit = rawLimit === undefined ? 10 : Number(rawLimit);
  if (!Number.isInteger(limit) || limit < 1 || limit > 100) {
    throw invalid('This value must be between 1 and 100 (it currently is out of range).', 'limit');
  }
  const after = text(query, 'starting_after');
  const before = text(query, 'ending_before');
  const indexOf = (id: string, param: string) => {
    const at = all.findIndex((item) => item.id === id);
    if (at === -1) throw invalid(`No such object: '${id}'`, param, 'resource_missing');
    return at;
  };
  if (before !== undefined) {
    const end = indexOf(before, 'ending_before');
    const start = Math.max(0, end - limit);
    return { data: all.slice(start, end), has_more: start > 0 };
  }
  const start = after === undefined ? 0 : indexOf(after, 'starting_after') + 1;
  return { data: all.slice(start, start + limit), has_more: start + limit < all.length };
}

export function registerMeterRoutes(app: App, rt: Runtime): void {
  // Meters are an account's own (the Stripe-Account header names a connected account's): another
  // account's meter does not exist here.
  const findMeter = (id: string, account: string | undefined): Meter => {
    const meter = rt.state.meters.get(id);
    if (!meter || !rt.state.meterOnAccount(meter, account)) {
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
  const nowSeconds = () => Math.floor(rt.clock() / 1000);
  const activeWithName = (eventName: string, account: string | undefined, except?: string) =>
    rt.state
      .metersOf(account)
      .find((m) => m.event_name === eventName && m.status === 'active' && m.id !== except);

  app.post('/v1/billing/meters', async (c) => {
    const auth = requirePermission(c, rt.restrictedKeys, 'rak_billing_meter_write');
    const raw = await c.req.text();
    const idem = rt.idempotency.begin(
      auth.key,
      c.req.header('idempotency-key'),
      'POST /v1/billing/meters',
      raw,
      rt.clock(),
    );
    if (idem.kind === 'replay') return replay(rt, c, idem.answer);
    try {
      const form = parseForm(raw);
      const account = connectedAccount(c);
      const displayName = text(form, 'display_name');
      if (!displayName)
        throw invalid('Missing required param: display_name.', 'display_name', 'parameter_missing');
      const eventName = text(form, 'event_name');
      if (!eventName) throw invalid('Missing required param: event_name.', 'event_name', 'parameter_missing');
      if (eventName.length > 100) throw invalid('event_name must be at most 100 characters.', 'event_name');
      const formula = nested(form, 'default_aggregation', 'formula');
      if (!formula) {
        throw invalid(
          'Missing required param: default_aggregation[formula].',
          'default_aggregation[formula]',
          'parameter_missing',
        );
      }
      const known = FORMULAS.find((f) => f === formula);
      if (!known) {
        throw invalid(
          `Invalid default_aggregation[formula]: must be one of ${FORMULAS.join(', ')}`,
          'default_aggregation[formula]',
        );
      }
      const mappingType = nested(form, 'customer_mapping', 'type');
      if (mappingType !== undefined && mappingType !== 'by_id') {
        throw invalid('Invalid customer_mapping[type]: must be by_id', 'customer_mapping[type]');
      }
      if (activeWithName(eventName, account)) {
        throw invalid(
          `An active meter with event_name '${eventName}' already exists.`,
          'event_name',
          'resource_already_exists',
        );
      }
      const now = nowSeconds();
      const meter: Meter = {
        id: stripeId('mtr', 24),
        event_name: eventName,
        display_name: displayName,
        formula: known,
        customer_payload_key: nested(form, 'customer_mapping', 'event_payload_key') ?? 'stripe_customer_id',
        value_payload_key: nested(form, 'value_settings', 'event_payload_key') ?? 'value',
        status: 'active',
        created: now,
        updated: now,
        deactivated_at: null,
        ...(account ? { account } : {}),
      };
      rt.state.meters.set(meter.id, meter);
      rt.changed();
      rt.log('info', 'meter created', { id: meter.id, event_name: eventName });
      const body = meterObject(meter, auth.livemode);
      if (idem.kind === 'new') idem.save({ status: 200, body, headers: {} });
      return json(c, 200, body);
    } finally {
      if (idem.kind === 'new') idem.release();
    }
  });

  app.get('/v1/billing/meters', (c) => {
    const auth = requirePermission(c, rt.restrictedKeys, 'rak_billing_meter_read');
    const query = parseForm(new URL(c.req.url).search.slice(1));
    const status = text(query, 'status');
    if (status !== undefined && status !== 'active' && status !== 'inactive') {
      throw invalid('Invalid status: must be one of active or inactive', 'status');
    }
    // In creation order (the default meters keep their order).
    const all = rt.state
      .metersOf(connectedAccount(c))
      .filter((m) => status === undefined || m.status === status);
    const page = paginate(all, query);
    return json(c, 200, {
      object: 'list',
      data: page.data.map((m) => meterObject(m, auth.livemode)),
      has_more: page.has_more,
      url: '/v1/billing/meters',
    });
  });

  app.get('/v1/billing/meters/:id', (c) => {
    const auth = requirePermission(c, rt.restrictedKeys, 'rak_billing_meter_read');
    return json(c, 200, meterObject(findMeter(c.req.param('id'), connectedAccount(c)), auth.livemode));
  });

  app.post('/v1/billing/meters/:id/deactivate', (c) => {
    const auth = requirePermission(c, rt.restrictedKeys, 'rak_billing_meter_write');
    const meter = findMeter(c.req.param('id'), connectedAccount(c));
    if (meter.status === 'active') {
      meter.status = 'inactive';
      meter.updated = nowSeconds();
      meter.deactivated_at = meter.updated;
      rt.changed();
      rt.log('info', 'meter deactivated', { id: meter.id, event_name: meter.event_name });
    }
    return json(c, 200, meterObject(meter, auth.livemode));
  });

  app.post('/v1/billing/meters/:id/reactivate', (c) => {
    const auth = requirePermission(c, rt.restrictedKeys, 'rak_billing_meter_write');
    const account = connectedAccount(c);
    const meter = findMeter(c.req.param('id'), account);
    if (meter.status === 'inactive') {
      if (activeWithName(meter.event_name, account, meter.id)) {
        throw invalid(
          `An active meter with event_name '${meter.event_name}' already exists.`,
          'event_name',
          'resource_already_exists',
        );
      }
      meter.status = 'active';
      meter.updated = nowSeconds();
      meter.deactivated_at = null;
      rt.changed();
      rt.log('info', 'meter reactivated', { id: meter.id, event_name: meter.event_name });
    }
    return json(c, 200, meterObject(meter, auth.livemode));
  });

  app.get('/v1/billing/meters/:id/event_summaries', (c) => {
    const auth = requirePermission(c, rt.restrictedKeys, 'rak_billing_meter_read');
    // Summaries are an account's own: a connected account's (Stripe-Account) or the platform's events.
    const account = connectedAccount(c);
    const meter = findMeter(c.req.param('id'), account);
    const query = parseForm(new URL(c.req.url).search.slice(1));
    const events = rt.state.events.filter((e) => e.account === account);
    const page = summarize(events, meter, query, auth.livemode);
    return json(c, 200, { ...page, url: `/v1/billing/meters/${meter.id}/event_summaries` });
  });
}
