// Customers, the Stripe resource meterbox reads besides meters (routes/meters.ts) and meter events.
import { StripeApiError } from '../errors.js';
import { replay } from '../fault-answers.js';
import { parseForm } from '../form.js';
import { type App, connectedAccount, json, requirePermission } from '../http.js';
import type { Runtime } from '../runtime.js';

export function registerResourceRoutes(app: App, rt: Runtime): void {
  app.post('/v1/customers', async (c) => {
    const auth = requirePermission(c, rt.restrictedKeys, 'rak_customer_write');
    const account = connectedAccount(c);
    const raw = await c.req.text();
    const idem = rt.idempotency.begin(
      auth.key,
      c.req.header('idempotency-key'),
      'POST /v1/customers',
      raw,
      rt.clock(),
    );
    if (idem.kind === 'replay') return replay(rt, c, idem.answer);
    const form = parseForm(raw);
    const str = (v: unknown) => (typeof v === 'string' && v !== '' ? v : undefined);
    const metadata: Record<string, string> = {};
    if (typeof form.metadata === 'object') {
      for (const [k, v] of Object.entries(form.metadata)) if (typeof v === 'string') metadata[k] = v;
    }
    const customer = rt.createCustomer(
      {
        email: str(form.email),
        name: str(form.name),
        description: str(form.description),
        metadata,
        ...(account ? { account } : {}),
      },
      auth.livemode,
    );
    // A customer created on a test clock: its subscriptions' periods follow that clock (routes/billing.ts).
    const testClock = str(form.test_clock);
    if (testClock) {
      customer.test_clock = testClock;
      rt.changed();
    }
    if (idem.kind === 'new') idem.save({ status: 200, body: customer, headers: {} });
    return json(c, 200, customer);
  });

  app.get('/v1/customers/:id', (c) => {
    requirePermission(c, rt.restrictedKeys, 'rak_customer_read');
    const id = c.req.param('id');
    const customer = rt.state.customers.get(id);
    // A customer is seen only through its own account (Stripe-Account).
    if (!customer || rt.state.accountOfCustomer(id) !== connectedAccount(c)) {
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
