// POST /v1/billing/meter_event_adjustments: a cancel by identifier (the rules are in
// ../adjustments.ts), under the v1 account-wide rate and idempotency keys.
import { cancelMeterEvent } from '../adjustments.js';
import { StripeApiError } from '../errors.js';
import { replay } from '../fault-answers.js';
import { parseForm } from '../form.js';
import { type App, connectedAccount, json, requireSecretKey } from '../http.js';
import type { SavedResponse } from '../idempotency.js';
import type { Runtime } from '../runtime.js';

export function registerAdjustmentRoutes(app: App, rt: Runtime): void {
  app.post('/v1/billing/meter_event_adjustments', async (c) => {
    const auth = requireSecretKey(c);
    const account = connectedAccount(c);
    if (account ? !rt.accountLimiter(account).take(rt.clock()) : !rt.limiter.take(rt.clock())) {
      return json(c, 429, new StripeApiError(429, 'rate_limit', 'Too many requests').body());
    }
    const raw = await c.req.text();
    const idem = rt.idempotency.begin(
      auth.key,
      c.req.header('idempotency-key'),
      'POST /v1/billing/meter_event_adjustments',
      raw,
      rt.clock(),
    );
    if (idem.kind === 'replay') return replay(rt, c, idem.answer);
    try {
      const result = cancelMeterEvent(rt.state, parseForm(raw), rt.clock(), account);
      const response: SavedResponse = result.ok
        ? { status: 200, body: { ...result.body, livemode: auth.livemode }, headers: {} }
        : { status: result.error.status, body: result.error.body(), headers: {} };
      if (result.ok) rt.changed();
      // As Stripe: a request refused in parameter validation saves nothing under its key.
      const validationError = !result.ok && result.error.code === 'parameter_missing';
      if (idem.kind === 'new' && !validationError) idem.save(response);
      return json(c, response.status, response.body);
    } finally {
      if (idem.kind === 'new') idem.release();
    }
  });
}
