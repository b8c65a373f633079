// Stripe Billing's objects a period-boundary migration reads: metered prices, test clocks (create,
// retrieve, advance), subscriptions (create, retrieve with their items' current period, cancel at
// period end), invoices (list a subscription's, and the upcoming one through create_preview).
import { type BillingState, type Interval, nextPeriodEnd, type Subscription } from '../billing.js';
import { StripeApiError } from '../errors.js';
import { type FormObject, parseForm } from '../form.js';
import { type App, json, requireSecretKey } from '../http.js';
import type { Runtime } from '../runtime.js';

const missing = (what: string, id: string) =>
  new StripeApiError(404, 'invalid_request_error', `No such ${what}: '${id}'`, 'resource_missing', 'id');
const invalid = (message: string, param: string) =>
  new StripeApiError(400, 'invalid_request_error', message, 'parameter_invalid', param);

const str = (v: unknown) => (typeof v === 'string' && v !== '' ? v : undefined);
const int = (v: unknown, param: string): number | undefined => {
  if (v === undefined || v === '') return undefined;
  if (typeof v !== 'string' || !/^\d+$/.test(v)) throw invalid(`Invalid integer: ${String(v)}`, param);
  return Number(v);
};
const obj = (v: unknown): FormObject => (typeof v === 'object' && v !== null ? (v as FormObject) : {});

function list<T>(data: T[], url: string) {
  return { object: 'list' as const, data, has_more: false, url };
}

