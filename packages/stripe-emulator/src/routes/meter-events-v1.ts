// POST /v1/billing/meter_events: Stripe's synchronous meter event, with its rules (identifier
// dedupe, timestamp window, customer mapping), its account-wide rate, one concurrent call per
// customer and meter, idempotency keys and the injected faults.
import { internalError, rateLimited } from '../errors.js';
import { postFault, preFault, replay } from '../fault-answers.js';
import { parseForm } from '../form.js';
import { type App, type Auth, connectedAccount, fail, requireSecretKey } from '../http.js';
import type { SavedResponse } from '../idempotency.js';
import { checkMeterEvent, type RawMeterEvent } from '../rules.js';
import type { Runtime } from '../runtime.js';

export function registerMeterEventRoutes(app: App, rt: Runtime): void {
  app.post('/v1/billing/meter_events', async (c) => {
    rt.state.counters.calls += 1;
    let auth: Auth;
    try {
      auth = requireSecretKey(c);
    } catch (err) {
      rt.state.counters.unauthorized += 1;
      throw err;
    }
    // On a connected account meter events count toward that account's basic limit (100/s live,
    // 25/s in a sandbox), not the platform's meter-event limit.
    const account = connectedAccount(c);
    if (account ? !rt.accountLimiter(account).take(rt.clock()) : !rt.limiter.take(rt.clock())) {
      rt.state.counters.rateLimited += 1;
      return fail(c, rateLimited(account ? 'global-rate' : 'endpoint-rate'));
    }
    const raw = await c.req.text();
    const form = parseForm(raw);
    const idem = rt.idempotency.begin(
      auth.key,
      c.req.header('idempotency-key'),
      'POST /v1/billing/meter_events',
      raw,
      rt.clock(),
    );
    if (idem.kind === 'replay') return replay(rt, c, idem.answer);
    if (typeof form.identifier === 'string') rt.state.countAttempt(form.identifier);
    const save = (r: SavedResponse) => (idem.kind === 'new' ? idem.save(r) : undefined);
    const customer = typeof form.payload === 'object' ? form.payload.stripe_customer_id : undefined;
    const eventName = form.event_name;
    const slot =
      typeof customer === 'string' && typeof eventName === 'string' ? { customer, eventName } : undefined;
    if (slot && !rt.state.tryEnter(slot.customer, slot.eventName, rt.concurrencyLimit)) {
      if (idem.kind === 'new') idem.release();
      rt.state.counters.rateLimited += 1;
      return fail(
        c,
        rateLimited(
          'resource-specific',
          `Only ${rt.concurrencyLimit} concurrent meter event request per customer and meter is allowed (customer ${slot.customer}, event_name ${slot.eventName}). Retry after the previous request completes.`,
        ),
      );
    }
    try {
      if (slot && rt.faults.current.failCustomers.includes(slot.customer)) {
        if (idem.kind === 'new') idem.release();
        rt.state.counters.serverError += 1;
        return fail(c, internalError());
      }
      const decision = rt.faults.decide(typeof customer === 'string' ? [customer] : []);
      const early = await preFault(rt, c, decision);
      if (early) return early;
      const result = checkMeterEvent(form as RawMeterEvent, {
        state: rt.state,
        now: rt.clock(),
        via: 'v1',
        strictCustomers: rt.strictCustomers,
        account,
      });
      if (!result.ok && result.asynchronous) {
        // Stripe answers 200 and rejects the event in an error report later (no usage recorded).
        const rejected = {
          code: result.error.code ?? 'invalid',
          message: result.error.message,
          identifier: typeof form.identifier === 'string' ? form.identifier : null,
          event_name: typeof eventName === 'string' ? eventName : null,
        };
        rt.state.counters.accepted += 1;
        rt.state.asyncErrors.push({ ...rejected, receivedAt: rt.clock() });
        rt.errorReports.reject(rejected);
        const timestamp =
          typeof form.timestamp === 'string' ? Number(form.timestamp) : Math.floor(rt.clock() / 1000);
        const body = {
          object: 'billing.meter_event',
          created: Math.floor(rt.clock() / 1000),
          event_name: eventName,
          identifier: rejected.identifier,
          livemode: auth.livemode,
          payload: form.payload,
          timestamp,
        };
        return postFault(rt, c, decision, { status: 200, body, headers: {} }, save);
      }
      if (!result.ok) {
        rt.faults.unstruck(decision);
        if (result.error.message.startsWith('An event already exists')) rt.state.counters.duplicate += 1;
        else rt.state.counters.rejected += 1;
        return fail(c, result.error);
      }
      rt.state.record(result.event);
      rt.state.counters.accepted += 1;
      rt.changed();
      rt.log('debug', 'meter event accepted', {
        identifier: result.event.identifier,
        via: 'v1',
        ...(account ? { account } : {}),
      });
      const e = result.event;
      const body = {
        object: 'billing.meter_event',
        created: Math.floor(e.receivedAt / 1000),
        event_name: e.event_name,
        identifier: e.identifier,
        livemode: auth.livemode,
        payload: e.payload,
        timestamp: e.timestamp,
      };
      return postFault(rt, c, decision, { status: 200, body, headers: {} }, save);
    } finally {
      if (idem.kind === 'new') idem.release();
      if (slot) rt.state.leave(slot.customer, slot.eventName);
    }
  });
}