export function registerBillingRoutes(app: App, rt: Runtime, billing: BillingState): void {
  app.post('/v1/prices', async (c) => {
    const auth = requireSecretKey(c);
    const form = parseForm(await c.req.text());
    const recurring = obj(form.recurring);
    const meter = str(recurring.meter);
    if (!meter || !rt.state.meters.has(meter))
      throw invalid('recurring[meter] must name a meter', 'recurring[meter]');
    const interval = (str(recurring.interval) ?? 'month') as Interval;
    if (!['day', 'week', 'month', 'year'].includes(interval))
      throw invalid('recurring[interval] must be day, week, month or year', 'recurring[interval]');
    const unitAmount = int(form.unit_amount, 'unit_amount') ?? 0;
    const price = {
      id: billing.nextId('price'),
      object: 'price' as const,
      active: true,
      currency: str(form.currency) ?? 'usd',
      unit_amount: unitAmount,
      unit_amount_decimal: String(unitAmount),
      product: str(form.product) ?? str(obj(form.product_data).name) ?? 'metered usage',
      recurring: {
        interval,
        interval_count: int(recurring.interval_count, 'recurring[interval_count]') ?? 1,
        usage_type: 'metered' as const,
        meter,
      },
      type: 'recurring' as const,
      created: Math.floor(rt.clock() / 1000),
      livemode: auth.livemode,
    };
    billing.prices.set(price.id, price);
    return json(c, 200, price);
  });

  app.post('/v1/test_helpers/test_clocks', async (c) => {
    requireSecretKey(c);
    const form = parseForm(await c.req.text());
    const frozen = int(form.frozen_time, 'frozen_time');
    if (frozen === undefined) throw invalid('Missing required param: frozen_time.', 'frozen_time');
    const tc = {
      id: billing.nextId('clock'),
      object: 'test_helpers.test_clock' as const,
      name: str(form.name) ?? null,
      frozen_time: frozen,
      created: Math.floor(rt.clock() / 1000),
      status: 'ready' as const,
      livemode: false as const,
    };
    billing.testClocks.set(tc.id, tc);
    return json(c, 200, tc);
  });

  app.get('/v1/test_helpers/test_clocks/:id', (c) => {
    requireSecretKey(c);
    const tc = billing.testClocks.get(c.req.param('id'));
    if (!tc) throw missing('test_clock', c.req.param('id'));
    return json(c, 200, tc);
  });

  app.post('/v1/test_helpers/test_clocks/:id/advance', async (c) => {
    requireSecretKey(c);
    const tc = billing.testClocks.get(c.req.param('id'));
    if (!tc) throw missing('test_clock', c.req.param('id'));
    const form = parseForm(await c.req.text());
    const to = int(form.frozen_time, 'frozen_time');
    if (to === undefined) throw invalid('Missing required param: frozen_time.', 'frozen_time');
    // Stripe: a test clock only moves forward.
    if (to <= tc.frozen_time)
      throw invalid(
        'The frozen_time must be after the current frozen_time of the test clock.',
        'frozen_time',
      );
    tc.frozen_time = to;
    for (const cu of rt.state.customers.values()) if (cu.test_clock === tc.id) billing.rollCustomer(cu.id);
    return json(c, 200, tc);
  });

  app.post('/v1/subscriptions', async (c) => {
    const auth = requireSecretKey(c);
    const form = parseForm(await c.req.text());
    const customer = str(form.customer);
    if (!customer || !rt.state.customers.has(customer)) throw missing('customer', String(customer));
    const items = Object.values(obj(form.items)).map((i) => str(obj(i).price));
    if (items.length === 0) throw invalid('Missing required param: items.', 'items');
    const prices = items.map((id) => {
      const p = id ? billing.prices.get(id) : undefined;
      if (!p) throw missing('price', String(id));
      return p;
    });
    const now = billing.nowFor(customer);
    const anchor = int(form.billing_cycle_anchor, 'billing_cycle_anchor') ?? now;
    if (anchor < now) throw invalid('billing_cycle_anchor cannot be in the past', 'billing_cycle_anchor');
    const first = prices[0]!.recurring;
    const end = anchor > now ? anchor : nextPeriodEnd(anchor, now, first.interval, first.interval_count);
    const id = billing.nextId('sub');
    const sub: Subscription = {
      id,
      object: 'subscription',
      customer,
      status: 'active',
      billing_cycle_anchor: anchor,
      start_date: now,
      created: now,
      cancel_at_period_end: false,
      canceled_at: null,
      test_clock: rt.state.customers.get(customer)?.test_clock ?? null,
      items: list(
        prices.map((price) => ({
          id: billing.nextId('si'),
          object: 'subscription_item' as const,
          price,
          subscription: id,
          current_period_start: now,
          current_period_end: end,
          created: now,
        })),
        `/v1/subscription_items?subscription=${id}`,
      ) as Subscription['items'],
      livemode: auth.livemode,
    };
    billing.subscriptions.set(id, sub);
    return json(c, 200, sub);
  });

  app.get('/v1/subscriptions/:id', (c) => {
    requireSecretKey(c);
    const sub = billing.subscriptions.get(c.req.param('id'));
    if (!sub) throw missing('subscription', c.req.param('id'));
    billing.roll(sub);
    return json(c, 200, sub);
  });

  app.post('/v1/subscriptions/:id', async (c) => {
    requireSecretKey(c);
    const sub = billing.subscriptions.get(c.req.param('id'));
    if (!sub) throw missing('subscription', c.req.param('id'));
    const form = parseForm(await c.req.text());
    if (form.cancel_at_period_end !== undefined)
      sub.cancel_at_period_end = form.cancel_at_period_end === 'true';
    billing.roll(sub);
    return json(c, 200, sub);
  });

  app.get('/v1/invoices', (c) => {
    requireSecretKey(c);
    const q = parseForm(new URL(c.req.url).search.slice(1));
    const subscription = str(q.subscription);
    const customer = str(q.customer);
    const status = str(q.status);
    billing.rollAll();
    const data = [...billing.invoices.values()]
      .filter(
        (i) =>
          (!subscription || i.subscription === subscription) &&
          (!customer || i.customer === customer) &&
          (!status || i.status === status),
      )
      // Stripe lists the newest first.
      .sort((a, b) => b.created - a.created);
    return json(c, 200, list(data, '/v1/invoices'));
  });

  app.post('/v1/invoices/create_preview', async (c) => {
    requireSecretKey(c);
    const form = parseForm(await c.req.text());
    const id = str(form.subscription);
    const sub = id ? billing.subscriptions.get(id) : undefined;
    if (!sub) throw missing('subscription', String(id));
    billing.roll(sub);
    const item = sub.items.data[0];
    if (sub.status !== 'active' || !item)
      throw new StripeApiError(
        400,
        'invalid_request_error',
        'No upcoming invoices for customer',
        'invoice_upcoming_none',
      );
    // The next invoice bills the current period's usage so far.
    return json(
      c,
      200,
      billing.invoiceFor(sub, item.current_period_start, item.current_period_end, 'upcoming'),
    );
  });
}
